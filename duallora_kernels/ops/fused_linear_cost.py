"""What the fused DualLoRA linear costs, on paper: its arithmetic floor, and an estimate of each
Triton design's time from the tiles the compile table keeps. No GPU has checked these numbers.

Two uses:

* the **floor** (:func:`floor_ratio`): the multiply-adds and the bytes the fused op cannot avoid
  (``Y = X W0^T + b + ((X A^T) .* S) B^T`` forward; dX, dA, dB backward; X, W0, dY read once,
  Y and dX written once) against the frozen ``nn.Linear``'s, each pass costed at the device's
  roofline ``max(FLOPs / peak, bytes / bandwidth)``. ``duallora bench`` multiplies the measured
  frozen time by it: the floor of that problem at that stacked rank, the goal's reference
  (``fused / floor <= 1.05``). At rank 64 on fc1 the adapters' arithmetic alone is ~15% of the
  frozen layer's, so a fixed goal against the frozen layer would sit below the floor.
* the **design estimate** (:func:`estimate`): each kernel of a design costed at
  ``max(FLOPs / (peak x tile efficiency), bytes / (0.85 x bandwidth))``, plus 3 us per launch
  and its float32 atomics as L2 read-modify-writes at half the HBM bandwidth. Tile efficiency
  is a model, not a measurement: ``0.75 * sqrt(I / I_ref)`` (capped at 0.75, x0.85 for
  K-steps under 32) with ``I = BLOCK_M * BLOCK_N / (BLOCK_M + BLOCK_N)`` the multiply-adds per
  operand element a tile loads and ``I_ref`` a 128x256 tile's -- cuBLAS-class tiles reach ~75%
  of a Hopper's bf16 peak, a 64x32 tile about a third of that. ``backend="auto"`` takes the
  design with the smallest estimate (:func:`favoured_design`) until a GPU run has measured them
  (:data:`.fused_linear.MEASURED`); the README's estimate table comes from here.

Peak figures are the vendors' (dense tensor-core rates with float32 accumulation; :data:`PEAKS`,
which the bench harness also uses to turn times into fractions of peak).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["DevicePeaks", "PEAKS", "ARCH_DEVICE", "device_peaks", "arch_peaks", "Work", "work", "roofline_us",
           "floor_ratio", "Estimate", "estimate", "favoured_design", "REPRESENTATIVE_M"]


@dataclass(frozen=True)
class DevicePeaks:
    """Dense peak throughput (FLOP/s by operand kind: bfloat16/float16 tensor cores with float32
    accumulation, tf32, float32 FMA) and memory bandwidth (bytes/s) of a GPU, from the vendor's
    data sheet or architecture whitepaper (dense, no sparsity)."""

    name: str
    flops: dict[str, float]
    bandwidth: float

    def lowp_flops(self, lowp: bool) -> float:
        return self.flops["bfloat16"] if lowp else self.flops["float32"]


def _peaks(name: str, lowp: float, tf32: float, fp32: float, bandwidth: float) -> DevicePeaks:
    return DevicePeaks(name, {"bfloat16": lowp, "float16": lowp, "tf32": tf32, "float32": fp32}, bandwidth)


#: Matched in order against ``torch.cuda.get_device_name()``: the first substring that occurs wins.
#: GeForce cards: their tensor cores run half rate with float32 accumulation (the whitepapers'
#: "FP16 Tensor TFLOPS with FP32 Accumulate").
PEAKS: tuple[tuple[str, DevicePeaks], ...] = (
    ("H200", _peaks("H200 SXM", 989e12, 494e12, 67e12, 4.8e12)),
    ("H100 NVL", _peaks("H100 NVL", 835e12, 418e12, 60e12, 3.9e12)),
    ("H100 PCIe", _peaks("H100 PCIe", 756e12, 378e12, 51e12, 2.0e12)),
    ("H100", _peaks("H100 SXM", 989e12, 494e12, 67e12, 3.35e12)),
    ("A100-SXM4-80GB", _peaks("A100 SXM 80GB", 312e12, 156e12, 19.5e12, 2.039e12)),
    ("A100 80GB PCIe", _peaks("A100 PCIe 80GB", 312e12, 156e12, 19.5e12, 1.935e12)),
    ("A100", _peaks("A100 40GB", 312e12, 156e12, 19.5e12, 1.555e12)),
    ("RTX 4090", _peaks("GeForce RTX 4090 (Ada whitepaper)", 165.2e12, 82.6e12, 82.6e12, 1.008e12)),
    ("RTX 3090", _peaks("GeForce RTX 3090 (GA102 whitepaper)", 71e12, 35.6e12, 35.6e12, 0.936e12)),
)
#: The device an arch's estimate is costed on when the device itself is not known (compute capability x10).
ARCH_DEVICE = {90: "H100", 89: "RTX 4090", 86: "RTX 3090", 80: "A100-SXM4-80GB"}
#: The token count a static design choice is costed at (ViT-B/16, batch 64): both designs scale
#: linearly in m at real batch sizes, so the choice does not depend on it.
REPRESENTATIVE_M = 64 * 197
_LAUNCH_US = 3.0
_BW_EFFICIENCY = 0.85
_ATOMIC_BW_FRACTION = 0.5
_TMA_GAIN = 1.1  # the TMA/persistent GEMMs' efficiency over the pointer ones: a guess for the GPU run to replace


def device_peaks(device_name: str) -> DevicePeaks | None:
    """The known ceilings of a GPU by its name, or None for an unknown device (ratios omitted)."""
    for key, peaks in PEAKS:
        if key.lower() in device_name.lower():
            return peaks
    return None


def arch_peaks(cap: int) -> DevicePeaks:
    """The ceilings an arch is costed at without a device: :data:`ARCH_DEVICE`'s."""
    return device_peaks(ARCH_DEVICE.get(cap, "H100"))


@dataclass(frozen=True)
class Work:
    """Multiply-add FLOPs and bytes of one forward and one backward."""

    flops_fwd: float
    bytes_fwd: float
    flops_bwd: float
    bytes_bwd: float


def work(m: int, n: int, d: int, r: int, *, elt: int = 2, train_a: bool = True, need_dx: bool = True) -> Work:
    """The fused op's unavoidable work at stacked rank ``r`` (``r = 0``: the frozen layer's).
    Forward: ``X W0^T`` and ``(X A^T) B^T``; read X, W0, A, B, write Y (and S, m x r, for dB).
    Backward: dX = ``dY W0 + ((dY B) .* S) A``, dB = ``dY^T S``, dA = ``U^T X`` when A trains;
    read dY, W0, B, A, S (and X for dA), write dX."""
    f_fwd = 2.0 * m * n * d + 2.0 * m * r * (d + n)
    b_fwd = elt * (m * d + n * d + m * n + r * (d + n) + m * r)
    f_bwd = (2.0 * m * n * d if need_dx else 0.0) + 2.0 * m * r * n * 2 + (2.0 * m * r * d if need_dx else 0.0)
    b_bwd = elt * (m * n + (n * d + m * d if need_dx else 0) + r * (d + n) + m * r)
    if r and train_a:
        f_bwd += 2.0 * m * r * d
        b_bwd += elt * m * d
    if not r:
        f_bwd = 2.0 * m * n * d if need_dx else 0.0
        b_bwd = elt * (m * n + n * d + m * d)
    return Work(f_fwd, b_fwd, f_bwd, b_bwd)


def roofline_us(flops: float, nbytes: float, peak: DevicePeaks, lowp: bool = True) -> float:
    """``max(FLOPs / peak, bytes / bandwidth)`` in microseconds."""
    return max(flops / peak.lowp_flops(lowp) * 1e6, nbytes / peak.bandwidth * 1e6)


def floor_ratio(m: int, n: int, d: int, r: int, peak: DevicePeaks, *, elt: int = 2, train_a: bool = True) -> float:
    """The fused op's roofline time over the frozen layer's (forward + backward): the floor of a
    problem is the measured frozen time times this."""
    lowp = elt == 2
    fused, frozen = work(m, n, d, r, elt=elt, train_a=train_a), work(m, n, d, 0, elt=elt)
    t_fused = roofline_us(fused.flops_fwd, fused.bytes_fwd, peak, lowp) + roofline_us(fused.flops_bwd, fused.bytes_bwd,
                                                                                      peak, lowp)
    t_frozen = roofline_us(frozen.flops_fwd, frozen.bytes_fwd, peak, lowp) + roofline_us(frozen.flops_bwd,
                                                                                        frozen.bytes_bwd, peak, lowp)
    return t_fused / t_frozen


def tile_efficiency(block_m: int, block_n: int, block_k: int) -> float:
    """The model's fraction of peak a GEMM main loop of this tile reaches (module docstring)."""
    ref = 128 * 256 / (128 + 256)
    eff = 0.75 * min(1.0, math.sqrt((block_m * block_n / (block_m + block_n)) / ref))
    return eff * (0.85 if block_k < 32 else 1.0)


@dataclass(frozen=True)
class Estimate:
    """A design's estimated forward and backward microseconds (launch overheads included), launches,
    and the tiles it was costed with."""

    design: str
    us_fwd: float
    us_bwd: float
    launches: int
    tiles: dict

    @property
    def us(self) -> float:
        return self.us_fwd + self.us_bwd


def _kernel_us(products: list[tuple[float, float]], nbytes: float, peak: DevicePeaks, lowp: bool,
               atomics: float = 0.0) -> float:
    """One kernel: its products ((FLOPs, tile efficiency) pairs, run one after another), its HBM
    bytes and its float32 atomics, whichever takes longest, plus its launch."""
    compute = sum(flops / (peak.lowp_flops(lowp) * eff) for flops, eff in products) * 1e6
    return max(compute, nbytes / (_BW_EFFICIENCY * peak.bandwidth) * 1e6,
               4 * atomics / (_ATOMIC_BW_FRACTION * peak.bandwidth) * 1e6) + _LAUNCH_US


def estimate(design: str, m: int, n: int, d: int, r: int, *, dtype: torch.dtype = torch.bfloat16, cap: int = 90,
             peak: DevicePeaks | None = None, basis: bool = True) -> Estimate:
    """The estimated time of one training step (forward + backward, every gradient) of ``design``
    at stacked rank ``r``, with the first tile the pruning keeps on ``cap`` (module docstring)."""
    from ._kernel_utils import pow2_at_least
    from .fused_linear_tiles import tiles_for  # here: the floor and the peaks need no triton

    peak = peak or arch_peaks(cap)
    lowp = dtype != torch.float32
    e = 2 if lowp else 4
    r_pad = pow2_at_least(r)
    coef = int(basis)  # the coefficients launch of each pass ([C_o; C_r] M, [dA_o; dA_r] M)
    if design == "single":
        bm, bn, bk = tiles_for("single_forward", dtype, r_pad, cap)[0][:3]
        eff = tile_efficiency(bm, bn, bk)
        # every n-tile recomputes its row block's X A^T
        fwd = _kernel_us([(2.0 * m * n * d, eff), (2.0 * m * d * r_pad * math.ceil(n / bn) + 2.0 * m * r_pad * n, eff)],
                         e * (m * d + n * d + m * n + m * r), peak, lowp)
        cm, cd, ck = tiles_for("single_backward", dtype, r_pad, cap)[0][:3]
        eff = tile_efficiency(cm, cd, ck)
        # every d-tile recomputes dY B; U A, dA and dB are (R_PAD x BLOCK) products of the epilogue
        bwd = _kernel_us([(2.0 * m * n * d, eff), (2.0 * m * n * r_pad * math.ceil(d / cd), eff),
                          (2.0 * m * r_pad * (3 * d + n), 0.5 * eff)],
                         e * (m * n + n * d + 2 * m * d + m * r), peak, lowp, math.ceil(m / cm) * r * (d + n))
        return Estimate(design, fwd + (1 + coef) * _LAUNCH_US, bwd + (2 + coef) * _LAUNCH_US, 5 + 2 * coef,
                        {"single_forward": (bm, bn, bk), "single_backward": (cm, cd, ck)})
    if design not in ("split", "tma"):
        raise ValueError(f"unknown design {design!r}")
    gain = _TMA_GAIN if design == "tma" and cap >= 90 and lowp else 1.0
    lm, lk = tiles_for("lowrank_forward", dtype, r_pad, cap)[0][:2]
    low_fwd = _kernel_us([(2.0 * m * d * r_pad, tile_efficiency(lm, r_pad, lk))], e * (m * d + m * r), peak, lowp)
    bm, bn, bk = tiles_for("gemm_forward", dtype, r_pad, cap)[0][:3]
    gemm_fwd = _kernel_us([(2.0 * m * n * (d + r_pad), min(0.85, tile_efficiency(bm, bn, bk) * gain))],
                          e * (m * d + n * d + m * n + m * r + r * n), peak, lowp)
    um, uk = tiles_for("lowrank_backward", dtype, r_pad, cap)[0][:2]
    low_bwd = _kernel_us([(2.0 * m * n * r_pad, tile_efficiency(um, r_pad, uk))], e * (m * n + m * r), peak, lowp)
    cm, cd, ck = tiles_for("gemm_backward", dtype, r_pad, cap)[0][:3]
    eff = tile_efficiency(cm, cd, ck)
    gemm_bwd = _kernel_us([(2.0 * m * d * (n + r_pad), min(0.85, eff * gain)), (2.0 * m * r_pad * (d + n), 0.5 * eff)],
                          e * (m * n + n * d + 2 * m * d + 2 * m * r), peak, lowp, math.ceil(m / cm) * r * (d + n))
    tiles = {"lowrank_forward": (lm, lk), "gemm_forward": (bm, bn, bk), "lowrank_backward": (um, uk),
             "gemm_backward": (cm, cd, ck)}
    return Estimate(design, low_fwd + gemm_fwd + (1 + coef) * _LAUNCH_US, low_bwd + gemm_bwd + (1 + coef) * _LAUNCH_US,
                    6 + 2 * coef, tiles)


def favoured_design(*, n: int, d: int, r: int, dtype: torch.dtype, cap: int) -> str:
    """"single" or "split", whichever has the smaller :func:`estimate` at :data:`REPRESENTATIVE_M`
    tokens (ties: the fewer launches). "tma" is never chosen on paper: its gain over the split
    design's pointer GEMMs is a guess until a GPU run measures it (:data:`.fused_linear.MEASURED`)."""
    if r == 0:
        return "split"  # no low-rank path: the split design's forward is the plain GEMM alone
    candidates = ["single", "split"]
    costs = {c: estimate(c, REPRESENTATIVE_M, n, d, r, dtype=dtype, cap=cap) for c in candidates}
    return min(candidates, key=lambda c: (round(costs[c].us, 1), costs[c].launches))


#: ViT-B/16's adapted layers (d, n) at batch 64: the shapes the figures below are made for.
VIT_B_LAYERS = (("qkv", 768, 2304), ("proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768))


def tradeoff_rows(cap: int = 90, dtype: torch.dtype = torch.bfloat16, ranks: tuple[int, ...] = (16, 64)) -> list[list]:
    """Per ViT-B/16 layer and stacked rank: what the split design pays (one more read of X forward
    and of dY backward, in MB and microseconds at the arch's bandwidth) against what the single
    design pays (the recomputed low-rank products, in GFLOP and microseconds at its tiles'
    efficiency), the two designs' first kept tiles (forward, backward), both designs' estimates
    of the whole step and the one ``design="auto"`` takes."""
    from ._kernel_utils import pow2_at_least
    from .fused_linear_tiles import tiles_for

    peak, m, e = arch_peaks(cap), REPRESENTATIVE_M, 2
    rows = []
    for name, d, n in VIT_B_LAYERS:
        for r in ranks:
            r_pad = pow2_at_least(r)
            sf, sb = tiles_for("single_forward", dtype, r_pad, cap)[0][:3], tiles_for("single_backward", dtype, r_pad, cap)[0][:3]
            gf, gb = tiles_for("gemm_forward", dtype, r_pad, cap)[0][:3], tiles_for("gemm_backward", dtype, r_pad, cap)[0][:3]
            extra_mb = e * m * (d + n) / 1e6
            extra_us = e * m * (d + n) / (_BW_EFFICIENCY * peak.bandwidth) * 1e6
            recompute = 2.0 * m * r_pad * (d * (math.ceil(n / sf[1]) - 1) + n * (math.ceil(d / sb[1]) - 1))
            eff_single = (tile_efficiency(*sf) + tile_efficiency(*sb)) / 2
            recompute_us = recompute / (peak.lowp_flops(True) * eff_single) * 1e6
            single, split = (estimate(k, m, n, d, r, dtype=dtype, cap=cap) for k in ("single", "split"))
            rows.append([name, r, f"{extra_mb:.0f} MB, {extra_us:.1f}", f"{recompute / 1e9:.1f} GF, {recompute_us:.1f}",
                         "x".join(map(str, sf)) + " " + "x".join(map(str, sb)),
                         "x".join(map(str, gf)) + " " + "x".join(map(str, gb)),
                         f"{single.us:.0f}", f"{split.us:.0f}", favoured_design(n=n, d=d, r=r, dtype=dtype, cap=cap)])
    return rows


#: split pays: one more read of X (forward) and of dY (backward); single pays: the recomputed
#: low-rank products; tiles: the first kept forward and backward tile; us: the whole step's estimate.
TRADEOFF_HEADERS = ("layer", "r", "split pays (us)", "single pays (us)", "single tiles", "split tiles", "single us",
                    "split us", "auto")


def tradeoff_table(cap: int = 90) -> str:
    """:func:`tradeoff_rows` as an RST-style text table (ops/fused_linear.py's docstring holds it)."""
    rows = [[str(c) for c in row] for row in tradeoff_rows(cap)]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(TRADEOFF_HEADERS)]
    rule = "  ".join("=" * w for w in widths)
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([rule, line(TRADEOFF_HEADERS), rule, *(line(r) for r in rows), rule])


def update_docstring(path: str | None = None) -> bool:
    """Write :func:`tradeoff_table` into ops/fused_linear.py's docstring (its ``@TRADEOFF@``
    placeholder, or the table already there); True when the file changed."""
    import re
    from pathlib import Path

    file = Path(path or Path(__file__).with_name("fused_linear.py"))
    text = file.read_text()
    table = "\n".join("    " + line for line in tradeoff_table().splitlines())
    new = text.replace("@TRADEOFF@", table) if "@TRADEOFF@" in text else re.sub(
        r"(?m)^    =+  =+.*\n    layer  .*\n    =+  =+.*\n(?:    .*\n)*?    =+  =+[^\n]*", lambda _: table, text, count=1)
    if new != text:
        file.write_text(new)
    return new != text


if __name__ == "__main__":
    # python -m duallora_kernels.ops.fused_linear_cost [--update-docstring]: the figures of
    # ops/fused_linear.py's docstring (re-made whenever the tile lists change)
    import sys

    if "--update-docstring" in sys.argv[1:]:
        print("updated ops/fused_linear.py" if update_docstring() else "ops/fused_linear.py is up to date")
    else:
        print(tradeoff_table())
