"""Device operations of one forward+backward of a variant (``kind="op_count"`` rows of
``duallora bench``; the budget of the fused step is :data:`duallora_kernels.opcount.STEP_BUDGET`,
the frozen layer's :data:`~duallora_kernels.opcount.FROZEN_STEP`), after one warm-up step,
counted two ways:

* ``"opcount"`` (CPU): :func:`duallora_kernels.opcount.count_device_ops`, a TorchDispatchMode
  that sees every aten op doing device work (views and bare allocations aside) plus every Triton
  launch; the backward runs on the calling thread there, so the mode sees it.
* ``"torch.profiler"`` (CUDA): autograd runs the backward on its own device threads, where a
  TorchDispatchMode is not active, so the count is the CUDA activities of one profiled step:
  kernels (Triton, cuBLAS, Inductor's), memcpy and memset. ``syncs`` is None there.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .problems import LayerProblem, amp_name
from .results import error_text
from .variants import FUSED_TRITON, make_step, variant_unavailable

__all__ = ["METHODS", "OpCount", "count_step", "device_activities", "op_count_row", "count_variant"]

#: How a count was made (the rows' ``method``), and what that means.
METHODS: dict[str, str] = {
    "opcount": "duallora_kernels.opcount.count_device_ops: aten ops doing device work (views and allocations "
               "aside) + Triton launches, forward and backward on the calling thread (CPU)",
    "torch.profiler": "torch.profiler CUDA activities of one step after a warm-up: kernels, memcpy, memset",
}
_DEVICE_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass
class OpCount:
    """The device operations of one step: ``total`` = sum of ``kernels`` and ``torch_ops``."""

    method: str
    kernels: dict[str, int] = field(default_factory=dict)
    torch_ops: dict[str, int] = field(default_factory=dict)
    syncs: list[str] | None = None

    @property
    def total(self) -> int:
        return sum(self.kernels.values()) + sum(self.torch_ops.values())


def _count_opcount(step: Callable[[], None]) -> OpCount:
    from ..opcount import count_device_ops

    with count_device_ops() as ops:
        step()
    return OpCount("opcount", dict(ops.kernels), dict(ops.torch_ops), list(ops.syncs))


def device_activities(events: Any) -> Counter:
    """Names of the device-side operations among profiler ``events`` (FunctionEvents):
    CUDA events whose activity is a kernel, memcpy or memset (annotations left out)."""
    from torch.autograd import DeviceType

    out: Counter = Counter()
    for e in events:
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        kind = getattr(e, "activity_type", None)
        if kind is not None and kind not in _DEVICE_ACTIVITIES:
            continue
        if kind is None and (getattr(e, "is_user_annotation", False) or e.name.startswith("ProfilerStep")):
            continue  # older torch: no activity type on the event
        out[e.name] += 1
    return out


def _count_profiler(step: Callable[[], None], device: torch.device) -> OpCount:
    from torch.profiler import ProfilerActivity, profile

    # CUPTI detached when the session ends, so that it slows no later timing (kineto's default
    # since torch 2.7; said explicitly for older ones). The benchmark also counts only after the
    # timings of a case.
    os.environ.setdefault("TEARDOWN_CUPTI", "1")
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    return OpCount("torch.profiler", dict(device_activities(prof.events())), {}, None)


def count_step(step: Callable[[], None], device: torch.device, *, warmup: int = 1) -> OpCount:
    """Device operations of one call of ``step`` (after ``warmup`` calls), by the method the
    device allows (module doc)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        return _count_profiler(step, device)
    return _count_opcount(step)


def op_count_row(problem: LayerProblem, variant: str, count: OpCount | None, *, status: str = "ok",
                 reason: str | None = None) -> dict[str, Any]:
    """One ``kind="op_count"`` result row (a forward+backward of ``variant`` on ``problem``). The
    budgets are those of a step without autocast: under autocast every variant also pays its casts
    (x, W0 and b to the autocast dtype and dX back; the unfused and PEFT variants the adapter factors
    too), so ``budget`` is None there."""
    from ..opcount import FROZEN_STEP, STEP_BUDGET

    shape = problem.shape
    budget = STEP_BUDGET if variant in FUSED_TRITON else FROZEN_STEP if variant == "frozen" else None
    row: dict[str, Any] = {
        "kind": "op_count", "layer": shape.name, "shape": shape.key, "d": shape.d, "n": shape.n,
        "batch": problem.batch, "m": problem.m, "rank": None if variant == "frozen" else problem.rank,
        "dtype": str(problem.dtype).replace("torch.", ""), "amp": amp_name(problem.amp), "pass": "fwd+bwd",
        "variant": variant, "status": status, "reason": reason, "device_ops": None, "method": None,
        "budget": budget if problem.amp is None else None,
        "kernels": None, "torch_ops": None, "syncs": None,
    }
    if count is not None:
        row.update(device_ops=count.total, method=count.method, kernels=count.kernels, torch_ops=count.torch_ops,
                   syncs=count.syncs)
    return row


def count_variant(variant: str, problem: LayerProblem, device: torch.device) -> dict[str, Any]:
    """The ``op_count`` row of one variant on ``problem``: counted where it can run (the fused
    kernel on the CPU only under TRITON_INTERPRET=1), else skipped with the reason; an exception
    becomes an ``error`` row."""
    reason = variant_unavailable(variant, device, "count")
    if reason:
        return op_count_row(problem, variant, None, status="skipped", reason=reason)
    try:
        return op_count_row(problem, variant, count_step(make_step(variant, "fwd+bwd", problem), device))
    except Exception as exc:  # recorded, and the matrix goes on
        return op_count_row(problem, variant, None, status="error", reason=error_text(exc))
