"""Host-side helpers shared by the Triton launchers (no kernels here).

Kept apart from the kernels so that the launchers agree on three things that are easy to get
subtly different: how a strided input is addressed, how outputs are allocated (poisoned on
request, so a test sees an element no program wrote), and what precision an fp32 ``tl.dot`` uses.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

#: Set to "1" (the tests do) to fill every output buffer a kernel stores into with NaN before the
#: launch: an element no program writes then fails the comparison instead of passing by luck.
#: Off by default because the fill is one more full write of each output.
POISON_ENV = "DUALLORA_POISON_OUTPUTS"


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (one small fixed config then)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An output buffer that a kernel writes in full: empty, or NaN-filled when poisoning is on."""
    if os.environ.get(POISON_ENV) == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: fp32 operands use TF32 only where torch's own matmuls may
    (``torch.set_float32_matmul_precision("high")``), so the kernels match cuBLAS's contract."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def pow2_at_least(value: int, floor: int = 16) -> int:
    """The padded block extent for a small dimension: ``tl.dot`` wants powers of two >= 16."""
    p = floor
    while p < value:
        p *= 2
    return p


def size_bucket(value: int) -> int:
    """A coarse autotuning key for the row count, so every batch size does not retune."""
    return pow2_at_least(max(value, 1), 16) if value <= 4096 else 8192


def rows_view(x: Tensor) -> tuple[Tensor, int, int, int, int]:
    """Address the rows of ``x`` (..., d) without copying it.

    Returns ``(t, rows_per_batch, stride_batch, stride_row, stride_col)`` such that element
    ``(i, k)`` of ``x.reshape(-1, d)`` sits at ``t.data_ptr()`` plus
    ``(i // rows_per_batch) * stride_batch + (i % rows_per_batch) * stride_row + k * stride_col``
    elements. This covers every 2-D view and every view whose leading dimensions collapse into
    one (a transposed (B, L, d) tensor, a token slice, an expanded gradient); anything else is
    copied once into a contiguous tensor.
    """
    d = x.shape[-1]
    try:
        v = x.view(-1, d)
        return v, max(v.shape[0], 1), 0, v.stride(0), v.stride(1)
    except RuntimeError:
        pass
    if x.dim() >= 3:
        try:
            v = x.view(-1, x.shape[-2], d)
            return v, max(v.shape[1], 1), v.stride(0), v.stride(1), v.stride(2)
        except RuntimeError:
            pass
    v = x.reshape(-1, d).contiguous()
    return v, max(v.shape[0], 1), 0, v.stride(0), v.stride(1)
