"""How cost grows with the number of finished tasks (issue 20, item 4): ``duallora bench --tasks``. The state it
builds is the one the lifecycle leaves, the device-operation count of a step does not grow with the tasks
(torch and Triton), what does grow (bases, frozen blocks, parameter bytes, planned memory) grows, and the
README section renders from the JSON the command writes. Times are produced, never asserted."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

from duallora_kernels import cli
from duallora_kernels._readme import markers
from duallora_kernels.commands import bench as bench_cmd
from duallora_kernels.harness import task_growth
from duallora_kernels.harness.problems import LayerShape
from duallora_kernels.harness.task_growth_report import TASK_COMMAND, render_task_growth_section
from duallora_kernels.harness.vit_models import basis_columns, load_training_state
from duallora_kernels.nn import DualLoRALinear

TINY_VIT = ["--model", "vit_base_patch16_224", "--img-size", "32", "--depth", "1", "--embed-dim", "64",
            "--num-heads", "2"]


def _settings(tasks, **over):
    s = {"tasks": tasks, "shapes": [LayerShape("custom", 40, 24)], "rank": 6, "dtype": "float32", "batch": 1,
         "vit_batch": 1, "basis_per_task": 0.1, "model": "vit_base_patch16_224", "model_label": "tiny",
         "timm_kwargs": {"img_size": 32, "depth": 1, "embed_dim": 64, "num_heads": 2}, "num_classes": 10,
         "plan_batch": 2, "warmup_ms": 0.0, "rep_ms": 0.0, "seed": 0}
    return {**s, **over}


def test_the_state_after_t_tasks_is_what_the_lifecycle_leaves():
    layer = DualLoRALinear(40, 24, rank_orth=3, rank_res=3)
    load_training_state(layer, 6, tasks=5, basis_per_task=0.1)
    assert layer.tasks_done == 5 and layer.basis_size == basis_columns(40, tasks=5, basis_per_task=0.1) == 20
    assert layer.basis_sizes.tolist() == [4] * 5 and layer.frozen_a.shape == (4 * 3, 40)  # task 1 had no block
    assert layer._frozen_task_ids == [1, 2, 3, 4] and layer._in_task and layer._res_active
    torch.testing.assert_close(layer.basis.T @ layer.basis, torch.eye(20, dtype=layer.basis.dtype))
    # one task done, a quarter of d in M: the planner's state as before
    load_training_state(layer, 6)
    assert layer.tasks_done == 1 and layer.basis_size == 10 and layer.frozen_a.shape[0] == 0


# Per Triton design (ops/fused_linear.py): design="auto" may pick another design once the stacked rank has
# grown into another tile bucket (7 or 8 launches a step, both within the budget); each design's own count
# is the same at 1, 5 and 20 tasks.
@pytest.mark.parametrize("backend, design", [("torch", "auto"), ("triton", "single"), ("triton", "split"),
                                             ("triton", "tma")])
def test_device_ops_of_a_layer_step_do_not_grow_with_the_tasks(backend, design, monkeypatch):
    from duallora_kernels.ops.fused_linear import DESIGN_ENV

    monkeypatch.setenv(DESIGN_ENV, design)
    s = _settings([1, 5, 20])
    counts = set()
    for tasks in s["tasks"]:
        layer, _ = task_growth._dual_layer(s["shapes"][0], s["rank"], tasks, s, torch.device("cpu"), backend)
        steps = task_growth._layer_steps(layer, 16, torch.device("cpu"), 0)
        train = task_growth.count_step(steps["train"], torch.device("cpu"))
        infer = task_growth.count_step(steps["infer"], torch.device("cpu"))
        assert not train.syncs and not infer.syncs
        counts.add((train.total, infer.total))
    assert len(counts) == 1, counts


def test_the_command_writes_json_and_plot_and_the_readme_renders_them(tmp_path, capsys):
    out = tmp_path / "bench" / "results" / "tasks-tiny.json"
    argv = ["bench", "--tasks", "2,1", "--shapes", "40x24", "--ranks", "6", "--batch", "1", "--vit-batch", "1",
            "--basis-per-task", "0.1", "--warmup-ms", "0", "--rep-ms", "0", "--threads", "1", "--no-progress",
            "--out", str(out), *TINY_VIT]
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == task_growth.TASKS_SCHEMA and doc["complete"]
    assert [(r["scope"], r["tasks"]) for r in doc["results"]] == [("layer", 1), ("layer", 2), ("vit", 1), ("vit", 2)]
    layer, vit = doc["results"][:2], doc["results"][2:]
    for rows in (layer, vit):  # memory grows with the tasks, device operations do not
        first, last = rows
        assert first["train_ops"] == last["train_ops"] and first["train_frozen_ops"] == last["train_frozen_ops"]
        assert last["param_bytes"] > first["param_bytes"] and last["frozen_param_bytes"] == first["frozen_param_bytes"]
        assert last["basis_columns"] > first["basis_columns"] and last["frozen_blocks"] > first["frozen_blocks"] == 0
        assert all(r["train_over_frozen"] == r["train_ms"] / r["train_frozen_ms"] for r in rows)
    assert layer[0]["infer_ops"] == layer[1]["infer_ops"]
    assert layer[0]["triton_train_ops"] == layer[1]["triton_train_ops"] is not None  # the interpreter counts it
    # what the layer holds more after one more task: 4 basis columns, a frozen block, U_t (float32, d = 40, n = 24)
    d, n, r_r, u = 40, 24, 3, 8
    grown = 4 * d * (layer[1]["basis_columns"] - layer[0]["basis_columns"]) + 4 * r_r * (d + n) + 4 * d * u + 8 + 8
    assert layer[1]["param_bytes"] - layer[0]["param_bytes"] == grown  # + basis_sizes and frozen_tasks entries
    assert vit[1]["planned_bytes"] >= vit[0]["planned_bytes"] and vit[0]["planned_frozen_bytes"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "one layer, by tasks done" in printed and "planned step memory on rtx3060-12gb" in printed
    section = render_task_growth_section([out], tmp_path)
    assert "[tasks-tiny.json](bench/results/tasks-tiny.json)" in section and "tasks-tiny.png" in section
    vit_line = next(line for line in section.splitlines() if line.startswith("| 2 |") and "MiB" in line and "/ 0 B" not in line)
    assert vit_line.count("|") >= 9
    start, end = markers("task-growth")
    empty = render_task_growth_section([], tmp_path)
    assert "Not measured yet" in empty and TASK_COMMAND in empty and start not in empty


def test_task_settings_refuse_bad_input():
    parser = bench_cmd.argparse.ArgumentParser()
    bench_cmd.add_arguments(parser)
    ok = bench_cmd.task_settings(parser.parse_args(["--tasks", "20,1,5,10"]))
    assert ok["tasks"] == [1, 5, 10, 20] and ok["shapes"][0].name == "vit_b.fc1" and ok["rank"] == 16
    assert ok["batch"] == 8 and ok["basis_per_task"] == 1 / 32
    for argv, msg in ((["--tasks", "0,5"], ">= 1"), (["--tasks", "a"], "numbers of finished tasks"),
                      (["--tasks", "1", "--shapes", "vit_b.fc1,vit_b.fc2"], "one layer shape"),
                      (["--tasks", "1", "--amp", "bf16"], "without autocast"),
                      (["--tasks", "1", "--basis-per-task", "0"], "--basis-per-task")):
        with pytest.raises(ValueError, match=msg):
            bench_cmd.task_settings(parser.parse_args(argv))


COMMITTED = sorted((pathlib.Path(__file__).resolve().parents[1] / "bench" / "results").glob("tasks-*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_task_growth_holds_its_schema_and_a_constant_op_count(path):
    doc = json.loads(path.read_text())
    assert doc["schema"] == task_growth.TASKS_SCHEMA and doc["complete"]
    for scope in ("layer", "vit"):
        rows = sorted((r for r in doc["results"] if r["scope"] == scope), key=lambda r: r["tasks"])
        assert len(rows) >= 2, scope
        assert len({(r["train_ops"], r["train_frozen_ops"]) for r in rows}) == 1, scope  # constant in the tasks
        assert [r["param_bytes"] for r in rows] == sorted(r["param_bytes"] for r in rows), scope
    assert path.with_suffix(".png").exists()
