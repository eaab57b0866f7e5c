"""B-only training (issue 20, item 1): with the down-projections fixed (A factors that do not require grad; a
DualLoRALinear with ``train_a=False``), the op keeps T = x A^T for backward instead of x, computes no dA, and the
gradients it does compute are the reference's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers
from duallora_kernels import dual_lora_linear
from duallora_kernels.harness.saved_bytes import count_saved
from duallora_kernels.nn import DualLoRALinear, begin_task, collect_inputs, end_task
from duallora_kernels.ops import registered
from duallora_kernels.ops.reference import dual_lora_linear_reference
from helpers import rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _fixed_a_problem(gen, dtype, m=30, d=48, n=40, r_o=4, r_r=3, lead=(2,)):
    """A layer in training (no gate: a task's own block only): x requiring grad, W0 and b frozen, C_o and C_r
    fixed, B_o and B_r trainable, a memory basis."""
    x, w, b, kw = helpers.dual_lora_problem(m, d, n, r_o=r_o, r_r=r_r, frozen_blocks=0, k=10, gen=gen, dtype=dtype,
                                            lead=lead)
    b.requires_grad_(False)
    kw.pop("gate")
    kw["orth_a"].requires_grad_(False)
    kw["res_a"].requires_grad_(False)
    return x, w, b, kw


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_are_the_frozen_layers_plus_t_and_the_assembled_a(backend, dtype, gen):
    for design in ("single", "split", "tma") if backend == "triton" else ("auto",):
        _saved_bytes_of_a_b_only_step(backend, design, dtype, gen)


def _saved_bytes_of_a_b_only_step(backend, design, dtype, gen):
    x, w, b, kw = _fixed_a_problem(gen, dtype)
    params = [w, b, *(v for v in kw.values() if isinstance(v, torch.Tensor))]
    fused = count_saved(lambda: dual_lora_linear(x, w, b, backend=backend, check_basis=False, design=design, **kw),
                        params)
    frozen = count_saved(lambda: F.linear(x, w, b), [w, b])
    m, d, n = x.numel() // x.shape[-1], x.shape[-1], w.shape[0]
    r = kw["orth_a"].shape[0] + kw["res_a"].shape[0]
    elsize = x.element_size()
    # T (m x r; the split/tma designs keep S = T .* scale in its place) and the assembled A (r x d, kept for dX
    # rather than rebuilt: two launches with a basis) -- never x (m x d), which the frozen layer does not keep
    # either; the split/tma designs also keep the assembled B^T (r x n) instead of rebuilding it in backward
    bt = r * n * elsize if design in ("split", "tma") else 0
    assert fused.activation_bytes == frozen.activation_bytes + m * r * elsize + r * d * elsize + bt, \
        (design, fused, frozen)
    assert frozen.activation_bytes == 0
    # training A as well keeps x on top
    kw["orth_a"].requires_grad_(True)
    trained = count_saved(lambda: dual_lora_linear(x, w, b, backend=backend, check_basis=False, design=design, **kw),
                          params)
    assert trained.activation_bytes == fused.activation_bytes + m * d * elsize, (trained, fused)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_of_b_and_x_are_the_references_and_a_gets_none(backend, gen):
    x, w, b, kw = _fixed_a_problem(gen, torch.float32)
    dy = torch.randn(*x.shape[:-1], w.shape[0], generator=gen)
    y = dual_lora_linear(x, w, b, backend=backend, check_basis=False, **kw)
    y.backward(dy)

    def to64(t):
        return t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t

    x64, kw64 = to64(x), {k: to64(v) for k, v in kw.items()}
    ref = dual_lora_linear_reference(x64, w.double(), b.double(), **kw64)
    ref.backward(dy.double())
    assert rel_err(y, ref) <= TOL[torch.float32]
    for name in ("orth_b", "res_b"):
        assert rel_err(kw[name].grad, kw64[name].grad) <= TOL[torch.float32], name
    assert rel_err(x.grad, x64.grad) <= TOL[torch.float32]
    assert kw["orth_a"].grad is None and kw["res_a"].grad is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_is_handed_no_x_and_plans_no_da(backend, gen, monkeypatch):
    seen = []
    launchers = registered._launchers

    def spying(backend_, dtype):
        kernels = launchers(backend_, dtype)

        def backward(dy, x, *rest):
            plan = rest[-2]
            seen.append((x, plan.need_da, plan.need_db))
            return kernels.backward(dy, x, *rest)

        return kernels._replace(backward=backward)

    monkeypatch.setattr(registered, "_launchers", spying)
    x, w, b, kw = _fixed_a_problem(gen, torch.float32)
    dual_lora_linear(x, w, b, backend=backend, check_basis=False, **kw).sum().backward()
    assert len(seen) == 1
    x_seen, need_da, need_db = seen[0]
    assert x_seen is None and not need_da and need_db


def _trained_layer(train_a: bool, *, steps: int = 3, seed: int = 0):
    """A layer through task 1 and into task 2 (orthogonal adapter and residual block), ``steps`` AdamW steps."""
    torch.manual_seed(seed)
    d, n = 32, 24
    layer = DualLoRALinear.from_linear(nn.Linear(d, n), rank_orth=4, rank_res=2, train_a=train_a, backend="torch")
    for t in range(2):
        x = torch.randn(4, 6, d) + 3 * torch.eye(d)[t]
        with collect_inputs(layer) as stats:
            layer(x)
        begin_task(layer, stats)
        start = {k: getattr(layer, k).detach().clone() for k in ("orth_a", "res_a", "orth_b", "res_b")}
        opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(steps):
            loss = (layer(x) - 1.0).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if t == 0:
            with collect_inputs(layer) as stats:
                layer(x)
            end_task(layer, stats)
    return layer, start


def test_layer_with_train_a_off_trains_b_only():
    layer, start = _trained_layer(train_a=False)
    assert "train_a=False" in repr(layer)
    assert not layer.orth_a.requires_grad and not layer.res_a.requires_grad
    assert layer.orth_b.requires_grad and layer.res_b.requires_grad
    assert torch.equal(layer.orth_a, start["orth_a"]) and torch.equal(layer.res_a, start["res_a"])
    assert not torch.equal(layer.orth_b, start["orth_b"]) and not torch.equal(layer.res_b, start["res_b"])
    on, start_on = _trained_layer(train_a=True)
    assert on.orth_a.requires_grad and not torch.equal(on.orth_a, start_on["orth_a"])
    # the same initialisation either way: A starts at the task's principal directions
    assert torch.equal(start_on["orth_a"], start["orth_a"]) and torch.equal(start_on["res_a"], start["res_a"])


def test_layer_step_saves_the_frozen_layers_bytes_plus_t_and_a():
    layer, _ = _trained_layer(train_a=False, steps=0)
    x = torch.randn(5, 7, layer.in_features, requires_grad=True)
    frozen = nn.Linear(layer.in_features, layer.out_features).requires_grad_(False)
    got = count_saved(lambda: layer(x), [*layer.parameters(), *layer.buffers()])
    floor = count_saved(lambda: frozen(x), [*frozen.parameters()])
    m, r = 5 * 7, layer.rank_orth + layer.rank_res
    assert got.activation_bytes == floor.activation_bytes + m * r * 4 + r * layer.in_features * 4, (got, floor)


def test_train_a_must_be_a_bool():
    with pytest.raises(TypeError, match="train_a must be True or False"):
        DualLoRALinear(8, 8, train_a="off")
