"""DualLoRALinear: drop-in behaviour, the task lifecycle, gates, inject() and state_dict."""
import pytest
import torch
from torch import nn

from duallora_kernels.nn import DualLoRALinear, begin_task, collect_inputs, dual_lora_layers, end_task, inject
from helpers import randn, rel_err

F64 = torch.float64


def _task_inputs(gen, d, shift, lead=(6, 5)):
    # each task's inputs concentrate on a few directions of its own, plus a little noise
    dirs = torch.randn(d, 3, generator=gen, dtype=F64)
    return [randn(*lead, 3, gen=gen) @ dirs.T * 2 + shift + 0.05 * randn(*lead, d, gen=gen) for _ in range(3)]


def _run_task(layer, batches, gen, steps=15):
    with collect_inputs(layer) as stats:
        for x in batches:
            layer(x)
    begin_task(layer, stats, generator=gen)
    layer.train()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.05)
    target = randn(*batches[0].shape[:-1], layer.out_features, gen=gen)
    for i in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(layer(batches[i % len(batches)]), target).backward()
        opt.step()
    layer.eval()
    with collect_inputs(layer) as stats:
        for x in batches:
            layer(x)
    return stats


def test_from_linear_is_a_drop_in(gen):
    lin = nn.Linear(16, 10).to(F64)
    layer = DualLoRALinear.from_linear(lin, rank_orth=4, rank_res=2)
    x = randn(3, 7, 16, gen=gen)
    assert rel_err(layer(x), lin(x)) == 0.0
    assert not any(p.requires_grad for p in layer.parameters())
    assert "rank_orth=4" in repr(layer) and "tasks_done=0" in repr(layer) and "basis=0/16" in repr(layer)


def test_lifecycle_fold_freeze_and_extend(gen):
    d, n = 20, 12
    layer = DualLoRALinear.from_linear(nn.Linear(d, n).to(F64), rank_orth=3, rank_res=2, thresholds=[0.9, 0.95, 0.99])
    probe = randn(4, 5, d, gen=gen)
    for t in range(3):
        stats = _run_task(layer, _task_inputs(gen, d, shift=0.3 * t), gen)
        # the residual block trains from task 2 on; its gradient stays in span(M) (checked below)
        assert bool(layer.res_active) == (t > 0)
        assert layer.orth_b.abs().max() > 0  # the orthogonal adapter trained
        layer.train()  # one-hot gate on the current task for the comparison
        before = layer(probe).detach()
        k_before = layer.basis_size
        added = end_task(layer, stats)[""]
        # fold + freeze: in training mode the gate is now dynamic-free -> compare with explicit gate
        layer.set_gate(torch.nn.functional.one_hot(torch.tensor(t), t + 1).to(F64))
        assert rel_err(layer(probe).detach(), before) <= 1e-12
        layer.set_gate(None)
        assert layer.orth_b.abs().max() == 0 and not layer.orth_a.requires_grad
        assert layer.basis_size == k_before + added
        m = layer.basis
        assert (m.T @ m - torch.eye(m.shape[1], dtype=F64)).abs().max() <= 1e-10
        assert layer.task_bases.shape == (t + 1, d, layer.score_rank)
        assert layer.frozen_tasks.tolist() == list(range(1, t + 1))
        g = stats[""].tokens
        energy = torch.trace(m.T @ g @ m) / torch.trace(g)
        assert energy >= layer.threshold(t) - 1e-9


def test_residual_gradient_lies_in_span_of_memory(gen):
    d = 16
    layer = DualLoRALinear(d, 8, rank_orth=2, rank_res=3).to(F64)
    end_task(layer, _run_task(layer, _task_inputs(gen, d, 0.0), gen, steps=2))
    with collect_inputs(layer) as stats:
        layer(randn(4, 5, d, gen=gen))
    begin_task(layer, stats, generator=gen)
    layer.train()
    # B_r starts at zero, which would make C_r's gradient vanish: give it a value first
    with torch.no_grad():
        layer.res_b.normal_(generator=gen)
        layer.orth_b.normal_(generator=gen)
    layer(randn(4, 5, d, gen=gen)).square().sum().backward()
    g, m = layer.res_a.grad, layer.basis
    assert g.norm() > 1e-6
    assert (g - (g @ m) @ m.T).norm() <= 1e-12 * g.norm()
    assert (layer.orth_a.grad @ m).norm() <= 1e-12 * layer.orth_a.grad.norm()


def test_gates_training_one_hot_eval_dynamic(gen):
    d = 16
    layer = DualLoRALinear(d, 8, rank_orth=2, rank_res=2, temperature=0.05).to(F64)
    tasks = [_task_inputs(gen, d, shift=s) for s in (0.0, 1.0, -1.0)]
    for batches in tasks:
        end_task(layer, _run_task(layer, batches, gen, steps=3))
    layer.eval()
    layer(tasks[2][0])
    assert layer.last_gate.shape == (6, 3)
    assert torch.allclose(layer.last_gate.sum(1), torch.ones(6))
    assert (layer.last_gate.argmax(1) == 2).float().mean() >= 0.8
    # explicit gate: all weight on frozen block of task 1 == frozen block alone
    x = randn(6, 5, d, gen=gen)
    layer.set_gate(torch.tensor([0.0, 1.0, 0.0], dtype=F64))
    y = layer(x)
    base = x @ layer.weight.T + layer.bias
    r = layer.rank_res
    blk = ((x @ layer.frozen_a[:r].T) @ layer.frozen_b[:, :r].T) * layer.res_scale
    assert rel_err(y, base + blk) <= 1e-12


def test_inject_replaces_exactly_the_targets_and_keeps_outputs(gen):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj, self.fc1, self.fc2, self.head = (nn.Linear(8, 8) for _ in range(5))

        def forward(self, x):
            return self.head(self.fc2(torch.relu(self.fc1(self.proj(self.qkv(x))))))

    model = nn.Sequential(Block(), Block()).to(F64)
    x = randn(3, 8, gen=gen)
    y0 = model(x)
    names = inject(model, targets=("qkv", "fc*"), rank_orth=2, rank_res=1)
    assert sorted(names) == sorted(f"{i}.{n}" for i in range(2) for n in ("qkv", "fc1", "fc2"))
    assert sorted(dual_lora_layers(model)) == sorted(names)
    assert type(model[0].proj) is nn.Linear and type(model[1].head) is nn.Linear
    assert rel_err(model(x), y0) == 0.0
    with pytest.raises(ValueError, match="no nn.Linear named"):
        inject(nn.Sequential(nn.Linear(3, 3)), targets=("qkv",))


def test_state_dict_round_trip_after_tasks(gen):
    d, n = 16, 10
    kw = dict(rank_orth=3, rank_res=2, thresholds=[0.9, 0.97])
    layer = DualLoRALinear(d, n, **kw).to(F64)
    for s in (0.0, 0.5, 1.0):
        end_task(layer, _run_task(layer, _task_inputs(gen, d, s), gen, steps=3))
    mid = _run_task(layer, _task_inputs(gen, d, 2.0), gen, steps=3)  # a task in progress
    fresh = DualLoRALinear(d, n, **kw).to(F64)
    fresh.load_state_dict(layer.state_dict())
    for name, t in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    x = randn(4, 5, d, gen=gen)
    layer.eval(), fresh.eval()
    assert rel_err(fresh(x), layer(x)) == 0.0
    assert repr(fresh) == repr(layer) and "frozen_blocks=2" in repr(fresh)
    assert fresh.thresholds.tolist() == [0.9, 0.97]
    end_task(fresh, mid)
    assert fresh.tasks_done == 4
