"""Shared test utilities: random problems and error measures."""
from __future__ import annotations

import torch


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64; NaN/inf in got make it inf, so they never pass."""
    got64, ref64 = got.detach().to(torch.float64), ref.detach().to(torch.float64)
    if not torch.isfinite(got64).all():
        return float("inf")
    return ((got64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def orthonormal_basis(d: int, k: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q.to(dtype)


def randn(*shape, gen, dtype=torch.float64, requires_grad=False, scale=1.0):
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def dual_lora_problem(m, d, n, r_o, r_r, frozen_blocks, k, gen, dtype=torch.float64, lead=()):
    """Random arguments for dual_lora_linear: returns (x, weight, bias, kwargs)."""
    x = randn(*lead, m, d, gen=gen, dtype=dtype, requires_grad=True)
    w = randn(n, d, gen=gen, dtype=dtype, scale=d**-0.5)
    b = randn(n, gen=gen, dtype=dtype, requires_grad=True)
    kw = {}
    if r_o:
        kw.update(orth_a=randn(r_o, d, gen=gen, dtype=dtype, requires_grad=True),
                  orth_b=randn(n, r_o, gen=gen, dtype=dtype, requires_grad=True), orth_scale=0.7)
    if k:
        kw["basis"] = orthonormal_basis(d, k, gen, dtype)
    if r_r and k:
        kw.update(res_a=randn(r_r, d, gen=gen, dtype=dtype, requires_grad=True),
                  res_b=randn(n, r_r, gen=gen, dtype=dtype, requires_grad=True), res_scale=1.3)
    blocks = frozen_blocks + (1 if (r_r and k) else 0)
    if frozen_blocks:
        kw.update(frozen_a=randn(frozen_blocks * r_r, d, gen=gen, dtype=dtype),
                  frozen_b=randn(n, frozen_blocks * r_r, gen=gen, dtype=dtype), res_scale=1.3)
    if blocks:
        kw["gate"] = torch.rand(*lead, m, blocks, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, b, kw
