"""``duallora bench --tasks`` as text and a picture: the terminal tables, the README's "How cost grows with the
number of tasks" section (from bench/results/tasks-*.json) and its plot (a PNG beside the JSON)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .tables import _source as _link  # "[name](path from root)", as the perf tables link files
from .tables import format_bytes, format_table

__all__ = ["TASK_COMMAND", "layer_table", "vit_table", "print_task_growth", "plot_task_growth",
           "render_task_growth_section"]

#: The command that writes the committed JSON (and the plot beside it); run it on an idle machine.
TASK_COMMAND = ("duallora bench --tasks 1,5,10,20 --threads 1 --no-progress "
                "--out bench/results/tasks-vit_b16-cpu-$(date +%F).json")


def _rows(rows: Sequence[dict[str, Any]], scope: str) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind") == "task_growth" and r["scope"] == scope]


def _ms(fused: float, frozen: float, ratio: float) -> str:
    return f"{fused:.2f} / {frozen:.2f} ({ratio:.2f}x)"


def _ops(r: dict[str, Any], pass_: str) -> str:
    triton = r.get(f"triton_{pass_}_ops")
    return f"{r[f'{pass_}_ops']}" + ("" if triton is None else f" ({triton} Triton)") + f" / {r[f'{pass_}_frozen_ops']}"


def layer_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    body = [[r["tasks"], r["basis_columns"], r["frozen_blocks"], _ops(r, "train"),
             _ms(r["train_ms"], r["train_frozen_ms"], r["train_over_frozen"]), _ops(r, "infer"),
             _ms(r["infer_ms"], r["infer_frozen_ms"], r["infer_over_frozen"]),
             f"{format_bytes(r['param_bytes'])} / {format_bytes(r['frozen_param_bytes'])}"]
            for r in _rows(rows, "layer")]
    return format_table(["tasks done", "basis columns", "frozen blocks", "train step: device ops (fused / frozen)",
                         "train step ms (fused / frozen)", "inference: device ops", "inference ms",
                         "parameters + buffers (fused / frozen)"], body, markdown=markdown)


def vit_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    body = [[r["tasks"], r["basis_columns"], r["frozen_blocks"], _ops(r, "train"),
             _ms(r["train_ms"], r["train_frozen_ms"], r["train_over_frozen"]),
             f"{format_bytes(r['planned_bytes'])} / {format_bytes(r['planned_frozen_bytes'])}",
             f"{r['planned_max_batch']} / {r['planned_frozen_max_batch']}",
             f"{format_bytes(r['param_bytes'])} / {format_bytes(r['frozen_param_bytes'])}"]
            for r in _rows(rows, "vit")]
    gpu = next((r["plan_gpu"] for r in _rows(rows, "vit")), "GPU")
    return format_table(["tasks done", "basis columns (all layers)", "frozen blocks (all layers)",
                         "train step: device ops (fused / frozen)", "train step ms (fused / frozen)",
                         f"planned step memory on {gpu} (fused / frozen)", "planned largest batch",
                         "parameters + buffers (fused / frozen)"], body, markdown=markdown)


def _what(doc: dict[str, Any]) -> tuple[str, str]:
    rows = doc["results"]
    layer, vit = _rows(rows, "layer"), _rows(rows, "vit")
    lw = (f"**One layer** ({layer[0]['model']} {layer[0]['d']}→{layer[0]['n']}, m = {layer[0]['m']}, rank "
          f"{layer[0]['rank']}, {layer[0]['dtype']}, {layer[0]['backend']} backend)") if layer else ""
    vw = (f"**A whole {vit[0]['model']} training step** (batch {vit[0]['batch']}, {vit[0]['dtype']}, "
          f"{vit[0]['backend']} backend: forward, backward, AdamW; the planner: float32 parameters, bf16 autocast, "
          f"AdamW, batch {vit[0]['plan_batch']})") if vit else ""
    return lw, vw


def print_task_growth(rows: Sequence[dict[str, Any]], file: Any = None) -> None:
    if _rows(rows, "layer"):
        print("\none layer, by tasks done (ms: median; ratio: fused / frozen)", file=file)
        print(layer_table(rows), file=file)
    if _rows(rows, "vit"):
        print("\na whole ViT training step, by tasks done", file=file)
        print(vit_table(rows), file=file)


def plot_task_growth(doc: dict[str, Any], out: Path) -> Path:
    """Four panels against tasks done: device ops, time over frozen, planned memory, parameter bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer, vit = _rows(doc["results"], "layer"), _rows(doc["results"], "vit")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for rows, label, style in ((layer, "layer", "o-"), (vit, "ViT step", "s-")):
        if not rows:
            continue
        t = [r["tasks"] for r in rows]
        axes[0].plot(t, [r["train_ops"] for r in rows], style, label=f"{label}: train step")
        axes[1].plot(t, [r["train_over_frozen"] for r in rows], style, label=f"{label}: train step")
        if label == "layer":
            axes[0].plot(t, [r["infer_ops"] for r in rows], "o--", label="layer: inference")
            axes[1].plot(t, [r["infer_over_frozen"] for r in rows], "o--", label="layer: inference")
        axes[3].plot(t, [r["param_bytes"] / 2**20 for r in rows], style, label=f"{label}: fused")
        axes[3].plot(t, [r["frozen_param_bytes"] / 2**20 for r in rows], style.replace("-", ":"),
                     label=f"{label}: frozen")
    if vit:
        t = [r["tasks"] for r in vit]
        axes[2].plot(t, [r["planned_bytes"] / 2**30 for r in vit], "s-", label="fused")
        axes[2].plot(t, [r["planned_frozen_bytes"] / 2**30 for r in vit], "s:", label="frozen")
        axes[2].set_title(f"planned step memory, {vit[0]['plan_gpu']} (GiB)", fontsize=9)
    titles = ("device operations per step", "time / frozen (same run)", None, "parameters + buffers (MiB)")
    for ax, title in zip(axes, titles):
        if title:
            ax.set_title(title, fontsize=9)
        ax.set_xlabel("tasks done")
        ax.legend(fontsize=7)
    for ax in (axes[0], axes[3]):  # a layer beside a whole model: log scale, both readable
        ax.set_yscale("log")
    fig.suptitle(f"How cost grows with the tasks ({doc['device']['name']}, {doc['date'][:10]})", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def render_task_growth_section(paths: Sequence[Path], root: Path) -> str:
    """The README section (without markers) from ``tasks-*.json`` files: per file its two tables and plot."""
    parts = ["<!-- generated by python -m duallora_kernels.readme from bench/results/tasks-*.json: do not edit by hand -->",
             "### How cost grows with the number of tasks", "",
             "Each finished task leaves every adapted layer more memory basis columns, its task bases and (from the "
             "second task on) a frozen residual block of rank_res. `duallora bench --tasks` puts the layers in the "
             "state of training the next task after T finished ones and measures them beside the frozen model in one "
             "run: device operations per step, time (the fused step timed right after a frozen one), the memory "
             "planner's peak and the parameter and buffer bytes ([harness/task_growth.py]"
             "(duallora_kernels/harness/task_growth.py)). The frozen residual blocks take no part in a training step "
             "(a task trains its own block only) and are stacked into the one low-rank product at inference; the "
             "device-operation count stays the same for any number of tasks (tests/test_task_growth.py).", ""]
    docs = []
    for p in sorted(paths):
        try:
            doc = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if doc.get("schema") == "duallora-tasks/1":
            docs.append((Path(p), doc))
    if not docs:
        parts.append(f"Not measured yet: times must come from an idle machine. `{TASK_COMMAND}` writes the JSON and "
                     f"its plot; `python -m duallora_kernels.readme` renders them here.")
        return "\n".join(parts) + "\n"
    for path, doc in docs:
        layer_what, vit_what = _what(doc)
        s = doc["settings"]
        parts += [f"From {_link(path, root)} ({doc['device']['name']}, {doc['date'][:10]}, "
                  f"{s.get('threads', '?')} thread(s); `{doc['command_line']}`; basis columns per task: "
                  f"{s['basis_per_task']:g} of each layer's d, an assumption).", ""]
        rows = doc["results"]
        if layer_what:
            parts += [layer_what + ":", "", layer_table(rows, markdown=True), ""]
        if vit_what:
            parts += [vit_what + ":", "", vit_table(rows, markdown=True), ""]
        png = path.with_suffix(".png")
        if png.exists():
            parts += [f"![cost by tasks done]({_link(png, root).split('](')[1][:-1]})", ""]
    return "\n".join(parts).rstrip() + "\n"
