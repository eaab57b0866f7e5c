"""How a call of the fused linear picks its Triton design (ops/fused_linear.py), what the cost model
behind it computes (ops/fused_linear_cost.py: the floor and the estimates), and the per-arch,
per-rank tile lists the kernels are pruned to (ops/fused_linear_tiles.py), checked on the CPU with
each target arch supplied to the pruning."""
from __future__ import annotations

import re

import pytest
import torch

from duallora_kernels.ops import _kernel_utils, fused_linear, fused_linear_cost as cost, fused_linear_tiles as tiles

LOWP = (torch.bfloat16, torch.float16)
ARCHS = (80, 86, 89, 90)


def _hand_floor(m, n, d, r, peaks, elt=2):
    """The floor ratio from its definition, written out: each pass at max(FLOPs / peak, bytes / BW)."""
    flops, bw = peaks.flops["bfloat16"], peaks.bandwidth

    def t(f, b):
        return max(f / flops, b / bw)

    fused = t(2 * m * n * d + 2 * m * r * d + 2 * m * r * n, elt * (m * d + n * d + m * n + r * (d + n) + m * r)) + \
        t(2 * m * n * d + 2 * m * r * n + 2 * m * r * d + 2 * m * r * n + 2 * m * r * d,
          elt * (m * n + n * d + m * d + r * (d + n) + m * r + m * d))
    frozen = t(2 * m * n * d, elt * (m * d + n * d + m * n)) + t(2 * m * n * d, elt * (m * n + n * d + m * d))
    return fused / frozen


@pytest.mark.parametrize("layer, d, n", cost.VIT_B_LAYERS)
@pytest.mark.parametrize("r", [16, 64])
def test_the_floor_is_the_roofline_ratio_of_the_ops_unavoidable_work(layer, d, n, r):
    peaks = cost.device_peaks("NVIDIA H100 80GB HBM3")
    got = cost.floor_ratio(12608, n, d, r, peaks)
    assert got == pytest.approx(_hand_floor(12608, n, d, r, peaks), rel=1e-12)
    assert cost.floor_ratio(12608, n, d, 0, peaks) == pytest.approx(1.0)
    assert 1.0 < got < 1.5


def test_at_rank_64_on_fc1_the_floor_sits_above_the_old_fixed_goal():
    # why the goal moved from fused/frozen <= 1.08 to fused/floor <= 1.05 (README, cost contract)
    assert cost.floor_ratio(12608, 3072, 768, 64, cost.device_peaks("NVIDIA H100 80GB HBM3")) > 1.08


def test_every_known_gpu_has_its_arch_and_consumer_cards_run_half_rate():
    for cap in ARCHS:
        assert cost.arch_peaks(cap) is not None
    assert cost.device_peaks("NVIDIA GeForce RTX 3090").flops["bfloat16"] == 71e12
    assert cost.device_peaks("NVIDIA H200").bandwidth == 4.8e12


@pytest.mark.parametrize("basis, single, split", [(True, 7, 8), (False, 5, 6)])
def test_the_estimates_count_the_launches_of_the_cost_contract(basis, single, split):
    # the same counts tests/test_cost_contract.py measures on the kernels themselves
    assert cost.estimate("single", 12608, 3072, 768, 64, basis=basis).launches == single
    assert cost.estimate("split", 12608, 3072, 768, 64, basis=basis).launches == split
    assert cost.estimate("tma", 12608, 3072, 768, 64, basis=basis).launches == split


def test_the_tile_efficiency_model_orders_tiles_by_operand_reuse():
    eff = cost.tile_efficiency
    assert eff(128, 256, 64) == pytest.approx(0.75)
    assert eff(128, 256, 64) > eff(128, 128, 64) > eff(64, 128, 64) > eff(64, 64, 32) > eff(64, 32, 16)
    assert eff(64, 32, 16) < 0.75 / 2  # "well under half of the bf16 peak" (issue 23)


def test_resolve_design_explicit_then_environment_then_measured_then_estimate(monkeypatch):
    args = dict(n=3072, d=768, r=64, dtype=torch.bfloat16, device=torch.device("cpu"))
    monkeypatch.delenv(fused_linear.DESIGN_ENV, raising=False)
    estimated = fused_linear.resolve_design("auto", **args)
    assert estimated == cost.favoured_design(n=3072, d=768, r=64, dtype=torch.bfloat16, cap=90)
    assert fused_linear.resolve_design("single", **args) == "single"
    monkeypatch.setenv(fused_linear.DESIGN_ENV, "tma")
    assert fused_linear.resolve_design("auto", **args) == "tma"
    assert fused_linear.resolve_design("split", **args) == "split"  # the argument wins
    monkeypatch.setenv(fused_linear.DESIGN_ENV, "fastest")
    with pytest.raises(ValueError, match="DUALLORA_DESIGN must be one of"):
        fused_linear.resolve_design("auto", **args)
    monkeypatch.delenv(fused_linear.DESIGN_ENV)
    monkeypatch.setitem(fused_linear.MEASURED, (90, 64), "tma")  # a GPU run measured it fastest on sm_90 at R_PAD 64
    assert fused_linear.resolve_design("auto", **args) == "tma"
    assert fused_linear.resolve_design("auto", **{**args, "r": 256}) == cost.favoured_design(
        n=3072, d=768, r=256, dtype=torch.bfloat16, cap=90)  # another bucket: not measured
    assert fused_linear.resolve_design("auto", **{**args, "dtype": torch.float32}) == cost.favoured_design(
        n=3072, d=768, r=64, dtype=torch.float32, cap=90)  # measured in bf16 only
    with _kernel_utils.target_arch(86):
        assert fused_linear.resolve_design("auto", **args) == cost.favoured_design(
            n=3072, d=768, r=64, dtype=torch.bfloat16, cap=86)


def test_the_estimate_picks_split_at_rank_64_and_never_tma_on_paper():
    for _, d, n in cost.VIT_B_LAYERS:
        for cap in ARCHS:
            assert cost.favoured_design(n=n, d=d, r=64, dtype=torch.bfloat16, cap=cap) in ("single", "split")
    assert cost.favoured_design(n=3072, d=768, r=64, dtype=torch.bfloat16, cap=90) == "split"


def test_the_fused_linear_docstring_holds_the_current_figures():
    # the figures are made by the cost model from the kept tiles: re-made when either changes
    # (python -m duallora_kernels.ops.fused_linear_cost prints them)
    doc = re.sub(r"\n {4}", "\n", "\n" + fused_linear.__doc__)
    assert cost.tradeoff_table() in doc


# ---------------------------------------------------------------------------------- tiles
def _prune(role: str, dtype: torch.dtype, r_pad: int, cap: int) -> list[tuple]:
    """What a role's autotuner keeps for a call with this dtype and R_PAD on arch ``cap``."""
    with _kernel_utils.target_arch(cap):
        return tiles.kept_shapes(role, dtype, r_pad)


@pytest.mark.parametrize("role", list(tiles.ROLES))
@pytest.mark.parametrize("cap", ARCHS)
def test_every_role_has_tiles_for_every_bucket_dtype_and_arch(role, cap):
    for dtype in (*LOWP, torch.float32):
        for r_pad in (16, 32, 64, 128, 256, 512):
            shapes = tiles.tiles_for(role, dtype, r_pad, cap)
            if role in tiles.HOPPER_ROLES and (cap < 90 or dtype == torch.float32):
                assert shapes == []
                continue
            assert shapes and all(len(s) == len(tiles.ROLES[role]) + 2 for s in shapes), (role, dtype, r_pad, cap)


@pytest.mark.parametrize("role", list(tiles.ROLES))
def test_the_fixed_config_fits_every_arch_and_is_the_best_that_does(role):
    for dtype in (*LOWP, torch.float32):
        if role in tiles.HOPPER_ROLES and dtype == torch.float32:
            continue  # TMA runs bf16/fp16 only
        for r_pad in (32, 64, 128, 256):
            fixed = tiles.fixed(role, dtype, r_pad)
            archs = (90,) if role in tiles.HOPPER_ROLES else ARCHS
            assert all(fixed in tiles.tiles_for(role, dtype, r_pad, cap) for cap in archs), (role, dtype, r_pad)
            # the most constrained arch's best choice that every arch holds
            first = tiles.tiles_for(role, dtype, r_pad, 90 if role in tiles.HOPPER_ROLES else 86)
            common = [s for s in first if all(s in tiles.tiles_for(role, dtype, r_pad, cap) for cap in archs)]
            assert fixed == common[0]


@pytest.mark.parametrize("role", tiles.GEMM_ROLES)
@pytest.mark.parametrize("cap", ARCHS)
def test_the_split_designs_gemms_keep_gemm_class_tiles_everywhere(role, cap):
    if role in tiles.HOPPER_ROLES and cap < 90:
        return
    for dtype in LOWP:
        for r_pad in (32, 64, 128, 256):
            shapes = tiles.tiles_for(role, dtype, r_pad, cap)
            assert all(bm >= 128 and bn >= 128 and bk >= 64 for bm, bn, bk, *_ in shapes[:1]), (role, cap, shapes)
            if cap >= 90:  # on Hopper every kept bf16 tile is GEMM-class (the compile table's rule)
                assert all(bm >= 128 and bn >= 128 and bk >= 64 for bm, bn, bk, *_ in shapes), (role, shapes)


def test_the_pruning_follows_the_target_arch_and_the_rank_bucket():
    # each rank bucket has a list of its own: the headline R_PAD 64 is not served R_PAD 256's survivors
    for cap in ARCHS:
        for role in ("single_forward", "single_backward", "lowrank_forward", "lowrank_backward"):
            got = {r_pad: _prune(role, torch.bfloat16, r_pad, cap) for r_pad in (32, 64, 256)}
            assert got[32] == tiles.TILES[(role, "lowp", 32, tiles.arch_class(cap))]
            assert got[64] == tiles.TILES[(role, "lowp", 64, tiles.arch_class(cap))]
            assert got[256] == tiles.TILES[(role, "lowp", 256, tiles.arch_class(cap))]
    assert _prune("gemm_forward_tma", torch.bfloat16, 64, 86) == []
    assert _prune("gemm_forward", torch.float32, 64, 90) == tiles.TILES[("gemm_forward", "fp32", None, "sm90")]


def test_autotune_limits_cut_the_kept_lists(monkeypatch):
    monkeypatch.setenv(_kernel_utils.AUTOTUNE_ENV, "1")
    assert _prune("gemm_backward", torch.bfloat16, 64, 90) == tiles.tiles_for("gemm_backward", torch.bfloat16, 64, 90)[:1]
    monkeypatch.setenv(_kernel_utils.AUTOTUNE_ENV, "0")
    for cap in ARCHS:
        assert _prune("single_backward", torch.float16, 256, cap) == [tiles.fixed("single_backward", torch.float16, 256)]


def test_shared_memory_limits_per_arch():
    assert _kernel_utils.smem_limit(90) == 227 * 1024 and _kernel_utils.smem_limit(89) == 99 * 1024
    assert _kernel_utils.smem_limit(86) == 99 * 1024 and _kernel_utils.smem_limit(80) == 163 * 1024


def test_a_gpu_runs_headline_decides_the_measured_designs(tmp_path):
    from duallora_kernels.harness import design_choice

    def row(shape, rank, single, split, tma):
        return {"kind": "comparison", "pass": "fwd+bwd", "shape": shape, "m": 12608, "dtype": "bfloat16", "amp": "off",
                "rank": rank, "fused_single_ms": single, "fused_split_ms": split, "fused_tma_ms": tma}

    doc = {"device": {"capability": "9.0"}, "results": [
        row("768x3072", 16, 0.20, 0.22, 0.23), row("3072x768", 16, 0.21, 0.20, None),  # tma cut off at r16
        row("768x3072", 64, 0.30, 0.25, 0.24), row("3072x768", 64, 0.31, 0.26, 0.26),
        {"kind": "comparison", "pass": "fwd", "shape": "768x3072", "rank": 64, "fused_single_ms": 0.01,
         "fused_split_ms": 9.0, "m": 12608, "dtype": "bfloat16"},  # forward-only rows do not count
    ]}
    got = design_choice.measured_designs([(tmp_path / "h200-headline.json", doc)])
    assert {k: v["design"] for k, v in got.items()} == {(90, 32): "single", (90, 64): "tma"}
    assert got[(90, 32)]["ms"] == pytest.approx({"single": 0.41, "split": 0.42})  # tma not in every case
    namespace: dict = {}
    exec(design_choice.render_module(got), namespace)
    assert namespace["MEASURED"] == {(90, 32): "single", (90, 64): "tma"}


def test_the_committed_measured_module_is_what_the_committed_results_give():
    from duallora_kernels.harness import design_choice
    from duallora_kernels.harness.results import load_docs

    paths = [p for p in sorted((design_choice.MODULE.parents[2] / "bench" / "results").glob("*.json"))
             if not p.name.startswith(("compile-", "cuda-compile-", "plan-"))]
    assert design_choice.MODULE.read_text() == design_choice.render_module(
        design_choice.measured_designs(load_docs(paths)))
