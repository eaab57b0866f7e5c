"""What a finished run records: the results.json dictionary and the title and legend of its plot, from the
run's settings, its history and its data (:class:`.datasets.stream.TaskStream`). The trainer decides when;
these functions only assemble."""
from __future__ import annotations

import os
import platform
import sys
from typing import Any, Sequence

import torch
from torch.utils.data import ConcatDataset

from .. import __version__
from .config import TrainConfig
from .data import Task
from .datasets import DISPLAY_NAMES
from .datasets.splits import split_label

__all__ = ["load_average", "results_dict", "data_title", "plot_title", "legend", "merge_tasks"]


def load_average() -> float | None:
    """The 1-minute load average: run times measured while other processes ran are not clean."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def results_dict(c: TrainConfig, tasks: Sequence[Task], history: Any, stream: Any, *, backbone: str,
                 backbone_sha256: str | None, load_at_start: float | None) -> dict[str, Any]:
    """results.json: the summary and matrices, the class order, the settings, the data, the memory's growth and
    where it ran."""
    from . import metrics
    from .pretrain import hardware

    return {
        "method": c.method,
        "summary": metrics.summary(history.accuracy, history.task_id),
        "accuracy_matrix": history.accuracy,
        "task_id_accuracy": history.task_id,
        "class_order": [list(t.classes) for t in tasks],
        "config": c.to_json(),
        "backbone": backbone,
        "basis_sizes": history.basis_sizes,
        "memory_growth": history.memory,
        "data": stream.describe() if stream is not None else None,
        "seconds_per_task": history.seconds,
        # task-<t>.safetensors' bytes: the model and the task identity's statistics (after the last task, the
        # class weights its score applies)
        "checkpoint_bytes_per_task": history.checkpoint_bytes,
        "backbone_sha256": backbone_sha256,
        "environment": {
            "duallora_kernels": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), **hardware(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET"),
            "load_average": {"start": load_at_start, "end": load_average()}, "argv": sys.argv,
        },
    }


def data_title(c: TrainConfig, stream: Any) -> str:
    """"Split Fashion-MNIST (5 tasks x 2)": the data set and its split, as plots and tables name a run."""
    name = DISPLAY_NAMES.get(c.dataset, c.dataset)
    if stream is not None and stream.source is not None and c.dataset == "imagefolder":
        name = stream.source.root.name
    sizes = stream.sizes if stream is not None else [c.classes_per_task] * (c.num_tasks or 1)
    return f"Split {name} ({split_label(sizes)})"


def plot_title(c: TrainConfig, results: dict[str, Any], stream: Any) -> str:
    s = results["summary"]
    return (f"{c.method} on {data_title(c, stream)}, seed {c.seed}: "
            f"A_last {100 * s['A_last']:.1f}%, forgetting {100 * s['forgetting']:.1f}%")


def legend(c: TrainConfig, class_order: list[list[int]], stream: Any) -> dict[str, Any]:
    """``plot_results``' legend arguments: each task's classes while they fit a legend entry (at most 4 per
    task), named while the data set is small (at most 10 classes, the embedded benchmark's)."""
    if c.method == "joint" or max(len(t) for t in class_order) > 4:
        return {"task_classes": None, "class_names": None}
    names = tuple(stream.class_names) if stream is not None and len(stream.class_names) <= 10 else None
    return {"task_classes": class_order, "class_names": names}


def merge_tasks(tasks: Sequence[Task]) -> Task:
    """One task holding every class (``joint``, the upper bound)."""
    classes = tuple(c for t in tasks for c in t.classes)
    plain = None if all(t.train_plain is None for t in tasks) else ConcatDataset([t.statistics_data for t in tasks])
    return Task(index=0, classes=classes, label_offset=0, train=ConcatDataset([t.train for t in tasks]),
                test=ConcatDataset([t.test for t in tasks]), train_plain=plain)
