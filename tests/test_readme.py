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
