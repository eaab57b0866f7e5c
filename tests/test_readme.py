"""The README's commands and its Python examples stay true."""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_quick_start_runs():
    block = _python_blocks()[0]
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tasks_done=3" in out.stdout and "task gate of the first sample" in out.stdout


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^(bash setup\.sh && .*)$", README, flags=re.M)
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
    assert "duallora train" in commands[0]


def test_generated_sections_are_up_to_date():
    # every generated section (results, performance, compile tables), by the one render command
    out = subprocess.run([sys.executable, "-m", "duallora_kernels.readme", "--check"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


def test_committed_runs_show_duallora_ahead_of_its_ablations_and_seq_lora():
    import json

    docs = [json.loads(p.read_text()) for p in (ROOT / "results" / "split-fmnist").glob("*/results.json")]
    rivals = ("orth-only", "res-only", "no-calibration", "seq-lora")
    for seed in sorted({d["config"]["seed"] for d in docs}):  # on every seed of the committed runs
        runs = {d["method"]: d["summary"]["A_last"] for d in docs if d["config"]["seed"] == seed}
        assert set(rivals) | {"duallora", "joint"} <= set(runs), seed
        assert all(runs["duallora"] > runs[m] for m in rivals), (seed, runs)


def test_committed_runs_were_made_with_the_shipped_backbone_and_say_on_what():
    import json

    from duallora_kernels.continual.pretrain import SHIPPED_SHA256

    from duallora_kernels.continual.config import METHODS

    runs = [json.loads(p.read_text()) for p in (ROOT / "results" / "split-fmnist").glob("*/results.json")]
    seeds = {r["config"]["seed"] for r in runs}  # every method once per seed (duallora train --seeds)
    assert sorted((r["method"], r["config"]["seed"]) for r in runs) == sorted((m, s) for m in METHODS for s in seeds)
    for run in runs:
        assert run["backbone_sha256"] == SHIPPED_SHA256, run["method"]
        assert run["environment"]["cpu"] and run["environment"]["threads"] >= 1
    # The variation section compares the default run with another thread count, and the two backends.
    variation = [json.loads(p.read_text()) for p in (ROOT / "results" / "variation").glob("*/results.json")]
    duallora = next(r for r in runs if r["method"] == "duallora" and r["config"]["seed"] == 0)
    same = [r for r in variation if r["config"] == {**duallora["config"], "out_dir": r["config"]["out_dir"],
                                                    "run_name": r["config"]["run_name"]}]
    assert {r["environment"]["threads"] for r in same} - {duallora["environment"]["threads"]}, "no other thread count"
    triton = [r for r in variation if r["config"]["backend"] == "triton"]
    assert triton and all(r["environment"]["triton_interpret"] == "1" for r in triton)
    for r in triton:  # each Triton run has its PyTorch twin
        assert any(t["config"] == {**r["config"], "backend": "torch", "out_dir": t["config"]["out_dir"]}
                   for t in variation)
