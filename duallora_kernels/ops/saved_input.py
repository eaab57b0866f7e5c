"""How the fused op keeps its input x for backward when only the gradient of A reads it (``saved_x``).

``"exact"`` keeps x as it is. ``"float8"`` keeps it as float8 e4m3 codes with one float32 scale per row (the
row's largest |x| over 448, e4m3's largest finite value) and decodes it when backward reads it: 1 byte per
element plus 4 per row instead of 2 (bfloat16) or 4 (float32). Only dA = ((dY B) .* S)^T x sees the rounding
(3 mantissa bits: at most 2^-4 relative per element); Y, dX and dB are exact. Measured on the benchmark before
it became an option: results/saved-x-float8/ and docs/method.md ("x saved in float8").

The torch-level codec; the Triton and CUDA backends run it around their kernels (the op decodes x before the
backward kernel reads it), so the saving is in what the graph keeps between forward and backward, not yet in
the kernels' traffic.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SAVED_X", "E4M3_MAX", "quantize_rows", "dequantize_rows"]

SAVED_X = ("exact", "float8")
#: The largest finite float8 e4m3 (``torch.float8_e4m3fn``) value.
E4M3_MAX = 448.0


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., d) -> (float8 e4m3 codes of x's shape, float32 scales (..., 1)) with x ~= codes * scale.
    An all-zero row gets the smallest normal scale (its codes are zeros)."""
    x32 = x.detach().float()
    scale = (x32.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (x32 / scale).to(torch.float8_e4m3fn), scale


def dequantize_rows(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The x that :func:`quantize_rows` encoded, in ``dtype``."""
    return (codes.float() * scale).to(dtype)
