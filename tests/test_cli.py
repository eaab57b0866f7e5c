"""The `duallora` command line: options that would be ignored are refused, --threads, help text, Ctrl-C."""
import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from duallora_kernels import cli
from duallora_kernels.commands import train as train_command
from duallora_kernels.continual.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model=vit_tiny_patch16_224", "--patch-size=7", "--depth=1", "--embed-dim=16", "--num-heads=2",
        "--train-per-class=16", "--test-per-class=8", "--batch-size=16", "--num-tasks=3", "--rank-orth=2",
        "--rank-res=2", "--no-progress"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# ------------------------------------------------------------------ item 1: ignored options are errors
@pytest.mark.parametrize(
    "argv, match",
    [
        (["--checkpoint", "{ckpt}"], r"--checkpoint only applies with --model"),
        (["--patch-size", "4", "--depth", "2"], r"--patch-size, --depth only apply with --model"),
        (["--img-size", "28"], r"--img-size only applies with --model"),
        (["--full", "--train-per-class", "10"], r"--full uses every image, so --train-per-class would be ignored"),
        (["--method", "orth-only", "--rank-res", "3"], r"--rank-res is not used by --method orth-only \(orth-only has no residual"),
        (["--method", "seq-lora,joint", "--beta", "0.5"], r"--beta is not used by --method seq-lora,joint"),
        (["--method", "joint", "--temperature", "0.1"], r"--temperature is not used by --method joint"),
        (["--method", "duallora,orth-only", "--run-name", "mine"], r"--run-name names one run"),
    ],
)
def test_options_a_run_would_ignore_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch, argv, match):
    ckpt = tmp_path / "weights.safetensors"
    ckpt.write_bytes(b"never opened")
    from duallora_kernels.continual import trainer

    monkeypatch.setattr(trainer.Trainer, "run", lambda *a, **k: pytest.fail("a run started"))
    out = tmp_path / "out"
    argv = [a.replace("{ckpt}", str(ckpt)) for a in argv]
    assert cli.main(["train", *argv, f"--out-dir={out}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert err.count("\n") == 1 and err.startswith("duallora train: error:")
    assert not out.exists()


def test_options_some_selected_method_uses_are_accepted():
    parser = _subparsers()["train"]
    args = parser.parse_args(["--method", "all", "--rank-res", "3", "--beta", "0.5"])
    configs = train_command.configs_from_args(args)
    assert [c.method for c in configs][-1] == "joint" and all(c.rank_res == 3 and c.beta == 0.5 for c in configs)
    args = parser.parse_args(["--model", "vit_tiny_patch16_224", "--patch-size", "4", "--checkpoint", "w.pth"])
    (config,) = train_command.configs_from_args(args)
    assert (config.model, config.patch_size, config.checkpoint) == ("vit_tiny_patch16_224", 4, "w.pth")


def test_train_config_refuses_model_options_without_a_model():
    with pytest.raises(ValueError, match=r"checkpoint='w.pth' only applies with model="):
        TrainConfig(checkpoint="w.pth")
    with pytest.raises(ValueError, match=r"patch_size=4, img_size=32 only apply with model="):
        TrainConfig(patch_size=4, img_size=32)
    assert TrainConfig(model="vit_tiny_patch16_224", checkpoint="w.pth").checkpoint == "w.pth"


# ------------------------------------------------------------------ item 5: --threads
def test_threads_default_never_exceeds_the_usable_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert cli.usable_cores() == 1
        torch.set_num_threads(2)
        assert cli.apply_threads(None) == 1 == torch.get_num_threads()
        with pytest.raises(ValueError, match=r"--threads 2 is more than the 1 core\(s\) this process may use"):
            cli.apply_threads(2)
        with pytest.raises(ValueError, match="--threads must be an int >= 1"):
            cli.apply_threads(0)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        torch.set_num_threads(3)
        assert cli.apply_threads(None) == 3 and cli.apply_threads(2) == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_too_many_threads_is_a_one_line_error(tmp_path, capsys):
    n = cli.usable_cores() + 1
    assert cli.main(["train", f"--threads={n}", f"--out-dir={tmp_path / 'out'}"]) == 2
    assert f"--threads {n} is more than the {n - 1} core(s)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ item 11: help
@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_every_option_has_help_and_shows_its_default_once(command):
    parser = _subparsers()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = formatter._expand_help(action)
        assert text.strip(), f"{action.option_strings} has no help"
        if action.nargs != 0:  # flags are off unless given: no default to show
            assert text.lower().count("default") == 1, f"{action.option_strings}: {text!r}"
    page = parser.format_help()
    assert "``" not in page and ":func:" not in page and ":class:" not in page
    assert "(default: None)" not in page


# ------------------------------------------------------------------ item 7: Ctrl-C
def test_ctrl_c_right_after_a_checkpoint_is_written_names_it(tmp_path):
    # SIGINT between checkpoint.json's rename (the commit point) and the trainer recording it: the
    # message follows the file, the run's truth, not the counter that had not caught up yet.
    from duallora_kernels.continual.trainer import Trainer

    trainer = Trainer(TrainConfig(out_dir=str(tmp_path)), progress=False, log=lambda m: None)
    trainer.total_tasks, trainer.current_task, trainer.tasks_checkpointed = 3, 0, 0
    assert "interrupted in task 0 of 3" in trainer.where_stopped() and "no task finished yet" in trainer.where_stopped()
    run_dir = trainer.config.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.json").write_text(json.dumps({"tasks_done": 1}))
    assert re.search(r"interrupted in task 1 of 3 of run \S+ \(task 0 is checkpointed in ", trainer.where_stopped())
    trainer.current_task, trainer.tasks_checkpointed = 2, 2  # the last task's checkpoint, before results
    (run_dir / "checkpoint.json").write_text(json.dumps({"tasks_done": 3}))
    assert "after its last task, while writing its results (tasks 0-2 are checkpointed" in trainer.where_stopped()


def test_ctrl_c_prints_one_line_with_the_resume_command_and_exits_130(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [*TINY, "--epochs=3", "--threads=1", f"--out-dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "duallora_kernels.cli", "train", *argv], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "duallora-seed0" / "checkpoint.json"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "duallora train: 1 CPU thread(s)" in stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    done = json.loads(ckpt.read_text())["tasks_done"]
    assert re.match(rf"duallora train: interrupted in task {done} of 3 of run duallora-seed0 \(task", lines[0]), lines[0]
    command = shlex.split(lines[0].split("; continue with: ", 1)[1])
    assert command[:2] == ["duallora", "train"] and command[2:] == [*argv, "--resume"]
    resumed = subprocess.run([sys.executable, "-m", "duallora_kernels.cli", *command[1:]], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed after task {done - 1}" in resumed.stdout
    results = json.loads((tmp_path / "duallora-seed0" / "results.json").read_text())
    assert [len(row) for row in results["accuracy_matrix"]] == [1, 2, 3]


# ------------------------------------------------------------------ issue 9: --amp and --compile
def test_amp_defaults_to_bf16_on_cuda_and_off_on_the_cpu(monkeypatch):
    parser = _subparsers()["train"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_command.configs_from_args(parser.parse_args([]))[0].amp == "off"
    assert train_command.configs_from_args(parser.parse_args(["--amp", "bf16"]))[0].amp == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_command.configs_from_args(parser.parse_args([]))[0].amp == "bf16"
    args = parser.parse_args(["--compile"])
    assert train_command.configs_from_args(args)[0].compile == "auto"
    assert parser.parse_args([]).compile == "off"


def _refused(tmp_path, capsys, monkeypatch, argv) -> str:
    from duallora_kernels.continual import trainer

    monkeypatch.setattr(trainer.Trainer, "run", lambda *a, **k: pytest.fail("a run started"))
    out = tmp_path / "out"
    assert cli.main(["train", *argv, f"--out-dir={out}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("duallora train: error:"), err
    assert not out.exists()
    return err


def test_amp_fp16_on_a_cpu_without_float16_matmul_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    err = _refused(tmp_path, capsys, monkeypatch, ["--amp", "fp16"])
    assert "no native float16 matrix multiply" in err and "--amp bf16" in err


def test_compile_where_the_compiler_fails_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from torch import _dynamo

    @_dynamo.register_backend(name="duallora_test_broken")
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _refused(tmp_path, capsys, monkeypatch, ["--compile", "duallora_test_broken"])
    assert "torch.compile with backend 'duallora_test_broken' does not work here" in err and "aot_eager" in err
    err = _refused(tmp_path, capsys, monkeypatch, ["--compile", "no_such_backend"])
    assert "has no backend 'no_such_backend'" in err


# ------------------------------------------------------------------ issue 20: --train-a
def test_train_a_reaches_every_layer_and_defaults_to_on():
    parser = _subparsers()["train"]
    assert all(c.train_a for c in train_command.configs_from_args(parser.parse_args(["--method", "all"])))
    configs = train_command.configs_from_args(parser.parse_args(["--method", "all", "--train-a", "off"]))
    assert len(configs) == 6 and not any(c.train_a or c.layer_kwargs()["train_a"] for c in configs)
    # a run recorded before the setting existed trained A
    assert TrainConfig.from_json({k: v for k, v in TrainConfig().to_json().items() if k != "train_a"}).train_a
    with pytest.raises(ValueError, match="train_a must be True or False"):
        TrainConfig(train_a="off")
