"""Bytes autograd saves for backward (``kind="saved_bytes"`` rows of ``duallora profile-memory``).

Counted with ``torch.autograd.graph.saved_tensors_hooks`` (:class:`SavedTensorCounter`). The
rule: every tensor autograd saves is mapped to its storage; a storage counts once, at its full
size (``untyped_storage().nbytes()``), however many tensors or views of it are saved, because
that is the memory the graph keeps alive. ``saved_bytes`` is the total; ``activation_bytes``
leaves out storages of parameters and buffers (and any tensor passed as ``exclude``), which exist
whether or not anything is saved. Tensors a custom autograd.Function keeps as ``ctx`` attributes
instead of ``save_for_backward`` are not seen by the hooks; on a GPU :func:`retained_bytes`
(allocator growth across a forward) checks that.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .problems import LayerProblem
from .variants import layer_forward
from .vit_models import vit_images

__all__ = ["SavedBytes", "SavedTensorCounter", "count_saved", "layer_saved_bytes", "retained_bytes",
           "vit_saved_bytes"]


@dataclass
class SavedBytes:
    """What autograd saved for backward (see :class:`SavedTensorCounter` for the rule)."""

    saved_bytes: int
    activation_bytes: int
    tensors: int
    storages: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _storage_key(t: Tensor) -> tuple[Any, ...] | None:
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    ptr = st.data_ptr()
    return None if ptr == 0 else (str(t.device), ptr)


def _storage_bytes(t: Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError, TypeError):
        return t.numel() * t.element_size()


class SavedTensorCounter:
    """Counts the bytes autograd saves for backward while the block runs.

    Rule: each saved tensor is mapped to its storage; a storage counts once, at its full size,
    no matter how many tensors or views of it are saved (``x * x`` saves x twice: counted once;
    ``linear`` saving ``W.t()`` counts W's storage). Storages of the tensors in ``exclude``
    (parameters, buffers) count towards ``saved_bytes`` but not ``activation_bytes``. The counter
    holds a reference to every saved tensor until it is closed, so a storage freed and reused
    during the block cannot be mistaken for one already counted.

    Usage::

        with SavedTensorCounter(exclude=model.parameters()) as c:
            y = model(x)
        c.result()  # SavedBytes
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {k for k in (_storage_key(t) for t in exclude) if k is not None}
        self._storages: dict[Any, tuple[int, bool]] = {}
        self._keep: list[Tensor] = []
        self.tensors = 0
        self._hooks: contextlib.AbstractContextManager | None = None

    def _pack(self, t: Tensor) -> Tensor:
        self.tensors += 1
        key = _storage_key(t)
        if key is None:
            key = ("no-storage", id(t))
        if key not in self._storages:
            self._storages[key] = (_storage_bytes(t), key in self._exclude)
        self._keep.append(t)
        return t

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._keep.clear()

    def result(self) -> SavedBytes:
        total = sum(b for b, _ in self._storages.values())
        act = sum(b for b, excluded in self._storages.values() if not excluded)
        return SavedBytes(total, act, self.tensors, len(self._storages))


def count_saved(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> SavedBytes:
    """Run ``fn()`` (a forward) and count what autograd saved for its backward."""
    with SavedTensorCounter(exclude) as counter:
        out = fn()
    del out
    return counter.result()


def layer_saved_bytes(variant: str, problem: LayerProblem) -> SavedBytes:
    """Saved-for-backward bytes of one forward of ``variant`` on ``problem.xs[0]`` (x requires
    grad). Besides the four timed variants, ``full_ft`` is an ``nn.Linear`` whose weight trains
    (what full fine-tuning saves: x)."""
    p = problem
    exclude: list[Tensor] = [p.weight, p.bias, p.basis, p.basis_x, *p.adapters]
    if variant == "full_ft":
        w = p.weight.detach().clone().requires_grad_(True)
        b = p.bias.detach().clone().requires_grad_(True)
        f: Callable[[Tensor], Tensor] = lambda x: F.linear(x, w, b)  # noqa: E731
        exclude += [w, b]
    else:
        f, _ = layer_forward(variant, p)
        if isinstance(f, nn.Module):
            exclude += [*f.parameters(), *f.buffers()]
    return count_saved(lambda: f(p.xs[0]), exclude)


def retained_bytes(fn: Callable[[], Tensor], device: torch.device) -> int | None:
    """CUDA only: allocator bytes still held after ``fn()`` returns (its output and everything its
    graph keeps), a check on the hook count that also sees tensors kept outside ``save_for_backward``."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    after = torch.cuda.memory_allocated(device)
    del out
    return after - before


def vit_saved_bytes(model: nn.Module, batch: int, seed: int = 0) -> SavedBytes:
    """Saved-for-backward bytes of one training forward of a whole ViT at ``batch``. The images
    require grad in every variant, so the backward runs through every block (as it must when
    every block holds trainable adapters, and so that the frozen model is a real floor rather
    than a head-only backward)."""
    p = next(model.parameters())
    images = vit_images(model, batch, p.device, p.dtype, seed)
    exclude = [*model.parameters(), *model.buffers()]
    return count_saved(lambda: model(images), exclude)

