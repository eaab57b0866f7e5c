"""The PyTorch reference of every op: the spec that the Triton and CUDA kernels must match.

Everything here is plain differentiable PyTorch. The gradient projections of DESIGN §1 are
not hooks: the op *uses* the projected matrices

    A_o = C_o (I - M M^T)          (orthogonal adapter)
    A_r = C_r (M M^T)              (the residual block being trained)

so autograd's gradient of the trainable tensor C is the projected gradient of A, under any
optimizer. These functions assume validated arguments; the public entry points in
``duallora_kernels.ops`` validate and dispatch here or to a kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "project_out",
    "project_onto",
    "adapter_matrices",
    "column_scales",
    "dual_lora_linear_reference",
    "gram_reference",
    "task_scores_reference",
]


def _proj_dtype(dtype: torch.dtype) -> torch.dtype:
    # Projections are formed in at least float32: in bf16 A_o M would only be ~1e-2 from zero.
    return torch.promote_types(dtype, torch.float32)


def project_out(a: Tensor, basis: Tensor | None) -> Tensor:
    """Rows of ``a`` with span(basis) removed: ``a - (a M) M^T``. ``basis`` (d, k) is orthonormal."""
    if basis is None or basis.shape[-1] == 0:
        return a
    wd = _proj_dtype(a.dtype)
    m = basis.to(wd)
    af = a.to(wd)
    return (af - (af @ m) @ m.T).to(a.dtype)


def project_onto(a: Tensor, basis: Tensor | None) -> Tensor:
    """Rows of ``a`` projected onto span(basis): ``(a M) M^T``; zero when the basis is empty."""
    if basis is None or basis.shape[-1] == 0:
        return torch.zeros_like(a)
    wd = _proj_dtype(a.dtype)
    m = basis.to(wd)
    return ((a.to(wd) @ m) @ m.T).to(a.dtype)


def adapter_matrices(
    orth_a: Tensor | None,
    orth_b: Tensor | None,
    res_a: Tensor | None,
    res_b: Tensor | None,
    frozen_a: Tensor | None,
    frozen_b: Tensor | None,
    basis: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, int, int]:
    """Stack the low-rank path into one ``A`` (r, d) and ``B`` (n, r).

    Row blocks, in this order: the orthogonal adapter (projected out of span(M)), the frozen
    residual blocks as stored, the training residual block (projected onto span(M)).
    Returns ``(A, B, r_orth, r_res)``; ``A`` and ``B`` are None when there is no adapter.
    """
    a_parts, b_parts = [], []
    r_orth = 0
    if orth_a is not None:
        a_parts.append(project_out(orth_a, basis))
        b_parts.append(orth_b)
        r_orth = orth_a.shape[0]
    r_res = 0
    if frozen_a is not None and frozen_a.shape[0] > 0:
        a_parts.append(frozen_a)
        b_parts.append(frozen_b)
    if res_a is not None:
        a_parts.append(project_onto(res_a, basis))
        b_parts.append(res_b)
        r_res = res_a.shape[0]
    if not a_parts:
        return None, None, 0, 0
    return torch.cat(a_parts, 0), torch.cat(b_parts, 1), r_orth, r_res


def column_scales(
    gate: Tensor | None,
    rows: int,
    r_orth: int,
    r_resid: int,
    orth_scale: float,
    res_scale: float,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """The per-row, per-column scale S (rows, r_orth + r_resid) of DESIGN §1.

    Orthogonal columns get ``orth_scale``. The ``r_resid`` residual columns form
    ``G = gate.shape[1]`` equal blocks; block j's columns get ``res_scale * gate[:, j]``.
    ``gate`` is (rows, G), or None for all ones.
    """
    parts = [torch.full((rows, r_orth), float(orth_scale), dtype=dtype, device=device)]
    if r_resid:
        if gate is None:
            parts.append(torch.full((rows, r_resid), float(res_scale), dtype=dtype, device=device))
        else:
            g = gate.to(dtype=dtype, device=device)
            parts.append((res_scale * g).repeat_interleave(r_resid // g.shape[1], dim=1))
    return torch.cat(parts, 1)


def dual_lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    orth_a: Tensor | None = None,
    orth_b: Tensor | None = None,
    res_a: Tensor | None = None,
    res_b: Tensor | None = None,
    frozen_a: Tensor | None = None,
    frozen_b: Tensor | None = None,
    gate: Tensor | None = None,
    basis: Tensor | None = None,
    orth_scale: float = 1.0,
    res_scale: float = 1.0,
) -> Tensor:
    """``Y = x W0^T + b + ((x A^T) .* S) B^T`` in plain PyTorch (see ``duallora_kernels.ops.dual_lora_linear``).

    ``gate`` here broadcasts to x.shape[:-1] + (G,), or is None. The basis is a constant (no gradient).
    """
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if basis is not None:
        basis = basis.detach()
    if gate is not None:
        gate = gate.expand(*x.shape[:-1], gate.shape[-1]).reshape(x2.shape[0], gate.shape[-1])
    y = x2 @ weight.T
    if bias is not None:
        y = y + bias
    a, b, r_orth, _ = adapter_matrices(orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, basis)
    if a is not None:
        s = column_scales(gate, x2.shape[0], r_orth, a.shape[0] - r_orth, orth_scale, res_scale, x.dtype, x.device)
        y = y + ((x2 @ a.T) * s) @ b.T
    return y.reshape(*x.shape[:-1], weight.shape[0])


def gram_reference(x: Tensor) -> Tensor:
    """``x^T x`` over all rows of x (..., d), accumulated in float32 (float64 for float64 input).
    Exactly symmetric: ``x.T @ x`` is not bitwise symmetric in every BLAS, ``(G + G^T) / 2`` is."""
    x2 = x.reshape(-1, x.shape[-1]).to(_proj_dtype(x.dtype))
    g = x2.T @ x2
    return (g + g.T) * 0.5


#: ||z||^2 below this scores 0 (float32's smallest normal number): scores are scale-invariant above it.
TINY_NORM = torch.finfo(torch.float32).tiny


def task_scores_reference(z: Tensor, task_bases: Tensor) -> Tensor:
    """Normalised projection energies ``||U_t^T z||^2 / ||z||^2`` for all tasks.

    z: (b, d) summaries; task_bases: (T, d, u) orthonormal columns per task. Returns (b, T) in
    float32 (float64 for float64 input), each entry in [0, 1]. Scale-invariant: any z with
    ``||z||^2 >= TINY_NORM`` (1.2e-38) scores as z / ||z|| does; a smaller (e.g. all-zero) z scores 0.
    """
    wd = _proj_dtype(z.dtype)
    zf = z.to(wd)
    proj = torch.einsum("bd,tdu->btu", zf, task_bases.to(wd))
    norm = zf.square().sum(-1, keepdim=True)
    ok = norm >= TINY_NORM
    return torch.where(ok, proj.square().sum(-1) / torch.where(ok, norm, 1.0), 0.0)
