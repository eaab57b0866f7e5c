"""Tile configs of the fused DualLoRA linear kernels (:mod:`.fused_linear`) and their per-arch pruning.

Kept apart from the kernels because the lists are data measured by compiling candidates ahead of
time (``python -m duallora_kernels.ops.aot``), not kernel logic: re-measure and edit them here.
"""
from __future__ import annotations

import torch
import triton

from ._kernel_utils import autotune_limit, current_arch, first_configs, interpreting

__all__ = ["TILES", "FIXED", "arch_class", "tiles_for", "configs", "pruner"]

#: Tile shapes (BLOCK_M, tile, BLOCK_K, num_warps, num_stages) by pass, dtype class ("lowp":
#: bfloat16/float16, "fp32"), rank bucket (R_PAD <= 32, or 64 and above) and arch class ("sm90":
#: Hopper, wgmma, 227 KB of shared memory; "sm80": A100, mma.sync, 163 KB; "sm86": RTX 3090/4090 and
#: any other arch, mma.sync, 99 KB), in order of preference (``DUALLORA_AUTOTUNE=N`` keeps the first
#: N). Each list holds only configs that compile for that arch with no register spills and within its
#: shared memory, as measured by compiling candidates ahead of time (``python -m
#: duallora_kernels.ops.aot``; tests/test_aot_compile.py re-checks what the pruning keeps). What the
#: candidates taught: the low-rank accumulators (BLOCK_M x R_PAD: T in forward; U and T .* S in
#: backward) cost registers like a second GEMM tile, so rank 64 needs BLOCK_M = 64 and short K-steps;
#: mma.sync (sm_80/86/89) holds its operands in registers, so the backward there fits only 64-row
#: tiles; IEEE float32 runs on FMA units with every operand in registers (the Hopper tiles spilled
#: 1.7-24 KB per thread and took 16-91 s each to compile), so it gets 32 x 32 tiles of its own.
TILES: dict[tuple[str, str, int, str], list[tuple[int, int, int, int, int]]] = {
    ("forward", "lowp", 32, "sm90"): [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 8, 3),
                                      (128, 128, 32, 8, 3), (64, 64, 32, 8, 3)],
    ("forward", "lowp", 32, "sm80"): [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3),
                                      (64, 128, 32, 8, 3), (64, 64, 32, 8, 3)],
    ("forward", "lowp", 64, "sm90"): [(64, 128, 64, 8, 3), (64, 128, 16, 8, 3), (64, 64, 32, 8, 3)],
    ("forward", "lowp", 64, "sm80"): [(64, 128, 32, 8, 3), (64, 64, 32, 8, 3), (64, 64, 16, 8, 3)],
    ("forward", "lowp", 64, "sm86"): [(64, 64, 32, 8, 3), (64, 64, 16, 8, 3)],
    ("backward", "lowp", 32, "sm90"): [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3),
                                       (64, 128, 32, 8, 3), (64, 64, 32, 8, 3)],
    ("backward", "lowp", 32, "sm80"): [(64, 64, 32, 8, 3), (64, 64, 64, 4, 4), (64, 64, 16, 8, 3), (64, 32, 16, 8, 3)],
    ("backward", "lowp", 64, "sm90"): [(64, 64, 16, 8, 3), (64, 32, 16, 8, 3)],
    ("backward", "lowp", 64, "sm80"): [(64, 32, 16, 8, 3)],
    ("forward", "fp32", 32, "any"): [(32, 32, 16, 4, 2), (64, 32, 16, 4, 2)],
    ("backward", "fp32", 32, "any"): [(32, 32, 16, 8, 2)],
}
#: DUALLORA_AUTOTUNE=0 (the compiled tests): one config per pass and dtype class that fits every
#: arch at ranks 16 and 64.
FIXED = {("forward", "lowp"): (64, 64, 32, 8, 3), ("backward", "lowp"): (64, 32, 16, 8, 3),
         ("forward", "fp32"): (32, 32, 16, 4, 2), ("backward", "fp32"): (32, 32, 16, 8, 2)}


def arch_class(cap: int) -> str:
    """The :data:`TILES` arch class of compute capability ``cap``."""
    return "sm90" if cap >= 90 else "sm80" if cap == 80 else "sm86"


def tiles_for(pass_: str, dtype: torch.dtype, r_pad: int, cap: int) -> list[tuple[int, int, int, int, int]]:
    """The tile shapes the autotuner may try for this call (see :data:`TILES`). Ranks above 64 take
    the smallest rank-64 tile: not compiled ahead of time (the checked ranks are 16 and 64)."""
    if dtype == torch.float32:
        return TILES[(pass_, "fp32", 32, "any")]
    bucket = 32 if r_pad <= 32 else 64
    cls = arch_class(cap)
    key = (pass_, "lowp", bucket, cls)
    if key not in TILES:  # sm86 shares sm80's list where sm80's fits 99 KB
        key = (pass_, "lowp", bucket, "sm80")
    shapes = TILES[key]
    return shapes if r_pad <= 64 else shapes[-1:]


def configs(tile_n: str, pass_: str) -> list[triton.Config]:
    """Every config any call may use; :func:`pruner` keeps the ones for the call's dtype, rank and
    arch. One small tile under the interpreter, where benchmarking configs would only burn CPU
    time; with ``DUALLORA_AUTOTUNE=0`` (:data:`._kernel_utils.AUTOTUNE_ENV`, the compiled tests)
    the :data:`FIXED` ones."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, tile_n: 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    if autotune_limit() == 0:
        shapes = [shape for (p, _), shape in FIXED.items() if p == pass_]
    else:
        shapes = list(dict.fromkeys(shape for (p, *_), lst in TILES.items() if p == pass_ for shape in lst))
    return [
        triton.Config({"BLOCK_M": bm, tile_n: bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _shape(cfg: triton.Config, tile_n: str) -> tuple[int, int, int, int, int]:
    kw = cfg.kwargs
    return kw["BLOCK_M"], kw[tile_n], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages


def pruner(tile_n: str, pass_: str):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        dtype = named_args["w_ptr"].dtype
        limit = autotune_limit()
        if limit == 0:
            wanted = [FIXED[(pass_, "fp32" if dtype == torch.float32 else "lowp")]]
        else:
            wanted = tiles_for(pass_, dtype, kwargs["R_PAD"], current_arch())
        by_shape = {_shape(c, tile_n): c for c in configs}
        keep = [by_shape[s] for s in wanted if s in by_shape] or configs[:1]  # configs[:1]: the interpreter's
        return first_configs(keep)

    return prune
