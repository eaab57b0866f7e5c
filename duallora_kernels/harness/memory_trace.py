"""A training step's memory, traced without a GPU: the step runs on fake tensors (shapes and
dtypes, no data, no arithmetic), and a dispatch mode follows the life of every storage it makes.

How (the rule the planner's numbers come from):

* The model is built with uninitialised storage (:func:`~.vit_models.build_vit_variant` with
  ``empty=True``: the same code paths as the measured model, no init arithmetic), then every
  parameter and buffer is swapped for a fake tensor of the same shape, dtype and view structure.
* :class:`StepMemoryTracer` (a ``TorchDispatchMode`` under autograd) sees every aten op of the
  forward, the backward and the optimizer step; each new output storage is an allocation of
  its size rounded as the CUDA caching allocator rounds a block (512 B), and is freed when the
  storage dies (a weak reference to the storage object, which PyTorch keeps for as long as the
  C++ storage lives, so a tensor kept only by the autograd graph stays counted).
* Each live storage has one category: ``parameters`` (and buffers), ``optimizer`` (AdamW state
  made by a warm-up step), ``gradients`` (a parameter's ``.grad``, from the accumulate-grad hook),
  ``saved`` (what ``saved_tensors_hooks`` sees autograd keep for backward and that is not a
  parameter: activations, and under AMP the low-precision copies of frozen weights), and
  ``transient`` (everything else: outputs in flight, gradients of activations, the optimizer's
  temporaries). The peak is the largest live total, with its split by category at that moment.

Autocast runs as CPU autocast on fake CPU tensors (CUDA autocast needs a CUDA runtime); for a ViT
both keep the residual stream in float32 and run linear layers and attention in the autocast
dtype. Attention is PyTorch's fused SDPA (flash on the CPU, flash or memory-efficient on a GPU):
the same saved tensors (q, k, v, the output and a float32 log-sum-exp per row). What the kernels
allocate inside one op (cuBLAS and flash-attention workspaces) is not a tensor the trace sees;
:mod:`.memory_plan` adds it per GPU.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .allocator_model import AllocatorReplay

__all__ = ["CATEGORIES", "BLOCK_BYTES", "block_bytes", "PhasePeak", "StepTrace", "StepMemoryTracer", "fake_model",
           "planned_step", "OPTIMIZERS", "make_optimizer", "FakeTraining", "trace_step"]

#: The categories of live memory, in the order a breakdown lists them.
CATEGORIES: tuple[str, ...] = ("parameters", "gradients", "optimizer", "saved", "transient")
#: The CUDA caching allocator rounds every block up to a multiple of 512 bytes (kMinBlockSize in
#: c10/cuda/CUDACachingAllocator.cpp); torch.cuda.max_memory_allocated counts the rounded sizes.
BLOCK_BYTES = 512


def block_bytes(nbytes: int) -> int:
    """The allocator block a storage of ``nbytes`` takes (0 for an empty storage: no block)."""
    return 0 if nbytes <= 0 else -(-nbytes // BLOCK_BYTES) * BLOCK_BYTES


@dataclass
class PhasePeak:
    """The largest live total of one phase (``forward``, ``backward``, ``optimizer``), its split by
    category then, and the allocator model's reserved bytes at the phase's end (reserved only grows)."""

    allocated: int
    at_peak: dict[str, int]
    reserved: int


@dataclass
class StepTrace:
    """One traced step: each phase's peak, the saved activations by dtype (raw storage bytes, as
    :class:`~.saved_bytes.SavedTensorCounter` counts them: parameters left out) and the bytes live
    before the step (parameters, buffers, optimizer state)."""

    batch: int
    phases: dict[str, PhasePeak]
    saved_by_dtype: dict[str, int]
    resident_bytes: int

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved_by_dtype.values())

    @property
    def peak(self) -> PhasePeak:
        """The step's peak: the phase with the most allocated bytes."""
        return max(self.phases.values(), key=lambda p: p.allocated)


class StepMemoryTracer(TorchDispatchMode):
    """Follows every storage an op makes while active; see the module doc for the rule. Each
    allocation and free also goes to an :class:`~.allocator_model.AllocatorReplay`."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, list] = {}  # id(storage) -> [block bytes, category, weakref]
        self.totals: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.phase = "setup"
        self.phases: dict[str, PhasePeak] = {}
        self.saved_by_dtype: dict[str, int] = defaultdict(int)
        self._saved_seen: set[int] = set()
        self.allocator = AllocatorReplay()

    def start_phase(self, name: str) -> None:
        self.phase = name
        self.phases[name] = PhasePeak(self.current, dict(self.totals), self.allocator.reserved)

    def track(self, t: Tensor, category: str) -> None:
        """Count ``t``'s storage as ``category`` (new, or moved from ``transient``)."""
        st = t.untyped_storage()
        key = id(st)
        entry = self._live.get(key)
        if entry is None:
            nbytes = block_bytes(st.nbytes())
            entry = [nbytes, category, weakref.ref(st, lambda _ref, key=key: self._free(key))]
            self._live[key] = entry
            self.totals[category] += nbytes
            self.current += nbytes
            if nbytes:
                self.allocator.alloc(key, nbytes)
        elif entry[1] == "transient" and category != "transient":
            self.totals["transient"] -= entry[0]
            self.totals[category] += entry[0]
            entry[1] = category

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        self._saved_seen.discard(key)  # the id may come back for another storage
        if entry is None:
            return
        self.totals[entry[1]] -= entry[0]
        self.current -= entry[0]
        if entry[0]:
            self.allocator.free(key)

    def saved(self, t: Tensor) -> None:
        """A tensor autograd saves: its storage becomes ``saved`` unless it is a parameter, buffer,
        gradient or optimizer state; each storage's raw bytes count once per dtype."""
        st = t.untyped_storage()
        self.track(t, "saved")
        if id(st) not in self._saved_seen and self._live[id(st)][1] == "saved":
            self._saved_seen.add(id(st))
            self.saved_by_dtype[str(t.dtype).replace("torch.", "")] += int(st.nbytes())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.track(t, "transient")
        peak = self.phases.get(self.phase)
        if peak is not None:
            peak.reserved = self.allocator.reserved
            if self.current > peak.allocated:
                peak.allocated, peak.at_peak = self.current, dict(self.totals)
        return out


def fake_model(model: nn.Module, mode: Any) -> nn.Module:
    """``model`` with every parameter and buffer replaced by a fake tensor of ``mode`` (same shape,
    dtype, device, strides, sharing and ``requires_grad``); the real storage is released."""
    memo: dict[int, tuple[Tensor, Tensor]] = {}  # id(real) -> (real, fake): a parameter shared by two modules stays one

    def fake(t: Tensor) -> Tensor:
        if id(t) not in memo:
            memo[id(t)] = (t, mode.from_tensor(t.detach()))
        return memo[id(t)][1]

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake(b)
    return model


def planned_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, batch: int, num_classes: int,
                 amp: torch.dtype | None, seed: int = 0, phase: Callable[[str], None] = lambda name: None) -> None:
    """The step the planner predicts and the GPU check measures: random images (requiring grad,
    so the backward runs through every block, as :func:`~.saved_bytes.vit_saved_bytes` counts),
    cross-entropy on float32 logits, backward, optimizer step, gradients set to None.
    ``optimizer=None``: an inference forward (no autograd graph). ``phase(name)`` is called as
    each of ``forward``, ``backward`` and ``optimizer`` begins."""
    p = next(model.parameters())
    size = model.patch_embed.img_size
    chans = model.patch_embed.proj.in_channels
    train = optimizer is not None
    g = torch.Generator(device=p.device).manual_seed(seed) if p.device.type != "meta" and not _is_fake(p) else None
    images = torch.randn(batch, chans, *size, device=p.device, dtype=p.dtype, generator=g).requires_grad_(train)
    labels = torch.randint(0, num_classes, (batch,), device=p.device, generator=g)
    dev = "cuda" if p.device.type == "cuda" else "cpu"
    phase("forward")
    with torch.set_grad_enabled(train), torch.autocast(dev, dtype=amp or torch.bfloat16, enabled=amp is not None):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    if not train:
        return
    phase("backward")
    loss.backward()
    phase("optimizer")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


#: Optimizers the planner knows: AdamW (two states per trainable element) and SGD with momentum (one).
OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(model: nn.Module, name: str = "adamw") -> torch.optim.Optimizer | None:
    """``name`` over the trainable parameters, multi-tensor (``foreach``) as on a CUDA device by
    default; None when nothing trains."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return None
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def _warm_state(opt: torch.optim.Optimizer) -> None:
    """The state a measured step finds, made by its warm-up step: what AdamW's and SGD's first
    step create per parameter (``_init_group`` in torch/optim/adamw.py and sgd.py), made directly
    (a fake warm-up step costs seconds). tests/test_memory_plan.py holds it to a real AdamW's."""
    for group in opt.param_groups:
        for p in group["params"]:
            if isinstance(opt, torch.optim.AdamW):
                opt.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            else:
                opt.state[p] = {"momentum_buffer": torch.zeros_like(p)}


class FakeTraining:
    """A model made fake once (from ``build()``: real, uninitialised storage), with its optimizer
    and the state a warm-up step would have made; :meth:`trace` traces one step at any batch."""

    def __init__(self, build: Callable[[], nn.Module], num_classes: int, amp: torch.dtype | None, *,
                 train: bool = True, optimizer: str = "adamw") -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.model = fake_model(build(), self.mode)
        self.num_classes, self.amp = num_classes, amp
        self.opt = None
        with self.mode:
            self.opt = make_optimizer(self.model, optimizer) if train else None
            if self.opt is not None:
                _warm_state(self.opt)

    def trace(self, batch: int) -> StepTrace:
        from ..ops._kernel_utils import observe_launches

        tracer = StepMemoryTracer()
        for t in [*self.model.parameters(), *self.model.buffers()]:
            tracer.track(t, "parameters")
        if self.opt is not None:
            for state in self.opt.state.values():
                for t in state.values():
                    if isinstance(t, Tensor) and t.dim() > 0:  # "step" is a host scalar off capturable mode
                        tracer.track(t, "optimizer")
        resident = tracer.current
        hooks = [p.register_post_accumulate_grad_hook(lambda p: tracer.track(p.grad, "gradients"))
                 for p in self.model.parameters() if p.requires_grad]
        try:
            with ExitStack() as stack:
                stack.enter_context(observe_launches(lambda *a: True, capture=True))  # backend="triton" on CPU tensors
                stack.enter_context(self.mode)
                stack.enter_context(tracer)
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(lambda t: (tracer.saved(t), t)[1],
                                                                             lambda t: t))
                planned_step(self.model, self.opt, batch, self.num_classes, self.amp, phase=tracer.start_phase)
        finally:
            for h in hooks:
                h.remove()
        return StepTrace(batch, tracer.phases, dict(tracer.saved_by_dtype), resident)


def trace_step(build: Callable[[], nn.Module], batch: int, num_classes: int, amp: torch.dtype | None, *,
               train: bool = True, optimizer: str = "adamw") -> StepTrace:
    """Trace one :func:`planned_step` at ``batch`` of the model ``build()`` makes (see :class:`FakeTraining`)."""
    return FakeTraining(build, num_classes, amp, train=train, optimizer=optimizer).trace(batch)
