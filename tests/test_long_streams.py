"""Long task streams end to end (issue 21): 10 and 20 tasks of a tiny ViT on CIFAR-100 files written here,
the memory's growth recorded after each task, resuming a run on the user's data, and the stacked rank of 20
tasks on every backend."""
import json
import logging

import pytest
import torch

from data_files import write_cifar100, write_image_folder
from duallora_kernels.continual.config import TrainConfig
from duallora_kernels.continual.trainer import Trainer

# A tiny randomly initialised ViT on 16x16 crops: seconds per run. head_lr is raised so that 2 epochs of
# 40 images per task learn something a test can see.
TINY_RGB = dict(model="vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, embed_dim=16, num_heads=2,
                num_tasks=None, train_per_class=None, test_per_class=None, epochs=2, batch_size=16, rank_orth=2,
                rank_res=2, head_lr=0.05, workers=0)


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar100(root, train_per_class=4, test_per_class=2)
    return root


def _run(config: TrainConfig, logs: list | None = None, resume: bool = False) -> dict:
    return Trainer(config, progress=False, log=(logs.append if logs is not None else lambda m: None)).run(resume=resume)


@pytest.mark.parametrize("increment, tasks", [(10, 10), (5, 20)])
def test_long_streams_run_end_to_end_and_record_the_memorys_growth(cifar100, tmp_path, increment, tasks):
    logs = []
    config = TrainConfig(**{**TINY_RGB, "epochs": 2 if tasks == 10 else 1}, dataset="cifar100",
                         data_root=str(cifar100), classes_per_task=increment, out_dir=str(tmp_path))
    results = _run(config, logs)
    assert [len(row) for row in results["accuracy_matrix"]] == list(range(1, tasks + 1))
    assert results["data"]["task_sizes"] == [increment] * tasks and results["data"]["classes"] == 100
    growth = results["memory_growth"]
    assert len(growth) == tasks and len(growth[0]) == 4  # qkv, proj, fc1, fc2 of the one block
    for name in growth[0]:
        layer = [g[name] for g in growth]
        # after task t: t frozen residual blocks (task 0 has no memory to train one in) of rank 2 each, beside the
        # orthogonal adapter's rank 2; the basis only grows, within the layer's input width
        assert [g["frozen_blocks"] for g in layer] == list(range(tasks))
        assert [g["stacked_rank"] for g in layer] == [2 + 2 * t for t in range(tasks)]
        columns = [g["basis_columns"] for g in layer]
        assert columns == sorted(columns) and 0 < columns[-1] <= layer[0]["in_features"]
        sizes = [g["buffer_bytes"] for g in layer]
        assert all(b > a for a, b in zip(sizes, sizes[1:]))
    assert results["basis_sizes"][-1] == {n: g["basis_columns"] for n, g in growth[-1].items()}
    last = logs[-2]  # the growth is printed after each task (the last line of the run is its summary)
    assert f"memory after task {tasks - 1}" in last and f"frozen residual blocks per layer {tasks - 1}, stacked rank " \
                                                        f"{2 * tasks}" in last
    # Task identity far above chance (1 / tasks): the data's labels follow its images through the stream
    assert results["task_id_accuracy"][-1] > 0.5
    if tasks == 10:  # and two epochs teach the heads their classes: far above chance over 100 classes (1%)
        assert results["summary"]["A_last"] > 0.08
    saved = json.loads((tmp_path / "duallora-seed0" / "results.json").read_text())
    assert saved["memory_growth"] == growth and saved["data"]["split"] == f"{tasks} tasks x {increment}"


def test_a_run_on_an_image_folder_resumes_to_the_same_results(tmp_path, monkeypatch):
    names = [f"n{c:02d}" for c in range(6)]
    write_image_folder(tmp_path / "data", names, {n: 6 for n in names})
    config = dict(TINY_RGB, dataset="imagefolder", data_root=str(tmp_path / "data"), split_ratio=0.34, split_seed=1,
                  classes_per_task=2, class_order_seed=1993, epochs=2)
    whole = _run(TrainConfig(**config, out_dir=str(tmp_path / "whole")))
    cut = TrainConfig(**config, out_dir=str(tmp_path / "cut"))
    real = Trainer._train_task

    def ctrl_c_in_task_2(self, model, tasks, t):
        if t == 2:
            raise KeyboardInterrupt
        return real(self, model, tasks, t)

    monkeypatch.setattr(Trainer, "_train_task", ctrl_c_in_task_2)
    with pytest.raises(KeyboardInterrupt):
        _run(cut)
    monkeypatch.setattr(Trainer, "_train_task", real)
    assert json.loads((cut.run_dir / "checkpoint.json").read_text())["tasks_done"] == 2
    logs = []
    resumed = _run(cut, logs, resume=True)
    assert any("resumed after task 1" in m for m in logs)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]  # augmentation and all, to the last digit
    assert resumed["task_id_accuracy"] == whole["task_id_accuracy"]
    assert resumed["memory_growth"] == whole["memory_growth"]
    data = resumed["data"]
    assert data["split_ratio"] == 0.34 and data["split_seed"] == 1 and data["train_images"] == 24
    # numpy.random.seed(1993); numpy.random.permutation(6) (PyCIL's rule): [0, 2, 3, 4, 5, 1]
    assert resumed["class_order"] == [[0, 2], [3, 4], [5, 1]]
    assert "PyCIL" in data["class_order_rule"] and data["class_names"][0] == ["n00", "n02"]
    # the README's results table shows the data, its split and which rule ordered the classes
    text = "\n".join(_render_table().render_runs([(cut.run_dir / "results.json", resumed)], tmp_path))
    assert ("imagefolder from class folders, split by --split-ratio, 3 tasks x 2 classes, class order shuffled by "
            "--class-order-seed 1993 (PyCIL's rule: numpy.random.seed, numpy.random.permutation) (seed 0: [[0, 2], "
            "[3, 4], [5, 1]]), every image (24 train / 12 test)") in text


def _render_table():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "results" / "render_table.py"
    spec = importlib.util.spec_from_file_location("render_table_for_streams", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------- the stacked rank of 20 tasks
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_twenty_tasks_stacked_rank_on_every_backend(backend, gen, monkeypatch):
    # rank_orth 8 + 19 frozen blocks and the training block of rank_res 4: r = 88 (Triton pads it to 128)
    import helpers
    from duallora_kernels.ops import _kernel_utils
    from test_fused_linear import check_against_reference

    monkeypatch.setenv(_kernel_utils.POISON_ENV, "1")
    x, w, b, kw = helpers.dual_lora_problem(5, 24, 16, 8, 4, 19, 20, gen, dtype=torch.float32)
    assert kw["frozen_a"].shape[0] + kw["orth_a"].shape[0] + kw["res_a"].shape[0] == 88
    check_against_reference(x, w, b, kw, backend=backend)


def test_the_cuda_backend_falls_back_above_its_rank_limit_with_one_notice(gen, monkeypatch, caplog):
    from duallora_kernels.ops import cuda
    from duallora_kernels.ops.launchers import TORCH, Layout

    monkeypatch.setattr(cuda, "load_extension", lambda: pytest.fail("the extension was called"))
    monkeypatch.setattr(cuda, "_told_rank", [])
    x, w = torch.randn(5, 24, generator=gen).bfloat16(), torch.randn(12, 24, generator=gen).bfloat16()
    a, bt = torch.randn(136, 24, generator=gen).bfloat16(), torch.randn(136, 12, generator=gen).bfloat16()
    lay = Layout(a, 8, 128, None, 0.5, 2.0)
    with caplog.at_level(logging.WARNING, logger=cuda.__name__):
        for _ in range(3):
            y, t = cuda._cuda_forward(x, w, None, a, bt, None, lay, True)
    assert torch.equal(y, TORCH.forward(x, w, None, a, bt, None, lay, True)[0])
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "stacked rank 136 is above the tensor-core kernels' limit of 128" in notices[0]
    assert "\n" not in notices[0]
