"""The memory plan as a picture, drawn from its JSON alone: the step's memory per variant as
stacked bars (one colour per part) and the largest batch per GPU, variants side by side.

    python -m duallora_kernels.harness.plan_plot bench/results/plan-vit_b16-bf16-r16.json   # writes the .png beside it
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["plot_plan"]

_PARTS = ("parameters", "gradients", "optimizer", "saved", "transient", "allocator")


def plot_plan(doc: dict[str, Any], out: Path, gpu: str | None = None) -> Path:
    """Write the plot of the plan ``doc`` to ``out`` (PNG); the bars' workspace and context are
    those of ``gpu`` (default: the plan's first GPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r.get("kind") == "plan" and r["status"] == "ok"]
    if not rows:
        raise ValueError("the plan has no planned variant to plot")
    key = gpu or rows[0]["gpus"][0]["gpu"]
    variants = [r["variant"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
    bottom = [0.0] * len(rows)
    parts: list[tuple[str, list[float]]] = [(p, [r["breakdown"][p] / 2**30 for r in rows]) for p in _PARTS]
    per_gpu = [next(g for g in r["gpus"] if g["gpu"] == key) for r in rows]
    parts.append(("workspace + scratch", [(g["workspace_bytes"] + g["attention_scratch_bytes"]) / 2**30 for g in per_gpu]))
    parts.append(("CUDA context (est.)", [g["context_bytes"] / 2**30 for g in per_gpu]))
    for name, values in parts:
        left.bar(variants, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    s = doc["settings"]
    left.set_ylabel("GiB")
    left.set_ylim(0, max(bottom) * 1.45)  # room for the legend above the bars
    left.set_title(f"one training step at batch {s['batch']} ({key})", fontsize=10)
    left.legend(fontsize=7, loc="upper left", ncol=2)
    gpus = [g["gpu"] for g in rows[0]["gpus"]]
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        best = [next(g for g in r["gpus"] if g["gpu"] == k)["max_batch"] for k in gpus]
        right.bar([j + (i - (len(rows) - 1) / 2) * width for j in range(len(gpus))], best, width, label=r["variant"])
    right.set_xticks(range(len(gpus)), gpus, rotation=20, fontsize=8)
    right.set_ylabel("largest batch")
    right.set_yscale("log", base=2)
    right.set_title(f"largest batch that fits (predicted; searched up to {s['max_batch_cap']})", fontsize=10)
    right.legend(fontsize=7)
    fig.suptitle(f"{s['model_label']}: parameters {s['dtype']}, autocast {s['amp']}, {s['optimizer']}, "
                 f"rank {s['rank']} (predicted on the CPU; unvalidated on hardware unless a plan check says so)",
                 fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m duallora_kernels.harness.plan_plot PLAN.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    print(plot_plan(json.loads(path.read_text()), path.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
