"""Small data sets written in each format `duallora train --dataset` reads, for the tests (no data set can be
downloaded here). Every image encodes its class and its index, so a test can tell which sample is where."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def cifar_pixels(labels: np.ndarray, seed: int) -> np.ndarray:
    """uint8 (N, 32, 32, 3): noise, with pixel (0, 0) = (class, index % 256, 7) and a bright square of the
    class's colour, so images of one class look alike."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 96, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 8:24, 8:24] = [(37 * c) % 256, (91 * c) % 256, (53 * c) % 256]
        images[i, 0, 0] = [c, i % 256, 7]
    return images


def _rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # (N, H, W, RGB) -> CIFAR's three planes


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the published files are Python 2 pickles


def write_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1, classes: int = 100) -> dict:
    """A ``cifar-100-python/`` folder under ``root``; returns its arrays (labels, images) for comparison."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, per_class, seed in (("train", train_per_class, 1), ("test", test_per_class, 2)):
        labels = np.repeat(np.arange(classes), per_class)[::-1].copy()  # not sorted: readers must not assume it
        images = cifar_pixels(labels, seed)
        _dump(folder / split, {"filenames": [f"{i}.png" for i in range(len(labels))], "fine_labels": labels.tolist(),
                               "coarse_labels": (labels // 5).tolist(), "data": _rows(images)})
        out[split] = (labels, images)
    _dump(folder / "meta", {"fine_label_names": [f"class{c:02d}" for c in range(classes)],
                            "coarse_label_names": [f"super{c}" for c in range(classes // 5)]})
    return out


def write_cifar10(root: Path, train_per_class: int = 5, test_per_class: int = 2) -> dict:
    """A ``cifar-10-batches-py/`` folder (five training batches, keys as bytes like the published files)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = np.tile(np.arange(10), train_per_class)
    images = cifar_pixels(labels, 3)
    for b, part in enumerate(np.array_split(np.arange(len(labels)), 5)):
        _dump(folder / f"data_batch_{b + 1}", {b"labels": labels[part].tolist(), b"data": _rows(images[part]),
                                               b"batch_label": b"training batch"})
    test_labels = np.tile(np.arange(10), test_per_class)
    test_images = cifar_pixels(test_labels, 4)
    _dump(folder / "test_batch", {b"labels": test_labels.tolist(), b"data": _rows(test_images)})
    _dump(folder / "batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                                                      b"frog", b"horse", b"ship", b"truck"]})
    return {"train": (labels, images), "test": (test_labels, test_images)}


def write_image_folder(root: Path, classes: list[str], per_class: dict[str, int], size: int = 20,
                       ext: str = ".png") -> None:
    """``root/<class>/<i><ext>`` images: pixel (0, 0) = (class index, i, 9), a square of the class's colour."""
    from PIL import Image

    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class[name]):
            pixels = np.full((size, size + 4, 3), 30, dtype=np.uint8)  # not square: the test transform crops
            pixels[4:16, 4:16] = [(37 * c) % 256, (91 * c) % 256, (53 * c) % 256]
            pixels[0, 0] = [c, i, 9]
            Image.fromarray(pixels).save(folder / f"{i:03d}{ext}")
