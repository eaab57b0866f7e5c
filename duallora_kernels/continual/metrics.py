"""Continual-learning metrics with the field's conventions, their table and their plot.

``R[t][j]`` is the accuracy on task j's test set after training task t (j <= t), predicting
over every class seen so far (class-incremental).

* ``A_last`` = mean_j R[T-1][j], the final average accuracy;
* ``A_avg``  = mean_t (mean_{j<=t} R[t][j]), the average incremental accuracy;
* forgetting = mean_{j<T-1} max_{j<=t<T-1} (R[t][j] - R[T-1][j]) (Chaudhry et al., 2018);
* task-identity accuracy: how often the dynamic memory's predicted task is the true one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["final_average", "incremental_accuracies", "average_incremental", "forgetting", "summary", "format_matrix", "task_labels",
           "plot_results"]

Matrix = Sequence[Sequence[float]]


def _row_mean(row: Sequence[float]) -> float:
    return sum(row) / len(row)


def final_average(r: Matrix) -> float:
    """A_last: mean accuracy over all tasks after the last one."""
    return _row_mean(r[-1])


def incremental_accuracies(r: Matrix) -> list[float]:
    """A_t for every t: the mean accuracy on tasks 0..t after task t."""
    return [_row_mean(row[: t + 1]) for t, row in enumerate(r)]


def average_incremental(r: Matrix) -> float:
    """A_avg: mean over t of A_t."""
    return sum(incremental_accuracies(r)) / len(r)


def forgetting(r: Matrix) -> float:
    """Max-based forgetting averaged over all tasks but the last (0 for a single task)."""
    last = len(r) - 1
    if last == 0:
        return 0.0
    drops = [max(r[t][j] for t in range(j, last)) - r[last][j] for j in range(last)]
    return sum(drops) / len(drops)


def summary(r: Matrix, task_id: Sequence[float | None] | None = None) -> dict[str, float | None]:
    """The headline numbers of an accuracy matrix (and the final task-identity accuracy)."""
    out: dict[str, float | None] = {
        "A_last": final_average(r),
        "A_avg": average_incremental(r),
        "forgetting": forgetting(r),
    }
    out["task_id_accuracy"] = task_id[-1] if task_id else None
    return out


def format_matrix(r: Matrix, task_id: Sequence[float | None] | None = None) -> str:
    """A plain-text table of R (rows: after task t; columns: task j) with A_t and task-id accuracy."""
    n = max(len(row) for row in r)
    head = "after | " + " ".join(f"  T{j:<3d}" for j in range(n)) + " |   A_t   task-id"
    lines = [head, "-" * len(head)]
    for t, row in enumerate(r):
        cells = " ".join(f"{100 * v:6.1f}" for v in row) + " " * (7 * (n - len(row)))
        tid = task_id[t] if task_id and t < len(task_id) else None
        tid_s = f"{100 * tid:6.1f}" if tid is not None else "     -"
        lines.append(f"T{t:<4d} | {cells} | {100 * _row_mean(row):6.1f}  {tid_s}")
    return "\n".join(lines)


def task_labels(
    num_tasks: int, task_classes: Sequence[Sequence[int]] | None = None, class_names: Sequence[str] | None = None
) -> list[str]:
    """The legend entry of each task: "task 0: 4 Coat, 6 Shirt" (source label and name of each class it holds),
    "task 0: classes 4, 6" without names, "task 0" without its classes."""
    labels = []
    for j in range(num_tasks):
        if task_classes is None or j >= len(task_classes):
            labels.append(f"task {j}")
        elif class_names is not None and all(0 <= c < len(class_names) for c in task_classes[j]):
            labels.append(f"task {j}: " + ", ".join(f"{c} {class_names[c]}" for c in task_classes[j]))
        else:
            labels.append(f"task {j}: classes " + ", ".join(str(c) for c in task_classes[j]))
    return labels


def plot_results(
    r: Matrix,
    path: str | Path,
    title: str,
    task_id: Sequence[float | None] | None = None,
    *,
    task_classes: Sequence[Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
) -> None:
    """Retention curves (accuracy of each task as later tasks arrive, and A_t) beside the accuracy
    matrix as a heat map; written as PNG to ``path`` (atomically). ``task_classes`` (the source
    classes of each task) and ``class_names`` label the tasks in the legend (:func:`task_labels`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .._io import atomic_write

    n = len(r)
    grid = np.full((n, max(len(row) for row in r)), np.nan)
    for t, row in enumerate(r):
        grid[t, : len(row)] = 100 * np.asarray(row)
    fig, (ax_c, ax_m) = plt.subplots(1, 2, figsize=(11, 5.2))
    steps = np.arange(n)
    labels = task_labels(grid.shape[1], task_classes, class_names)
    for j in range(grid.shape[1]):
        ax_c.plot(steps[j:], grid[j:, j], marker="o", label=labels[j])
    ax_c.plot(steps, [100 * _row_mean(row) for row in r], "k--", lw=2, label="A_t (all seen)")
    if task_id and any(v is not None for v in task_id):
        ax_c.plot(steps, [np.nan if v is None else 100 * v for v in task_id], ":", color="grey", label="task-id acc.")
    ax_c.set(xlabel="after training task", ylabel="accuracy (%)", ylim=(0, 101), xticks=steps, title="retention")
    # Below the curves: the entries name each task's classes and would cover the curves inside the axes.
    ax_c.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    im = ax_m.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for (t, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax_m.text(j, t, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
    ax_m.set(xlabel="evaluated on task j", ylabel="after training task t", title="accuracy matrix R[t][j] (%)",
             xticks=range(grid.shape[1]), yticks=steps)
    fig.colorbar(im, ax=ax_m, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
