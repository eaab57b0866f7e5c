"""Two pieces of ``duallora bench`` kept beside :mod:`duallora_kernels.benchmark`: the
``torch.compile``'d unfused variant, and the device-operation count of one forward+backward.

**unfused_compiled** is what a careful user writes instead of using the fused op:
:func:`~duallora_kernels.benchmark.unfused_dual_lora_linear` under ``torch.compile`` (default
mode, ``dynamic=False``, ``fullgraph=True``, so a graph break is an error row rather than a
silent eager fallback). It runs on a CUDA device only: on the CPU, Inductor's C++ code takes
minutes per shape and is not what the goals compare against, so the CPU gets a ``skipped`` row.
Each new problem (shape, rank, dtype) starts from ``torch._dynamo.reset()``: dynamo keeps at most
8 compiled versions per function and silently runs eager code past that, which a matrix of 60
cases would hit.

**Device operations** of one forward+backward (``kind="op_count"`` rows; the budget of the fused
step is :data:`duallora_kernels.opcount.STEP_BUDGET`, the frozen layer's
:data:`~duallora_kernels.opcount.FROZEN_STEP`), after one warm-up step, counted two ways:

* ``"opcount"`` (CPU): :func:`duallora_kernels.opcount.count_device_ops`, a TorchDispatchMode
  that sees every aten op doing device work (views and bare allocations aside) plus every Triton
  launch; the backward runs on the calling thread there, so the mode sees it.
* ``"torch.profiler"`` (CUDA): autograd runs the backward on its own device threads, where a
  TorchDispatchMode is not active, so the count is the CUDA activities of one profiled step:
  kernels (Triton, cuBLAS, Inductor's), memcpy and memset. ``syncs`` is None there.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["COMPILED", "METHODS", "OpCount", "compiled_unavailable", "compiled_forward", "count_step",
           "op_count_row", "count_variant",
           "cpu_bf16_matmul", "device_activities"]

#: The torch.compile'd unfused variant's name in ``--variants`` and the JSON.
COMPILED = "unfused_compiled"
#: How a count was made (the rows' ``method``), and what that means.
METHODS: dict[str, str] = {
    "opcount": "duallora_kernels.opcount.count_device_ops: aten ops doing device work (views and allocations "
               "aside) + Triton launches, forward and backward on the calling thread (CPU)",
    "torch.profiler": "torch.profiler CUDA activities of one step after a warm-up: kernels, memcpy, memset",
}
_DEVICE_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")


# ----------------------------------------------------------------------------- torch.compile'd unfused
def compiled_unavailable(device: torch.device) -> str | None:
    """Why the compiled variant cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return ("torch.compile'd unfused variant runs on a CUDA device only (Inductor's CPU code takes minutes "
                "per shape and is not what the goals compare against)")
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    return None


def compiled_forward(problem: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(x)``: the unfused composition of ``problem`` under ``torch.compile`` (compiled on the
    first call, once per problem; see the module doc)."""
    f = problem._cache.get(COMPILED)
    if f is None:
        from .benchmark import unfused_dual_lora_linear

        import torch._dynamo

        torch._dynamo.reset()
        fn = torch.compile(unfused_dual_lora_linear, dynamic=False, fullgraph=True)
        p = problem

        def f(x: torch.Tensor) -> torch.Tensor:
            return fn(x, p.weight, p.bias, p.orth_a, p.orth_b, p.res_a, p.res_b, p.basis_x, p.gate,
                      p.orth_scale, p.res_scale)

        problem._cache[COMPILED] = f
    return f


# ----------------------------------------------------------------------------- device-operation counts
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
    from .opcount import count_device_ops

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
    import os

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


def op_count_row(problem: Any, variant: str, count: OpCount | None, *, status: str = "ok",
                 reason: str | None = None) -> dict[str, Any]:
    """One ``kind="op_count"`` result row (a forward+backward of ``variant`` on ``problem``)."""
    from .opcount import FROZEN_STEP, STEP_BUDGET

    shape = problem.shape
    row: dict[str, Any] = {
        "kind": "op_count", "layer": shape.name, "shape": shape.key, "d": shape.d, "n": shape.n,
        "batch": problem.batch, "m": problem.m, "rank": None if variant == "frozen" else problem.rank,
        "dtype": str(problem.dtype).replace("torch.", ""), "pass": "fwd+bwd", "variant": variant,
        "status": status, "reason": reason, "device_ops": None, "method": None,
        "budget": STEP_BUDGET if variant == "fused" else FROZEN_STEP if variant == "frozen" else None,
        "kernels": None, "torch_ops": None, "syncs": None,
    }
    if count is not None:
        row.update(device_ops=count.total, method=count.method, kernels=count.kernels, torch_ops=count.torch_ops,
                   syncs=count.syncs)
    return row


def count_variant(variant: str, problem: Any, device: torch.device) -> dict[str, Any]:
    """The ``op_count`` row of one variant on ``problem``: counted where it can run (the fused
    kernel on the CPU only under TRITON_INTERPRET=1), else skipped with the reason; an exception
    becomes an ``error`` row."""
    from .benchmark import error_text, make_step, variant_unavailable

    reason = variant_unavailable(variant, device, "count")
    if reason:
        return op_count_row(problem, variant, None, status="skipped", reason=reason)
    try:
        return op_count_row(problem, variant, count_step(make_step(variant, "fwd+bwd", problem), device))
    except Exception as exc:  # recorded, and the matrix goes on
        return op_count_row(problem, variant, None, status="error", reason=error_text(exc))


# ----------------------------------------------------------------------------- CPU bfloat16
def cpu_bf16_matmul() -> tuple[bool, str]:
    """Whether this CPU multiplies bfloat16 matrices in hardware, and how that was decided.

    Without it, bfloat16 matmuls run through a float32 emulation 100-400x slower than float32,
    which is why ``--quick`` leaves bfloat16 out there. Decided without timing anything: on x86
    the CPU flags torch (and oneDNN) read, ``avx512_bf16`` or AMX tiles
    (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``); on ARM the ``bf16``
    feature in /proc/cpuinfo; anything else counts as no support.
    """
    import platform

    cpu = getattr(torch, "cpu", None)
    for flag, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported")):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True, f"the CPU has {flag}"
        except Exception:  # a probe that fails says nothing either way
            pass
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            with open("/proc/cpuinfo") as f:
                if any(line.startswith("Features") and "bf16" in line.split(":", 1)[-1].split() for line in f):
                    return True, "the CPU has the ARM bf16 feature"
        except OSError:
            pass
    return False, "the CPU has no bfloat16 matmul instructions (no avx512_bf16, AMX or ARM bf16)"
