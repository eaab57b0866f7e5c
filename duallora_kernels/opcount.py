"""Count the device operations and host synchronisations of a piece of PyTorch code, on any device.

The cost contract of the fused op (README, "Cost contract"): a training step of one DualLoRA
layer launches at most :data:`STEP_BUDGET` device operations and never synchronises with the
host. On a GPU each launch costs 3-8 us whatever it computes, so small torch ops around a fused
kernel can cost more than the kernel. This module makes both countable on a CPU:

* torch ops that do device work are seen by a ``TorchDispatchMode``: every ``aten`` op except
  views (``t``, ``view``, ``expand``, ``detach``, ...) and bare allocations (``empty``, ...),
  which launch nothing;
* Triton kernels are seen through :func:`duallora_kernels.ops._kernel_utils.launch` (under
  ``TRITON_INTERPRET=1`` the interpreter's own bookkeeping is hidden: a compiled kernel is one
  launch);
* host synchronisations are the ops that read a device value on the host (``item``,
  ``_local_scalar_dense``, ``is_nonzero``, ``equal``, a copy to the CPU from another device).

Usage::

    with count_device_ops() as ops:
        y = layer(x); y.backward(dy)
    ops.total, ops.kernels, ops.torch_ops, ops.syncs
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["STEP_BUDGET", "FROZEN_STEP", "DeviceOps", "count_device_ops"]

#: Device operations allowed in one forward+backward of a DualLoRA layer (README, cost contract).
STEP_BUDGET = 8
#: What the frozen nn.Linear's training step launches (x W0^T + b forward, dY W0 backward).
FROZEN_STEP = 2

# No device work: allocations, and ops that only read metadata.
_NO_WORK = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "lift_fresh",
            "_has_compatible_shallow_copy_type", "set_", "resize_", "promote_types", "result_type", "can_cast",
            "is_same_size", "size", "stride", "dim", "numel", "is_contiguous", "_debug_has_internal_overlap"}
#: Custom-op namespaces whose ops are looked through: their inner launches and torch ops are counted.
TRANSPARENT_NAMESPACES = {"duallora"}
_SYNCS = {"item", "_local_scalar_dense", "is_nonzero", "equal", "tolist", "nonzero", "unique", "_unique2",
          "masked_select", "repeat_interleave.Tensor"}


@dataclass
class DeviceOps:
    """What ran inside :func:`count_device_ops`: Triton kernels by name, torch ops by aten name,
    host synchronisations by aten name (in order)."""

    kernels: Counter = field(default_factory=Counter)
    torch_ops: Counter = field(default_factory=Counter)
    syncs: list = field(default_factory=list)

    @property
    def total(self) -> int:
        """Device operations: Triton launches plus torch ops that do device work."""
        return sum(self.kernels.values()) + sum(self.torch_ops.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "kernels": dict(self.kernels), "torch_ops": dict(self.torch_ops),
                "syncs": list(self.syncs)}

    def __str__(self) -> str:
        parts = [f"{k} x{v}" for k, v in sorted(self.kernels.items())]
        parts += [f"aten.{k} x{v}" for k, v in sorted(self.torch_ops.items())]
        return f"{self.total} device ops ({', '.join(parts) or 'none'}); host syncs: {self.syncs or 'none'}"


class _Mode(TorchDispatchMode):
    def __init__(self, ops: DeviceOps) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in TRANSPARENT_NAMESPACES:
            # A registered op of ours: what counts is the device work inside it, so its Python
            # implementation runs with this mode pushed again (calling the op itself would land here).
            from torch._library.custom_ops import _maybe_get_opdef

            with self:
                return _maybe_get_opdef(func)._init_fn(*args, **kwargs)
        name = func.overloadpacket.__name__
        full = f"{name}.{func._overloadname}"
        if name in _SYNCS or full in _SYNCS:
            self.ops.syncs.append(name)
        elif name in ("_to_copy", "copy_") and _crosses_to_cpu(func, args, kwargs):
            self.ops.syncs.append(f"{name} to cpu")
        if not (func.is_view or name in _NO_WORK or name in _SYNCS or name.startswith("sym_")):
            self.ops.torch_ops[name] += 1
        return func(*args, **kwargs)


def _crosses_to_cpu(func, args, kwargs) -> bool:
    src = args[0] if args else None
    if not isinstance(src, torch.Tensor) or src.device.type in ("cpu", "meta"):
        if func.overloadpacket.__name__ == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
            return args[0].device.type == "cpu" and args[1].device.type not in ("cpu", "meta")
        return False
    dev = kwargs.get("device")
    return dev is not None and torch.device(dev).type == "cpu"


class count_device_ops:
    """Context manager that records every device operation and host sync within (see module doc)."""

    def __init__(self) -> None:
        self.ops = DeviceOps()
        self._mode = _Mode(self.ops)

    def _on_launch(self, kernel, grid, args, kwargs) -> bool:
        from .ops._kernel_utils import kernel_name

        self.ops.kernels[kernel_name(kernel)] += 1
        return False

    def __enter__(self) -> DeviceOps:
        from .ops._kernel_utils import observe_launches

        self._launches = observe_launches(self._on_launch)
        self._launches.__enter__()
        self._mode.__enter__()
        return self.ops

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._launches.__exit__(*exc)
