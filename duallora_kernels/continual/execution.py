"""Where and how a run's training steps execute: device, autocast dtype and torch.compile backend,
each checked on this machine before anything runs (one-line ValueErrors), and the training step itself under
them (:func:`training_step`: autocast, torch.compile, and a DistributedDataParallel wrapper under torchrun)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import AMP_MODES, TrainConfig

__all__ = ["Execution", "amp_dtype", "compile_backend", "check_execution", "default_workers", "training_step"]


@dataclass(frozen=True)
class Execution:
    """Where and how a run's training steps execute: device, autocast dtype (None: off), torch.compile backend
    (None: eager), this process's place in a torchrun group, and how its data loaders feed it (worker
    processes that decode images; pinned memory for non-blocking copies to a GPU)."""

    device: torch.device
    amp_dtype: torch.dtype | None
    compile_backend: str | None
    rank: int = 0
    world: int = 1
    workers: int = 0
    pin_memory: bool = False


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device``; ValueError where the device cannot compute in it.

    fp16 on a CPU needs native float16 matrix products: oneDNN's check
    (``torch.ops.mkldnn._is_mkldnn_fp16_supported()``: AVX512-FP16 or AMX-FP16). Without them float16 autocast
    would run emulated, slower than float32. bf16 on a CUDA GPU needs ``torch.cuda.is_bf16_supported()``."""
    if amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "off":
        return None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cpu" and amp == "fp16" and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        raise ValueError("--amp fp16: this CPU has no native float16 matrix multiply (oneDNN finds neither "
                         "AVX512-FP16 nor AMX-FP16), so float16 autocast would only be emulated; use --amp bf16 "
                         "or --amp off")
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--amp bf16: the GPU {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         "use --amp fp16 or --amp off")
    return dtype


def compile_backend(spec: str, device: torch.device) -> str | None:
    """The torch.compile backend of ``--compile`` (``off``: None; ``auto``: inductor), after compiling and running
    a small probe on ``device``; ValueError (one line) where it does not work (e.g. inductor on a CPU
    without a C++ compiler)."""
    if spec == "off":
        return None
    from torch import _dynamo

    backend = "inductor" if spec == "auto" else spec
    known = _dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"--compile {spec}: torch.compile has no backend {backend!r} (it has {', '.join(known)}); "
                         "use --compile (inductor) or --compile aot_eager")

    try:
        _compile_probe(backend, str(device))
    except Exception as err:  # any failure of the compiler stack: say which and what to do
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        hint = ("inductor's CPU code needs a working C++ compiler (g++ or clang on PATH, or CXX); "
                if backend == "inductor" and device.type == "cpu" else "")
        raise ValueError(f"--compile {spec}: torch.compile with backend {backend!r} does not work here "
                         f"({type(err).__name__}: {first}); {hint}use --compile aot_eager (no code generation) "
                         "or leave --compile out") from None
    return backend


@functools.lru_cache(maxsize=None)
def _compile_probe(backend: str, device: str) -> None:
    """Compile and run a small function with ``backend`` on ``device`` (once per process: the command line
    checks every run's settings first, then each run checks its own)."""
    from torch import _dynamo

    def probe(a: torch.Tensor) -> torch.Tensor:
        return F.linear(a, a).relu().sum()

    try:
        # no random numbers: the probe must not move the global RNG the run is seeded with
        torch.compile(probe, backend=backend, fullgraph=True)(torch.linspace(-1, 1, 16, device=device).view(4, 4))
    finally:
        _dynamo.reset()


def check_execution(config: TrainConfig) -> Execution:
    """Device, autocast and compiler of a run, each checked on this machine (ValueError, before anything runs)."""
    device = distributed.device_for_rank()
    workers = config.workers if config.workers is not None else (
        0 if config.dataset == "fashion-mnist" else default_workers())
    return Execution(device, amp_dtype(config.amp, device), compile_backend(config.compile, device),
                     distributed.rank(), distributed.world_size(), workers, device.type == "cuda")


def default_workers() -> int:
    """``--workers``' default for data sets that decode images: the cores this process may use, one left to the
    training loop, shared between the processes torchrun starts on this node, at most 8."""
    import os

    from ..cli import usable_cores

    per_process = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_process - 1))


def training_step(model: nn.Module, t: int, offset: int, ex: Execution) -> Callable[..., torch.Tensor]:
    """``step(x, y, weight) -> loss`` of task ``t`` of a ContinualViT (its labels start at ``offset``): under
    autocast when --amp is on, compiled when --compile is, and under torchrun through a DistributedDataParallel
    wrapper made for this task.

    The wrapper is made after ``begin_task``, so it registers only what this task trains (its head, the
    orthogonal adapters, the residual blocks where they exist): frozen residual blocks and the adapters
    that are off on the first task are not parameters that require gradients, so DDP's unused-parameter
    check has nothing to find (no ``find_unused_parameters``). Buffers (bases, frozen blocks) are not
    broadcast: every rank builds them from the same all-reduced statistics."""
    world, dtype = ex.world, ex.amp_dtype
    if world > 1:
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # no buffer sync in forward (newer torch names it forward_sync_buffers, older broadcast_buffers)
        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
        net = DistributedDataParallel(model, device_ids=[ex.device.index] if ex.device.type == "cuda" else None,
                                      **no_sync)
        cols = model.task_label_ranges[t]

        def logits_of(x: torch.Tensor) -> torch.Tensor:
            return net(x)[:, cols.start:cols.stop]  # through DDP's forward: its gradient hooks need it
    else:
        def logits_of(x: torch.Tensor) -> torch.Tensor:
            return model.logits_per_task(x)[t]

    def step(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(ex.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = logits_of(x)
        if dtype is not None:
            logits = logits.float()
        if world == 1:
            return F.cross_entropy(logits, y - offset)
        # DDP averages the ranks' gradients: the sum over this rank's part times world / global batch size
        # makes that average the gradient of the global batch's mean loss, whatever the parts' sizes.
        return F.cross_entropy(logits, y - offset, reduction="sum") * weight

    if ex.compile_backend is None:
        return step
    from torch import _dynamo

    _dynamo.reset()  # the previous task's graphs guard on state that has changed (heads, gates)
    # fullgraph in one process (no graph break anywhere); DDP's graph splitting at its buckets needs breaks
    return torch.compile(step, backend=ex.compile_backend, fullgraph=world == 1)
