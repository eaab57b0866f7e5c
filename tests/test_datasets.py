"""The user's own data (issue 21): every format read from small files this test writes, the field's split
conventions against hand-computed expectations, the model's preprocessing and seeded augmentation."""
import json
import pickle
import re

import numpy as np
import pytest
import torch

from data_files import write_cifar10, write_cifar100, write_image_folder
from duallora_kernels.continual.config import TrainConfig
from duallora_kernels.continual.data import class_order, make_loader
from duallora_kernels.continual.datasets import check_data_root, load_source
from duallora_kernels.continual.datasets.images import TaskImages, for_epoch
from duallora_kernels.continual.datasets.preprocess import Preprocessing
from duallora_kernels.continual.datasets.splits import (pycil_order, read_class_order, resolve_class_order,
                                                        split_label, task_sizes)
from duallora_kernels.continual.datasets.stream import load_stream

# numpy.random.seed(1993); numpy.random.permutation(100): the CIFAR-100 class order PyCIL and PILOT runs use
# (their default seed), as published in their logs and copied into many code bases.
PYCIL_1993_CIFAR100 = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38, 58, 70, 77, 1,
                       85, 19, 17, 50, 28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44, 91, 41, 72, 60, 79, 52, 20, 10,
                       31, 54]


# ------------------------------------------------------------------------------------------------- formats
def test_cifar100_is_read_from_its_python_pickles(tmp_path):
    written = write_cifar100(tmp_path, train_per_class=2, test_per_class=1)
    for root in (tmp_path, tmp_path / "cifar-100-python"):  # torchvision's root, or the folder itself
        source = load_source("cifar100", root)
        assert source.class_names[:3] == ("class00", "class01", "class02") and len(source.class_names) == 100
        for split in ("train", "test"):
            labels, images = written[split]
            got = getattr(source, split)
            np.testing.assert_array_equal(got.labels, labels)
            np.testing.assert_array_equal(got.pixels, images)  # CIFAR's planes back to (H, W, RGB)
        image = source.train.load(7)
        assert image.mode == "RGB" and image.size == (32, 32)
        assert image.getpixel((0, 0)) == (int(written["train"][0][7]), 7, 7)


def test_cifar10_is_read_from_its_five_batches(tmp_path):
    written = write_cifar10(tmp_path, train_per_class=5, test_per_class=2)
    source = load_source("cifar10", tmp_path)
    assert source.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                  "truck")
    np.testing.assert_array_equal(source.train.labels, written["train"][0])  # batches 1..5 in order
    np.testing.assert_array_equal(source.train.pixels, written["train"][1])
    assert len(source.test) == 20 and source.describe()["train_images"] == 50


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(tmp_path, 1, 1, classes=5)

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    (folder / "train").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match=r"not a CIFAR pickle \(refers to (__builtin__|builtins)\.print"):
        load_source("cifar100", tmp_path)


def test_image_folder_with_train_and_test(tmp_path):
    classes = ["zebra", "ant", "mole"]
    write_image_folder(tmp_path / "train", classes, {"zebra": 3, "ant": 2, "mole": 4})
    write_image_folder(tmp_path / "val", classes, {"zebra": 1, "ant": 1, "mole": 2}, ext=".jpg")  # val/ is test/
    source = load_source("imagefolder", tmp_path)
    assert source.class_names == ("ant", "mole", "zebra")  # sorted folder names, as torchvision's ImageFolder
    assert source.train.labels.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert source.test.labels.tolist() == [0, 1, 1, 2]
    assert source.describe()["layout"] == "train/ + val/"
    # the file of ant's second image: written by class index 1 ("ant" was second in the list), image 1
    assert source.train.load(1).getpixel((0, 0)) == (1, 1, 9)
    assert source.test.load(3).size == (24, 20)  # JPEG decodes (lossy: its pixels are not compared)


def test_image_folder_without_a_test_split_is_split_per_class(tmp_path):
    write_image_folder(tmp_path, ["a", "b", "c"], {"a": 10, "b": 5, "c": 2})
    source = load_source("imagefolder", tmp_path, split_ratio=0.2, split_seed=3)
    # round(0.2 n) held out, at least one and at most n - 1: a 2 of 10, b 1 of 5, c 1 of 2 (0.4 rounds to 0)
    assert np.bincount(source.test.labels).tolist() == [2, 1, 1]
    assert np.bincount(source.train.labels).tolist() == [8, 4, 1]
    assert not set(source.train.files) & set(source.test.files)
    assert len(set(source.train.files) | set(source.test.files)) == 17
    assert source.describe()["split_ratio"] == 0.2 and source.describe()["split_seed"] == 3
    again = load_source("imagefolder", tmp_path, split_ratio=0.2, split_seed=3)
    other = load_source("imagefolder", tmp_path, split_ratio=0.2, split_seed=4)
    assert again.test.files == source.test.files and other.test.files != source.test.files


@pytest.mark.parametrize("dataset, layout, kw, error, match", [
    ("cifar100", "empty", {}, FileNotFoundError, r"is not laid out as expected: DIR/cifar-100-python/ .*holding train, test, meta"),
    ("cifar10", "cifar100", {}, FileNotFoundError, r"cifar-10-batches-py.*it looks like cifar100 data: --dataset cifar100"),
    ("imagefolder", "cifar100", {}, FileNotFoundError, r"DIR/train/<class>/<image> and DIR/test/<class>/<image>.*"
                                                       r"--dataset cifar100"),
    ("imagefolder", "one tree", {}, ValueError, r"no test split: add --split-ratio R"),
    ("imagefolder", "train+test", {"split_ratio": 0.2}, ValueError, r"its test split is given, so --split-ratio"),
    ("cifar100", "missing", {}, FileNotFoundError, r"--data-root .*missing does not exist; --dataset cifar100 expects"),
    ("cifar100", None, {}, ValueError, r"--dataset cifar100 reads the user's files: give --data-root DIR"),
])
def test_a_folder_that_is_not_the_data_set_is_one_line_naming_the_layout(tmp_path, dataset, layout, kw, error, match):
    if layout == "cifar100":
        write_cifar100(tmp_path, 1, 1, classes=5)
    elif layout == "one tree":
        write_image_folder(tmp_path, ["a", "b"], {"a": 2, "b": 2})
    elif layout == "train+test":
        write_image_folder(tmp_path / "train", ["a"], {"a": 2})
        write_image_folder(tmp_path / "test", ["a"], {"a": 1})
    root = None if layout is None else tmp_path / "missing" if layout == "missing" else tmp_path
    with pytest.raises(error, match=match) as info:
        load_source(dataset, root, **kw)
    assert "\n" not in str(info.value)


def test_train_and_test_must_hold_the_same_classes(tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b"], {"a": 2, "b": 2})
    write_image_folder(tmp_path / "test", ["a", "c"], {"a": 1, "c": 1})
    with pytest.raises(ValueError, match=r"must hold the same class folders; 2 are in only one of them: b, c"):
        load_source("imagefolder", tmp_path)
    check_data_root("imagefolder", tmp_path)  # the layout itself is right: the cheap check lets it through


# --------------------------------------------------------------------------------------------- split rules
@pytest.mark.parametrize("args, sizes", [
    ((100, 10), [10] * 10),                              # B0-Inc10
    ((100, 10, 0), [10] * 10),                           # B0 spelled with 0
    ((100, 10, 50), [50, 10, 10, 10, 10, 10]),           # B50-Inc10: 6 tasks
    ((200, 20), [20] * 10),                              # ImageNet-R B0-Inc20
    ((100, 30), [30, 30, 30, 10]),                       # the last task takes the remainder (PyCIL's rule)
    ((95, 10, 50), [50, 10, 10, 10, 10, 5]),
    ((10, 2, None, 5), [2, 2, 2, 2, 2]),                 # the embedded benchmark: 5 tasks x 2
    ((10, 2, 4, 3), [4, 2, 2]),                          # a task count uses only the classes it needs
])
def test_task_sizes_by_hand(args, sizes):
    assert task_sizes(*args) == sizes


def test_task_sizes_that_do_not_fit():
    with pytest.raises(ValueError, match="dataset has 10 classes, 6 tasks × 2 classes needs 12"):
        task_sizes(10, 2, None, 6)
    with pytest.raises(ValueError, match="a first task of 8 classes and 2 more × 2 needs 12"):
        task_sizes(10, 2, 8, 3)
    assert split_label([50, 10, 10]) == "B50-Inc10, 3 tasks" and split_label([2] * 5) == "5 tasks x 2"


def test_class_orders_by_rule(tmp_path):
    names = [f"c{i}" for i in range(100)]
    # the default: the run's seed shuffles as the embedded benchmark always did (README: seed 0 -> [[4, 6], ...])
    order, rule = resolve_class_order(names[:10], seed=0)
    assert order == class_order(10, 0) == [4, 6, 2, 7, 3, 5, 9, 0, 8, 1] and rule == "shuffled by the seed 0"
    order, rule = resolve_class_order(names, seed=0, class_order_seed=1993)
    assert order[:50] == PYCIL_1993_CIFAR100 and sorted(order) == list(range(100)) and "PyCIL" in rule
    assert pycil_order(10, 1993) == [4, 2, 7, 6, 0, 3, 5, 8, 9, 1]
    assert resolve_class_order(names, seed=5, explicit="sorted")[0] == list(range(100))
    (tmp_path / "order.txt").write_text("c3, c1\nc7 2")  # names and indices, mixed
    explicit = read_class_order(tmp_path / "order.txt")
    assert explicit == ("c3", "c1", "c7", 2)
    assert resolve_class_order(names, seed=0, class_order_seed=7, explicit=explicit)[0] == [3, 1, 7, 2]
    (tmp_path / "order.json").write_text(json.dumps([9, 8]))
    assert read_class_order(tmp_path / "order.json") == (9, 8)
    with pytest.raises(ValueError, match=r"repeats class\(es\) \[3\]"):
        resolve_class_order(names, seed=0, explicit=("c3", 3))
    with pytest.raises(ValueError, match="names 'c100', which the data set does not have"):
        resolve_class_order(names, seed=0, explicit=("c100",))


def test_a_b50_inc10_split_of_cifar100_in_pycil_order(tmp_path):
    write_cifar100(tmp_path, train_per_class=2, test_per_class=1)
    config = TrainConfig(dataset="cifar100", data_root=str(tmp_path), model="vit_tiny_patch16_224", num_tasks=None,
                         init_classes=50, classes_per_task=10, class_order_seed=1993, train_per_class=None,
                         test_per_class=None, img_size=None)
    stream = load_stream(config)
    assert stream.sizes == [50, 10, 10, 10, 10, 10] and stream.task_classes[0] == tuple(PYCIL_1993_CIFAR100)
    prep = Preprocessing(3, (8, 8), "bilinear", (0.5,) * 3, (0.5,) * 3, 1.0)
    tasks = stream.tasks(prep)
    assert [t.label_offset for t in tasks] == [0, 50, 60, 70, 80, 90]
    second = tasks[1]
    # every sample of task 1 is an image of one of its classes, relabelled to 50 + its class's position
    source = stream.source.train
    positions = {c: i for i, c in enumerate(second.classes)}
    for k in range(len(second.train)):
        x, y = second.train_plain[k]
        assert x.shape == (3, 8, 8) and y == 50 + positions[int(source.labels[second.train.index[k]])]
    assert len(second.train) == 20 and len(second.test) == 10
    described = stream.describe()
    assert described["split"] == "B50-Inc10, 6 tasks" and described["class_names"][1][0] == f"class{second.classes[0]:02d}"


# ------------------------------------------------------------------------------------- preprocessing
def test_preprocessing_comes_from_the_models_timm_configuration():
    from PIL import Image

    from duallora_kernels.vit import create_vit

    model = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, embed_dim=16, num_heads=2)
    prep = Preprocessing.of_model(model)
    # timm's configuration of vit_tiny_patch16_224: bicubic, mean = std = 0.5, crop 0.9; the size as built
    assert prep == Preprocessing(3, (16, 16), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.9)
    image = Image.new("RGB", (40, 30), (255, 0, 51))
    x = prep.test_transform()(image)
    assert x.shape == (3, 16, 16)
    # a constant image stays constant through resize and crop: (v / 255 - 0.5) / 0.5
    torch.testing.assert_close(x[:, 5, 5], torch.tensor([1.0, -1.0, 51 / 255 / 0.5 - 1.0]), atol=1e-5, rtol=0)
    grey = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, embed_dim=16, num_heads=2, in_chans=1)
    assert Preprocessing.of_model(grey).train_transform()(image).shape == (1, 16, 16)


def test_augmentation_is_seeded_per_sample_whatever_the_workers(tmp_path):
    written = write_cifar10(tmp_path, train_per_class=2, test_per_class=1)
    source = load_source("cifar10", tmp_path)
    prep = Preprocessing(3, (12, 12), "bilinear", (0.5,) * 3, (0.5,) * 3, 1.0)
    data = TaskImages(source.train, np.arange(20), written["train"][0], prep.train_transform(), random=True)

    def epoch(seed, workers):
        loader = make_loader(for_epoch(data, seed), 8, shuffle=True, seed=seed, workers=workers)
        return [(x.clone(), y.clone()) for x, y in loader]

    state = torch.get_rng_state()
    one = epoch(11, workers=0)
    assert torch.equal(torch.get_rng_state(), state)  # the trainer's generator is not touched
    two = epoch(11, workers=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, two)) and len(one) == 3
    other = epoch(12, workers=0)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(one, other))
    # the same sample under two epoch seeds: other crops of the same image
    assert not torch.equal(data.for_epoch(1)[0][0], data.for_epoch(2)[0][0])
    assert torch.equal(data.for_epoch(1)[0][0], data.for_epoch(1)[0][0])


# ------------------------------------------------------------------------------------------ the command
def _train_args(argv):
    from duallora_kernels import cli

    parser = cli.build_parser()
    return parser.parse_args(["train", *argv])


def test_each_data_set_brings_its_own_defaults_and_the_embedded_benchmark_keeps_its_own(tmp_path):
    from duallora_kernels.commands.train import configs_from_args

    (default,) = configs_from_args(_train_args([]))
    assert (default.dataset, default.num_tasks, default.classes_per_task, default.train_per_class,
            default.test_per_class, default.img_size) == ("fashion-mnist", 5, 2, 500, 300, 28)
    model = ["--model", "vit_tiny_patch16_224", "--data-root", str(tmp_path)]
    (c100,) = configs_from_args(_train_args(["--dataset", "cifar100", *model]))
    assert (c100.num_tasks, c100.classes_per_task, c100.train_per_class, c100.img_size) == (None, 10, None, None)
    (c10,) = configs_from_args(_train_args(["--dataset", "cifar10", "--increment", "5", "--init-classes", "0", *model]))
    assert (c10.classes_per_task, c10.init_classes, c10.in_chans) == (5, 0, 3)
    (tmp_path / "order.txt").write_text("3 1 2")
    (ordered,) = configs_from_args(_train_args(["--dataset", "imagefolder", "--class-order", str(tmp_path / "order.txt"),
                                                "--split-ratio", "0.2", *model]))
    assert ordered.class_order == (3, 1, 2) and ordered.to_json()["class_order"] == [3, 1, 2]
    assert TrainConfig.from_json(ordered.to_json()) == ordered  # what a resumed run compares


def test_a_preset_expands_to_the_inflora_settings_and_given_options_win(tmp_path):
    from duallora_kernels.commands.presets import expand_preset
    from duallora_kernels.commands.train import configs_from_args

    parser = _train_args([])._train_parser
    argv, preset = expand_preset(["--preset", "cifar100-b0inc10", "--data-root", "D", "--checkpoint", "w.pth",
                                  "--increment", "5"], parser)
    assert preset.source == "InfLoRA configs/cifar100_inflora.json"
    assert argv[:4] == ["--dataset", "cifar100", "--model", "vit_base_patch16_224"] and argv.count("--increment") == 1
    (config,) = configs_from_args(parser.parse_args([*argv, "--preset", "cifar100-b0inc10"]))
    # configs/cifar100_inflora.json: init_cls 10, increment 10 (given here: 5 wins), 20 epochs, batch 128, Adam lr 5e-4 without
    # weight decay, shuffle false, rank 10, lamb 0.95 -> 0.95 + 0.05 * 9 / 10 after the last of 10 tasks
    assert (config.init_classes, config.classes_per_task, config.epochs, config.batch_size, config.lr, config.head_lr,
            config.weight_decay, config.class_order, config.rank_orth, config.threshold_start,
            config.threshold_end) == (10, 5, 20, 128, 5e-4, 5e-4, 0.0, "sorted", 10, 0.95, 0.995)
    argv, _ = expand_preset(["--preset=imagenetr-b0inc10"], parser)
    assert argv[argv.index("--init-classes") + 1] == "10" and argv[argv.index("--epochs") + 1] == "50"
    assert argv[argv.index("--threshold-end") + 1] == "0.999"  # 0.98 + 0.02 * 19 / 20: 20 tasks


@pytest.mark.parametrize("argv, match", [
    (["--preset", "cifar100-b0inc10", "--data-root", "{missing}", "--checkpoint", "{ckpt}"],
     r"--data-root \S+missing does not exist; --dataset cifar100 expects DIR/cifar-100-python/"),
    (["--preset", "imagenetr-b0inc20", "--checkpoint", "{ckpt}"], r"--preset imagenetr-b0inc20 .* add --data-root DIR"),
    (["--dataset", "cifar100", "--model", "vit_tiny_patch16_224", "--data-root", "{missing}"],
     r"--data-root \S+missing does not exist; --dataset cifar100 expects DIR/cifar-100-python/"),
    (["--dataset", "cifar100", "--data-root", "{data}"], r"dataset 'cifar100' needs a timm ViT \(--model NAME"),
    (["--dataset", "cifar100", "--model", "vit_tiny_patch16_224", "--data-root", "{data}", "--full"],
     r"--full selects every Fashion-MNIST image"),
    (["--workers", "2"], r"--workers: fashion-mnist is held in memory as tensors"),
    (["--split-seed", "3"], r"--split-seed draws the --split-ratio split; without --split-ratio it would be ignored"),
    (["--class-order", "sorted", "--class-order-seed", "1993"], r"give --class-order .* or --class-order-seed"),
    (["--dataset", "cifar100", "--model", "vit_tiny_patch16_224", "--data-root", "{data}", "--split-ratio", "0.2"],
     r"split_ratio .* applies to dataset 'imagefolder' only"),
    (["--dataset", "imagefolder", "--model", "vit_tiny_patch16_224", "--data-root", "{data}"],
     r"it looks like cifar100 data: --dataset cifar100"),
])
def test_bad_data_options_stop_with_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch, argv, match):
    from duallora_kernels import cli
    from duallora_kernels.continual import trainer

    write_cifar100(tmp_path / "data", 1, 1, classes=5)
    (tmp_path / "w.pth").write_bytes(b"never read")
    monkeypatch.setattr(trainer.Trainer, "run", lambda *a, **k: pytest.fail("a run started"))
    argv = [a.format(missing=tmp_path / "missing", ckpt=tmp_path / "w.pth", data=tmp_path / "data") for a in argv]
    out = tmp_path / "out"
    assert cli.main(["train", *argv, f"--out-dir={out}", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert re.search(match, captured.err), captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("duallora train: error:")
    assert not out.exists()
    if "--preset" in argv and "--data-root" in argv:  # the expanded command was printed first, in full
        assert re.search(r"--preset cifar100-b0inc10 is: duallora train --dataset cifar100 --model vit_base_patch16_224 "
                         r"--init-classes 10 --increment 10 --class-order sorted --epochs 20 .* --data-root \S+missing "
                         r"--checkpoint \S+w.pth", captured.out), captured.out
