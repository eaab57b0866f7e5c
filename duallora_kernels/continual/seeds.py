"""Runs of the same methods over several seeds: each metric's mean and standard deviation per method, and
one plot of every method's A_t curve with its spread.

The standard deviation is the sample one (n - 1 in the denominator, numpy's ``ddof=1``), over the seeds'
runs; with one seed it is None. A_t (after task t, the accuracy over every class seen so far) is the mean
of row t of the run's accuracy matrix (:func:`.metrics.incremental_accuracies`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .metrics import incremental_accuracies

__all__ = ["SUMMARY_METRICS", "Spread", "MethodRuns", "mean_std", "group_by_method", "plot_curves"]

# results.json's summary keys, in the order tables show them
SUMMARY_METRICS = ("A_last", "A_avg", "forgetting", "task_id_accuracy")


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (None for one value) of one quantity over seeds."""

    mean: float
    std: float | None
    n: int


def mean_std(values: Sequence[float]) -> Spread:
    """The mean and the sample standard deviation (ddof=1) of ``values``; ValueError when empty."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_std needs at least one value")
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return Spread(mean, std, len(xs))


@dataclass
class MethodRuns:
    """One method's runs (results.json dicts), one per seed."""

    method: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [int(r["config"]["seed"]) for r in self.runs]

    def metric(self, name: str) -> Spread | None:
        """A summary metric over the seeds; None where a run has none (e.g. task-id of joint)."""
        values = [r["summary"].get(name) for r in self.runs]
        return None if any(v is None for v in values) else mean_std(values)

    def seconds(self) -> Spread:
        """Run time per run (the sum of the tasks' seconds)."""
        return mean_std([sum(r["seconds_per_task"]) for r in self.runs])

    def curve(self) -> list[Spread]:
        """A_t per step t over the seeds (every run must have as many tasks)."""
        lengths = {len(r["accuracy_matrix"]) for r in self.runs}
        if len(lengths) != 1:
            raise ValueError(f"{self.method}: the runs have different numbers of tasks {sorted(lengths)}")
        per_run = [incremental_accuracies(r["accuracy_matrix"]) for r in self.runs]
        return [mean_std([a_t[t] for a_t in per_run]) for t in range(lengths.pop())]


def group_by_method(runs: Sequence[dict[str, Any]], order: Sequence[str] = ()) -> list[MethodRuns]:
    """The runs grouped by method (methods in ``order`` first, in that order; then the others by name), each
    group's runs sorted by seed; ValueError when a method has two runs with the same seed."""
    groups: dict[str, MethodRuns] = {}
    for r in runs:
        groups.setdefault(r["method"], MethodRuns(r["method"])).runs.append(r)
    for g in groups.values():
        g.runs.sort(key=lambda r: int(r["config"]["seed"]))
        if len(set(g.seeds)) != len(g.seeds):
            raise ValueError(f"{g.method} has more than one run with the same seed: {g.seeds}")
    rank = {m: i for i, m in enumerate(order)}
    return sorted(groups.values(), key=lambda g: (rank.get(g.method, len(rank)), g.method))


def plot_curves(groups: Sequence[MethodRuns], path: str | Path, title: str) -> None:
    """Every method's mean A_t over its seeds, with a band of one standard deviation and each seed's curve
    faint, written as PNG to ``path`` (atomically). A one-task method (joint) is a horizontal line at its
    final accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .._io import atomic_write

    steps = max(len(g.runs[0]["accuracy_matrix"]) for g in groups)
    x = np.arange(steps)
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, g in enumerate(groups):
        color = f"C{i}"
        curve = g.curve()
        mean = np.array([100 * s.mean for s in curve])
        std = np.array([100 * (s.std or 0.0) for s in curve])
        label = f"{g.method} ({len(g.runs)} seed{'s' if len(g.runs) > 1 else ''})"
        if len(curve) == 1:  # the upper bound: one task holding every class
            ax.axhline(mean[0], color=color, ls="--", label=label + ", final")
            ax.axhspan(mean[0] - std[0], mean[0] + std[0], color=color, alpha=0.12)
            continue
        for r in g.runs:
            ax.plot(x, [100 * a for a in incremental_accuracies(r["accuracy_matrix"])], color=color, lw=0.7, alpha=0.35)
        ax.plot(x, mean, color=color, marker="o", lw=2, label=label)
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15)
    ax.set(xlabel="after training task t", ylabel="A_t: accuracy over the classes seen so far (%)", xticks=x,
           ylim=(0, 101), title=title)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
