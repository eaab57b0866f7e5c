"""The tested version range (duallora_kernels/_versions.py) agrees with what the package declares
and what the two CI lanes install, and its checks say what they should."""
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

from duallora_kernels import _versions
from duallora_kernels._versions import TESTED, _interpreter_needs_old_numpy, outside_tested, range_warning

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirement(reqs: list[str], name: str) -> str:
    found = [r for r in reqs if re.match(rf"{name}\b", r) and not r.startswith(f"{name}vision")]
    assert len(found) == 1, (name, reqs)
    return found[0]


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_the_oldest_tested_is_the_oldest_declared(name):
    low, _ = TESTED[name]
    assert re.search(rf">={re.escape(low)}\b", _requirement(PROJECT["dependencies"], name))
    assert re.search(rf"=={re.escape(low)}\.\*", _requirement(PROJECT["optional-dependencies"]["oldest"], name))


def test_the_oldest_extra_caps_numpy_for_triton_36s_interpreter():
    numpy_req = _requirement(PROJECT["optional-dependencies"]["oldest"], "numpy")
    assert "<2.4" in numpy_req
    low, high = TESTED["numpy"]
    assert high == "2.4" and _versions._minor(low) < (2, 4)


def test_the_newest_tested_torch_is_what_setup_sh_installs():
    pinned = re.search(r"torch==(\d+\.\d+)\.\d+", (ROOT / "setup.sh").read_text())
    assert pinned and pinned[1] == TESTED["torch"][1]


def test_versions_outside_the_range_are_named():
    inside = {"torch": "2.11.0+cu130", "triton": "3.8.0", "numpy": "2.3.5"}
    assert outside_tested(inside) == [] and range_warning(inside) is None
    outside = {"torch": "2.10.1", "triton": "3.9.0", "numpy": "2.4.6"}
    assert outside_tested(outside) == ["torch 2.10.1 (tested 2.11-2.14)", "triton 3.9.0 (tested 3.6-3.8)"]
    line = range_warning(outside)
    assert line.count("\n") == 0 and "torch 2.10.1" in line and "triton 3.9.0" in line
    assert outside_tested({"torch": None}) == []  # not installed: nothing to compare


def test_the_interpreter_numpy_rule():
    assert _interpreter_needs_old_numpy("3.6.0", "2.4.6")
    assert not _interpreter_needs_old_numpy("3.6.0", "2.3.5")
    assert not _interpreter_needs_old_numpy("3.7.0", "2.4.6")
    assert not _interpreter_needs_old_numpy("3.8.0", "2.5.0")


def test_the_interpreter_check_raises_one_line(monkeypatch):
    import numpy
    import triton

    _versions.check_interpreter_numpy.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    try:
        with pytest.raises(RuntimeError, match=r"needs numpy < 2.4 .*pip install 'numpy<2.4'") as err:
            _versions.check_interpreter_numpy()
        assert "\n" not in str(err.value)
    finally:
        _versions.check_interpreter_numpy.cache_clear()


def test_the_command_warns_in_one_line_and_checks_the_lane():
    run = subprocess.run([sys.executable, "-m", "duallora_kernels._versions"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0
    assert run.stdout.strip() == (range_warning() or "")
    ends = [end for end, i in (("oldest", 0), ("newest", 1))
            if all(_versions._minor(_versions.installed()[k]) == _versions._minor(TESTED[k][i])
                   for k in ("torch", "triton"))]
    for end in ("oldest", "newest"):
        run = subprocess.run([sys.executable, "-m", "duallora_kernels._versions", "--expect", end],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert run.returncode == (0 if end in ends else 1), (end, run.stdout, run.stderr)
