"""DualLoRALinear as a drop-in for nn.Linear in the stacks people train with: autocast and
torch.compile(fullgraph=True), on the CPU (the torch backend and the Triton interpreter)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from duallora_kernels import dual_lora_linear
from duallora_kernels.nn import DualLoRALinear, begin_task, collect_inputs, end_task
from duallora_kernels.ops.reference import dual_lora_linear_reference
from duallora_kernels.vit import ContinualViT, create_vit
import helpers
from helpers import rel_err

LOW = [torch.bfloat16, torch.float16]


def _trained_layer(d=32, n=24, tasks=3, backend="torch", seed=0):
    """A layer after ``tasks - 1`` finished tasks, in the middle of the last one: basis, frozen
    residual blocks, a training residual block."""
    torch.manual_seed(seed)
    layer = DualLoRALinear.from_linear(nn.Linear(d, n), rank_orth=4, rank_res=2, backend=backend)
    xs = []
    for t in range(tasks):
        x = torch.randn(2, 8, d) + 2 * torch.eye(d)[t]
        xs.append(x)
        with torch.no_grad():
            layer.start_collecting(); layer(x); stats = layer.stop_collecting()
        layer.begin_task(stats)
        with torch.no_grad():  # give the adapters values, so their path is not zero
            layer.orth_b.normal_(0, 0.1)
            layer.res_b.normal_(0, 0.1)
        if t < tasks - 1:
            with torch.no_grad():
                layer.start_collecting(); layer(x); stats = layer.stop_collecting()
            layer.end_task(stats)
    return layer, xs


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_casts_like_f_linear(dtype, backend, gen):
    layer, xs = _trained_layer(backend=backend)
    x = xs[-1].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        want = nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == want.dtype == dtype
    # the value: the float64 reference of the operands autocast casts for F.linear (x, W0, b) and of
    # the adapter factors as stored (the op assembles A and B^T from them and rounds them once; the
    # basis is not cast)
    cast64 = lambda t: t.detach().to(dtype).double()  # noqa: E731
    own64 = lambda t: t.detach().double()  # noqa: E731
    ref = dual_lora_linear_reference(
        cast64(x), cast64(layer.weight), cast64(layer.bias), orth_a=own64(layer.orth_a), orth_b=own64(layer.orth_b),
        res_a=own64(layer.res_a), res_b=own64(layer.res_b), basis=layer.basis.double(),
        orth_scale=layer.orth_scale, res_scale=layer.res_scale)
    assert rel_err(y, ref) <= 2e-2
    # the gradients reach the float32 parameters in float32
    y.float().square().mean().backward()
    assert layer.orth_a.grad.dtype == layer.orth_b.grad.dtype == layer.res_a.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lead", [(16,), (2, 8)], ids=["2d", "3d"])
@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
def test_output_takes_in_place_ops_as_nn_linear_does(backend, lead, mode, gen):
    # What timm's beit / eva attention does with qkv_bias_separate: qkv = self.qkv(x); qkv += qkv_bias.
    # nn.Linear's output allows it in every mode; the layer's must too, with the same values and gradients.
    layer, _ = _trained_layer(backend=backend)
    layer.train(mode == "train")
    grad = mode != "no_grad"
    x = torch.randn(*lead, 32, generator=gen, requires_grad=grad)
    extra = torch.randn(24, generator=gen, requires_grad=grad)
    layer.set_gate(torch.tensor([0.0, 0.3, 0.7]))  # task 0 has no residual block: task 1's frozen, task 2's training
    with torch.set_grad_enabled(grad):
        linear_out = nn.functional.linear(x, layer.weight, layer.bias)
        linear_out += extra  # nn.Linear's output takes it
        y = layer(x)
        y += extra
        y.mul_(2.0)
    assert y.shape == linear_out.shape == (*lead, 24)
    leaves = {"x": x, "extra": extra, "orth_b": layer.orth_b, "res_b": layer.res_b}
    ref64 = {k: v.detach().double().requires_grad_(grad) for k, v in leaves.items()}
    ref = 2 * (dual_lora_linear_reference(
        ref64["x"], layer.weight.double(), layer.bias.double(), orth_a=layer.orth_a.detach().double(),
        orth_b=ref64["orth_b"], res_a=layer.res_a.detach().double(), res_b=ref64["res_b"],
        frozen_a=layer.frozen_a.double(), frozen_b=layer.frozen_b.double(), gate=torch.tensor([0.3, 0.7]).double(),
        basis=layer.basis.double(), orth_scale=layer.orth_scale, res_scale=layer.res_scale) + ref64["extra"])
    assert rel_err(y, ref) <= 1e-5
    if grad:
        dy = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        y.backward(dy.float())
        ref.backward(dy)
        for name, leaf in leaves.items():
            assert rel_err(leaf.grad, ref64[name].grad) <= 1e-5, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_with_frozen_blocks_and_a_gate_reads_the_adapters_in_their_own_dtype(backend, gen):
    # inference in task 3: float32 frozen blocks and a per-row gate beside bf16 autocast; the
    # adapters are not cast by separate ops, and their gradients come back in float32
    x, w, b, kw = helpers.dual_lora_problem(12, 32, 24, r_o=4, r_r=2, frozen_blocks=2, k=8, gen=gen,
                                            dtype=torch.float32, lead=(2,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dual_lora_linear(x, w, b, backend=backend, **kw)
    assert y.dtype == torch.bfloat16
    low64 = lambda t: t.detach().bfloat16().double()  # noqa: E731
    ref = dual_lora_linear_reference(low64(x), low64(w), low64(b),
                                     **{k: v.detach().double() if torch.is_tensor(v) else v for k, v in kw.items()})
    assert rel_err(y, ref) <= 2e-2
    # a random dY, not y.sum(): with dY = 1 every row of dB is the same column sum of T (r values
    # in all), which cancellation can make arbitrarily small beside bf16's rounding of T (it failed
    # ~2% of seeds); with a random dY the norm spans n x r independent sums (max 0.011 in 2000 seeds)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.float().backward(dy.float())
    trained = [kw["orth_a"], kw["orth_b"], kw["res_a"], kw["res_b"]]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    # the same gradients as the float64 reference's (bf16 x and W0, so at bf16's tolerance)
    refs = [p.detach().double().requires_grad_(True) for p in trained]
    ref_kw = {**{k: v.detach().double() if torch.is_tensor(v) else v for k, v in kw.items()},
              "orth_a": refs[0], "orth_b": refs[1], "res_a": refs[2], "res_b": refs[3]}
    dual_lora_linear_reference(low64(x), low64(w), low64(b), **ref_kw).backward(dy)
    for p, r in zip(trained, refs):
        assert rel_err(p.grad, r.grad) <= 3e-2


def test_low_precision_input_with_float32_weights_fails_like_nn_linear():
    layer, xs = _trained_layer()
    with pytest.raises(RuntimeError):
        nn.Linear(32, 24)(xs[0].bfloat16())
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but x has torch.bfloat16"):
        layer(xs[0].bfloat16())


def test_memory_statistics_stay_float32_under_autocast():
    layer, xs = _trained_layer()
    with torch.autocast("cpu", dtype=torch.bfloat16), collect_inputs(layer) as stats:
        layer(xs[0])
    ref = xs[0].reshape(-1, 32).double()
    (only,) = stats.values()
    assert rel_err(only.tokens, ref.T @ ref) <= 1e-6  # a bfloat16 Gram would be ~1e-3 off


def test_task_lifecycle_inside_autocast_builds_the_bases_it_builds_outside():
    # a mixed-precision loop wraps end_task / begin_task in autocast too: the bases must not see it
    layer, xs = _trained_layer()
    twin = copy.deepcopy(layer)
    with torch.no_grad(), collect_inputs(layer) as stats:
        layer(xs[-1])
    with torch.no_grad(), collect_inputs(layer) as next_stats:
        layer(xs[0] + xs[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        added = end_task(layer, stats)
        begin_task(layer, next_stats)
    assert added == end_task(twin, stats)
    begin_task(twin, next_stats)
    for name in ("weight", "basis", "task_bases", "frozen_a", "frozen_b", "orth_a", "res_a"):
        assert torch.equal(getattr(layer, name), getattr(twin, name)), name
    m = layer.basis.double()
    assert (m.T @ m - torch.eye(m.shape[1], dtype=torch.float64)).abs().max() <= 1e-6


def test_orthogonal_training_under_autocast_keeps_old_outputs(gen):
    # the span(M) invariant at the autocast dtype's tolerance: train only the orthogonal adapter
    # of task 3 under bf16 autocast; outputs on inputs inside span(M) do not move.
    layer, xs = _trained_layer(backend="triton")
    layer.res_a.requires_grad_(False); layer.res_b.requires_grad_(False)
    probe = (xs[0].reshape(-1, 32) @ layer.basis) @ layer.basis.T  # old inputs, projected into span(M)
    layer.set_gate(torch.tensor([0.0, 0.0, 0.0]))  # residual blocks off: the orthogonal path alone
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = layer(probe).float()
    start = layer.orth_b.detach().clone()
    losses_moved = lambda lyr: (lyr.orth_b.detach() - start).abs().max() > 0.1  # noqa: E731
    opt = torch.optim.AdamW([layer.orth_a, layer.orth_b], lr=5e-2)
    target = torch.randn(16, 24, generator=gen)
    for _ in range(10):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (layer(xs[-1].reshape(-1, 32)).float() - target).square().mean()
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = layer(probe).float()
    assert losses_moved(layer)
    assert rel_err(after, before) <= 1e-2  # bf16 rounding of the same product, nothing more


def _vit_in_first_task(gen, batch):
    """A tiny ContinualViT with DualLoRA (torch backend) in its first task, and a 2-class batch."""
    torch.manual_seed(0)
    model = ContinualViT(create_vit(img_size=28, patch_size=7, depth=1, embed_dim=32, num_heads=2, in_chans=1),
                         adapter=dict(rank_orth=4, rank_res=2, backend="torch"))
    model.add_task_head(2)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    y = (x.mean((1, 2, 3)) > 0).long()
    with collect_inputs(model) as stats, torch.no_grad():
        model(x)
    begin_task(model, stats)
    model.train()
    return model, x, y


def test_continual_vit_training_step_under_cpu_autocast_learns(gen):
    model, x, y = _vit_in_first_task(gen, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
        assert logits.dtype == torch.bfloat16
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def _phases():
    """(name, layer, input) for task 1, task 3 in training (frozen blocks, one-hot gate) and
    inference with the dynamic gate."""
    torch.manual_seed(1)
    first = DualLoRALinear.from_linear(nn.Linear(32, 24), rank_orth=4, rank_res=2, backend="torch")
    x0 = torch.randn(2, 8, 32)
    with torch.no_grad():
        first.start_collecting(); first(x0); stats = first.stop_collecting()
    first.begin_task(stats)
    mid, xs = _trained_layer()
    done, xs2 = _trained_layer(seed=2)
    with torch.no_grad():
        done.start_collecting(); done(xs2[-1]); stats = done.stop_collecting()
    done.end_task(stats)
    done.eval()
    return [("task 1", first, x0), ("task 3 training", mid, xs[-1]), ("inference, dynamic gate", done, xs2[0])]


@pytest.mark.parametrize("phase", range(3))
def test_torch_compile_fullgraph_matches_eager(phase):
    torch._dynamo.reset()
    name, layer, x = _phases()[phase]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    xe = x.clone().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    ye, yc = layer(xe), compiled(xc)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6, msg=name)
    if layer.training:
        ye.square().sum().backward()
        grads_e = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
        layer.zero_grad()
        yc.square().sum().backward()
        grads_c = [p.grad for p in layer.parameters() if p.requires_grad]
        for ge, gc in zip(grads_e, grads_c):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_continual_vit_training_step_compiles_fullgraph(gen):
    torch._dynamo.reset()
    model, x, y = _vit_in_first_task(gen, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_loss = nn.functional.cross_entropy(model(x), y)
    eager_loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    loss = nn.functional.cross_entropy(compiled(x), y)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager[n], rtol=1e-4, atol=1e-6, msg=n)
