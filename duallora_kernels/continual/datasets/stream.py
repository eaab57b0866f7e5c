"""A run's task stream: which data set, which classes each task holds, which samples of them, and the task
data sets themselves once the model says how its images are preprocessed.

:func:`load_stream` reads the data and settles the split (every data problem is found there, before a model is
built or a file written); :meth:`TaskStream.tasks` makes the per-task data sets. The embedded benchmark
(``fashion-mnist``) keeps its own pipeline whatever the model: normalised 28x28 grey tensors in memory, as its
committed results were made.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..data import Task
from .images import ImageSource, TaskImages
from .preprocess import Preprocessing
from .splits import global_labels, per_class_index, resolve_class_order, split_label, task_sizes

__all__ = ["TaskStream", "load_stream"]


@dataclass(frozen=True)
class _Selection:
    """One task's classes and the samples chosen for it (indices into the source's splits)."""

    classes: tuple[int, ...]
    offset: int
    train: np.ndarray
    test: np.ndarray


@dataclass
class TaskStream:
    """The data of a run: its data set's class names, the class order (and the rule that made it), each task's
    size, and either the embedded benchmark's ready tasks or an image source and each task's samples."""

    dataset: str
    class_names: tuple[str, ...]
    order: list[int]
    order_rule: str
    sizes: list[int]
    source: ImageSource | None = None
    ready: list[Task] | None = None
    selections: list[_Selection] = field(default_factory=list)
    preprocessing: Preprocessing | None = None

    @property
    def task_classes(self) -> list[tuple[int, ...]]:
        ends = np.cumsum(self.sizes).tolist()
        return [tuple(self.order[e - s:e]) for s, e in zip(self.sizes, ends)]

    def tasks(self, preprocessing: Preprocessing | None = None) -> list[Task]:
        """The tasks; an image source's are decoded with ``preprocessing`` (the model's), the embedded
        benchmark's are its tensors (``preprocessing`` unused)."""
        if self.ready is not None:
            return self.ready
        if preprocessing is None:
            raise ValueError(f"--dataset {self.dataset}: the task data sets need the model's preprocessing")
        self.preprocessing = preprocessing
        train_tf, test_tf = preprocessing.train_transform(), preprocessing.test_transform()
        src, tasks = self.source, []
        for t, s in enumerate(self.selections):
            train_labels = global_labels(src.train.labels[s.train], s.classes, s.offset)
            test_labels = global_labels(src.test.labels[s.test], s.classes, s.offset)
            tasks.append(Task(
                index=t, classes=s.classes, label_offset=s.offset,
                train=TaskImages(src.train, s.train, train_labels, train_tf, random=True),
                test=TaskImages(src.test, s.test, test_labels, test_tf),
                train_plain=TaskImages(src.train, s.train, train_labels, test_tf)))
        return tasks

    def describe(self) -> dict[str, Any]:
        """What results.json records about the data (``data``)."""
        where = self.source.describe() if self.source is not None else {"dataset": self.dataset}
        return {**where, "split": split_label(self.sizes), "task_sizes": list(self.sizes),
                "class_order_rule": self.order_rule,
                "class_names": [[self.class_names[c] for c in classes] for classes in self.task_classes],
                "preprocessing": self.preprocessing.to_json() if self.preprocessing is not None else None}


def load_stream(config: Any) -> TaskStream:
    """Read ``config.dataset`` under ``config.data_root`` and settle its split (``config``: a TrainConfig).
    FileNotFoundError / ValueError (one line each) for a folder that is not that data set or a split it cannot
    give."""
    from . import load_source

    c = config
    if c.dataset == "fashion-mnist":
        return _fashion_mnist(c)
    source = load_source(c.dataset, c.data_root, split_ratio=c.split_ratio, split_seed=c.split_seed)
    order, rule = resolve_class_order(source.class_names, seed=c.seed, class_order_seed=c.class_order_seed,
                                      explicit=c.class_order)
    sizes = task_sizes(len(order), c.classes_per_task, c.init_classes, c.num_tasks)
    stream = TaskStream(c.dataset, source.class_names, order[:sum(sizes)], rule, sizes, source=source)
    offsets = np.cumsum([0, *sizes[:-1]]).tolist()
    for classes, offset in zip(stream.task_classes, offsets):
        stream.selections.append(_Selection(
            classes, offset, per_class_index(source.train.labels, classes, c.train_per_class, c.seed, "train"),
            per_class_index(source.test.labels, classes, c.test_per_class, c.seed, "test")))
    return stream


def _fashion_mnist(c: Any) -> TaskStream:
    from ..data import FASHION_MNIST_CLASSES, load_fashion_mnist, split_class_incremental

    train, test = load_fashion_mnist(c.data_root)
    names = _names(train.classes, FASHION_MNIST_CLASSES)
    positions, rule = resolve_class_order(names, seed=c.seed, class_order_seed=c.class_order_seed,
                                          explicit=c.class_order)
    order = [train.classes[i] for i in positions]
    tasks = split_class_incremental(
        train, test, num_tasks=c.num_tasks, classes_per_task=c.classes_per_task, init_classes=c.init_classes,
        order=order, seed=c.seed, train_per_class=c.train_per_class, test_per_class=c.test_per_class)
    sizes = [t.num_classes for t in tasks]
    return TaskStream("fashion-mnist", tuple(_names(range(max(train.classes) + 1), FASHION_MNIST_CLASSES)),
                      order[:sum(sizes)], rule, sizes, ready=tasks)


def _names(labels: Sequence[int], known: Sequence[str]) -> tuple[str, ...]:
    return tuple(known[i] if 0 <= i < len(known) else str(i) for i in labels)

