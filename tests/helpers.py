"""Shared test utilities: random problems and error measures."""
from __future__ import annotations

import os

import torch

#: Where the kernel tests build their inputs: cpu (the Triton interpreter, the default) or cuda
#: (compiled kernels; DUALLORA_TEST_DEVICE=cuda, checked in conftest). Values are always drawn on
#: the CPU from the test's generator and then moved, so one seed gives the same problem on both.
TEST_DEVICE = torch.device("cuda" if os.environ.get("DUALLORA_TEST_DEVICE") == "cuda" else "cpu")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64; NaN/inf in got make it inf, so they never pass."""
    got64, ref64 = got.detach().to(torch.float64), ref.detach().to(torch.float64)
    if not torch.isfinite(got64).all():
        return float("inf")
    return ((got64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def orthonormal_basis(d: int, k: int, gen: torch.Generator, dtype=torch.float64, device="cpu") -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q.to(device=device, dtype=dtype)


def randn(*shape, gen, dtype=torch.float64, requires_grad=False, scale=1.0, device="cpu"):
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def dual_lora_problem(m, d, n, r_o, r_r, frozen_blocks, k, gen, dtype=torch.float64, lead=(), device="cpu"):
    """Random arguments for dual_lora_linear: returns (x, weight, bias, kwargs)."""
    def rnd(*shape, **kw):
        return randn(*shape, gen=gen, dtype=dtype, device=device, **kw)

    x = rnd(*lead, m, d, requires_grad=True)
    w = rnd(n, d, scale=d**-0.5)
    b = rnd(n, requires_grad=True)
    kw = {}
    if r_o:
        kw.update(orth_a=rnd(r_o, d, requires_grad=True), orth_b=rnd(n, r_o, requires_grad=True), orth_scale=0.7)
    if k:
        kw["basis"] = orthonormal_basis(d, k, gen, dtype, device)
    if r_r and k:
        kw.update(res_a=rnd(r_r, d, requires_grad=True), res_b=rnd(n, r_r, requires_grad=True), res_scale=1.3)
    blocks = frozen_blocks + (1 if (r_r and k) else 0)
    if frozen_blocks:
        kw.update(frozen_a=rnd(frozen_blocks * r_r, d), frozen_b=rnd(n, frozen_blocks * r_r), res_scale=1.3)
    if blocks:
        kw["gate"] = torch.rand(*lead, m, blocks, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, w, b, kw
