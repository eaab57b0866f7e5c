"""The example programs in python/ run and do what they say."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_custom_task_loop_learns_and_keeps_every_task():
    lines = _run("python/custom_task_loop.py").strip().splitlines()
    assert len(lines) == 3
    final = [float(a) for a in re.findall(r"'([0-9.]+)'", lines[-1])]
    assert len(final) == 3 and min(final) >= 0.8  # three tasks, none forgotten


@pytest.mark.parametrize("model", ["vit_small_patch16_224", "beit_base_patch16_224"])
def test_inject_timm_vit_trains_adapters_only(model):
    # beit computes its fused qkv with F.linear on the layer's weight unless inject switches it
    out = _run("python/inject_timm_vit.py", "--model", model, "--depth", "1", "--img-size", "32", "--batch", "2")
    assert "adapted 4 linear layers" in out
    share = float(re.search(r"\(([0-9.]+)%\)", out).group(1))
    assert 0 < share < 10
    assert re.search(r"loss \d+\.\d+", out)


def test_examples_print_help_instead_of_running():
    for script in ("python/custom_task_loop.py", "python/inject_timm_vit.py"):
        out = _run(script, "--help")
        assert out.startswith("usage:") and "after task" not in out and "adapted" not in out
        assert "(default:" in out and "``" not in out
