"""The memory kernels' per-arch choices, on the CPU with each target arch supplied (as
tests/test_design_choice.py does for the linear kernels' tiles): which configs the Gram and
task-score autotuners keep on sm_80/86/89/90 (each arch's shared memory through
:class:`._kernel_utils.target_arch`), and how the Gram kernel splits its rows over the SMs of the
GPU each arch stands for. Under the interpreter the kernels have one config and never split, so
without these a wrong limit or a dropped config would show only at a launch on that GPU."""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
import triton

from duallora_kernels.ops import _kernel_utils
from duallora_kernels.ops._kernel_utils import AUTOTUNE_ENV, ARCHS, smem_limit, target_arch

# The kernel modules share the public functions' names; reach them through sys.modules.
fused_gram = importlib.import_module("duallora_kernels.ops.fused_gram")
fused_scores = importlib.import_module("duallora_kernels.ops.fused_scores")

#: SMs of the GPU each target arch stands for (data sheets): A100, RTX 3090, RTX 4090, H100 SXM.
SMS = {80: 108, 86: 82, 89: 128, 90: 132}
KB = 1024


@pytest.fixture
def gpu_configs(monkeypatch):
    """The config lists a GPU gets (the interpreter's is one small config), autotuning every kept one."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read when the lists are built (each _configs() call)
    monkeypatch.delenv(AUTOTUNE_ENV, raising=False)
    return lambda module: module._configs()


def _gram_shapes(configs: list[triton.Config]) -> list[tuple[int, int, int, int]]:
    return [(c.kwargs["BLOCK_D"], c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in configs]


def _gram_kept(configs, dtype: torch.dtype, cap: int) -> list[tuple[int, int, int, int]]:
    with target_arch(cap):
        return _gram_shapes(fused_gram._prune(configs, {"x_ptr": torch.empty(0, dtype=dtype)}))


# ---------------------------------------------------------------------------------- gram
@pytest.mark.parametrize("cap", ARCHS)
def test_gram_keeps_every_tile_of_the_dtype_on_every_arch(gpu_configs, cap):
    configs = gpu_configs(fused_gram)
    for dtype, wanted in ((torch.bfloat16, fused_gram.LOWP_SHAPES), (torch.float16, fused_gram.LOWP_SHAPES),
                          (torch.float32, fused_gram.FP32_SHAPES)):
        kept = _gram_kept(configs, dtype, cap)
        assert kept == wanted, (cap, dtype, kept)  # all of them, in order of preference
        elsize = torch.empty(0, dtype=dtype).element_size()
        assert all(fused_gram.plan_resources(s, elsize)[0] <= smem_limit(cap) for s in kept)
    # The largest bf16 tile's pipeline takes 96 KB: within sm_86/89's 99 KB, which is why it stays there.
    assert fused_gram.plan_resources(fused_gram.LOWP_SHAPES[0], 2)[0] == 96 * KB


def test_gram_pruning_applies_the_target_archs_shared_memory(gpu_configs, monkeypatch):
    configs = gpu_configs(fused_gram)
    monkeypatch.setitem(_kernel_utils.SMEM_LIMIT, 86, 64 * KB)  # an arch with less shared memory
    assert _gram_kept(configs, torch.bfloat16, 86) == [(128, 32, 8, 4), (64, 64, 4, 4), (64, 32, 8, 2)]
    for other in (80, 89, 90):  # each arch its own limit
        assert _gram_kept(configs, torch.bfloat16, other) == fused_gram.LOWP_SHAPES
    monkeypatch.setitem(_kernel_utils.SMEM_LIMIT, 86, 8 * KB)  # nothing fits: the least preferred, smallest tile
    assert _gram_kept(configs, torch.bfloat16, 86) == [(64, 32, 8, 2)]


def test_gram_fixed_config_runs_on_every_arch_in_every_dtype(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(AUTOTUNE_ENV, "0")
    assert _gram_shapes(fused_gram._configs()) == [fused_gram.FIXED_SHAPE]
    assert fused_gram.FIXED_SHAPE in fused_gram.LOWP_SHAPES and fused_gram.FIXED_SHAPE in fused_gram.FP32_SHAPES
    assert all(fused_gram.plan_resources(fused_gram.FIXED_SHAPE, 4)[0] <= smem_limit(cap) for cap in ARCHS)


def test_gram_autotune_limit_keeps_the_first_tiles(gpu_configs, monkeypatch):
    configs = gpu_configs(fused_gram)
    monkeypatch.setenv(AUTOTUNE_ENV, "2")
    for cap in ARCHS:
        assert _gram_kept(configs, torch.float16, cap) == fused_gram.LOWP_SHAPES[:2]


def _split(m: int, d: int, cap: int, monkeypatch) -> tuple[int, int]:
    """(rows per program, programs per tile) of the Gram kernel on the GPU that ``cap`` stands for."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=SMS[cap]))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    chunk = fused_gram._row_chunk(m, d, torch.device("cuda"))
    return chunk, triton.cdiv(m, chunk)


@pytest.mark.parametrize("cap, chunk, splits", [(90, 2048, 7), (89, 2048, 7), (86, 2560, 5), (80, 2304, 6)])
def test_gram_splits_the_rows_into_about_four_waves_per_gpu(cap, chunk, splits, monkeypatch):
    # ViT-B/16 at batch 64, the input of qkv / fc1 (d 768): 12 x 12 tiles, 78 on or above the diagonal,
    # too few for 4 waves on any of these GPUs, so the rows are split over 4 * SMs / 78 programs per tile
    m, programs = 64 * 197, 78
    assert _split(m, 768, cap, monkeypatch) == (chunk, splits)
    assert programs * splits >= 4 * SMS[cap] > programs * (splits - 1)
    # fc2's input (d 3072): 1,176 tiles fill every GPU alone: one program per tile, no atomics
    assert _split(m, 3072, cap, monkeypatch) == (12800, 1)
    for rows, d in ((100, 768), (300_000, 64), (1, 16)):
        chunk, splits = _split(rows, d, cap, monkeypatch)
        assert chunk % fused_gram._CHUNK_QUANTUM == 0 and chunk * splits >= rows > chunk * (splits - 1)


def test_gram_plans_the_ahead_of_time_compile_as_on_an_h100():
    # capture (the compile check): nothing runs, the rows are split as on 132 SMs, atomics included
    with _kernel_utils.observe_launches(lambda *a: True, capture=True):
        assert fused_gram._row_chunk(64 * 197, 768, torch.device("cpu")) == 2048


# ---------------------------------------------------------------------------------- task scores
def _scores_kept(configs, dtype: torch.dtype, block_u: int, cap: int) -> list[tuple[int, int, int, int]]:
    args = {"z_ptr": torch.empty(0, dtype=dtype), "u_ptr": torch.empty(0, dtype=dtype)}
    with target_arch(cap):
        kept = fused_scores._prune(configs, args, BLOCK_U=block_u)
    return [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages) for c in kept]


ALL_SCORE_SHAPES = [(32, 32, 4, 2), (16, 16, 4, 2), (32, 16, 4, 2), (16, 32, 4, 2)]


@pytest.mark.parametrize("cap", ARCHS)
def test_task_scores_keep_every_config_on_every_arch(gpu_configs, cap):
    configs = gpu_configs(fused_scores)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for block_u in (16, 64):
            assert _scores_kept(configs, dtype, block_u, cap) == ALL_SCORE_SHAPES, (dtype, block_u)


def test_task_scores_pruning_applies_the_target_archs_shared_memory(gpu_configs, monkeypatch):
    # float32, 64 basis vectors a step: stages x BLOCK_D x (BLOCK_B + BLOCK_U) x 4 bytes = 24, 10, 12, 20 KB
    configs = gpu_configs(fused_scores)
    monkeypatch.setitem(_kernel_utils.SMEM_LIMIT, 80, 16 * KB)
    assert _scores_kept(configs, torch.float32, 64, 80) == [(16, 16, 4, 2), (32, 16, 4, 2)]
    assert _scores_kept(configs, torch.float32, 64, 90) == ALL_SCORE_SHAPES
    monkeypatch.setitem(_kernel_utils.SMEM_LIMIT, 80, 4 * KB)  # nothing fits: the first, the fixed one
    assert _scores_kept(configs, torch.float32, 64, 80) == [(32, 32, 4, 2)]
