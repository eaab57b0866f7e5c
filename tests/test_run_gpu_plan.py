"""bench/run_gpu.sh, the one command a lent GPU machine runs, checked on the CPU: its dry-run plan
(steps in priority order, limits under 8 minutes, every output under $OUT, python3, commands the
CLIs accept) and its real control flow with a stand-in python (time limits, files, summary)."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from duallora_kernels.commands import bench as bench_cmd
from duallora_kernels.commands import profile_memory as mem_cmd
from duallora_kernels.harness import plan_check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "run_gpu.sh"
LEASE_S = 480  # the whole script must fit 8 minutes of a 10-minute lease
MAX_FILES = 8  # what comes back from $OUT

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _env(out: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PY", "STEPS", "DRY_RUN", "SLUG")}
    return {**env, "OUT": str(out), **extra}


def _plan(out: Path, *args: str, **env: str) -> tuple[str, list[dict]]:
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=_env(out, **env), capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    steps: list[dict] = []
    for line in proc.stdout.splitlines():
        m = re.match(r"step (\d+) (\S+): limit (\d+) s \(\+(\d+) s to stop\), signal (\w+)$", line)
        if m:
            steps.append({"n": int(m[1]), "name": m[2], "limit": int(m[3]), "grace": int(m[4]), "signal": m[5]})
        elif line.startswith("  command: "):
            steps[-1]["command"] = line[len("  command: "):]
        elif line.startswith("  writes: "):
            steps[-1]["writes"] = line[len("  writes: "):].split(", ")
    return proc.stdout, steps


def _cli_args(command: str, module: str) -> list[str]:
    words = shlex.split(command)
    return words[words.index(module) + 1:]


def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    text, steps = _plan(out, DRY_RUN="1")
    assert not out.exists()  # nothing ran, nothing was created
    assert text.splitlines()[:2] == ["run_gpu.sh plan (dry run: nothing runs)", f"OUT={out}"]
    assert [s["name"] for s in steps] == ["setup", "kernel-tests", "headline", "memory", "plan-check"]  # priority order
    assert [s["n"] for s in steps] == [1, 2, 3, 4, 5]
    total = sum(s["limit"] + s["grace"] for s in steps)
    assert total < LEASE_S
    assert re.search(rf"^total: {sum(s['limit'] for s in steps)} s of limits \+ \d+ s to stop = {total} s$", text, re.M)
    outputs = [p for s in steps for p in s["writes"]]
    outputs += re.search(r"^also writes: (.*)$", text, re.M)[1].split(", ")
    paths = {p.split(" (")[0] for p in outputs}
    assert all(Path(p).parent == out for p in paths), paths  # flat under $OUT: nothing deeper comes back
    assert len(paths) <= MAX_FILES
    for s in steps:
        words = shlex.split(s["command"])
        py = next(w for w in words if "=" not in w)
        assert py == "python3", s["command"]  # the lent machine has python3, no python
        assert not re.search(r"(^|\s)python(\s|$)", s["command"])


def test_the_plans_commands_are_what_the_issue_asks_and_the_clis_accept_them(tmp_path):
    out = tmp_path / "out"
    _, steps = _plan(out, "--dry-run")
    by = {s["name"]: s for s in steps}
    tests = by["kernel-tests"]["command"]
    assert "DUALLORA_TEST_DEVICE=cuda" in tests and "DUALLORA_AUTOTUNE=0" in tests and "TRITON_INTERPRET=0" in tests
    assert "-m pytest" in tests and "tests/test_fused_linear.py" in tests and by["kernel-tests"]["signal"] == "INT"
    head = by["headline"]["command"]
    assert head.startswith("DUALLORA_AUTOTUNE=1 ")
    args = _parse(bench_cmd, _cli_args(head, "duallora_kernels.commands.bench"))
    s = bench_cmd.settings_from(args)
    assert s["dtypes"] == ["bfloat16"] and s["ranks"] == [16, 64] and s["batch"] == 64
    assert [x.name for x in s["shapes"]] == ["vit_b.proj", "vit_b.qkv", "vit_b.fc1", "vit_b.fc2"]
    # the three Triton designs side by side, before the baselines (a step cut off keeps what ran first)
    assert s["variants"][:4] == ["frozen", "fused_single", "fused_split", "fused_tma"] and s["count_ops"]
    assert set(s["variants"][4:]) == {"fused", "unfused", "unfused_compiled", "peft"}
    assert Path(args.out).parent == out and args.out.name.endswith("-headline.json") and args.no_progress
    mem = by["memory"]["command"]
    assert mem.startswith("DUALLORA_AUTOTUNE=2 ")
    margs = _parse(mem_cmd, _cli_args(mem, "duallora_kernels.commands.profile_memory"))
    ms = mem_cmd.settings_from(margs)
    assert ms["scopes"] == ["layer", "vit"] and ms["dtypes"] == ["bfloat16"] and ms["rank"] == 16
    assert (ms["batch"], ms["vit_batch"], ms["step_batch"]) == (64, 64, 64)
    assert Path(margs.out).parent == out and margs.out.name.endswith("-memory.json")
    check = by["plan-check"]["command"]  # the planner against the GPU: every variant, two batches b and 2b
    assert check.startswith("DUALLORA_AUTOTUNE=0 ")
    cargs = plan_check.build_parser().parse_args(_cli_args(check, "duallora_kernels.harness.plan_check"))
    assert cargs.batches == "32,64" and set(cargs.variants.split(",")) == {"fused", "fused_fixed_a", "unfused", "peft", "full_ft",
                                                                  "frozen"}
    assert cargs.out.parent == out and cargs.out.name.startswith("plan-check-")
    # a subset keeps the priority order, and the setup always comes first
    _, sub = _plan(out, DRY_RUN="1", STEPS="memory,kernel-tests")
    assert [s["name"] for s in sub] == ["setup", "kernel-tests", "memory"]
    _, sub = _plan(out, DRY_RUN="1", STEPS="plan-check")
    assert [s["name"] for s in sub] == ["setup", "plan-check"]


FAKE_PY = r"""#!/usr/bin/env bash
# A stand-in for python3 on a GPU machine: answers the setup, passes the tests, writes the JSON.
out=; prev=
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
case "$*" in
  *"import xdist"*) exit 1 ;;
  -c*) echo "device: Fake GPU (capability (9, 0)), 1 GPU(s)"; echo "slug: fake-gpu" ;;
  *"-m pytest"*) echo "pytest autotune=$DUALLORA_AUTOTUNE device=$DUALLORA_TEST_DEVICE path=$PYTHONPATH"; echo "3 passed" ;;
  *commands.bench*) echo '{"rows": 1}' > "$out"; echo "bench autotune=$DUALLORA_AUTOTUNE" ;;
  *profile_memory*) echo '{"rows": 0}' > "$out"; exec sleep 30 ;;
  *plan_check*) echo '{"results": []}' > "$out"; echo "plan-check autotune=$DUALLORA_AUTOTUNE" ;;
esac
"""


def test_a_run_with_a_stand_in_python_writes_under_out_and_summarises_each_step(tmp_path):
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], env=_env(out, PY=str(fake), MEMORY_LIMIT="1"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1  # the memory step was cut off
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and all(p.is_file() for p in out.iterdir())
    date = re.search(r"date (\S+) \(UTC\)", proc.stdout)[1]
    prefix = f"fake-gpu-{date}"
    assert files == sorted([f"{prefix}-headline.json", f"{prefix}-kernel-tests.txt", f"{prefix}-memory.json",
                            f"plan-check-{prefix}.json", "run_gpu.log", "summary.txt"])
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["setup", "kernel-tests", "headline", "memory", "plan-check",
                                                        "cuda-backend"]
    assert summary[5].startswith("cuda-backend: not run")  # a second command of its own (STEPS=cuda-backend)
    assert summary[1].startswith("kernel-tests: exit 0 after") and summary[2].startswith("headline: exit 0 after")
    assert summary[3].startswith("memory: cut off at its limit (exit 124)") and str(out) in summary[3]
    assert summary[4].startswith("plan-check: exit 0 after")  # a step cut off does not stop the next one
    assert proc.stdout.rstrip().endswith("\n".join(summary))  # the last lines of the output
    log = (out / f"{prefix}-kernel-tests.txt").read_text()
    assert log.startswith("# duallora kernel tests, compiled on a GPU")
    assert "# device: Fake GPU" in log and "pytest autotune=0 device=cuda" in log and "pytest: exit 0" in log
    assert f"path={ROOT}" in log  # the package runs from the tree, not installed
    assert "bench autotune=1" in (out / "run_gpu.log").read_text()  # the headline: first kept config


def test_without_a_gpu_the_setup_step_stops_the_run_with_a_summary(tmp_path):
    fake = tmp_path / "nogpu"
    fake.write_text("#!/usr/bin/env bash\necho 'RuntimeError: Found no NVIDIA driver' >&2\nexit 1\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], env=_env(out, PY=str(fake)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert sorted(p.name for p in out.iterdir()) == ["run_gpu.log", "summary.txt"]
    assert (out / "summary.txt").read_text().startswith("setup: exit 1 after")
    assert "Found no NVIDIA driver" in proc.stdout


def test_bench_readme_gives_the_plans_limits(tmp_path):
    _, steps = _plan(tmp_path / "out", DRY_RUN="1")
    text = (ROOT / "bench" / "README.md").read_text()
    for s in steps:
        assert f"| {s['n']} {s['name']} | {s['limit']} s (+{s['grace']}" in text, s["name"]
    limits, grace = sum(s["limit"] for s in steps), sum(s["grace"] for s in steps)
    assert f"{limits} s of limits plus {grace} s to stop: {limits + grace} s at most" in text


def test_collect_copies_the_returned_files_and_renders_the_table(tmp_path):
    import sys

    from duallora_kernels._readme import markers

    back = tmp_path / "back"
    back.mkdir()
    src = ROOT / "bench" / "results" / "cpu-2026-11-30.json"
    shutil.copy(src, back / "h200-2031-01-02-headline.json")
    (back / "h200-2031-01-02-kernel-tests.txt").write_text("# log\n3 passed\n")
    (back / "run_gpu.log").write_text("not collected\n")
    check = {"schema": "duallora-plan-check/1", "device": {"name": "NVIDIA H200"}, "results": [
        {"variant": "fused", "batch": 32, "status": "ok", "measured_reserved": 3 << 30, "predicted_reserved": 3.2 * 2**30,
         "reserved_error": 0.0667, "allocated_error": -0.02}]}
    (back / "plan-check-h200-2031-01-02.json").write_text(json.dumps(check))
    results, readme = tmp_path / "results", tmp_path / "README.md"
    start, end = markers("perf-table")
    plan_start, plan_end = markers("memory-plan")
    readme.write_text(f"# x\n{start}\nold\n{end}\n{plan_start}\nold plan\n{plan_end}\n")
    proc = subprocess.run(["bash", str(SCRIPT), "--collect", "back"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=_env(tmp_path / "unused", PY=sys.executable, RESULTS_DIR=str(results),
                                                README_FILE=str(readme)))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in results.iterdir()) == ["h200-2031-01-02-headline.json", "h200-2031-01-02-kernel-tests.txt",
                                                         "plan-check-h200-2031-01-02.json"]
    text = readme.read_text()
    assert "old" not in text and "h200-2031-01-02-headline.json" in text and "vit_b.fc1 768→3072" in text
    assert "| NVIDIA H200 | fused | 32 | 3.00 GiB | 3.20 GiB | +6.7% | -2.0% | yes |" in text  # the plan check
    assert f"then: git add {results}/h200-2031-01-02-headline.json" in proc.stdout
    empty = subprocess.run(["bash", str(SCRIPT), "--collect", str(tmp_path / "nothing")], capture_output=True,
                           text=True, timeout=60, env=_env(tmp_path / "unused", RESULTS_DIR=str(results)))
    assert empty.returncode == 1 and "no *.json" in empty.stderr


def test_the_cuda_backend_step_is_a_second_command_of_its_own(tmp_path):
    # Not in the default run (the build alone may take minutes); STEPS=cuda-backend fits one command.
    out = tmp_path / "out"
    _, default = _plan(out, DRY_RUN="1")
    assert "cuda-backend" not in [s["name"] for s in default]
    _, steps = _plan(out, DRY_RUN="1", STEPS="cuda-backend")
    assert [s["name"] for s in steps] == ["setup", "cuda-backend"] and steps[1]["n"] == 6
    assert sum(s["limit"] + s["grace"] for s in steps) < 600  # one lease command
    cmd = steps[1]["command"]
    assert "TORCH_CUDA_ARCH_LIST=<capability>" in cmd and "load_extension()" in cmd
    assert "-k 'cuda_backend or (gpu_backends and cuda)'" in cmd and "DUALLORA_TEST_DEVICE=cuda" in cmd
    bench = cmd[cmd.index("DUALLORA_AUTOTUNE=2"):cmd.index(" || rc=1")]
    args = _parse(bench_cmd, _cli_args(bench, "duallora_kernels.commands.bench"))
    s = bench_cmd.settings_from(args)
    assert s["variants"] == ["frozen", "fused", "cuda"] and s["dtypes"] == ["bfloat16"] and s["batch"] == 64
    assert Path(args.out).parent == out and args.out.name.endswith("-cuda.json")
    # run with a stand-in python: the arch comes from the setup step, a failed build stops the step
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PY.replace('*"-m pytest"*)', '*"-m pytest"*) echo "arch=$TORCH_CUDA_ARCH_LIST";'))
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(SCRIPT)], env=_env(out, PY=str(fake), STEPS="cuda-backend"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "arch=9.0" in proc.stdout and "3 passed" in proc.stdout
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[-1].startswith("cuda-backend: exit 0 after") and summary[-1].endswith("-cuda.json")
    assert [line.split(":")[0] for line in summary][1:5] == ["kernel-tests", "headline", "memory", "plan-check"]


_FAKE_DEVICE = """
import sys, torch
from importlib import metadata
torch.cuda.get_device_name = lambda *a: "NVIDIA H200"
torch.cuda.get_device_capability = lambda *a: (9, 0)
torch.cuda.device_count = lambda: 1
real = metadata.version
metadata.version = lambda name: sys.argv[1] if name == "torch" else real(name)
exec(sys.argv[2])
"""


@pytest.mark.parametrize("torch_version, warned", [("2.11.0+cu130", False), ("2.10.0", True), ("2.15.0", True)])
def test_the_setup_step_warns_in_one_line_outside_the_tested_range(torch_version, warned):
    setup_py = re.search(r"^SETUP_PY='(.*?)'$", SCRIPT.read_text(), re.S | re.M)[1]
    run = subprocess.run([sys.executable, "-c",
                          _FAKE_DEVICE, torch_version, setup_py], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("device: NVIDIA H200") and lines[-1] == "slug: h200"
    warnings = [line for line in lines if "outside the tested range" in line]
    assert len(warnings) == int(warned), lines
    if warned:
        assert f"torch {torch_version} (tested 2.11-2.14)" in warnings[0]
