"""The data sets ``duallora train --dataset NAME --data-root DIR`` reads from the user's own files (nothing is
downloaded), and the field's split conventions.

========================  =====================================================================================
``fashion-mnist``         the embedded benchmark: Fashion-MNIST's IDX files (:mod:`..data`), 28x28 grey tensors
``cifar100``, ``cifar10`` the python-pickle folders ``cifar-100-python/``, ``cifar-10-batches-py/`` (:mod:`.cifar`)
``imagefolder``           a ``train/`` + ``test/`` tree of class folders, or one tree with ``--split-ratio``
                          (:mod:`.folder`): ImageNet-R, ImageNet-A, CUB-200, DomainNet
========================  =====================================================================================

:mod:`.splits`: B<N>-Inc<K> task sizes and class orders; :mod:`.preprocess`: the model's image pipeline;
:mod:`.images`: decoding with per-sample seeded augmentation; :mod:`.stream`: a run's tasks.
"""
from __future__ import annotations

import os
from pathlib import Path

from .images import ImageSource

__all__ = ["DATASETS", "DISPLAY_NAMES", "RUN_DEFAULTS", "expected_layout", "load_source", "check_data_root"]

DATASETS = ("fashion-mnist", "cifar100", "cifar10", "imagefolder")
DISPLAY_NAMES = {"fashion-mnist": "Fashion-MNIST", "cifar100": "CIFAR-100", "cifar10": "CIFAR-10",
                 "imagefolder": "image folder"}


def expected_layout(dataset: str) -> str:
    """The folder layout ``--dataset`` expects under ``--data-root DIR``, in words."""
    from . import cifar, folder

    if dataset in cifar.CIFAR_LAYOUTS:
        return cifar.expected_layout(dataset)
    if dataset == "imagefolder":
        return folder.EXPECTED_LAYOUT
    if dataset == "fashion-mnist":
        return "DIR holding Fashion-MNIST's four IDX files (train-images-idx3-ubyte.gz, ...)"
    raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")


def _looks_like(root: Path) -> str | None:
    """Which known data set ``root`` holds, if any (for an error that says what to pass instead)."""
    from . import cifar, folder

    for name in cifar.CIFAR_LAYOUTS:
        if cifar.find_cifar(name, root) is not None:
            return name
    if folder.find_layout(root) is not None:
        return "imagefolder"
    try:
        from ..data import find_fashion_mnist

        find_fashion_mnist(root)
        return "fashion-mnist"
    except FileNotFoundError:
        return None


def check_data_root(dataset: str, root: str | os.PathLike | None) -> None:
    """One-line error (FileNotFoundError) when ``root`` is not a folder of ``dataset``'s layout; cheap (no image
    is read), so a command can check before anything is written."""
    from . import cifar, folder

    expected_layout(dataset)  # an unknown name
    if dataset == "fashion-mnist":
        from ..data import find_fashion_mnist

        find_fashion_mnist(root)
        return
    if root is None:
        raise ValueError(f"--dataset {dataset} reads the user's files: give --data-root DIR, {expected_layout(dataset)}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--data-root {path} does not exist; --dataset {dataset} expects "
                                f"{expected_layout(dataset)}")
    found = (cifar.find_cifar(dataset, path) if dataset in cifar.CIFAR_LAYOUTS else folder.find_layout(path))
    if found is None:
        other = _looks_like(path)
        hint = f"; it looks like {other} data: --dataset {other}" if other and other != dataset else ""
        raise FileNotFoundError(f"--dataset {dataset}: {path} is not laid out as expected: "
                                f"{expected_layout(dataset)}{hint}")


def load_source(dataset: str, root: str | os.PathLike | None, *, split_ratio: float | None = None,
                split_seed: int = 0) -> ImageSource:
    """The training and test images of ``dataset`` under ``root`` (any data set but the embedded benchmark)."""
    from . import cifar, folder

    check_data_root(dataset, root)
    path = Path(root).expanduser()
    if dataset in cifar.CIFAR_LAYOUTS:
        if split_ratio is not None:
            raise ValueError(f"--dataset {dataset} has its own test split: --split-ratio would be ignored; leave it out")
        return cifar.load_cifar(dataset, path)
    return folder.load_image_folder(path, split_ratio=split_ratio, split_seed=split_seed)


#: ``duallora train``'s defaults for the user's data sets, where the embedded benchmark's (TrainConfig's) do not
#: fit: every class in tasks of the usual size (Split CIFAR-10: 5 x 2; CIFAR-100 and image folders: B0-Inc10),
#: every image, the model's own input size.
RUN_DEFAULTS = {
    name: dict(num_tasks=None, classes_per_task=increment, train_per_class=None, test_per_class=None, img_size=None)
    for name, increment in (("cifar10", 2), ("cifar100", 10), ("imagefolder", 10))
}
