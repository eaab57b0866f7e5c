"""inject on tiny random-weight models of 14 timm families (duallora_kernels.timm_families.CASES), each through
the task lifecycle: injected == original; a finished task's outputs move no more than its memory allows, layer
by layer, and not at all (to float64 rounding) with thresholds=1.0; a strict state_dict round trip;
torch.compile(backend="aot_eager") == eager; a bf16-autocast training step with collect_inputs / end_task inside
autocast. results/timm-families/families.json (the README's table) must say what these runs do."""
import copy
import functools
import json

import pytest
import timm
import torch

from duallora_kernels.nn import begin_task, collect_inputs, dual_lora_layers, end_task, inject, set_gate
from duallora_kernels.timm_families import CASES, JSON_PATH, LAYER_KWARGS, build, describe, images, run_two_tasks
from helpers import rel_err

FAMILIES = {case.family: case for case in CASES}
COMMITTED = {row["family"]: row for row in json.loads(JSON_PATH.read_text())["families"]}


@functools.lru_cache(maxsize=None)
def _default_run(family: str):
    """Two tasks at the default thresholds (float32), shared by the tests of one family."""
    return run_two_tasks(FAMILIES[family])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()  # compiled frames of one family must not be guarded against by the next


@pytest.mark.parametrize("family", FAMILIES)
def test_injected_model_is_the_original_and_the_committed_table_says_what_inject_does(family):
    case = FAMILIES[family]
    model = build(case)
    original = copy.deepcopy(model)
    x = images(7, n=2)
    row = describe(case)
    inject(model, case.targets, **LAYER_KWARGS)
    with torch.no_grad():
        got, want = model(x), original(x)
    if row["qkv_switched_to_call_the_layer"]:  # qkv + bias added after the product, not inside it
        assert rel_err(got, want) <= 1e-6
    else:
        assert torch.equal(got, want)
    committed = {k: v for k, v in COMMITTED[family].items() if not k.startswith("movement")}
    assert committed == row, "results/timm-families/families.json is stale: python -m duallora_kernels.timm_families"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_finished_task_moves_no_more_than_its_memory_allows(family):
    run = _default_run(family)
    # every layer on its task-1 inputs X: M keeps the threshold's share of X's energy, and the next task's
    # update dW moves the output by ||dW (I - M M^T) X|| <= ||dW||_2 ||(I - M M^T) X|| (float32 rounding aside)
    for layer in run.layers:
        assert layer.outside <= 1 - layer.threshold + 1e-5, layer
        assert layer.moved <= layer.allowed * (1 + 1e-6) + 1e-5 * layer.output, layer
    assert any(layer.update > 0 and layer.outside > 0 for layer in run.layers)  # the bound was not vacuous
    assert run.learned > 0.05  # task 2 trained
    assert run.movement == pytest.approx(COMMITTED[family]["movement_default"], rel=1e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_with_thresholds_1_a_finished_task_does_not_move(family):
    run = run_two_tasks(FAMILIES[family], thresholds=1.0, dtype=torch.float64)
    assert run.learned > 0.05 and any(layer.update > 0 for layer in run.layers)  # task 2 trained, and changed W0
    # M keeps all but at most 1e-12 of X's energy (extend_basis): the rest is float64 rounding
    for layer in run.layers:
        assert layer.outside <= 1e-12 and layer.moved <= layer.allowed * (1 + 1e-9) + 1e-12 * layer.output, layer
    assert run.movement <= 1e-8 and COMMITTED[family]["movement_threshold_1_float64"] <= 1e-8


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip_and_compile_after_two_tasks(family):
    case, model = FAMILIES[family], _default_run(family).model
    fresh = build(case, seed=1)
    inject(fresh, case.targets, **LAYER_KWARGS)
    fresh.load_state_dict(model.state_dict(), strict=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    x = torch.cat([images(1), images(2)])  # one image of each task
    with torch.no_grad():
        eager = model(x)  # dynamic gates: each layer scores its input against both tasks
        assert torch.equal(fresh(x), eager)
        set_gate(model, torch.tensor([0.3, 0.7]))
        gated = model(x)
        compiled = torch.compile(model, backend="aot_eager")(x)
        set_gate(model, None)
    assert rel_err(compiled, gated) <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_step_and_lifecycle_inside_autocast(family):
    case = FAMILIES[family]
    model = build(case)
    inject(model, case.targets, **LAYER_KWARGS)
    x = images(3, n=2)
    for task in range(2):  # the second task has a basis to keep the first one's inputs out of
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad(), collect_inputs(model) as stats:
                model(x + task)
            begin_task(model, stats)
            trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            loss = model(x + task).float().square().mean()
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if n in trained]
        assert all(g is not None and g.dtype == torch.float32 and g.isfinite().all() for g in grads)
        torch.optim.SGD([p for n, p in model.named_parameters() if n in trained], lr=1e-2).step()
        assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad(), collect_inputs(model) as stats:
                model(x + task)
            end_task(model, stats)
    for name, layer in dual_lora_layers(model).items():
        m = layer.basis.double()
        assert layer.basis.dtype == torch.float32 and layer.tasks_done == 2, name
        assert (m.T @ m - torch.eye(m.shape[1], dtype=torch.float64)).abs().max() <= 1e-5, name


def test_the_committed_table_covers_every_family_with_this_timm():
    doc = json.loads(JSON_PATH.read_text())
    assert [row["family"] for row in doc["families"]] == list(FAMILIES)
    assert doc["timm"] == timm.__version__ and doc["layer_kwargs"] == LAYER_KWARGS


def test_the_readme_quotes_the_committed_movements():
    from duallora_kernels.timm_families import max_movement

    doc = json.loads(JSON_PATH.read_text())
    readme = (JSON_PATH.parents[2] / "README.md").read_text()
    worst64 = max(row["movement_threshold_1_float64"] for row in doc["families"])
    assert f"moved by up to {100 * max_movement(doc):.0f}% of their norm" in readme
    assert f"(at most {worst64:.0e})" in readme
