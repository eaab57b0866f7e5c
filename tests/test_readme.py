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


def test_generated_tables_are_up_to_date():
    for script in ("results/render_table.py", "bench/render_table.py"):
        out = subprocess.run([sys.executable, script, "--check"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_committed_runs_show_duallora_ahead_of_its_ablations_and_seq_lora():
    import json

    runs = {json.loads(p.read_text())["method"]: json.loads(p.read_text())["summary"]["A_last"]
            for p in (ROOT / "results" / "split-fmnist").glob("*/results.json")}
    rivals = ("orth-only", "res-only", "no-calibration", "seq-lora")
    assert set(rivals) | {"duallora", "joint"} <= set(runs)
    assert all(runs["duallora"] > runs[m] for m in rivals), runs


def test_compile_table_is_up_to_date():
    out = subprocess.run([sys.executable, "bench/render_compile_table.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
