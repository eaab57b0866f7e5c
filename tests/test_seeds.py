"""Runs over several seeds: `duallora train --seeds`, each metric's mean ± std per method (against numpy on
fabricated results), the A_t plot and the README's results table."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from duallora_kernels import cli
from duallora_kernels.commands import train as train_command
from duallora_kernels.continual import metrics
from duallora_kernels.continual.seeds import group_by_method, mean_std, plot_curves

ROOT = Path(__file__).resolve().parents[1]


def _train_parser():
    import argparse

    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices["train"]


def _fake_run(method: str, seed: int, rng: np.random.Generator, tasks: int = 4) -> dict:
    """A results.json as `duallora train` writes it, with random accuracies."""
    r = [[float(v) for v in rng.uniform(0.3, 1.0, size=t + 1)] for t in range(tasks)]
    task_id = [None] + [float(v) for v in rng.uniform(0.5, 1.0, size=tasks - 1)]
    return {"method": method, "summary": metrics.summary(r, task_id), "accuracy_matrix": r,
            "task_id_accuracy": task_id, "class_order": [[2 * t, 2 * t + 1] for t in range(tasks)],
            "config": {"seed": seed, "num_tasks": tasks, "classes_per_task": 2, "train_per_class": 10,
                       "test_per_class": 5},
            "backbone": "fake", "seconds_per_task": [float(v) for v in rng.uniform(1, 5, size=tasks)],
            "environment": {"argv": ["duallora", "train", "--seeds", "0,1,2"], "threads": 1}}


def test_mean_and_std_match_numpy():
    rng = np.random.default_rng(0)
    values = rng.normal(size=5)
    s = mean_std(values)
    assert s.mean == pytest.approx(np.mean(values), rel=1e-12) and s.std == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    assert mean_std([0.4]).std is None and mean_std([0.4]).n == 1
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])


def test_grouping_over_seeds_matches_numpy_on_fabricated_runs():
    rng = np.random.default_rng(1)
    runs = [_fake_run(m, s, rng) for s in (2, 0, 1) for m in ("orth-only", "duallora")]
    groups = group_by_method(runs, order=("duallora", "orth-only"))
    assert [g.method for g in groups] == ["duallora", "orth-only"] and groups[0].seeds == [0, 1, 2]
    for g in groups:
        mine = [r for r in runs if r["method"] == g.method]
        for name in ("A_last", "A_avg", "forgetting", "task_id_accuracy"):
            vals = np.array([r["summary"][name] for r in mine])
            assert g.metric(name).mean == pytest.approx(vals.mean(), rel=1e-12)
            assert g.metric(name).std == pytest.approx(vals.std(ddof=1), rel=1e-12)
        a_t = np.array([[np.mean(row) for row in r["accuracy_matrix"]] for r in mine])  # (seeds, tasks)
        curve = g.curve()
        np.testing.assert_allclose([c.mean for c in curve], a_t.mean(0), rtol=1e-12)
        np.testing.assert_allclose([c.std for c in curve], a_t.std(0, ddof=1), rtol=1e-12)
        seconds = np.array([sum(r["seconds_per_task"]) for r in mine])
        assert g.seconds().mean == pytest.approx(seconds.mean(), rel=1e-12)
    with pytest.raises(ValueError, match="more than one run with the same seed"):
        group_by_method(runs + [_fake_run("duallora", 0, rng)])


def test_curves_plot_and_readme_table_show_mean_and_std(tmp_path):
    rng = np.random.default_rng(2)
    runs = [_fake_run(m, s, rng) for s in (0, 1, 2) for m in ("duallora", "orth-only")]
    joint = _fake_run("joint", 0, rng, tasks=1)
    root = tmp_path / "repo"
    for r in runs + [joint]:
        folder = root / "results" / "split-fmnist" / f"{r['method']}-seed{r['config']['seed']}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(r))
    plot_curves(group_by_method(runs + [joint]), root / "results" / "split-fmnist" / "a_t-curves.png", "fake")
    assert (root / "results" / "split-fmnist" / "a_t-curves.png").read_bytes()[:4] == b"\x89PNG"
    spec = importlib.util.spec_from_file_location("render_table_under_test", ROOT / "results" / "render_table.py")
    render_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_table)
    text = render_table.render(sorted((root / "results" / "split-fmnist").glob("*/results.json")), root=root)
    row = next(line for line in text.splitlines() if line.startswith("| `duallora`"))
    a_last = np.array([r["summary"]["A_last"] for r in runs if r["method"] == "duallora"]) * 100
    assert f"{a_last.mean():.1f} ± {a_last.std(ddof=1):.1f}" in row and "| 0, 1, 2 |" in row
    assert " / ".join(f"{v:.1f}" for v in a_last) in row
    joint_row = next(line for line in text.splitlines() if line.startswith("| `joint`"))
    assert f"| {100 * joint['summary']['A_last']:.1f} |" in joint_row and "| - |" in joint_row  # one seed, no task-id
    assert "](results/split-fmnist/a_t-curves.png)" in text
    assert "--full" not in text.split("### Results")[1].split("|")[0]  # no --full section without --full runs
    full = _fake_run("duallora", 0, rng)
    full["config"].update(train_per_class=None, test_per_class=None)
    (root / "results" / "split-fmnist-full" / "duallora-seed0").mkdir(parents=True)
    (root / "results" / "split-fmnist-full" / "duallora-seed0" / "results.json").write_text(json.dumps(full))
    text = render_table.render(sorted((root / "results" / "split-fmnist").glob("*/results.json")), root=root)
    section = text.split("### The same with `--full`")[1]
    assert "every image" in section and f"| {100 * full['summary']['A_last']:.1f} |" in section
    assert "Not run with `--full` yet: `orth-only`, `res-only`" in section
    assert "upper bound" not in text  # no section without results/upper-bound/upper-bound.json
    probe = {"command": "python probe", "seed": 0, "threads": 2, "hardware": {"cpu": "a CPU"}, "rows": [
        {"backbone": "shipped", "change": "-", "lda_task_id_accuracy": rng.random(), "lda_class_accuracy": rng.random()},
        {"backbone": "pretrain", "change": "90 epochs", "pretrain_seconds": 231.6, "mnist_val_accuracy": rng.random(),
         "lda_task_id_accuracy": rng.random(), "lda_class_accuracy": rng.random(),
         "joint_train_accuracy": rng.random(), "joint_test_accuracy": rng.random()}]}
    (root / "results" / "upper-bound").mkdir(parents=True)
    (root / "results" / "upper-bound" / "upper-bound.json").write_text(json.dumps(probe))
    text = render_table.render(sorted((root / "results" / "split-fmnist").glob("*/results.json")), root=root)
    lda_only, epochs = text.split("### What limits the joint upper bound")[1].split("\n\n")[2].splitlines()[2:4]
    first, second = probe["rows"]
    assert lda_only == (f"| shipped | - | - | - | {100 * first['lda_task_id_accuracy']:.1f} | "
                        f"{100 * first['lda_class_accuracy']:.1f} | - | - |")
    assert epochs == ("| pretrain | 90 epochs | " + " | ".join(f"{100 * second[k]:.1f}" for k in (
        "joint_train_accuracy", "joint_test_accuracy", "lda_task_id_accuracy", "lda_class_accuracy",
        "mnist_val_accuracy")) + " | 232 s |")


def test_seeds_flag_makes_one_run_per_method_and_seed():
    parser = _train_parser()
    configs = train_command.configs_from_args(parser.parse_args(["--method", "duallora,joint", "--seeds", "2,0"]))
    assert [(c.method, c.seed) for c in configs] == [("duallora", 2), ("joint", 2), ("duallora", 0), ("joint", 0)]
    assert [c.name for c in configs][:2] == ["duallora-seed2", "joint-seed2"]
    (one,) = train_command.configs_from_args(parser.parse_args(["--seed", "3"]))
    assert one.seed == 3


@pytest.mark.parametrize("argv, match", [
    (["--seeds", "0,1", "--seed", "1"], "give --seed or --seeds, not both"),
    (["--seeds", "0,x"], "comma-separated integers"),
    (["--seeds", "0,0"], "distinct integers"),
    (["--seeds", "-1"], "distinct integers >= 0"),
    (["--seeds", "0,1", "--run-name", "mine"], "--run-name names one run"),
])
def test_bad_seeds_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch, argv, match):
    from duallora_kernels.continual import trainer

    monkeypatch.setattr(trainer.Trainer, "run", lambda *a, **k: pytest.fail("a run started"))
    assert cli.main(["train", *argv, f"--out-dir={tmp_path / 'out'}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.startswith("duallora train: error:")
    assert not (tmp_path / "out").exists()


def test_train_with_seeds_writes_every_run_and_the_curves_plot(tmp_path):
    from test_cli import TINY

    out = tmp_path / "out"
    argv = ["train", *TINY, "--num-tasks=2", "--epochs=1", "--method", "duallora,joint", "--seeds", "0,1",
            f"--out-dir={out}", "--threads=1"]
    assert cli.main(argv) == 0
    assert sorted(p.parent.name for p in out.glob("*/results.json")) == [
        "duallora-seed0", "duallora-seed1", "joint-seed0", "joint-seed1"]
    assert (out / "a_t-curves.png").read_bytes()[:4] == b"\x89PNG"


def test_memory_option_runs_render_against_the_default_with_their_difference(tmp_path):
    # issue 20: results/split-fmnist-train-a-off beside the default runs, each metric's Δ and whether it lies
    # within one standard deviation of the default over the seeds
    rng = np.random.default_rng(3)
    root = tmp_path / "repo"
    default = [_fake_run("duallora", s, rng) for s in (0, 1, 2)]
    option = [_fake_run("duallora", s, rng) for s in (0, 1, 2)]
    option[0]["environment"]["argv"] = ["/x/duallora_kernels/__main__.py", "train", "--train-a", "off"]
    for folder, runs in (("split-fmnist", default), ("split-fmnist-train-a-off", option)):
        for r in runs:
            d = root / "results" / folder / f"duallora-seed{r['config']['seed']}"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(r))
    spec = importlib.util.spec_from_file_location("render_table_options", ROOT / "results" / "render_table.py")
    render_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_table)
    text = render_table.render(sorted((root / "results" / "split-fmnist").glob("*/results.json")), root=root)
    section = text.split("### `--train-a off`: B-only training")[1].split("###")[0]
    row = next(line for line in section.splitlines() if line.startswith("| `duallora`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    for name, (i_opt, i_ref, i_delta) in (("A_last", (2, 4, 5)), ("forgetting", (6, 7, 8))):
        opt = np.array([r["summary"][name] for r in option]) * 100
        ref = np.array([r["summary"][name] for r in default]) * 100
        diff = opt.mean() - ref.mean()
        assert cells[i_opt] == f"{opt.mean():.1f} ± {opt.std(ddof=1):.1f}"
        assert cells[i_ref] == f"{ref.mean():.1f} ± {ref.std(ddof=1):.1f}"
        assert cells[i_delta] == f"{diff:+.1f} ({'yes' if abs(diff) <= ref.std(ddof=1) else 'no'})"
    assert "Made with `duallora train --train-a off`" in section  # python -m duallora_kernels reads as duallora
    assert "Experiment: x saved in float8" not in text  # no section without its runs
