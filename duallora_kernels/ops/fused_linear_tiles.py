"""Tile configs of the fused DualLoRA linear kernels (:mod:`.fused_linear` and its designs) and their
per-arch, per-rank pruning.

Kept apart from the kernels because the lists are data measured by compiling candidates ahead of
time (``python -m duallora_kernels.compiled.aot``; ``--sweep`` compiles every candidate of
:data:`CANDIDATES`), not kernel logic: re-measure and edit them here.
"""
from __future__ import annotations

import os

import torch
import triton

from ._kernel_utils import autotune_limit, current_arch, first_configs, interpreting

__all__ = ["ROLES", "TILES", "CANDIDATES", "arch_class", "rank_bucket", "rank_chunk", "tiles_for", "fixed", "kept_shapes",
           "configs", "pruner"]

#: Each kernel's role and the names of its block sizes, in the order of the shape tuples below
#: (then num_warps, num_stages). GEMM-class roles also get GROUP_M (the grouped tile order).
ROLES: dict[str, tuple[str, ...]] = {
    "single_forward": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    "single_backward": ("BLOCK_M", "BLOCK_D", "BLOCK_K"),
    "lowrank_forward": ("BLOCK_M", "BLOCK_K"),
    "lowrank_backward": ("BLOCK_M", "BLOCK_K"),
    "gemm_forward": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    "gemm_backward": ("BLOCK_M", "BLOCK_D", "BLOCK_K"),
    "gemm_forward_tma": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    "gemm_backward_tma": ("BLOCK_M", "BLOCK_D", "BLOCK_K"),
}
#: Roles whose main loop is a plain GEMM (the split design): what the compile table's
#: GEMM-class-tile check applies to.
GEMM_ROLES = ("gemm_forward", "gemm_backward", "gemm_forward_tma", "gemm_backward_tma")
#: Roles that exist only on sm_90 (tensor descriptors / TMA).
HOPPER_ROLES = ("gemm_forward_tma", "gemm_backward_tma")
#: Padded-rank buckets: R_PAD 16 and 32 share one; 64, 128, 256 each have their own.
BUCKETS = (32, 64, 128, 256)

Shape = tuple[int, ...]

#: Tile shapes by (role, dtype class, rank bucket, arch class), in order of preference
#: (``DUALLORA_AUTOTUNE=N`` keeps the first N). dtype class: "lowp" (bfloat16/float16) or "fp32";
#: arch class: "sm90" (Hopper, wgmma, 227 KB of shared memory), "sm80" (A100, mma.sync, 163 KB),
#: "sm86" (RTX 3090/4090 and any other arch, mma.sync, 99 KB). A bucket of None holds for every
#: bucket (the split design's GEMMs: their main loop holds no rank-sized accumulator). Each list
#: holds only configs that compile for that arch with no register spills and within its shared
#: memory, as measured (tests/test_aot_compile.py re-checks what the pruning keeps).
TILES: dict[tuple[str, str, int | None, str], list[Shape]] = {}

def _set(role: str, dtype_class: str, bucket: int | None, arch: str, shapes: list[Shape]) -> None:
    TILES[(role, dtype_class, bucket, arch)] = shapes


# The lists below were measured by ``python -m duallora_kernels.compiled.aot --sweep`` (Triton 3.8, bf16,
# every candidate of CANDIDATES at R_PAD 32/64/128/256 on sm_90, sm_86 and sm_80; sm_89 compiles as
# sm_86 does): each keeps up to three survivors in CANDIDATES' order of preference. What they
# taught: the single design's second accumulator (BLOCK_M x R_PAD) costs registers like another
# output tile, so its tiles shrink with the rank (128x128 to 64x32 in backward); the split design's
# GEMMs hold one accumulator and keep 128x128x64 or larger at every rank on every arch (128x256 on
# Hopper and at R_PAD 32 on sm_80; in backward the dA/dB epilogue's rank chunks bring them to
# 128x128 from R_PAD 64 on); its skinny passes are memory-bound, so they favour 64-row blocks (more
# programs than SMs) and need BK 32 at R_PAD 256, where the (64 x 256) accumulator fills the registers.
_SINGLE = {  # (forward lists, backward lists) by bucket, per arch class
    "sm90": ({32: [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4)],
              64: [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4)],
              128: [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 32, 8, 3)],
              256: [(64, 128, 64, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3)]},
             {32: [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 8, 3)],
              64: [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 64, 64, 4, 4)],
              128: [(64, 128, 64, 8, 3), (64, 64, 32, 8, 3), (64, 32, 16, 8, 3)],
              256: [(64, 64, 16, 8, 3), (64, 32, 16, 8, 3)]}),
    "sm80": ({32: [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 8, 3)],
              64: [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 8, 3)],
              128: [(64, 128, 64, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3)],
              256: [(64, 128, 64, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3)]},
             {32: [(64, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 4)],
              64: [(64, 64, 64, 4, 4), (64, 64, 32, 8, 3), (64, 32, 16, 8, 3)],
              128: [(64, 64, 32, 8, 3), (64, 32, 16, 8, 3)],
              256: [(64, 32, 16, 8, 3)]}),
    "sm86": ({32: [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3)],
              64: [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3)],
              128: [(64, 128, 64, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3)],
              256: [(64, 64, 32, 8, 3), (64, 64, 16, 8, 3)]},
             {32: [(64, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 4)],
              64: [(64, 64, 64, 4, 4), (64, 64, 32, 8, 3), (64, 32, 16, 8, 3)],
              128: [(64, 64, 32, 8, 3), (64, 32, 16, 8, 3)],
              256: [(64, 32, 16, 8, 3)]}),
}
for _arch, (_fwd, _bwd) in _SINGLE.items():
    for _b in BUCKETS:
        _set("single_forward", "lowp", _b, _arch, _fwd[_b])
        _set("single_backward", "lowp", _b, _arch, _bwd[_b])
# the split design's skinny low-rank passes: the same lists on every arch
_LOWRANK = {32: [(64, 64, 4, 3), (128, 64, 4, 3), (64, 32, 8, 3)], 64: [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 8, 3)],
            128: [(64, 64, 4, 3), (64, 32, 8, 3), (128, 64, 8, 3)], 256: [(64, 32, 8, 3)]}
for _arch in ("sm90", "sm80", "sm86"):
    for _role in ("lowrank_forward", "lowrank_backward"):
        for _b in BUCKETS:
            _set(_role, "lowp", _b, _arch, _LOWRANK[_b])
# the split design's GEMMs: the forward's main loop is a plain GEMM at every rank; the backward's
# epilogue (dA, dB in 64-rank chunks) takes registers from R_PAD 64 on
_GEMM_FWD = {"sm90": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)],
             "sm80": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3)],
             # no 128x256 on sm_86/89: Triton 3.8 fits it in 246 registers, Triton 3.6 (the oldest
             # we admit) spills 32 B there, as in the backward below; sm_80 fits it with both
             "sm86": [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3)]}
_GEMM_BWD = {"sm90": {32: [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3)],
                      64: [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3)],
                      128: [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3)],
                      256: [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3)]},
             "sm80": {32: [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3)],
                      64: [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3)],
                      128: [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3)],
                      256: [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3)]}}
_GEMM_BWD["sm86"] = {**_GEMM_BWD["sm80"], 32: [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3)]}
_TMA_BWD = {32: [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4)],
            64: [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3)],
            128: [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3)], 256: [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3)]}
for _arch in ("sm90", "sm80", "sm86"):
    _set("gemm_forward", "lowp", None, _arch, _GEMM_FWD[_arch])
    for _b in BUCKETS:
        _set("gemm_backward", "lowp", _b, _arch, _GEMM_BWD[_arch][_b])
_set("gemm_forward_tma", "lowp", None, "sm90", [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4)])
for _b in BUCKETS:
    _set("gemm_backward_tma", "lowp", _b, "sm90", _TMA_BWD[_b])

# --- float32 (IEEE dots run on FMA units with every operand in registers: small tiles) ---
for _arch in ("sm90", "sm80", "sm86"):
    for _role in ("single_forward", "gemm_forward"):
        _set(_role, "fp32", None, _arch, [(32, 32, 16, 4, 2), (64, 32, 16, 4, 2)])
    for _role in ("single_backward", "gemm_backward"):
        _set(_role, "fp32", None, _arch, [(32, 32, 16, 8, 2)])
    for _role in ("lowrank_forward", "lowrank_backward"):
        _set(_role, "fp32", None, _arch, [(32, 32, 4, 2)])


#: Set to "1" (``python -m duallora_kernels.compiled.aot --sweep`` does) to make every call of a role try
#: all of its :data:`CANDIDATES` on every arch and bucket: how the lists above are measured.
SWEEP_ENV = "DUALLORA_TILE_SWEEP"
#: The shapes a sweep compiles per role (every bucket, every arch): :data:`TILES` keeps, per
#: bucket and arch, those that compiled without spills within shared memory, best first.
CANDIDATES: dict[str, list[Shape]] = {
    "single_forward": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 8, 3),
                       (128, 128, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3), (64, 64, 16, 8, 3)],
    "single_backward": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3),
                        (64, 64, 64, 4, 4), (64, 64, 32, 8, 3), (64, 32, 16, 8, 3), (64, 64, 16, 8, 3)],
    "lowrank_forward": [(256, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                        (64, 32, 8, 3)],
    "lowrank_backward": [(256, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                         (64, 32, 8, 3)],
    "gemm_forward": [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4),
                     (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 2), (128, 128, 32, 8, 4),
                     (128, 128, 32, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
    "gemm_backward": [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4),
                      (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 2), (128, 128, 32, 8, 4),
                      (128, 128, 32, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
    "gemm_forward_tma": [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                         (128, 128, 64, 8, 3), (128, 128, 64, 4, 4)],
    "gemm_backward_tma": [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                          (128, 128, 64, 8, 3), (128, 128, 64, 4, 4)],
}


def _sweeping() -> bool:
    return os.environ.get(SWEEP_ENV) == "1"


def arch_class(cap: int) -> str:
    """The :data:`TILES` arch class of compute capability ``cap``."""
    return "sm90" if cap >= 90 else "sm80" if cap == 80 else "sm86"


def rank_bucket(r_pad: int) -> int:
    """The tile bucket of padded rank ``r_pad`` (16 and 32 share one; above 256: 256's)."""
    return next((b for b in BUCKETS if r_pad <= b), BUCKETS[-1])


def rank_chunk(r_pad: int) -> int:
    """Ranks per product in the split backward's epilogue (dA, dB): at most 64, so an
    (R_PAD x BLOCK) float32 product never sits beside the dX kernel's pipeline buffers."""
    return min(r_pad, 64)


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "lowp"


def tiles_for(role: str, dtype: torch.dtype, r_pad: int, cap: int) -> list[Shape]:
    """The tile shapes the autotuner may try for this call (see :data:`TILES`); [] where the role
    does not run (the TMA roles below sm_90)."""
    if role in HOPPER_ROLES and (cap < 90 or dtype == torch.float32):
        return []  # TMA runs bf16/fp16 on sm_90 only (fused_linear_tma.tma_eligible)
    if _sweeping() and dtype != torch.float32:
        return CANDIDATES[role]
    cls, bucket, arch = _dtype_class(dtype), rank_bucket(r_pad), arch_class(cap)
    for key in ((role, cls, bucket, arch), (role, cls, None, arch)):
        if key in TILES:
            return TILES[key]
    raise KeyError(f"no tiles for {role} {cls} R_PAD={r_pad} on {arch}")


def fixed(role: str, dtype: torch.dtype, r_pad: int) -> Shape:
    """The ``DUALLORA_AUTOTUNE=0`` config: the first shape of the most constrained arch's list
    (sm_86's; sm_90's for the Hopper-only roles) that every arch's list holds, so one config runs
    everywhere and is the best such one."""
    if role in HOPPER_ROLES:
        return tiles_for(role, dtype, r_pad, 90)[0]
    lists = [tiles_for(role, dtype, r_pad, cap) for cap in (86, 80, 90)]
    return next((s for s in lists[0] if all(s in other for other in lists[1:])), lists[0][0])


def _config(role: str, shape: Shape, pre_hook, group_m: int = 8) -> triton.Config:
    *blocks, warps, stages = shape
    kwargs = dict(zip(ROLES[role], blocks))
    if role.startswith(("gemm", "single")):
        kwargs["GROUP_M"] = group_m
    return triton.Config(kwargs, num_warps=warps, num_stages=stages, pre_hook=pre_hook)


#: The one config of every role under the interpreter: small tiles, so the test shapes cross
#: tile edges and masks (benchmarking configs there would only burn CPU time).
_INTERPRETER = {"single_forward": (32, 32, 32), "single_backward": (32, 32, 32), "lowrank_forward": (32, 32),
                "lowrank_backward": (32, 32), "gemm_forward": (32, 32, 32), "gemm_backward": (32, 32, 32),
                "gemm_forward_tma": (32, 32, 32), "gemm_backward_tma": (32, 32, 32)}


def configs(role: str, pre_hook=None) -> list[triton.Config]:
    """Every config any call of ``role`` may use; :func:`pruner` keeps the ones for the call's dtype,
    rank and arch. One small config under the interpreter; with ``DUALLORA_AUTOTUNE=0``
    (:data:`._kernel_utils.AUTOTUNE_ENV`, the compiled tests) the fixed ones."""
    if interpreting():
        return [_config(role, (*_INTERPRETER[role], 4, 1), pre_hook, group_m=4)]
    shapes = [shape for (r, *_), lst in TILES.items() if r == role for shape in lst]
    if _sweeping():
        shapes += CANDIDATES[role]
    return [_config(role, shape, pre_hook) for shape in dict.fromkeys(shapes)]


def _shape(role: str, cfg: triton.Config) -> Shape:
    return (*(cfg.kwargs[name] for name in ROLES[role]), cfg.num_warps, cfg.num_stages)


def kept_shapes(role: str, dtype: torch.dtype, r_pad: int) -> list[Shape]:
    """The shapes a call of ``role`` keeps on the target arch (:func:`._kernel_utils.current_arch`:
    the device's, or :class:`._kernel_utils.target_arch`'s), ``DUALLORA_AUTOTUNE`` applied."""
    if autotune_limit() == 0:
        return [] if role in HOPPER_ROLES and current_arch() < 90 else [fixed(role, dtype, r_pad)]
    return first_configs(tiles_for(role, dtype, r_pad, current_arch()))


def pruner(role: str):
    """``prune_configs_by["early_config_prune"]`` of a ``role`` kernel: the call's dtype (its first
    tensor argument's), its R_PAD and the target arch pick the list (:func:`kept_shapes`)."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if interpreting():
            return configs[:1]
        # the first tensor argument's dtype (a tensor descriptor's: its base tensor's)
        dtype = next(getattr(v, "base", v).dtype for v in named_args.values() if hasattr(getattr(v, "base", v), "dtype"))
        by_shape = {_shape(role, c): c for c in configs}
        return [by_shape[s] for s in kept_shapes(role, dtype, kwargs.get("R_PAD", 16)) if s in by_shape]

    return prune
