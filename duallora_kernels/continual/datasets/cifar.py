"""CIFAR-10 and CIFAR-100 from the "python version" folders their authors publish (the files torchvision's
``CIFAR10``/``CIFAR100`` read), read directly: nothing is downloaded.

* ``cifar-100-python/``: ``train``, ``test`` (dicts with ``data``, uint8 (N, 3072), and ``fine_labels``) and
  ``meta`` (``fine_label_names``);
* ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` (``data``, ``labels``) and
  ``batches.meta`` (``label_names``).

Each row of ``data`` is a 32x32 image as three planes (1,024 red, then green, then blue values, row-major).
The files are Python pickles; they are read with an unpickler that builds only numpy arrays and plain
containers, so a file that is not what it claims cannot run code.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .images import ImageList, ImageSource

__all__ = ["CIFAR_LAYOUTS", "find_cifar", "load_cifar"]

# name -> (folder, training files, test file, meta file, label key, names key)
CIFAR_LAYOUTS = {
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names"),
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                "batches.meta", "labels", "label_names"),
}
SIDE = 32
# What a CIFAR pickle may reference: numpy's array reconstruction and Python 2 byte strings.
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
}


def expected_layout(name: str) -> str:
    folder, train, test, meta, _, _ = CIFAR_LAYOUTS[name]
    return f"DIR/{folder}/ (or that folder itself) holding {', '.join((*train, test, meta))}"


def find_cifar(name: str, root: Path) -> Path | None:
    """The ``cifar-*`` folder of ``name`` under ``root`` (or ``root`` itself), None when its files are not there."""
    folder, train, test, meta, _, _ = CIFAR_LAYOUTS[name]
    for candidate in (root / folder, root):
        if all((candidate / f).is_file() for f in (*train, test, meta)):
            return candidate
    return None


def load_cifar(name: str, root: Path) -> ImageSource:
    """CIFAR-10/100 under ``root`` (see the module docstring); FileNotFoundError naming the expected layout."""
    folder = find_cifar(name, root)
    if folder is None:
        raise FileNotFoundError(f"--dataset {name}: {root} is not a CIFAR folder; expected {expected_layout(name)} "
                                "(the python version, as torchvision keeps it)")
    _, train_files, test_file, meta_file, label_key, names_key = CIFAR_LAYOUTS[name]
    names = _read(folder / meta_file).get(names_key)
    if not isinstance(names, list) or not names:
        raise ValueError(f"{folder / meta_file}: no list {names_key!r} of class names")
    names = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    train = _concat([_split(folder / f, label_key, len(names)) for f in train_files])
    test = _split(folder / test_file, label_key, len(names))
    return ImageSource(name, folder, names, train, test, {"layout": folder.name})


def _split(path: Path, label_key: str, num_classes: int) -> ImageList:
    d = _read(path)
    data, labels = d.get("data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be uint8 rows of {3 * SIDE * SIDE} values (32x32 RGB), got {what}")
    labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
    if labels is None or labels.shape != (len(data),):
        raise ValueError(f"{path}: expected {len(data)} labels under {label_key!r}")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise ValueError(f"{path}: labels outside 0..{num_classes - 1} (the meta file names {num_classes} classes)")
    pixels = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)  # planes -> (N, H, W, RGB)
    return ImageList(labels, pixels=np.ascontiguousarray(pixels))


def _concat(parts: list[ImageList]) -> ImageList:
    return ImageList(np.concatenate([p.labels for p in parts]), pixels=np.concatenate([p.pixels for p in parts]))


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR file never does")
        try:  # numpy >= 2 keeps them in numpy._core (numpy.core is a deprecated alias there)
            found = importlib.import_module(module.replace("numpy.core.", "numpy._core."))
        except ImportError:  # numpy 1.x
            found = importlib.import_module(module.replace("numpy._core.", "numpy.core."))
        return getattr(found, name)


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            # latin1: the published files were pickled by Python 2; it decodes their byte strings losslessly
            d = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a CIFAR pickle ({err})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR pickle (holds a {type(d).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
