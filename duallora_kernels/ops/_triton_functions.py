"""The ``@triton.jit`` device functions the kernels share, inlined into each kernel that calls them.

Apart from :mod:`._kernel_utils` (plain Python, what the launchers share; ``dot_mode`` and
``rows_view``, which the docstrings below name, are there) because defining them needs triton,
which the torch backend does not.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, MODE: tl.constexpr):
    """``acc + a @ b`` in float32; ``MODE`` from :func:`dot_mode`."""
    if MODE == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=MODE)
    return out


@triton.jit
def row_offsets(rows, rows_per_batch, stride_batch, stride_row):
    """Element offsets of ``rows`` of a tensor addressed as :func:`rows_view` describes. int64:
    m * d passes 2**31 for real batches of tokens."""
    rows = rows.to(tl.int64)
    return (rows // rows_per_batch) * stride_batch + (rows % rows_per_batch) * stride_row
