"""Any image data set kept as a tree of class folders (``--dataset imagefolder``): ImageNet-R, ImageNet-A,
CUB-200 and DomainNet are published or commonly re-split this way.

* ``DIR/train/<class>/...`` and ``DIR/test/<class>/...`` (``val/`` is taken for ``test/``): the split as given;
* ``DIR/<class>/...`` (or ``DIR/train/<class>/...`` alone): one tree, split per class by ``--split-ratio`` R,
  the fraction of each class's images held out for testing, drawn with ``--split-seed``.

Classes are the class folders' names in sorted order (torchvision's ImageFolder convention: the label of a
class is its position in that order); a class's images are the image files anywhere below its folder.
Images are decoded only when a task's data loader asks for them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .images import ImageList, ImageSource

__all__ = ["IMAGE_EXTENSIONS", "EXPECTED_LAYOUT", "find_layout", "load_image_folder", "split_per_class"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TEST_NAMES = ("test", "val")
EXPECTED_LAYOUT = ("DIR/train/<class>/<image> and DIR/test/<class>/<image> (test/ may be val/), or DIR/<class>/<image> "
                   "with --split-ratio R")


def _class_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_below(folder: Path) -> list[str]:
    found = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [os.path.join(here, f) for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return found


def _holds_classes(folder: Path) -> bool:
    """Whether ``folder`` has class folders: its first subfolder holds an image somewhere below it (a cheap
    look, not a scan: the layout check runs before anything else)."""
    folders = _class_folders(folder)
    if not folders:
        return False
    for _, dirs, files in os.walk(folders[0], followlinks=True):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def find_layout(root: Path) -> tuple[str, Path, Path | None] | None:
    """("split", train folder, test folder) for a train/test tree, ("one tree", folder, None) for class folders
    without a test split, None when ``root`` is neither."""
    train = root / "train"
    test = next((root / n for n in TEST_NAMES if _holds_classes(root / n)), None)
    if _holds_classes(train):
        return ("split", train, test) if test is not None else ("one tree", train, None)
    if _holds_classes(root) and not {p.name for p in _class_folders(root)} & {"train", *TEST_NAMES}:
        return "one tree", root, None
    return None


def load_image_folder(root: Path, *, split_ratio: float | None = None, split_seed: int = 0) -> ImageSource:
    """The image folder under ``root`` (see the module docstring). FileNotFoundError naming the expected layout
    when ``root`` is not one; ValueError for a --split-ratio that the layout does not use or lacks."""
    layout = find_layout(root)
    if layout is None:
        raise FileNotFoundError(f"--dataset imagefolder: {root} is not an image folder; expected {EXPECTED_LAYOUT}")
    kind, train_dir, test_dir = layout
    if kind == "split":
        if split_ratio is not None:
            raise ValueError(f"{root} has {train_dir.name}/ and {test_dir.name}/: its test split is given, so "
                             "--split-ratio would be ignored; leave it out")
        names, train_files = _scan(train_dir)
        test_names, test_files = _scan(test_dir)
        if test_names != names:
            only = sorted(set(names) ^ set(test_names))
            raise ValueError(f"{train_dir} and {test_dir} must hold the same class folders; "
                             f"{len(only)} are in only one of them: {', '.join(only[:5])}{' ...' if len(only) > 5 else ''}")
        details = {"layout": f"{train_dir.name}/ + {test_dir.name}/"}
        train, test = _as_list(train_files), _as_list(test_files)
    else:
        if split_ratio is None:
            raise ValueError(f"{train_dir} holds class folders but no test split: add --split-ratio R (the fraction "
                             "of each class held out for testing, e.g. 0.2; drawn with --split-seed)")
        names, files = _scan(train_dir)
        train_files, test_files = split_per_class(files, split_ratio, split_seed)
        details = {"layout": "class folders, split by --split-ratio", "split_ratio": split_ratio,
                   "split_seed": split_seed}
        train, test = _as_list(train_files), _as_list(test_files)
    return ImageSource("imagefolder", root, tuple(names), train, test, details)


def _scan(folder: Path) -> tuple[list[str], list[list[str]]]:
    classes = _class_folders(folder)
    files = [_images_below(c) for c in classes]
    empty = [c.name for c, f in zip(classes, files) if not f]
    if empty:
        raise ValueError(f"{folder}: class folder(s) {', '.join(empty[:5])} hold no image "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    return [c.name for c in classes], files


def split_per_class(files: list[list[str]], ratio: float, seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """Each class's files split into (train, test): round(ratio * n) of its n files, at least one and at most
    n - 1, drawn by a generator seeded with (seed, class index), so a class's split depends on nothing else."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"--split-ratio must be in (0, 1), the fraction held out for testing; got {ratio}")
    train, test = [], []
    for c, members in enumerate(files):
        if len(members) < 2:
            raise ValueError(f"class {c} has {len(members)} image: too few to hold one out for testing")
        n_test = min(max(int(round(ratio * len(members))), 1), len(members) - 1)
        held = set(np.random.default_rng([seed, c]).permutation(len(members))[:n_test].tolist())
        train.append([f for i, f in enumerate(members) if i not in held])
        test.append([f for i, f in enumerate(members) if i in held])
    return train, test


def _as_list(files: list[list[str]]) -> ImageList:
    labels = np.concatenate([np.full(len(f), c, dtype=np.int64) for c, f in enumerate(files)])
    return ImageList(labels, files=tuple(p for f in files for p in f))
