"""The package as users get it: built into an sdist and a wheel, installed into a fresh virtual
environment outside the checkout, the README's Quick start and a tiny `duallora train` run from there;
the torch backend with no triton installed; results that record only this checkout's commit.

The fresh environment sees the test environment's site-packages through a .pth file (torch, timm and
the rest, without a download of several GB) but neither the checkout nor its editable install: a .pth
line adds a directory, not the .pth files (the editable finder) inside it."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
#: A two-task run of a one-block ViT on 16 images per class: seconds.
TINY_TRAIN = ["--model=vit_tiny_patch16_224", "--patch-size=7", "--depth=1", "--embed-dim=16", "--num-heads=2",
              "--train-per-class=16", "--test-per-class=8", "--batch-size=16", "--num-tasks=2", "--classes-per-task=2",
              "--rank-orth=2", "--rank-res=2", "--epochs=1", "--threads=1", "--no-progress"]
#: What the sdist must hold beyond the package for its tests to run and its wheel to build.
SDIST_MUST_HOLD = ("LICENSE", "setup.py", "pyproject.toml", "MANIFEST.in", "setup.sh", ".ci/run", "csrc/bindings.cpp",
                   "csrc/fused_tiles.h", "tests/conftest.py", "tests/helpers.py", "tests/data_files.py",
                   "tests/cuda_emulation/harness.cpp", "python/custom_task_loop.py", "bench/run_gpu.sh",
                   "bench/README.md", "bench/results/cuda-compile-13.0.json", "results/render_table.py",
                   "docs/method.md", "duallora_kernels/py.typed")
#: Tests of the sdist run from the unpacked sdist: each reads files the package does not hold
#: (csrc/ and tests/cuda_emulation/; bench/; python/).
SDIST_TESTS = ["tests/test_cuda_emulation.py::test_emulated_forward_matches_reference",
               "tests/test_run_gpu_plan.py::test_collect_copies_the_returned_files_and_renders_the_table",
               "tests/test_examples.py::test_custom_task_loop_learns_and_keeps_every_task"]


def _quick_start() -> str:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[0]


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without PYTHONPATH (which may point at the checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _run(cmd: list, cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


# ---------------------------------------------------------------------------------- without triton
_NO_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as where it is not installed
{code}
import torch
from duallora_kernels import dual_lora_linear
try:
    dual_lora_linear(torch.randn(2, 4), torch.randn(3, 4), backend="triton")
except RuntimeError as err:
    print("triton backend:", err)
"""


def test_the_torch_backend_runs_without_triton(tmp_path):
    # the Quick start (backend "auto" on the CPU: torch) and a tiny `duallora train`, triton unimportable
    out = _run([sys.executable, "-c", _NO_TRITON.format(code=_quick_start())], tmp_path, PYTHONPATH=str(ROOT))
    assert "task gate of the first sample" in out.stdout
    assert "triton backend: backend='triton' needs the triton package (pip install triton)" in out.stdout
    if not FASHION_MNIST.exists():
        pytest.skip(f"no Fashion-MNIST at {FASHION_MNIST.parent} (setup.sh installs it)")
    train = "from duallora_kernels.cli import main\nsys.exit(main(['train', *sys.argv[1:]]))"
    _run([sys.executable, "-c", _NO_TRITON.format(code=train), *TINY_TRAIN, f"--out-dir={tmp_path / 'run'}"], tmp_path,
         PYTHONPATH=str(ROOT))
    assert json.loads((tmp_path / "run" / "duallora-seed0" / "results.json").read_text())["summary"]


# ---------------------------------------------------------------------------------- the commit recorded
def test_results_record_no_commit_of_a_repository_the_package_sits_in(tmp_path, monkeypatch):
    from duallora_kernels import _source
    from duallora_kernels.harness import results

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "project"
    site = repo / ".venv" / "lib" / "site-packages"  # an installed copy inside a user's own repository
    site.mkdir(parents=True)
    (repo / "notes.txt").write_text("the user's project\n")
    git = ["git", "-C", str(repo), "-c", "user.name=u", "-c", "user.email=u@example.com"]
    for args in (["init", "-q"], ["add", "notes.txt"], ["commit", "-q", "-m", "theirs"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    theirs = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    monkeypatch.delenv("DUALLORA_GIT_COMMIT", raising=False)
    try:
        monkeypatch.setattr(_source, "PACKAGE_PARENT", site)
        _source.checkout_root.cache_clear()
        assert _source.checkout_root() is None and _source.git("rev-parse", "HEAD") is None
        assert results.run_metadata("bench", [], torch.device("cpu"), {})["git"] == {"commit": None, "dirty": None}
        monkeypatch.setattr(_source, "PACKAGE_PARENT", repo)  # the package at the top of a checkout: its commit
        _source.checkout_root.cache_clear()
        assert _source.checkout_root() == repo
        assert results.run_metadata("bench", [], torch.device("cpu"), {})["git"] == {"commit": theirs, "dirty": False}
    finally:
        monkeypatch.undo()
        _source.checkout_root.cache_clear()
    # this package: a checkout exactly when its directory is a git work tree's top (an unpacked sdist is not)
    assert (_source.checkout_root() == ROOT) == (ROOT / ".git").exists()


# ---------------------------------------------------------------------------------- sdist, wheel, install
def _copy_of_the_source(dst: Path) -> Path:
    """The source tree without what a checkout accumulates (history, venvs, build outputs, runs): in a
    checkout the files git tracks or would (not those it ignores), in an unpacked sdist all of them."""
    from duallora_kernels import _source

    listed = _source.git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if listed is None:
        return Path(shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")))
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the work tree is not there to copy
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    return dst


def _build(hook: str, source: Path, out: Path) -> Path:
    """PEP 517's ``build_sdist`` / ``build_wheel`` of setuptools, in this environment (no download)."""
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    name = _run([sys.executable, "-c", code], source).stdout.strip().splitlines()[-1]
    return out / name


@pytest.mark.slow
def test_the_wheel_and_sdist_install_and_run_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    sdist = _build("build_sdist", _copy_of_the_source(tmp_path / "src"), dist)
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert not [f for f in SDIST_MUST_HOLD if f not in names], [f for f in SDIST_MUST_HOLD if f not in names]
    unpacked = tmp_path / "unpacked" / sdist.name.removesuffix(".tar.gz")
    wheel = _build("build_wheel", unpacked, dist)  # the wheel from the sdist, as pip builds one
    with zipfile.ZipFile(wheel) as whl:
        shipped = set(whl.namelist())
    assert {f"duallora_kernels/csrc/{p.name}" for p in (ROOT / "csrc").iterdir()} <= shipped
    assert "duallora_kernels/py.typed" in shipped and any(n.endswith("licenses/LICENSE") for n in shipped)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], tmp_path)
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    (Path(purelib) / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([python, "-c", "import duallora_kernels.ops.cuda as c; print(c.__file__); print(c.CSRC)"], elsewhere)
    module, csrc = where.stdout.split()
    assert module.startswith(purelib) and csrc == str(Path(purelib) / "duallora_kernels" / "csrc"), where.stdout
    out = _run([python, "-c", _quick_start()], elsewhere)
    assert "tasks_done=3" in out.stdout and "task gate of the first sample" in out.stdout
    if FASHION_MNIST.exists():
        _run([venv / "bin" / "duallora", "train", *TINY_TRAIN, f"--out-dir={elsewhere / 'run'}"], elsewhere)
        assert json.loads((elsewhere / "run" / "duallora-seed0" / "results.json").read_text())["summary"]

    # the sdist's own tests, from the unpacked sdist: all of them collect, and those that read csrc/,
    # tests/cuda_emulation/, bench/ and python/ pass
    collected = _run([python, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider"], unpacked)
    assert re.search(r"^\d+ tests collected", collected.stdout, flags=re.M), collected.stdout[-2000:]
    ran = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *SDIST_TESTS], unpacked, timeout=600)
    assert re.search(r"\b\d+ passed", ran.stdout) and " failed" not in ran.stdout, ran.stdout[-2000:]
    if not FASHION_MNIST.exists():
        pytest.skip(f"the tiny `duallora train` needs Fashion-MNIST at {FASHION_MNIST.parent} (setup.sh installs it)")
