"""Timing one step, what it moves, and the whole matrix (:func:`run_bench`).

Timing (:func:`time_callable`): on a GPU ``triton.testing.do_bench`` (median of the timed runs,
after its warm-up; it also flushes L2 before every run), on the CPU a wall-clock loop
(warm-up, then the median of single-call times). Either way the inputs x and dY rotate among
several buffers (:func:`buffer_count`) so that no run finds the previous run's data in cache.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from . import device_ops
from .device_memory import is_oom
from .devices import device_info, peak_key
from .problems import (TOKENS, TORCH_DTYPES, LayerProblem, LayerShape, amp_name, goal_met, make_problem, ratio,
                       split_rank)
from .results import error_text
from .variants import PASSES, VARIANTS, make_step, variant_unavailable

__all__ = ["Timing", "buffer_count", "time_callable", "flop_count", "byte_count", "timing_row", "comparison_rows",
           "run_bench"]


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int | None
    timer: str


def buffer_count(problem_bytes_per_buffer: int, device: torch.device, cap: int = 8) -> int:
    """How many x/dY buffers to rotate: enough that one round covers twice the GPU's L2 (2 on CPU)."""
    if device.type != "cuda":
        return 2
    props = torch.cuda.get_device_properties(device.index if device.index is not None else torch.cuda.current_device())
    l2 = int(getattr(props, "L2_cache_size", 0)) or 50 * 2**20
    return max(2, min(cap, math.ceil(2 * l2 / max(1, problem_bytes_per_buffer))))


def time_callable(fn: Callable[[], Any], device: torch.device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
                  min_reps: int = 5, max_reps: int = 10000) -> Timing:
    """Median time of ``fn()`` in ms. CUDA: ``triton.testing.do_bench`` (L2 flushed before each
    run). CPU: ``fn()`` once, warm-up calls for ``warmup_ms``, then single calls timed with
    ``time.perf_counter`` until ``rep_ms`` have passed and at least ``min_reps`` ran."""
    if device.type == "cuda":
        import triton.testing

        with torch.cuda.device(device):
            q50, q20, q80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(q50), float(q20), float(q80), None, "triton.testing.do_bench")
    fn()
    t_end = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < t_end:
        fn()
    times: list[float] = []
    t_stop = time.perf_counter() + rep_ms / 1e3
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_stop):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return Timing(statistics.median(times), qs[1], qs[7], len(times), "wall-clock (time.perf_counter)")


def flop_count(m: int, d: int, n: int, rank: int, variant: str, pass_: str) -> int:
    """The useful FLOPs of a pass (2 per multiply-add; bias and elementwise work ignored).
    frozen: fwd ``2mnd``, bwd ``2mnd`` (dX only). Low-rank variants add ``2mr(d+n)`` forward and
    ``4mr(d+n)`` backward (dY B, U A, dA, dB); ``fused_fixed_a`` has no dA: ``2mr(d+2n)`` backward."""
    base = 2 * m * n * d
    if variant == "frozen":
        return base if pass_ == "fwd" else 2 * base
    lo = 2 * m * rank * (d + n)
    if pass_ == "fwd":
        return base + lo
    return 2 * base + lo + (2 * m * rank * (d + 2 * n) if variant == "fused_fixed_a" else 2 * lo)


def byte_count(m: int, d: int, n: int, rank: int, variant: str, pass_: str, elsize: int) -> int:
    """The least memory traffic of a pass: every large tensor moved once (the table in
    ``ops/fused_linear.py``). Forward: read X, W0, b; write Y. Backward: read dY, W0; write dX;
    the low-rank variants also read X again (for dA; not ``fused_fixed_a``, which has no dA), write T
    (m x r, x's dtype) forward and read it backward, and move the factors and their gradients. Unfused
    code moves more; its GB/s is an effective rate over this count."""
    fwd = elsize * (m * d + n * d + m * n + n)
    bwd = elsize * (m * n + n * d + m * d)
    if variant != "frozen":
        small = elsize * rank * (d + n)
        fwd += small + elsize * m * rank
        bwd += elsize * m * rank + 2 * small + (0 if variant == "fused_fixed_a" else elsize * m * d)
    return fwd if pass_ == "fwd" else fwd + bwd


def timing_row(problem: LayerProblem, variant: str, pass_: str, timing: Timing | None, *,
               status: str = "ok", reason: str | None = None, peaks: dict | None = None) -> dict[str, Any]:
    """One ``kind="timing"`` result row. Under autocast (``amp``), ``dtype`` is the tensors' own
    (float32) and ``bytes`` and the peak fractions are those of the autocast dtype the matmuls run
    in: autocast's casts (x, W0 and b for every variant, the adapter factors too for the unfused
    and PEFT ones) are traffic on top."""
    shape, m = problem.shape, problem.m
    dtype = str(problem.dtype).replace("torch.", "")
    compute = str(problem.compute_dtype).replace("torch.", "")
    rank = None if variant == "frozen" else problem.rank
    r_o, r_r = split_rank(problem.rank)
    fl = flop_count(m, shape.d, shape.n, problem.rank, variant, pass_)
    by = byte_count(m, shape.d, shape.n, problem.rank, variant, pass_, problem.compute_dtype.itemsize)
    row: dict[str, Any] = {
        "kind": "timing", "layer": shape.name, "shape": shape.key, "d": shape.d, "n": shape.n,
        "batch": problem.batch, "m": m, "rank": rank,
        "rank_orth": None if rank is None else r_o, "rank_res": None if rank is None else r_r,
        "dtype": dtype, "amp": amp_name(problem.amp), "pass": pass_, "variant": variant, "status": status,
        "reason": reason, "median_ms": None, "p20_ms": None, "p80_ms": None, "reps": None,
        "flops": fl, "bytes": by, "tflops": None, "gbps": None, "pct_peak_flops": None, "pct_peak_bw": None,
    }
    if timing is not None:
        s = timing.median_ms / 1e3
        row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
                   tflops=fl / s / 1e12, gbps=by / s / 1e9)
        if peaks:
            peak_f = peaks["flops"].get(peak_key(compute))
            if peak_f:
                row["pct_peak_flops"] = 100 * fl / s / peak_f
            row["pct_peak_bw"] = 100 * by / s / peaks["bandwidth"]
    return row


def floor_fields(t: dict[str, float | None], m: int, n: int, d: int, rank: int, compute_dtype: str,
                 peaks: dict | None) -> dict[str, Any]:
    """The forward+backward floor of one problem: the measured frozen time times the roofline ratio
    of the fused op's unavoidable work to the frozen layer's at this rank
    (:func:`duallora_kernels.ops.fused_linear_cost.floor_ratio`, on this device's peaks), and each
    fused variant over it (goal: ``fused_over_floor``). None without the device's peaks or a frozen time."""
    from ..ops.fused_linear_cost import DevicePeaks, floor_ratio

    out: dict[str, Any] = {"floor_over_frozen": None, "floor_ms": None}
    out.update({f"{v}_over_floor": None for v in FUSED_VARIANTS})
    if not peaks or t.get("frozen") is None:
        return out
    device = DevicePeaks(peaks.get("source", "?"), peaks["flops"], peaks["bandwidth"])
    lowp = compute_dtype in ("bfloat16", "float16")
    ratio_ = floor_ratio(m, n, d, rank, device, elt=2 if lowp else 4)
    floor_ms = t["frozen"] * ratio_
    out.update(floor_over_frozen=ratio_, floor_ms=floor_ms)
    out.update({f"{v}_over_floor": ratio(t.get(v), floor_ms) for v in FUSED_VARIANTS})
    out["goal_fused_over_floor"] = goal_met("fused_over_floor", out["fused_over_floor"])
    return out


#: The variants that run the fused Triton op (auto design, then each design forced).
FUSED_VARIANTS = ("fused", "fused_single", "fused_split", "fused_tma")


def comparison_rows(timing_rows: Iterable[dict[str, Any]], peaks: dict | None = None) -> list[dict[str, Any]]:
    """One ``kind="comparison"`` row per (shape, batch, dtype, pass, rank): the variants' medians,
    the ratios fused/frozen, unfused/fused, peft/fused, unfused_compiled/fused, cuda/frozen,
    cuda/fused, fused_fixed_a/frozen and fused_fixed_a/fused (None where a side is missing), on
    fwd+bwd rows the floor (:func:`floor_fields`, with the device's ``peaks``) and each variant's
    device operations (``<variant>_ops``, from the ``op_count`` rows among ``timing_rows``)."""
    timing_rows = list(timing_rows)
    def amp(r: dict[str, Any]) -> str:
        return r.get("amp", "off")  # rows of schema /1 and /2 ran without autocast

    n_ops = {(r["shape"], r["batch"], r["dtype"], amp(r), r["variant"], r["rank"]): r["device_ops"]
             for r in timing_rows if r["kind"] == "op_count"}
    rows = [r for r in timing_rows if r["kind"] == "timing"]
    # the dtype the matmuls ran in (the autocast dtype under --amp): what the floor is costed in
    compute = {(r["shape"], r["batch"], r["dtype"], amp(r)): (r["amp"] if amp(r) != "off" else r["dtype"])
               for r in rows}
    ms = {(r["shape"], r["batch"], r["dtype"], amp(r), r["pass"], r["variant"], r["rank"]): r["median_ms"]
          for r in rows}
    keys = sorted({(r["layer"], r["shape"], r["d"], r["n"], r["batch"], r["m"], r["dtype"], amp(r), r["pass"],
                    r["rank"]) for r in rows if r["rank"] is not None},
                  key=lambda k: (k[6], k[7], k[2], k[3], k[4], PASSES.index(k[8]), k[9]))
    out = []
    for layer, shape, d, n, batch, m, dtype, amp_, pass_, rank in keys:
        t = {v: ms.get((shape, batch, dtype, amp_, pass_, v, None if v == "frozen" else rank)) for v in VARIANTS}
        f_fr, u_f = ratio(t["fused"], t["frozen"]), ratio(t["unfused"], t["fused"])
        c_f, cu_fr = ratio(t["unfused_compiled"], t["fused"]), ratio(t["cuda"], t["frozen"])
        ops = {v: n_ops.get((shape, batch, dtype, amp_, v, None if v == "frozen" else rank)) for v in VARIANTS}
        out.append({
            "kind": "comparison", "layer": layer, "shape": shape, "d": d, "n": n, "batch": batch, "m": m,
            "dtype": dtype, "amp": amp_, "pass": pass_, "rank": rank,
            **{f"{v}_ms": t[v] for v in VARIANTS},
            "fused_over_frozen": f_fr, "unfused_over_fused": u_f, "peft_over_fused": ratio(t["peft"], t["fused"]),
            "unfused_over_frozen": ratio(t["unfused"], t["frozen"]), "unfused_compiled_over_fused": c_f,
            "goal_fused_over_frozen": goal_met("fused_over_frozen", f_fr) if pass_ == "fwd+bwd" else None,
            "goal_unfused_over_fused": goal_met("unfused_over_fused", u_f) if pass_ == "fwd+bwd" else None,
            "goal_unfused_compiled_over_fused": goal_met("unfused_compiled_over_fused", c_f) if pass_ == "fwd+bwd" else None,
            "cuda_over_frozen": cu_fr, "cuda_over_fused": ratio(t["cuda"], t["fused"]),
            "fused_fixed_a_over_frozen": ratio(t["fused_fixed_a"], t["frozen"]),
            "fused_fixed_a_over_fused": ratio(t["fused_fixed_a"], t["fused"]),
            "goal_cuda_over_frozen": goal_met("cuda_over_frozen", cu_fr) if pass_ == "fwd+bwd" else None,
            **({f"{v}_ops": ops[v] for v in VARIANTS} if pass_ == "fwd+bwd" else {}),
            **(floor_fields(t, m, n, d, rank, compute.get((shape, batch, dtype, amp_), dtype), peaks)
               if pass_ == "fwd+bwd" else {}),
        })
    return out


def run_bench(
    *,
    device: torch.device,
    shapes: Sequence[LayerShape],
    ranks: Sequence[int],
    dtypes: Sequence[str],
    variants: Sequence[str] = VARIANTS,
    passes: Sequence[str] = PASSES,
    batch: int = 64,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    buffers: int | None = None,
    seed: int = 0,
    progress: bool = True,
    on_group: Callable[[list[dict[str, Any]]], None] | None = None,
    count_ops: bool = True,
    amp: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """Time the matrix (every forward under ``torch.autocast(device, amp)`` when ``amp`` is given;
    the dtypes must then be float32); returns the ``timing`` and ``op_count`` rows followed by the ``comparison`` rows.

    The frozen layer does not depend on the rank and is timed once per (shape, dtype, pass).
    A variant that cannot run here gets a ``status="skipped"`` row with its reason; one that fails
    (e.g. out of memory) a ``status="error"`` row, and the run goes on. With ``count_ops``, each
    variant's forward+backward also gets an ``op_count`` row (:mod:`.device_ops`),
    counted once every variant of that (dtype, shape, rank) is timed.
    ``on_group`` is called with the rows so far after each variant of each (dtype, shape, rank),
    so a caller can save partial results.
    """
    peaks = device_info(device).get("peaks")
    cases = [(dt, s) for dt in dtypes for s in shapes]
    per_case = len(passes) * (("frozen" in variants) + len(ranks) * sum(v != "frozen" for v in variants))
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cases) * per_case, desc="bench", leave=False, dynamic_ncols=True)
    try:
        for dtype, shape in cases:
            elsize = (amp or TORCH_DTYPES[dtype]).itemsize
            nbuf = buffers or buffer_count(batch * TOKENS * (shape.d + shape.n) * elsize, device)
            base = make_problem(shape, ranks[0], dtype, device, batch=batch, buffers=nbuf, seed=seed, amp=amp)
            for rank_i, rank in enumerate(ranks):
                problem = base if rank_i == 0 else base.with_rank(rank)
                for variant in variants:
                    if variant == "frozen" and rank_i:
                        continue
                    reason = variant_unavailable(variant, device, "time")
                    for pass_ in passes:
                        if bar is not None:
                            bar.set_postfix_str(f"{dtype} {shape.key} r={rank} {variant} {pass_}")
                        if reason:
                            rows.append(timing_row(problem, variant, pass_, None, status="skipped", reason=reason))
                        else:
                            try:
                                t = time_callable(make_step(variant, pass_, problem), device,
                                                  warmup_ms=warmup_ms, rep_ms=rep_ms)
                                rows.append(timing_row(problem, variant, pass_, t, peaks=peaks))
                            except Exception as exc:  # recorded, and the matrix goes on
                                if is_oom(exc) and device.type == "cuda":
                                    torch.cuda.empty_cache()
                                rows.append(timing_row(problem, variant, pass_, None, status="error",
                                                       reason=error_text(exc)))
                        if bar is not None:
                            bar.update(1)
                    if on_group is not None:
                        on_group(rows + comparison_rows(rows, peaks))
                if count_ops:  # after this problem's timings: a profiler session never precedes them
                    for variant in variants:
                        if variant != "frozen" or not rank_i:
                            rows.append(device_ops.count_variant(variant, problem, device))
                    if on_group is not None:
                        on_group(rows + comparison_rows(rows, peaks))
            del base, problem
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if bar is not None:
            bar.close()
    return rows + comparison_rows(rows, peaks)
