"""Render the committed continual-learning runs into the README's results section (between
``<!-- results-table:start -->`` and ``<!-- results-table:end -->``): the default runs of every method
(results/split-fmnist/*/results.json), the same with every image (results/split-fmnist-full/), what limits the
joint upper bound (results/upper-bound/upper-bound.json, from probe_upper_bound.py beside it), and how much the
default run varies across machines
(results/variation/: the same run with another thread count, another backend, another backbone, and the
backbone's pretraining with another thread count; notes.json says in words what differs in each run), and the
default command with one memory option changed against it (OPTION_RUNS: results/split-fmnist-train-a-off/,
results/saved-x-float8/).

    python results/render_table.py            # rewrite the README section
    python results/render_table.py --check    # exit 1 if it is out of date

The runs come from ``duallora train --method all --seeds 0,1,2 --out-dir results/split-fmnist`` (a row per method:
each metric's mean ± std over the seeds; the A_t plot that command writes beside them); each variation's
command is the one recorded in its results.json (its ``argv``, and ``TRITON_INTERPRET`` when set).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
try:
    from duallora_kernels._readme import update
    from duallora_kernels.commands.train import CURVES_PNG
    from duallora_kernels.continual.config import METHODS
    from duallora_kernels.continual.seeds import Spread, group_by_method
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
    from duallora_kernels._readme import update
    from duallora_kernels.commands.train import CURVES_PNG
    from duallora_kernels.continual.config import METHODS
    from duallora_kernels.continual.seeds import Spread, group_by_method


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _command(d: dict[str, Any]) -> str:
    """The command a run was made with: ``duallora`` and its arguments, as recorded in results.json."""
    argv = list(d.get("environment", {}).get("argv") or [])
    if not argv:
        return "(not recorded)"
    env = d.get("environment", {}).get("triton_interpret")
    first = Path(argv[0])
    if first.name == "duallora" or first.parts[-2:] == ("duallora_kernels", "__main__.py"):  # python -m duallora_kernels
        words = ["duallora", *argv[1:]]
    else:
        words = (["python"] if first.suffix == ".py" else []) + argv
    return (f"TRITON_INTERPRET={env} " if env else "") + shlex.join(words)


def _machine(d: dict[str, Any]) -> str:
    env = d.get("environment", {})
    cpu = env.get("cpu") or "CPU not recorded"
    gpu = f", {env['gpu']}" if env.get("gpu") else ""
    return f"{cpu}{gpu}, {env.get('threads', '?')} thread(s)"


def _backbone(d: dict[str, Any]) -> str:
    sha = d.get("backbone_sha256")
    return f"sha256 {sha[:12]}…" if sha else "sha256 not recorded"


def _load(docs: Sequence[dict[str, Any]]) -> str:
    values = [v for d in docs for v in (d.get("environment", {}).get("load_average") or {}).values() if v is not None]
    if not values:
        return ""
    return (f" The 1-minute load average was {min(values):.1f}-{max(values):.1f} while they ran (other processes "
            "shared the cores), so the run times are slower than on an idle machine.")


def _spread(v: Spread | None, scale: float = 100.0, fmt: str = ".1f") -> str:
    """"mean ± std" (one seed: the value alone); "-" when the metric does not apply."""
    if v is None:
        return "-"
    return f"{scale * v.mean:{fmt}}" + ("" if v.std is None else f" ± {scale * v.std:{fmt}}")




FULL_RUNS = "split-fmnist-full"
UPPER_BOUND = "upper-bound/upper-bound.json"  # results/upper-bound/probe_upper_bound.py: what limits `joint`  # beside the default runs: `duallora train --full`, every image


def _images(c: dict[str, Any], data: dict[str, Any]) -> str:
    if c["train_per_class"] is None and c["test_per_class"] is None:
        if c.get("dataset", "fashion-mnist") != "fashion-mnist":
            return f"every image ({data['train_images']:,} train / {data['test_images']:,} test)"
        return "every image (`--full`: 6,000 train / 1,000 test images per class)"
    return f"{c['train_per_class']} train / {c['test_per_class']} test images per class"


def _split(d: dict[str, Any]) -> str:
    """"5 tasks x 2 classes", or how the run's data says its split is written ("B50-Inc10, 6 tasks")."""
    data = d.get("data") or {}
    sizes = data.get("task_sizes") or [d["config"]["classes_per_task"]] * d["config"]["num_tasks"]
    return f"{len(sizes)} tasks x {sizes[0]} classes" if len(set(sizes)) == 1 else data["split"]


def _order(docs: list[tuple[Path, dict[str, Any]]], seeds: list[int]) -> str:
    """Which rule made the class order (recorded in results.json's data) and the order of each seed."""
    orders = {int(d["config"]["seed"]): d["class_order"] for _, d in docs if d["method"] != "joint"}
    order_text = "; ".join(f"seed {s}: {orders[s]}" for s in seeds if s in orders)
    rules = {(d.get("data") or {}).get("class_order_rule", "") for _, d in docs}
    if all(not r or r.startswith("shuffled by the seed ") for r in rules):
        return f"class order shuffled by the seed ({order_text})"
    return f"class order {' / '.join(sorted(rules))} ({order_text})"


def render_runs(docs: list[tuple[Path, dict[str, Any]]], root: Path,
                title: str = "### Results: Split Fashion-MNIST, class-incremental") -> list[str]:
    first = docs[0][1]
    c = first["config"]
    groups = group_by_method([d for _, d in docs], METHODS)
    path_of = {id(d): p for p, d in docs}
    seeds = sorted({s for g in groups for s in g.seeds})
    data = first.get("data") or {}
    source = (f"{data['dataset']} from {data.get('layout', 'its folder')}, "
              if data.get("dataset", "fashion-mnist") != "fashion-mnist" else "")
    lines = [
        title,
        "",
        f"{source}{_split(first)}, {_order(docs, seeds)}, {_images(c, data)}, backbone: {first['backbone']} "
        f"({_backbone(first)}). "
        "A_last: final accuracy over all classes; A_avg: mean over tasks of the accuracy on the classes seen so far; "
        "forgetting: max-based; task-id: accuracy of the dynamic memory's task prediction after the last task."
        + (" Each cell: mean ± standard deviation over the seeds (sample std, n - 1); A_last per seed: in the "
           "order of the seeds column (`duallora train` with no arguments prints the seed-0 run); run time: mean "
           "per run."
           if any(len(g.runs) > 1 for g in groups) else ""),
        "",
        "| method | seeds | A_last | A_last per seed | A_avg | forgetting | task-id | run time | plots |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        plots = " ".join(f"[{s}]({path_of[id(r)].parent.relative_to(root)}/results.png)" for s, r in zip(g.seeds, g.runs))
        lines.append(
            f"| `{g.method}` | {', '.join(map(str, g.seeds))} | {_spread(g.metric('A_last'))} | "
            f"{' / '.join(_pct(r['summary']['A_last']) for r in g.runs)} | "
            f"{_spread(g.metric('A_avg'))} | {_spread(g.metric('forgetting'))} | "
            f"{_spread(g.metric('task_id_accuracy'))} | {g.seconds().mean:.0f} s | {plots} |"
        )
    curves = docs[0][0].parent.parent / CURVES_PNG
    if curves.is_file():
        lines += ["", f"![A_t of every method over the seeds]({curves.relative_to(root)})"]
    lines += ["", f"Made with `{_command(first)}` on {_machine(first)}, torch "
              f"{first.get('environment', {}).get('torch', '?')}.{_load([d for _, d in docs])}"]
    return lines


#: Runs of the default command with one memory option changed, rendered against the default runs (issue 20):
#: folder under results/, title, and what the option is.
OPTION_RUNS = (
    ("split-fmnist-train-a-off", "`--train-a off`: B-only training",
     "the adapters' down-projections A stay at their initialisation (the task's principal input directions) and "
     "only B trains, so each adapted layer keeps T = x A^T for backward instead of its input x (docs/method.md, "
     "\"Fixed down-projections\")"),
    ("saved-x-float8", "Experiment: x saved in float8 for dA",
     "each adapted layer's saved input x kept as float8 e4m3 with one scale per row and read back for the "
     "gradient of A only (results/saved-x-float8/run_experiment.py, run before it became the option "
     "`saved_x=\"float8\"` of DualLoRALinear and dual_lora_linear)"),
)


def _delta(option: Any, default: Any) -> str:
    """"+0.3 (yes)": the option's mean minus the default's, and whether that is within the default's std."""
    if option is None or default is None:
        return "-"
    diff = 100 * (option.mean - default.mean)
    within = default.std is not None and abs(diff) <= 100 * default.std
    return f"{diff:+.1f} ({'yes' if within else 'no'})"


def render_option(folder: Path, title: str, what: str, default_docs: list[tuple[Path, dict[str, Any]]],
                  root: Path) -> list[str]:
    """One option's runs against the default runs of the same methods and seeds: A_last and forgetting, each
    with its difference and whether that lies within one standard deviation of the default over the seeds."""
    docs = [(p, json.loads(p.read_text())) for p in sorted(folder.glob("*/results.json"))]
    if not docs:
        return []
    default = {g.method: g for g in group_by_method([d for _, d in default_docs], METHODS)}
    groups = group_by_method([d for _, d in docs], METHODS)
    lines = ["", f"### {title}", "",
             f"The default command with one change: {what}. Same methods and seeds as the first table; Δ = the "
             "option's mean minus the default's, in points, and whether it lies within one standard deviation of the "
             "default over the seeds.", "",
             "| method | seeds | A_last | A_last per seed | A_last: default | Δ A_last (within 1 std) | forgetting | "
             "forgetting: default | Δ forgetting (within 1 std) | task-id | run time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        ref = default.get(g.method)
        ref_a, ref_f = (ref.metric("A_last"), ref.metric("forgetting")) if ref else (None, None)
        if ref is not None and ref.seeds != g.seeds:
            ref_a = ref_f = None  # compared seed for seed only
        lines.append(
            f"| `{g.method}` | {', '.join(map(str, g.seeds))} | {_spread(g.metric('A_last'))} | "
            f"{' / '.join(_pct(r['summary']['A_last']) for r in g.runs)} | {_spread(ref_a)} | "
            f"{_delta(g.metric('A_last'), ref_a)} | {_spread(g.metric('forgetting'))} | {_spread(ref_f)} | "
            f"{_delta(g.metric('forgetting'), ref_f)} | {_spread(g.metric('task_id_accuracy'))} | "
            f"{g.seconds().mean:.0f} s |")
    first = docs[0][1]
    lines += ["", f"Made with `{_command(first)}` on {_machine(first)}, torch "
              f"{first.get('environment', {}).get('torch', '?')} ([{folder.name}/]({folder.relative_to(root)}))."
              f"{_load([d for _, d in docs])}"]
    return lines


_NOT_PART_OF_THE_RESULT = ("out_dir", "run_name", "data_root", "backend", "workers")
# What a run made before a setting existed did, in that setting's words.
_BEFORE_IT_EXISTED = {"amp": "off", "compile": "off", "task_score": "subspace", "dataset": "fashion-mnist",
                      "init_classes": None, "class_order_seed": None, "class_order": None, "split_ratio": None,
                      "split_seed": 0, "train_a": True}


def _settings(d: dict[str, Any]) -> str:
    """A run's settings without those that name where it ran or how (the backend): runs with equal settings
    should give equal numbers, and a table compares only those."""
    import dataclasses

    from duallora_kernels.continual.config import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(_NOT_PART_OF_THE_RESULT)
    settings = {**_BEFORE_IT_EXISTED, **{k: v for k, v in d["config"].items() if k in known}}
    if settings["task_score"] == "subspace":  # the prototype settings are not used
        settings = {k: v for k, v in settings.items() if not k.startswith("prototype_")}
    return json.dumps(settings, sort_keys=True)


def _differing(reference: dict[str, Any] | None, d: dict[str, Any]) -> str:
    """The settings in which run ``d`` differs from ``reference``, in words."""
    if reference is None:
        return "no reference run"
    mine, theirs = json.loads(_settings(reference)), json.loads(_settings(d))
    # a setting only one side has is implied by another (the prototype settings by task_score): not repeated
    words = [f"{k} {theirs[k]!r} instead of {mine[k]!r}" for k in sorted(set(mine) & set(theirs))
             if theirs[k] != mine[k]]
    return "; ".join(words) or "none"


def _span(rows: list[tuple[str, str, dict[str, Any]]]) -> str:
    if len(rows) < 2:
        return ""
    first = rows[0][2]

    def same(d: dict[str, Any]) -> bool:
        return d["accuracy_matrix"] == first["accuracy_matrix"] and d["task_id_accuracy"] == first["task_id_accuracy"]

    if all(same(d) for _, _, d in rows):
        return "Every run in this table has the same accuracy matrix and task-identity accuracies, to the last digit."
    a = [100 * d["summary"]["A_last"] for _, _, d in rows]
    twins = [name for name, _, d in rows[1:] if same(d)]
    return ((f"{', '.join(twins)}: the same accuracy matrix and task-identity accuracies as the first row, to the "
             "last digit. " if twins else "") + f"A_last spans {min(a):.1f}-{max(a):.1f} over these runs "
            f"({max(a) - min(a):.1f} points).")


def _run_table(rows: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    lines = ["| run | what differs | command | machine | backbone | A_last | A_avg | forgetting | task-id |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, note, d in rows:
        s = d["summary"]
        lines.append(f"| {name} | {note} | `{_command(d)}` | {_machine(d)} | {_backbone(d)} | "
                     f"{_pct(s['A_last'])} | {_pct(s['A_avg'])} | {_pct(s['forgetting'])} | "
                     f"{_pct(s['task_id_accuracy'])} |")
    span = _span(rows)
    return lines + ([f"", span] if span else [])


def render_variation(reference: dict[str, Any] | None, runs: list[tuple[Path, dict[str, Any]]],
                     pretrains: list[tuple[Path, dict[str, Any]]], shipped_sha: str | None, root: Path,
                     notes: dict[str, str]) -> list[str]:
    if not runs and not pretrains:
        return []
    lines = ["", "### How much the results vary across machines", ""]
    rows = ([("the table above (seed 0)", "-", reference)] if reference else []) + [
        (f"[{p.parent.name}]({p.parent.relative_to(root)}/results.json)", notes.get(p.parent.name, ""), d)
        for p, d in runs]
    groups: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for row in rows:
        groups.setdefault(_settings(row[2]), []).append(row)
    for i, group in enumerate(groups.values()):
        if i == 0:
            lines += [
                "The default run is deterministic for one machine and thread count (a killed and resumed run "
                "reaches the same numbers), but float sums may be ordered differently with another thread count, "
                "another backend or another CPU, and training amplifies rounding differences. The `duallora` run "
                "of seed 0 in the table above, and the same run with what the second column says changed:",
                "",
            ]
        elif any(d["config"].get("backend") == "triton" for _, _, d in group):
            lines += ["", "The Triton kernels run on a CPU only through Triton's interpreter, far too slow for the "
                      "default run; the same comparison on a small run (a small randomly initialised ViT, 3 tasks, 100 test "
                      "images per class):", ""]
        else:
            lines += ["", f"Runs with other settings than the table above ({_differing(reference, group[0][2])}):", ""]
        lines += _run_table(group)
    if pretrains:
        lines += [
            "",
            "The backbone is shipped with the package because its pretraining (`duallora pretrain`) is itself "
            "deterministic only per machine and thread count:",
            "",
            "| pretraining | machine | MNIST held-out accuracy | sha256 | the shipped backbone? |",
            "|---|---|---|---|---|",
        ]
        for p, info in pretrains:
            hw, m = info.get("hardware") or {}, info["metrics"]
            same = "yes" if info.get("sha256") == shipped_sha else "no"
            lines.append(f"| [{p.stem}]({p.relative_to(root)}) | {hw.get('cpu') or 'CPU not recorded'}, "
                         f"{m['threads']} thread(s) | {100 * m['val_accuracy']:.1f}% | {info['sha256'][:12]}… | {same} |")
    return lines


def render_upper_bound(path: Path, root: Path) -> list[str]:
    """The joint upper bound under each change that probe_upper_bound.py measured (seed 0)."""
    if not path.is_file():
        return []
    doc = json.loads(path.read_text())
    rows, hw = doc["rows"], doc.get("hardware") or {}
    pct = lambda row, key: _pct(row[key]) if key in row else "-"  # noqa: E731
    lines = ["", "### What limits the joint upper bound", "",
             f"`joint` (one task holding all ten classes, plain LoRA on the frozen backbone) on seed {doc['seed']}, with "
             "one change at a time: its accuracy on its own training images says whether the adapters fit them at all. "
             "The rows below the first group self-pretrain a backbone on the MNIST digits with that change (the rest as "
             "shipped) and also give the default task score's class-prototype LDA on its frozen features: task identity, "
             "and its accuracy as a 10-way classifier.", "",
             "| backbone | change | joint: train | joint: test | LDA: task-id | LDA: 10-way | MNIST held-out | pretraining |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        seconds = f"{row['pretrain_seconds']:.0f} s" if "pretrain_seconds" in row else "-"
        lines.append(f"| {row['backbone']} | {row['change']} | {pct(row, 'joint_train_accuracy')} | "
                     f"{pct(row, 'joint_test_accuracy')} | {pct(row, 'lda_task_id_accuracy')} | "
                     f"{pct(row, 'lda_class_accuracy')} | {pct(row, 'mnist_val_accuracy')} | {seconds} |")
    lines += ["", f"Made with `{doc['command']}` on {hw.get('cpu') or 'a CPU not recorded'}, {doc['threads']} thread(s) "
              f"([{path.name}]({path.relative_to(root)})); docs/method.md (item 7) reads it."]
    return lines


def render(runs: Sequence[Path], root: Path = ROOT, variation: Path | None = None) -> str:
    docs = [(p, json.loads(p.read_text())) for p in runs]
    docs.sort(key=lambda d: (METHODS.index(d[1]["method"]) if d[1]["method"] in METHODS else 99, str(d[0])))
    if not docs:
        return "_No committed runs yet: `duallora train --method all --out-dir results/split-fmnist`._"
    lines = render_runs(docs, root)
    full = sorted((docs[0][0].parent.parent.parent / FULL_RUNS).glob("*/results.json"))
    if full:
        full_docs = [(p, json.loads(p.read_text())) for p in full]
        full_docs.sort(key=lambda d: (METHODS.index(d[1]["method"]) if d[1]["method"] in METHODS else 99, str(d[0])))
        missing = [m for m in METHODS if m not in {d["method"] for _, d in full_docs}]
        commands = sorted({_command(d) for _, d in full_docs})
        lines += ["", *render_runs(full_docs, root, "### The same with `--full`: all 60,000 training images"),
                  *([f"", f"Each run's command is in its results.json ({len(commands)} commands; the others differ from "
                         "the one above by their `--method`)."] if len(commands) > 1 else []),
                  *([f"", f"Not run with `--full` yet: {', '.join(f'`{m}`' for m in missing)}."] if missing else [])]
    results_dir = docs[0][0].parent.parent.parent
    for folder, title, what in OPTION_RUNS:
        lines += render_option(results_dir / folder, title, what, docs, root)
    lines += render_upper_bound(results_dir / UPPER_BOUND, root)
    if variation is not None and variation.is_dir():
        from duallora_kernels.continual.pretrain import SHIPPED_SHA256

        reference = next((d for _, d in docs if d["method"] == "duallora" and d["config"]["seed"] == 0), None)
        var_runs = [(p, json.loads(p.read_text())) for p in sorted(variation.glob("*/results.json"))]
        pretrains = [(p, json.loads(p.read_text())) for p in sorted(variation.glob("pretrain-*.json"))]
        notes_file = variation / "notes.json"
        notes = json.loads(notes_file.read_text()) if notes_file.is_file() else {}
        lines += render_variation(reference, var_runs, pretrains, SHIPPED_SHA256, root, notes)
    lines += ["", "Generated by `python results/render_table.py` from `results/split-fmnist/*/results.json`, "
              f"`results/{FULL_RUNS}/*/results.json`, "
              f"{', '.join(f'`results/{f}/*/results.json`' for f, _, _ in OPTION_RUNS)}, `results/{UPPER_BOUND}` and `results/variation/`; the choices behind the defaults are in [docs/method.md](docs/method.md)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "results" / "split-fmnist",
                    help="folder of the default runs, one <method>-seed<seed>/results.json each")
    ap.add_argument("--variation", type=Path, default=ROOT / "results" / "variation",
                    help="folder of the variation runs and pretraining records")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README to update")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README section is out of date")
    args = ap.parse_args(argv)
    block = render(sorted(args.runs.glob("*/results.json")), root=args.readme.resolve().parent,
                   variation=args.variation)
    return update(args.readme, block, "results-table", check=args.check, script="results/render_table.py")


if __name__ == "__main__":
    sys.exit(main())
