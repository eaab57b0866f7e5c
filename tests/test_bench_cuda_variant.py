"""``duallora bench``'s ``cuda`` variant (the CUDA C++ backend): what it runs, and why it is
skipped where it cannot run -- said before anything is built. No time is ever asserted."""
from __future__ import annotations

import json

import pytest
import torch

from duallora_kernels.commands import bench as bench_cmd
from duallora_kernels.harness import variants
from duallora_kernels.harness.problems import LayerShape, make_problem
from duallora_kernels.harness.timing import comparison_rows
from duallora_kernels.ops import cuda, cuda_build


def test_cuda_variant_is_skipped_on_the_cpu_with_its_reason(tmp_path):
    out = tmp_path / "b.json"
    assert bench_cmd.main(["--shapes", "16x24", "--ranks", "4", "--batch", "1", "--warmup-ms", "1", "--rep-ms", "2",
                           "--dtype", "float32", "--variants", "frozen,cuda", "--no-progress", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["results"]
            if r["kind"] in ("timing", "op_count") and r["variant"] == "cuda"]
    assert len(rows) == 3 and all(r["status"] == "skipped" and "needs a CUDA device" in r["reason"] for r in rows)


def test_cuda_variant_without_nvcc_or_a_prebuilt_extension_says_what_to_do(monkeypatch):
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda *a, **k: None)
    reason = variants.cuda_unavailable(torch.device("cuda"))
    assert reason == cuda_build.missing_toolchain_message(cuda.CSRC) and len(reason.splitlines()) == 1


def test_cuda_variant_runs_the_op_with_the_cuda_backend(monkeypatch):
    seen = []

    def fake_op(x, weight, bias, *, backend, **kw):
        seen.append(backend)
        return x @ weight.T + bias

    import duallora_kernels.ops as ops

    monkeypatch.setattr(ops, "dual_lora_linear", fake_op)
    p = make_problem(LayerShape("custom", 8, 6), 2, "float32", "cpu", m=3, buffers=1)
    f, trainable = variants.layer_forward("cuda", p)
    torch.testing.assert_close(f(p.xs[0]), p.xs[0] @ p.weight.T + p.bias)
    assert seen == ["cuda"] and trainable == p.adapters


def test_comparison_rows_carry_the_cuda_ratios():
    base = {"kind": "timing", "layer": "x", "shape": "8x6", "d": 8, "n": 6, "batch": 1, "m": 3, "dtype": "bfloat16",
            "amp": "off", "pass": "fwd+bwd"}
    rows = [{**base, "variant": v, "rank": None if v == "frozen" else 4, "median_ms": ms}
            for v, ms in (("frozen", 1.0), ("fused", 1.1), ("cuda", 1.5))]
    (c,) = comparison_rows(rows)
    assert c["cuda_ms"] == 1.5 and abs(c["cuda_over_frozen"] - 1.5) < 1e-12 and abs(c["cuda_over_fused"] - 1.5 / 1.1) < 1e-12
    assert c["goal_cuda_over_frozen"] is False


def test_the_bench_and_the_loader_give_the_same_reason_without_a_toolchain(monkeypatch):
    # one decision (ops.cuda.extension_unavailable): the bench skips with the message the loader raises
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda *a, **k: None)
    monkeypatch.setattr(cuda, "_ext", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = variants.cuda_unavailable(torch.device("cuda"))
    assert reason and reason == cuda.extension_unavailable()
    try:
        cuda.load_extension()
    except RuntimeError as err:
        assert str(err) == reason
    else:
        raise AssertionError("load_extension built or imported an extension without nvcc or _C")


def test_with_nvcc_but_without_the_sources_the_bench_skips_before_any_build(monkeypatch, tmp_path):
    # an installed copy whose csrc/ did not ship (issue 24): nvcc alone used to make the variant look runnable
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda *a, **k: tmp_path / "nvcc")
    monkeypatch.setattr(cuda, "_ext", None)
    monkeypatch.setattr(cuda, "CSRC", tmp_path / "csrc")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = variants.cuda_unavailable(torch.device("cuda"))
    assert reason == cuda.extension_unavailable() and len(reason.splitlines()) == 1
    assert f"are not in {tmp_path / 'csrc'}" in reason and "bindings.cpp" in reason
    monkeypatch.setattr(cuda, "build_extension", lambda: pytest.fail("a build was started"))
    with pytest.raises(RuntimeError) as err:
        cuda.load_extension()
    assert str(err.value) == reason


def test_the_sources_are_found_where_the_package_runs_from():
    # a checkout: its csrc/; a wheel: the copy setup.py ships in the package (tests/test_packaging.py)
    assert all((cuda.CSRC / s).is_file() for s in cuda.SOURCES)
