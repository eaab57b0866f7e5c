"""DESIGN §4's invariants: training the orthogonal adapter never moves outputs on inputs inside span(M).

Here the old task's inputs span exactly the directions M keeps, so they lie inside span(M); in general M
keeps the threshold's share of their energy (tests/test_timm_families.py bounds what the rest may move).

On helpers.TEST_DEVICE (CUDA under DUALLORA_TEST_DEVICE=cuda). The fused Triton op's version of
this invariant, in float32, is test_fused_linear.py::test_adamw_on_orthogonal_adapter_keeps_old_outputs
(in float64 backend="triton" runs the reference, so it would repeat the torch case here).
"""
import functools

import pytest
import torch

from duallora_kernels import dual_lora_linear
from duallora_kernels.memory import extend_basis
from duallora_kernels.ops.reference import project_out
import helpers
from helpers import TEST_DEVICE, rel_err

BACKENDS = ["torch"]
randn = functools.partial(helpers.randn, device=TEST_DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_on_orthogonal_adapter_leaves_old_inputs_unchanged(backend, gen):
    d, n, r, dt = 24, 16, 4, torch.float64
    # "old" task: inputs in a random 6-dim subspace; its basis by GPM's criterion
    old_dirs = torch.linalg.qr(torch.randn(d, 6, generator=gen, dtype=dt))[0].to(TEST_DEVICE)
    old_x = randn(200, 6, gen=gen) @ old_dirs.T
    basis = extend_basis(None, old_x.T @ old_x, 0.999)
    assert basis.shape[1] == 6
    w = randn(n, d, gen=gen, scale=d**-0.5)
    b = randn(n, gen=gen)
    orth_a = randn(r, d, gen=gen, requires_grad=True)
    orth_b = torch.zeros(n, r, dtype=dt, device=TEST_DEVICE, requires_grad=True)
    probe = randn(50, 6, gen=gen) @ old_dirs.T  # fresh inputs in span(M)

    def layer(x):
        return dual_lora_linear(x, w, b, orth_a=orth_a, orth_b=orth_b, basis=basis, backend=backend)

    before = layer(probe).detach()
    opt = torch.optim.AdamW([orth_a, orth_b], lr=5e-2, weight_decay=0.1)
    new_x, target = randn(64, d, gen=gen), randn(64, n, gen=gen)
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.mse_loss(layer(new_x), target).backward()
        opt.step()
    assert orth_b.detach().abs().max() > 0.1  # the adapter really trained
    assert (layer(new_x).detach() - (new_x @ w.T + b)).norm() > 0.1
    assert rel_err(layer(probe).detach(), before) <= 1e-9
    a_o = project_out(orth_a.detach(), basis)
    assert (a_o @ basis).abs().max() <= 1e-12
