"""Argument checks shared by the public API. Every message names the argument and what was expected."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakIdKeyDictionary

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value: Any, *, ndim: int | tuple[int, ...] | None = None, floating: bool = True) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {value.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            want = " or ".join(f"{k}-D" for k in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    return value


def shape(name: str, value: Tensor, expected: tuple[int | None, ...], meaning: str) -> None:
    ok = value.dim() == len(expected) and all(e is None or s == e for s, e in zip(value.shape, expected))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
        raise ValueError(f"{name} must have shape {want} {meaning}, got {tuple(value.shape)}")


def same_device(name: str, value: Tensor, ref: Tensor, ref_name: str) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}; put them on one device")


def same_dtype(name: str, value: Tensor, ref: Tensor, ref_name: str) -> None:
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but {ref_name} has {ref.dtype}; they must match")


def rank(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def nonneg_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def positive(name: str, value: Any) -> float:
    v = finite(name, value)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def threshold(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def orthonormal_tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 3e-2)


def _orthonormality_error(basis: Tensor) -> Tensor:
    """max |M^T M - I| of ``basis`` (d, k), computed in at least float32, as a 0-d tensor on its device."""
    from .ops import autocast_off  # imported late: ops imports this module

    b = basis.detach().to(torch.promote_types(basis.dtype, torch.float32))
    with autocast_off(b.device):  # M^T M in bfloat16 would be ~1e-3 off the identity
        return (b.T @ b - torch.eye(b.shape[1], dtype=b.dtype, device=b.device)).abs().amax()


def orthonormal(name: str, basis: Tensor) -> None:
    """``basis`` (d, k) must have orthonormal columns (M^T M = I)."""
    if basis.shape[-1] == 0:
        return
    err = _orthonormality_error(basis).item()
    if not err <= orthonormal_tol(basis.dtype):
        raise ValueError(
            f"{name} must have orthonormal columns (M^T M = I); max |M^T M - I| = {err:.3g} "
            f"(tolerance {orthonormal_tol(basis.dtype):.0e} for {basis.dtype})"
        )


def orthonormal_async(name: str, basis: Tensor) -> None:
    """``basis`` (d, k) must have orthonormal columns, checked on its device without a host sync
    (``torch._assert_async``): the error surfaces on the CPU at once, on a GPU as a device-side
    assert at the next synchronisation."""
    torch._assert_async(
        _orthonormality_error(basis) <= orthonormal_tol(basis.dtype),
        f"{name} must have orthonormal columns (M^T M = I) within {orthonormal_tol(basis.dtype):.0e} for "
        f"{basis.dtype}; pass an orthonormal basis (e.g. torch.linalg.qr(...).Q)",
    )


class _Checked:
    """What must be unchanged for an earlier check of a tensor to hold: its version counter (bumped by
    every in-place op on it or on a view or ``.detach()`` of it), the storage it reads (a weak
    reference, which keeps the storage's address from being reused while held: a ``.data = ...``
    swap shows as another storage) and how it reads it."""

    __slots__ = ("version", "storage", "layout")

    def __init__(self, t: Tensor) -> None:
        self.version = t._version
        self.storage = StorageWeakRef(t.untyped_storage())
        self.layout = _layout(t)

    def holds_for(self, t: Tensor) -> bool:
        return (t._version == self.version and t.untyped_storage()._cdata == self.storage.cdata
                and _layout(t) == self.layout)


def _layout(t: Tensor) -> tuple:
    return t.dtype, t.device, t.shape, t.stride(), t.storage_offset()


#: Bases found orthonormal by :func:`orthonormal_once`, by identity (a weak reference: never by
#: address, which a freed tensor hands on to the next), with what the finding depends on.
_orthonormal: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _trackable(t: Tensor) -> bool:
    """Whether a check of ``t`` can be remembered: a plain tensor with data and a version counter,
    outside tracing (torch.compile's FakeTensors, functorch's wrappers and tensor subclasses are new
    objects on every trace or hold no data: those are checked every time, inside the graph)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return type(t) in (Tensor, torch.nn.Parameter) and t.device.type != "meta" and not t.is_inference()


def orthonormal_once(name: str, basis: Tensor) -> None:
    """:func:`orthonormal_async` once per version of ``basis``: again for a new tensor, or after an
    in-place change or a ``.data = ...`` swap. Writes that bypass the version counter -- in place
    through ``basis.data`` or its storage, which autograd's own checks do not see either -- are not
    seen; a basis edited that way must be passed as a new tensor."""
    if not _trackable(basis):
        orthonormal_async(name, basis)
        return
    seen = _orthonormal.get(basis)
    if seen is not None and seen.holds_for(basis):
        return
    orthonormal_async(name, basis)  # on the CPU a failure raises here, before anything is remembered
    _orthonormal[basis] = _Checked(basis)
