"""Memory: streaming Gram, GPM basis extension, principal directions, scores and gates."""
import pytest
import torch

from duallora_kernels import memory
from helpers import orthonormal_basis, randn, rel_err


def test_gram_accumulator_streams_tokens_and_summaries(gen):
    acc = memory.GramAccumulator(12, summary="cls", backend="torch")
    batches = [randn(3, 5, 12, gen=gen, dtype=torch.float32) for _ in range(4)]
    for x in batches:
        acc.update(x)
    allx = torch.cat([x.reshape(-1, 12) for x in batches]).double()
    cls = torch.cat([x[:, 0] for x in batches]).double()
    assert acc.token_count == 60 and acc.summary_count == 12
    assert rel_err(acc.tokens, allx.T @ allx) <= 1e-6
    assert rel_err(acc.summary, cls.T @ cls) <= 1e-6
    mean = memory.GramAccumulator(12, summary="mean", backend="torch")
    mean.update(batches[0])
    z = batches[0].double().mean(1)
    assert rel_err(mean.summary, z.T @ z) <= 1e-6


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.97, 1.0])
def test_extend_basis_meets_threshold_with_fewest_directions(threshold, gen):
    d = 20
    old = orthonormal_basis(d, 4, gen)
    r = randn(d, 300, gen=gen) * torch.linspace(3, 0.1, d, dtype=torch.float64)[:, None]
    g = r @ r.T
    new = memory.extend_basis(old, g, threshold)
    k = new.shape[1]
    assert torch.equal(new[:, :4], old)
    assert (new.T @ new - torch.eye(k, dtype=torch.float64)).abs().max() <= 1e-12
    energy = memory.captured_energy(g, new)
    assert energy >= threshold - 1e-9
    if k > 4:  # one direction fewer must miss the threshold (fewest directions)
        assert memory.captured_energy(g, new[:, :-1]) < threshold


def test_extend_basis_adds_nothing_when_memory_already_explains_the_task(gen):
    m = orthonormal_basis(16, 5, gen)
    r = m @ randn(5, 100, gen=gen)
    new = memory.extend_basis(m, r @ r.T, 0.99)
    assert new.shape[1] == 5


def test_threshold_schedule_rises():
    assert memory.threshold_schedule(5, 0.95, 0.99) == pytest.approx([0.95, 0.96, 0.97, 0.98, 0.99])
    assert memory.threshold_for_task([0.9, 0.95], 7) == 0.95


def test_principal_directions_in_and_out_of_span(gen):
    d = 18
    m = orthonormal_basis(d, 5, gen)
    r = randn(d, 200, gen=gen)
    g = r @ r.T
    out = memory.principal_directions(g, 4, exclude=m)
    inside = memory.principal_directions(g, 3, within=m)
    assert (out.T @ m).abs().max() <= 1e-12
    assert (inside - m @ (m.T @ inside)).abs().max() <= 1e-12
    for u in (out, inside):
        assert (u.T @ u - torch.eye(u.shape[1], dtype=u.dtype)).abs().max() <= 1e-10
    # top direction of the projected Gram has the largest energy among candidates
    p = torch.eye(d, dtype=torch.float64) - m @ m.T
    vals = torch.linalg.eigvalsh(p @ g @ p)
    assert (out[:, 0] @ g @ out[:, 0]).item() == pytest.approx(vals[-1].item(), rel=1e-9)


def test_task_scores_and_gates(gen):
    d = 16
    bases = torch.stack([orthonormal_basis(d, 3, gen) for _ in range(3)])
    z = torch.cat([bases[1] @ randn(3, 4, gen=gen)], 1).T  # 4 samples inside task 1's subspace
    scores = memory.task_scores(z, bases, backend="torch")
    assert scores.shape == (4, 3)
    assert torch.allclose(scores[:, 1], torch.ones(4, dtype=torch.float64), atol=1e-12)
    ref = torch.stack([(z @ bases[t]).square().sum(1) / z.square().sum(1) for t in range(3)], 1)
    assert rel_err(scores, ref) <= 1e-12
    soft = memory.task_gates(scores, temperature=0.05)
    assert torch.allclose(soft.sum(1), torch.ones(4, dtype=soft.dtype))
    assert (soft.argmax(1) == 1).all()
    hard = memory.task_gates(scores, hard=True)
    assert torch.equal(hard, torch.nn.functional.one_hot(torch.full((4,), 1), 3).to(hard.dtype))


# ---------------------------------------------------------------- non-finite statistics (issue 10, item 6)
def test_non_finite_stats_name_the_layer_and_the_task():
    stats = memory.InputStats(4)
    stats.tokens += torch.eye(4, dtype=torch.float64)
    memory.check_finite_stats(stats, layer="blocks.0.qkv", task=2)  # finite: no error
    stats.summary[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in the summary Gram matrix\) at layer 'blocks.0.qkv', task 2"):
        memory.check_finite_stats(stats, layer="blocks.0.qkv", task=2)
    with pytest.raises(ValueError, match="gram holds NaN or inf"):
        memory.extend_basis(None, torch.full((4, 4), float("inf"), dtype=torch.float64), 0.9)
    with pytest.raises(ValueError, match="gram holds NaN or inf"):
        memory.principal_directions(stats.summary, 2)


def test_model_end_task_refuses_nan_before_any_layer_changes(gen):
    from torch import nn

    from duallora_kernels.nn import begin_task, collect_inputs, dual_lora_layers, end_task, inject

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    inject(model, targets=["0", "1"], rank_orth=2, rank_res=2)
    x = torch.randn(6, 3, 8, generator=gen)
    layers = dual_lora_layers(model)
    with torch.no_grad(), collect_inputs(model) as stats:
        model(x)
    begin_task(model, stats)
    with torch.no_grad():
        for layer in layers.values():
            layer.orth_b.normal_()  # something to fold, so a change to the weights would show
    with torch.no_grad(), collect_inputs(model) as stats:
        model(x)
    good = stats["1"].tokens[0, 0].item()
    stats["1"].tokens[0, 0] = float("nan")  # only the second layer's statistics are bad
    before = {n: (l.weight.clone(), l.basis.clone(), int(l.tasks_done)) for n, l in layers.items()}
    with pytest.raises(ValueError, match=r"layer '1', task 0 \(end of task\).*No basis was changed"):
        end_task(model, stats)
    for n, layer in layers.items():
        weight, basis, done = before[n]
        assert torch.equal(layer.weight, weight) and torch.equal(layer.basis, basis)
        assert int(layer.tasks_done) == done and bool(layer.in_task)
    stats["1"].tokens[0, 0] = good
    added = end_task(model, stats)  # with finite statistics the task ends normally
    assert set(added) == {"0", "1"} and all(int(l.tasks_done) == 1 for l in layers.values())
