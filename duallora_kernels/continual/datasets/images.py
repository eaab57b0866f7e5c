"""Image data sets read from the user's files: what a format reader returns (:class:`ImageSource`, two
:class:`ImageList` splits), and the per-task view the trainer iterates (:class:`TaskImages`), which decodes and
preprocesses each image when a DataLoader worker asks for it.

Random augmentation is seeded per sample: image k of an epoch seeded s is transformed under the torch seed
derived from (s, k). A run therefore sees the same augmented images whatever ``--workers`` is (each worker
would otherwise draw from its own generator) and a resumed run sees those of an uninterrupted one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

__all__ = ["ImageList", "ImageSource", "TaskImages", "for_epoch"]


@dataclass(frozen=True)
class ImageList:
    """One split of a data set: integer labels (N,) and either the pixels, uint8 (N, H, W, 3) in memory
    (CIFAR's pickles), or one image file per sample (an image folder)."""

    labels: np.ndarray
    pixels: np.ndarray | None = None
    files: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.pixels is None) == (self.files is None):
            raise ValueError("an ImageList holds either pixels or files")
        n = len(self.pixels) if self.pixels is not None else len(self.files)
        if self.labels.ndim != 1 or len(self.labels) != n:
            raise ValueError(f"labels must have shape ({n},), got {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Any:
        """Image i as an RGB PIL image."""
        from PIL import Image

        if self.pixels is not None:
            return Image.fromarray(self.pixels[i], mode="RGB")
        with open(self.files[i], "rb") as f:  # open the file ourselves: PIL would keep it open until GC
            return Image.open(f).convert("RGB")


@dataclass(frozen=True)
class ImageSource:
    """A data set as its reader found it: class names (index = source label), a training and a test split,
    and what ``results.json`` records about where they came from (``details``)."""

    name: str
    root: Path
    class_names: tuple[str, ...]
    train: ImageList
    test: ImageList
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "root": str(self.root), "classes": len(self.class_names),
                "train_images": len(self.train), "test_images": len(self.test), **self.details}


class TaskImages(Dataset):
    """The samples ``index`` of an :class:`ImageList` with their global labels, decoded and transformed on
    access: ``(float32 image (C, H, W), int label)``. ``random`` says whether ``transform`` draws random
    numbers (augmentation); it then runs under a torch seed made from :meth:`for_epoch`'s seed and the
    sample's position."""

    def __init__(self, images: ImageList, index: np.ndarray, labels: np.ndarray,
                 transform: Callable[[Any], torch.Tensor], *, random: bool = False, seed: int = 0) -> None:
        if len(index) != len(labels):
            raise ValueError(f"{len(index)} samples but {len(labels)} labels")
        self.images, self.index, self.labels = images, np.asarray(index), np.asarray(labels, dtype=np.int64)
        self.transform, self.random, self.seed = transform, random, seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        image = self.images.load(int(self.index[k]))
        if not self.random:
            return self.transform(image), int(self.labels[k])
        # fork_rng: the global generator of the process that runs this (the trainer's, with --workers 0) is
        # left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, k))
            return self.transform(image), int(self.labels[k])

    def for_epoch(self, seed: int) -> "TaskImages":
        """The same samples, augmented under ``seed`` (a shallow copy: the images are shared)."""
        other = copy.copy(self)
        other.seed = seed
        return other


def for_epoch(dataset: Dataset, seed: int) -> Dataset:
    """``dataset`` with its augmentation drawn from ``seed`` where it augments (:class:`TaskImages`, also inside
    a ConcatDataset); any other data set as it is (the embedded benchmark's tensors do not augment)."""
    if isinstance(dataset, TaskImages):
        return dataset.for_epoch(seed)
    if isinstance(dataset, ConcatDataset):
        return ConcatDataset([for_epoch(d, seed) for d in dataset.datasets])
    return dataset


def _sample_seed(seed: int, position: int) -> int:
    return int(np.random.SeedSequence([seed & (2**63 - 1), position]).generate_state(1, np.uint64)[0] >> 1)

