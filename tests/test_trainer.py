"""The continual-learning loop: metrics, calibration, results files, crash-and-resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from duallora_kernels.continual import metrics
from duallora_kernels.continual.calibration import calibrate_logits
from duallora_kernels.continual.config import TrainConfig
from duallora_kernels.continual.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
# A tiny randomly initialised timm ViT keeps these runs to seconds; the method itself is
# exercised on the real benchmark by `duallora train` (results/).
TINY = dict(model="vit_tiny_patch16_224", patch_size=7, depth=1, embed_dim=16, num_heads=2,
            train_per_class=16, test_per_class=8, epochs=1, batch_size=16, num_tasks=3, rank_orth=2, rank_res=2)


def tiny_args(out_dir, **over):
    cfg = {**TINY, "out_dir": str(out_dir), **over}
    return [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]


def test_metrics_against_hand_computation():
    r = [[0.9], [0.7, 0.8], [0.6, 0.75, 0.5]]
    assert metrics.final_average(r) == pytest.approx((0.6 + 0.75 + 0.5) / 3)
    assert metrics.average_incremental(r) == pytest.approx((0.9 + 0.75 + (0.6 + 0.75 + 0.5) / 3) / 3)
    assert metrics.forgetting(r) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.75)) / 2)
    assert metrics.forgetting([[0.5]]) == 0.0
    table = metrics.format_matrix(r, [None, 0.9, 0.8])
    assert "T2" in table and "75.0" in table and "80.0" in table


def test_calibration_adds_beta_log_gate():
    logits = torch.zeros(2, 4)
    gate = torch.tensor([[0.8, 0.2], [0.1, 0.9]])
    out = calibrate_logits(logits, gate, [range(0, 2), range(2, 4)], beta=2.0)
    expect = 2.0 * torch.log(gate).repeat_interleave(2, dim=1)
    within = logits.view(2, 2, 2).log_softmax(-1).view(2, 4)
    assert torch.allclose(out, within + expect)
    assert calibrate_logits(logits, gate, [range(0, 2), range(2, 4)], beta=0.0) is logits


def test_run_writes_results_plot_and_checkpoint(tmp_path):
    cfg = TrainConfig(**TINY, out_dir=str(tmp_path))
    results = Trainer(cfg, progress=False, log=lambda m: None).run()
    run = tmp_path / "duallora-seed0"
    saved = json.loads((run / "results.json").read_text())
    assert saved["accuracy_matrix"] == results["accuracy_matrix"]
    r = saved["accuracy_matrix"]
    assert [len(row) for row in r] == [1, 2, 3] and all(0 <= v <= 1 for row in r for v in row)
    assert saved["summary"]["A_last"] == pytest.approx(sum(r[-1]) / 3)
    assert len(saved["class_order"]) == 3 and len({c for t in saved["class_order"] for c in t}) == 6
    assert saved["config"]["method"] == "duallora" and saved["task_id_accuracy"][0] is None
    assert 0 <= saved["task_id_accuracy"][-1] <= 1
    assert (run / "results.png").read_bytes()[:4] == b"\x89PNG"
    state = json.loads((run / "checkpoint.json").read_text())
    assert state["tasks_done"] == 3 and (run / state["weights"]).is_file()
    assert sorted(p.name for p in run.glob("task-*.safetensors")) == ["task-2.safetensors"]
    assert not list(run.glob(".*.tmp"))  # no half-written file left
    sizes = saved["checkpoint_bytes_per_task"]  # each task's checkpoint, as written
    assert len(sizes) == 3 and all(isinstance(s, int) and s > 0 for s in sizes)
    assert sizes[-1] == (run / "task-2.safetensors").stat().st_size and state["history"]["checkpoint_bytes"] == sizes


def test_killed_mid_task_then_resumed_reaches_the_same_results(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "duallora_kernels.commands.train", "--no-progress", "--epochs=3"]
    whole = subprocess.run(cmd + tiny_args(tmp_path / "whole"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen(cmd + tiny_args(tmp_path / "cut"), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "cut" / "duallora-seed0" / "checkpoint.json"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed mid-task"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(ckpt.read_text())
    assert state["tasks_done"] < 3  # killed inside a later task, not at the end
    resumed = subprocess.run(cmd + tiny_args(tmp_path / "cut") + ["--resume"], env=env, cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after task" in resumed.stdout
    a = json.loads((tmp_path / "whole" / "duallora-seed0" / "results.json").read_text())
    b = json.loads((tmp_path / "cut" / "duallora-seed0" / "results.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["task_id_accuracy"] == b["task_id_accuracy"]


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(model="vit_tinyy_patch16_224"), ValueError, "vit_tiny"),
        (dict(num_tasks=6), ValueError, "dataset has 10 classes, 6 tasks × 2 classes needs 12"),
        (dict(data_root="/nonexistent/fmnist"), FileNotFoundError, "dataset-fashion-mnist|--data-root"),
        (dict(method="ewc"), ValueError, "method must be one of"),
        (dict(rank_orth=0), ValueError, "rank_orth must be an int >= 1"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, over, exc, match):
    with pytest.raises(exc, match=match):
        Trainer(TrainConfig(**{**TINY, "out_dir": str(tmp_path), **over}), progress=False, log=lambda m: None).run()
    assert list(tmp_path.iterdir()) == []


def test_wrong_shape_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    from duallora_kernels.vit import create_vit

    other = create_vit("vit_tiny_patch16_224", img_size=28, patch_size=7, depth=1, embed_dim=32, num_heads=2, in_chans=1)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "ckpt.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="embed"):
        Trainer(TrainConfig(**{**TINY, "out_dir": str(out), "checkpoint": str(tmp_path / "ckpt.safetensors")}),
                progress=False, log=lambda m: None).run()
    assert not out.exists()


def test_cli_reports_bad_input_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "duallora_kernels.cli", "train", "--num-tasks=6", "--no-progress",
                          f"--out-dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert "error: dataset has 10 classes" in out.stderr and "Traceback" not in out.stderr


def test_nan_in_a_tasks_data_stops_with_the_layer_and_the_task(tmp_path, monkeypatch):
    from duallora_kernels.continual import trainer as trainer_module

    real = trainer_module.load_stream

    def with_nan(config):
        stream = real(config)
        stream.ready[1].train.tensors[0][3, 0, 5, 5] = float("nan")  # one pixel of one image of task 1
        return stream

    monkeypatch.setattr(trainer_module, "load_stream", with_nan)
    with pytest.raises(ValueError, match=r"non-finite input statistics .* at layer 'backbone\.blocks\.0\.attn\.qkv', "
                                         r"task 1 \(start of task, before training\).*NaN/inf"):
        Trainer(TrainConfig(**TINY, out_dir=str(tmp_path)), progress=False, log=lambda m: None).run()
    state = json.loads((tmp_path / "duallora-seed0" / "checkpoint.json").read_text())
    assert state["tasks_done"] == 1  # task 0 finished and was kept; task 1 stopped before any change


def test_a_new_run_moves_the_earlier_runs_outputs_aside(tmp_path, monkeypatch):
    cfg = TrainConfig(**TINY, out_dir=str(tmp_path))
    first = Trainer(cfg, progress=False, log=lambda m: None).run()
    run = tmp_path / "duallora-seed0"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert set(before) == {"results.json", "results.png", "checkpoint.json", "task-2.safetensors"}

    def stop_in_task_0(self, model, tasks, t):
        raise KeyboardInterrupt  # Ctrl-C (or a kill) inside the new run's first task

    monkeypatch.setattr(Trainer, "_train_task", stop_in_task_0)
    logs = []
    trainer = Trainer(TrainConfig(**{**TINY, "epochs": 2}, out_dir=str(tmp_path)), progress=False, log=logs.append)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert trainer.where_stopped() == "interrupted in task 0 of 3 of run duallora-seed0 (no task finished yet)"
    # Nothing of the earlier run is left where a reader would take it for the new run's ...
    assert sorted(p.name for p in run.iterdir()) == ["previous"]
    # ... it is all in previous/, unchanged, and the log says so.
    assert {p.name: p.read_bytes() for p in (run / "previous").iterdir()} == before
    assert any("moved an earlier run's" in m and "results.json" in m for m in logs)
    assert json.loads(before["results.json"])["accuracy_matrix"] == first["accuracy_matrix"]


def test_resuming_a_finished_run_keeps_its_results(tmp_path):
    cfg = TrainConfig(**TINY, out_dir=str(tmp_path))
    first = Trainer(cfg, progress=False, log=lambda m: None).run()
    again = Trainer(cfg, progress=False, log=lambda m: None).run(resume=True)
    assert again["accuracy_matrix"] == first["accuracy_matrix"]
    assert not (tmp_path / "duallora-seed0" / "previous").exists()


def test_results_record_backbone_hash_hardware_and_a_legend_with_each_tasks_classes(tmp_path, monkeypatch):
    import matplotlib.figure
    from safetensors.torch import save_file

    from duallora_kernels.continual.pretrain import sha256_of
    from duallora_kernels.vit import create_vit

    backbone = create_vit("vit_tiny_patch16_224", img_size=28, patch_size=7, depth=1, embed_dim=16, num_heads=2,
                          in_chans=1)
    ckpt = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(ckpt))
    legends = []
    real_savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        legends.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()])
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    results = Trainer(TrainConfig(**TINY, checkpoint=str(ckpt), out_dir=str(tmp_path / "out")), progress=False,
                      log=lambda m: None).run()
    assert results["backbone_sha256"] == sha256_of(ckpt) and len(results["backbone_sha256"]) == 64
    env = results["environment"]
    assert env["cpu"] and env["gpu"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    assert env["threads"] == torch.get_num_threads() and env["usable_cores"] >= 1
    (c0, c1), (c2, c3) = results["class_order"][:2]
    from duallora_kernels.continual.data import FASHION_MNIST_CLASSES as names

    assert legends[0][:2] == [f"task 0: {c0} {names[c0]}, {c1} {names[c1]}", f"task 1: {c2} {names[c2]}, {c3} {names[c3]}"]
    assert metrics.task_labels(2, [[4, 6], [2, 7]]) == ["task 0: classes 4, 6", "task 1: classes 2, 7"]
    assert metrics.task_labels(2) == ["task 0", "task 1"]


def test_amp_and_compile_train_in_bf16_through_one_compiled_graph(tmp_path):
    # --amp bf16 --compile aot_eager (the CPU backend the tests use; --compile alone is inductor, which
    # needs the C++ compiler): the adapted layers compute in bfloat16 during training, parameters stay
    # float32, the step compiles with fullgraph=True (a graph break would raise), and the run finishes.
    from duallora_kernels.nn import dual_lora_layers

    seen = set()

    class Watching(Trainer):
        def _training_step(self, model, t, offset, ex):
            for layer in dual_lora_layers(model).values():
                layer.register_forward_hook(lambda m, i, o: seen.add(o.dtype) if m.training else None)
            return super()._training_step(model, t, offset, ex)

    small = {**TINY, "num_tasks": 2}
    eager = Trainer(TrainConfig(**small, out_dir=str(tmp_path / "e")), progress=False, log=lambda m: None).run()
    compiled = Trainer(TrainConfig(**small, compile="aot_eager", out_dir=str(tmp_path / "c")),
                       progress=False, log=lambda m: None).run()
    assert compiled["accuracy_matrix"] == eager["accuracy_matrix"]
    assert compiled["basis_sizes"] == eager["basis_sizes"]
    w = Watching(TrainConfig(**small, amp="bf16", compile="aot_eager", out_dir=str(tmp_path / "b")),
                 progress=False, log=lambda m: None)
    results = w.run()
    assert seen == {torch.bfloat16}
    assert all(0 <= v <= 1 for row in results["accuracy_matrix"] for v in row)
    assert results["config"]["amp"] == "bf16" and results["config"]["compile"] == "aot_eager"


def test_amp_fp16_trains_in_float16_with_a_grad_scaler(tmp_path, monkeypatch):
    # Where the CPU has native float16 matmul (oneDNN says so; this one may not: the check is patched), --amp
    # fp16 trains the step in float16, its loss scaled by a GradScaler, parameters float32.
    from duallora_kernels.nn import dual_lora_layers

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: True)
    seen, scaled = set(), []
    real_scaler = torch.amp.GradScaler

    def scaler(*a, **k):
        s = real_scaler(*a, **k)
        scaled.append(s.is_enabled())
        return s

    monkeypatch.setattr(torch.amp, "GradScaler", scaler)

    class Watching(Trainer):
        def _training_step(self, model, t, offset, ex):
            for layer in dual_lora_layers(model).values():
                layer.register_forward_hook(lambda m, i, o: seen.add(o.dtype) if m.training else None)
            return super()._training_step(model, t, offset, ex)

    w = Watching(TrainConfig(**{**TINY, "num_tasks": 2}, amp="fp16", out_dir=str(tmp_path)),
                 progress=False, log=lambda m: None)
    results = w.run()
    assert seen == {torch.float16} and scaled == [True, True]
    assert all(0 <= v <= 1 for row in results["accuracy_matrix"] for v in row)
