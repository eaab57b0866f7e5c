"""The reference op against a naive, loop-by-block autograd of DESIGN §1's formula, in float64."""
import pytest
import torch

from duallora_kernels import dual_lora_linear
from helpers import dual_lora_problem, rel_err


def naive(x, w, b, *, orth_a=None, orth_b=None, res_a=None, res_b=None, frozen_a=None, frozen_b=None,
          gate=None, basis=None, orth_scale=1.0, res_scale=1.0):
    """Y = X W0^T + b + s_o (X A_o^T) B_o^T + s_r sum_j g_j (X A_j^T) B_j^T, with explicit d x d projectors."""
    d = x.shape[-1]
    y = x @ w.T + b
    eye = torch.eye(d, dtype=x.dtype)
    span = basis @ basis.T if basis is not None else torch.zeros(d, d, dtype=x.dtype)
    if orth_a is not None:
        y = y + orth_scale * (x @ (orth_a @ (eye - span)).T) @ orth_b.T
    blocks_a, blocks_b = [], []
    r = res_a.shape[0] if res_a is not None else None
    if frozen_a is not None:
        nf = gate.shape[-1] - (1 if res_a is not None else 0)
        r = frozen_a.shape[0] // nf
        blocks_a += list(frozen_a.split(r, 0))
        blocks_b += list(frozen_b.split(r, 1))
    if res_a is not None:
        blocks_a.append(res_a @ span)
        blocks_b.append(res_b)
    for j, (a_j, b_j) in enumerate(zip(blocks_a, blocks_b)):
        g = gate[..., j : j + 1] if gate is not None else 1.0
        y = y + res_scale * (g * (x @ a_j.T)) @ b_j.T
    return y


CASES = [
    # m, d, n, r_o, r_r, frozen, k, lead
    (7, 16, 12, 3, 0, 0, 0, ()),        # task 1: empty memory, orthogonal adapter only
    (9, 20, 11, 4, 2, 0, 5, ()),        # task 2: one training residual block
    (5, 24, 10, 2, 3, 2, 8, (3,)),      # task 4: two frozen blocks, 3-D input
    (6, 18, 14, 1, 1, 3, 6, (2,)),      # rank 1 everywhere
    (4, 16, 9, 0, 2, 1, 4, ()),         # residual only (orth off)
]


@pytest.mark.parametrize("case", CASES)
def test_forward_and_every_gradient_match_naive(case, gen):
    m, d, n, r_o, r_r, frozen, k, lead = case
    x, w, b, kw = dual_lora_problem(m, d, n, r_o, r_r, frozen, k, gen, lead=lead)
    y = dual_lora_linear(x, w, b, backend="torch", **kw)
    y_ref = naive(x, w, b, **kw)
    assert rel_err(y, y_ref) <= 1e-10
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    leaves = [t for t in [x, b, *kw.values()] if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad(y, leaves, dy)
    ref = torch.autograd.grad(y_ref, leaves, dy)
    assert len(leaves) >= 2
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= 1e-10


def test_gradcheck(gen):
    x, w, b, kw = dual_lora_problem(5, 8, 6, 2, 2, 1, 3, gen)
    names = ["orth_a", "orth_b", "res_a", "res_b"]
    rest = {k: v for k, v in kw.items() if k not in names}

    def f(x, b, oa, ob, ra, rb):
        return dual_lora_linear(x, w, b, orth_a=oa, orth_b=ob, res_a=ra, res_b=rb, backend="torch", **rest)

    assert torch.autograd.gradcheck(f, (x, b, *[kw[k] for k in names]))


def test_gradients_are_projected(gen):
    x, w, b, kw = dual_lora_problem(11, 24, 10, 4, 3, 1, 7, gen)
    y = dual_lora_linear(x, w, b, backend="torch", **kw)
    y.square().sum().backward()
    m = kw["basis"]
    g_o, g_r = kw["orth_a"].grad, kw["res_a"].grad
    assert g_o.norm() > 1e-3 and g_r.norm() > 1e-3
    assert (g_o @ m).abs().max() <= 1e-12 * g_o.norm()             # orthogonal to span(M)
    assert (g_r - (g_r @ m) @ m.T).abs().max() <= 1e-12 * g_r.norm()  # inside span(M)


def test_frozen_blocks_and_gate_get_no_gradient(gen):
    x, w, b, kw = dual_lora_problem(5, 12, 7, 2, 2, 2, 4, gen)
    kw["gate"].requires_grad_(True)
    y = dual_lora_linear(x, w, b, backend="torch", **kw)
    y.sum().backward()
    assert kw["gate"].grad is None
    assert kw["frozen_a"].grad is None and kw["frozen_b"].grad is None


def test_zero_gates_switch_residual_blocks_off(gen):
    x, w, b, kw = dual_lora_problem(6, 16, 8, 2, 2, 2, 5, gen)
    kw["gate"] = torch.zeros_like(kw["gate"])
    y = dual_lora_linear(x, w, b, backend="torch", **kw)
    only_orth = {k: kw[k] for k in ("orth_a", "orth_b", "orth_scale", "basis")}
    assert rel_err(y, dual_lora_linear(x, w, b, backend="torch", **only_orth)) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_matches_float64(dtype, gen):
    x, w, b, kw = dual_lora_problem(8, 32, 16, 4, 2, 1, 6, gen)
    y64 = dual_lora_linear(x, w, b, backend="torch", **kw)
    cast = {k: (v.detach().to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    y = dual_lora_linear(x.detach().to(dtype), w.to(dtype), b.detach().to(dtype), backend="torch", **cast)
    assert y.dtype == dtype
    assert rel_err(y, y64) <= (1e-5 if dtype == torch.float32 else 2e-2)
