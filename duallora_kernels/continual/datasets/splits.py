"""The field's class-incremental split conventions: how many classes each task gets, and in which order the
classes come.

* Task sizes (:func:`task_sizes`): ``B<N>-Inc<K>`` as PyCIL and PILOT name them: a first task of N classes,
  then K classes per task. ``B0`` means the first task is like the others (N = K). With no task count the
  classes are used up, the last task taking what remains (PyCIL's rule); with one, exactly that many tasks.
* Samples (:func:`per_class_index`, :func:`global_labels`): a seeded subset of each class, relabelled to its
  position in the class order.
* Class order (:func:`resolve_class_order`): one of
  - the run's seed (the default; what the embedded benchmark always did: ``numpy.random.default_rng(seed)``);
  - ``class_order_seed`` S: PyCIL's rule, ``numpy.random.seed(S); numpy.random.permutation(C)``, so
    ``--class-order-seed 1993`` (PyCIL's and PILOT's default) gives the order their papers used;
  - ``"sorted"``: the data set's own label order, unshuffled (InfLoRA's configs: ``"shuffle": false``);
  - an explicit list of class indices or class names (``--class-order FILE``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["SORTED", "task_sizes", "split_label", "pycil_order", "resolve_class_order", "read_class_order",
           "per_class_index", "global_labels"]

#: ``--class-order sorted``: the data set's own label order.
SORTED = "sorted"


def task_sizes(num_classes: int, increment: int, init_classes: int | None = None,
               num_tasks: int | None = None) -> list[int]:
    """The number of classes of each task: ``init_classes`` first (None or 0: ``increment``, i.e. B0), then
    ``increment`` per task; ``num_tasks`` tasks, or (None) as many as ``num_classes`` fill, the last one taking
    the remainder. ValueError when the classes do not suffice."""
    for name, value in (("increment", increment), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    first = increment if not init_classes else init_classes
    if num_tasks is not None:
        sizes = [first] + [increment] * (num_tasks - 1)
        if sum(sizes) > num_classes:
            split = (f"{num_tasks} tasks × {increment} classes" if first == increment else
                     f"a first task of {first} classes and {num_tasks - 1} more × {increment}")
            raise ValueError(f"dataset has {num_classes} classes, {split} needs {sum(sizes)}")
        return sizes
    if first > num_classes:
        raise ValueError(f"dataset has {num_classes} classes, a first task of {first} classes needs more")
    sizes = [first]
    while sum(sizes) + increment < num_classes:
        sizes.append(increment)
    if num_classes - sum(sizes) > 0:
        sizes.append(num_classes - sum(sizes))
    return sizes


def split_label(sizes: Sequence[int]) -> str:
    """How a split is usually written: "5 tasks x 2" when the tasks are equal, else "B50-Inc10, 6 tasks"."""
    if len(set(sizes)) == 1:
        return f"{len(sizes)} tasks x {sizes[0]}"
    increment = sizes[1] if len(sizes) > 1 else sizes[0]
    return f"B{sizes[0]}-Inc{increment}, {len(sizes)} tasks"


def pycil_order(num_classes: int, seed: int) -> list[int]:
    """PyCIL's class order: ``numpy.random.seed(seed); numpy.random.permutation(num_classes)``, without touching
    numpy's global generator (a RandomState of that seed draws the same permutation)."""
    return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]


def resolve_class_order(class_names: Sequence[str], *, seed: int, class_order_seed: int | None = None,
                        explicit: Sequence[int | str] | str | None = None) -> tuple[list[int], str]:
    """The class indices (positions in ``class_names``) in task order, and a sentence saying which rule made it.

    ``explicit`` wins over ``class_order_seed``, which wins over ``seed``. An explicit order may list fewer
    classes than the data set has (the others are not used); its entries are indices, or names in
    ``class_names``. ValueError for a repeated, unknown or out-of-range class."""
    from ..data import class_order  # the embedded benchmark's rule, unchanged

    n = len(class_names)
    if explicit == SORTED:
        return list(range(n)), "the data set's own label order (--class-order sorted: no shuffle)"
    if explicit is not None:
        return _explicit_order(list(explicit), class_names), "given explicitly (--class-order)"
    if class_order_seed is not None:
        return pycil_order(n, class_order_seed), (f"shuffled by --class-order-seed {class_order_seed} (PyCIL's rule: "
                                                  "numpy.random.seed, numpy.random.permutation)")
    return class_order(n, seed), f"shuffled by the seed {seed}"


def _explicit_order(entries: list[int | str], class_names: Sequence[str]) -> list[int]:
    by_name = {name: i for i, name in enumerate(class_names)}
    order = []
    for entry in entries:
        if isinstance(entry, str) and not entry.lstrip("-").isdigit():
            if entry not in by_name:
                close = ", ".join(sorted(by_name)[:5])
                raise ValueError(f"class order names {entry!r}, which the data set does not have (its classes: "
                                 f"{close}{', ...' if len(by_name) > 5 else ''})")
            order.append(by_name[entry])
            continue
        index = int(entry)
        if not 0 <= index < len(class_names):
            raise ValueError(f"class order holds index {index}, but the data set has classes 0..{len(class_names) - 1}")
        order.append(index)
    repeated = sorted({c for c in order if order.count(c) > 1})
    if repeated:
        raise ValueError(f"class order repeats class(es) {repeated}")
    if not order:
        raise ValueError("class order is empty")
    return order


def read_class_order(path: str | os.PathLike) -> tuple[int | str, ...]:
    """``--class-order FILE``: a JSON list, or class indices / names separated by commas, spaces or new lines.
    Integers stay integers (indices); anything else is a class name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--class-order {path}: no such file (give a file of class indices or names, "
                                "or the word 'sorted')")
    text = path.read_text()
    try:
        entries = json.loads(text)
    except ValueError:
        entries = text.replace(",", " ").split()
    if not isinstance(entries, list) or not all(isinstance(e, (int, str)) and not isinstance(e, bool)
                                                 for e in entries):
        raise ValueError(f"--class-order {path}: expected a list of class indices or names, got {text[:80]!r}")
    return tuple(int(e) if isinstance(e, str) and e.lstrip("-").isdigit() else e for e in entries)


def per_class_index(labels: np.ndarray, classes: Sequence[int], per_class: int | None, seed: int,
                    split: str) -> np.ndarray:
    """The samples of ``classes`` (class by class), ``per_class`` of each (a seeded choice; None: all of them):
    the subsampling rule of every data set's split, the embedded benchmark's first."""
    chosen = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if per_class is not None:
            if per_class < 1:
                raise ValueError(f"{split}_per_class must be >= 1 or None, got {per_class}")
            if per_class > len(members):
                raise ValueError(
                    f"{split}_per_class={per_class} but class {c} has only {len(members)} {split} samples"
                )
            # One generator per (seed, split, class): a class's subsample does not depend on the others.
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, c])
            members = np.sort(rng.choice(members, size=per_class, replace=False))
        chosen.append(members)
    return np.concatenate(chosen)


def global_labels(source_labels: np.ndarray, classes: Sequence[int], label_offset: int) -> np.ndarray:
    """Source labels relabelled to their task's global labels: ``classes[i]`` becomes ``label_offset + i``."""
    labels = np.empty(len(source_labels), dtype=np.int64)
    for position, c in enumerate(classes):
        labels[source_labels == c] = label_offset + position
    return labels

