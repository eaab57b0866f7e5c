"""GPU memory of a training step: its peak and time at one batch (``step_memory`` rows) and the
largest batch whose step fits a memory budget (``max_batch`` rows)."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from .vit_models import training_step

__all__ = ["is_oom", "free_cuda", "step_memory", "search_largest", "largest_batch"]


def is_oom(exc: BaseException) -> bool:
    """True for the CUDA out-of-memory errors a trial may raise (the allocator's, cuBLAS's)."""
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def step_memory(model: nn.Module, batch: int, num_classes: int, device: torch.device, *, steps: int = 3) -> dict[str, Any]:
    """Peak allocator bytes and median time of a training step at ``batch`` (CUDA)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    training_step(model, opt, batch, num_classes)  # optimizer state and kernels warm
    torch.cuda.synchronize(device)
    free_cuda()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        training_step(model, opt, batch, num_classes, seed=s)
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": int(peak), "resident_bytes": int(base), "step_ms": statistics.median(times)}


def search_largest(fits: Callable[[int], bool], start: int = 16, cap: int = 4096) -> int:
    """The largest b in [1, cap] with ``fits(b)``, assuming fits is monotone (True up to some b):
    doubling from ``start`` (halving if it does not fit), then bisection. 0 if even 1 does not fit."""
    lo, hi = 0, None  # fits(lo) (0 trivially), not fits(hi)
    b = max(1, min(start, cap))
    if fits(b):
        lo = b
        while lo < cap:
            b = min(cap, lo * 2)
            if fits(b):
                lo = b
            else:
                hi = b
                break
        if hi is None:
            return lo
    else:
        hi = b
        while hi > 1:
            b = hi // 2
            if fits(b):
                lo = b
                break
            hi = b
        if lo == 0:
            return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def largest_batch(model: nn.Module, budget_bytes: int, num_classes: int, device: torch.device, *,
                  start: int = 32, cap: int = 4096) -> dict[str, Any]:
    """The largest batch whose training step fits when PyTorch's allocator may use at most
    ``budget_bytes`` (``torch.cuda.set_per_process_memory_fraction``; the model's weights count,
    the CUDA context does not). Out-of-memory errors are caught; memory is freed between trials
    and the fraction reset to 1 at the end."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(idx).total_memory
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    trials: dict[int, bool] = {}

    def fits(b: int) -> bool:
        ok = True
        free_cuda()
        try:
            training_step(model, opt, b, num_classes)
            torch.cuda.synchronize(device)
        except Exception as exc:
            if not is_oom(exc):
                raise
            ok = False
        opt.zero_grad(set_to_none=True)
        free_cuda()
        trials[b] = ok
        return ok

    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), idx)
    try:
        best = search_largest(fits, start=start, cap=cap)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, idx)
        free_cuda()
    return {"max_batch": best, "trials": {str(k): v for k, v in sorted(trials.items())}}
