"""``duallora bench --amp bf16|fp16|off``: the layer problem in float32, every variant's forward
under ``torch.autocast`` (backward outside it), rows that say so (schema duallora-bench/3), and
one-line errors for what cannot run. On the CPU, tiny shapes; no time is ever asserted."""
from __future__ import annotations

import json

import pytest
import torch

from duallora_kernels.commands import bench as bench_cmd
from duallora_kernels.harness import tables
from duallora_kernels.harness.problems import LayerShape, make_problem, parse_amp
from duallora_kernels.harness.results import SCHEMA, validate_doc
from duallora_kernels.harness.timing import byte_count
from duallora_kernels.harness.variants import layer_forward, make_step
from duallora_kernels.opcount import FROZEN_STEP
from duallora_kernels.ops.reference import dual_lora_linear_reference
from helpers import rel_err

TINY = ["--shapes", "16x24", "--ranks", "4", "--batch", "1", "--warmup-ms", "1", "--rep-ms", "2", "--no-progress"]


def test_bench_amp_bf16_writes_float32_problems_run_under_autocast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DUALLORA_AUTOTUNE", "1")
    out = tmp_path / "amp.json"
    assert bench_cmd.main([*TINY, "--amp", "bf16", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert validate_doc(doc) == [] and doc["schema"] == SCHEMA == "duallora-bench/3"
    assert doc["settings"]["amp"] == "bf16" and doc["settings"]["dtypes"] == ["float32"]
    rows = [r for r in doc["results"] if r["kind"] in ("timing", "op_count", "comparison")]
    assert rows and {(r["dtype"], r["amp"]) for r in rows} == {("float32", "bfloat16")}
    timing = {(r["variant"], r["pass"]): r for r in doc["results"] if r["kind"] == "timing"}
    frozen = timing[("frozen", "fwd+bwd")]
    assert frozen["status"] == "ok" and frozen["median_ms"] > 0
    # the traffic of the matmuls' dtype (bfloat16), not of the float32 storage
    assert frozen["bytes"] == byte_count(197, 16, 24, 4, "frozen", "fwd+bwd", 2)
    counts = {r["variant"]: r for r in doc["results"] if r["kind"] == "op_count"}
    # autocast's casts are counted: x, W0 and b to bfloat16 forward, dX back to float32
    assert counts["frozen"]["device_ops"] == FROZEN_STEP + 4 and counts["frozen"]["torch_ops"]["_to_copy"] == 4
    assert counts["fused"]["status"] == "ok", counts["fused"]["reason"]
    assert counts["fused"]["torch_ops"] == {"_to_copy": 4} and counts["fused"]["budget"] is None
    text = capsys.readouterr().out
    assert "float32, autocast bfloat16" in text


def test_bench_amp_refuses_a_low_precision_dtype_and_an_unknown_mode(tmp_path, capsys):
    assert bench_cmd.main([*TINY, "--amp", "bf16", "--dtype", "bf16", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "--amp bf16" in err and "--dtype float32" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(SystemExit):
        bench_cmd.main([*TINY, "--amp", "int8"])
    with pytest.raises(ValueError, match="--amp must be one of off, bf16, fp16"):
        parse_amp("fp8")


def test_bench_amp_fp16_on_a_cpu_without_fp16_matmul_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    assert bench_cmd.main([*TINY, "--amp", "fp16", "--device", "cpu", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no native float16 matrix multiply" in err and "--amp bf16" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("variant", ["frozen", "unfused", "fused"])
def test_every_variant_computes_in_the_autocast_dtype(variant, gen):
    p = make_problem(LayerShape("custom", 32, 24), 4, "float32", "cpu", m=10, buffers=1, seed=3, amp=torch.bfloat16)
    assert p.xs[0].dtype == p.weight.dtype == p.orth_a.dtype == torch.float32 and p.dys[0].dtype == torch.bfloat16
    f, trainable = layer_forward(variant, p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f(p.xs[0])
    assert y.dtype == torch.bfloat16
    low64 = lambda t: t.detach().bfloat16().double()  # noqa: E731
    if variant == "frozen":
        ref = low64(p.xs[0]) @ low64(p.weight).T + low64(p.bias)
    else:
        ref = dual_lora_linear_reference(
            low64(p.xs[0]), low64(p.weight), low64(p.bias), orth_a=p.orth_a.double(), orth_b=p.orth_b.double(),
            res_a=p.res_a.double(), res_b=p.res_b.double(), gate=p.gate.double(), basis=p.basis.double(),
            orth_scale=p.orth_scale, res_scale=p.res_scale)
    assert rel_err(y, ref) <= 2e-2
    # the timed step: forward under autocast, backward outside; gradients in the parameters' dtype
    make_step(variant, "fwd+bwd", p)()
    assert p.xs[0].grad.dtype == torch.float32 and torch.isfinite(p.xs[0].grad).all()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in trainable)


def test_problems_under_amp_must_be_float32():
    with pytest.raises(ValueError, match="must be float32, got bfloat16"):
        make_problem(LayerShape("custom", 8, 8), 2, "bfloat16", "cpu", m=3, buffers=1, amp=torch.bfloat16)


def test_tables_label_autocast_rows_and_read_rows_without_amp():
    row = {"dtype": "float32", "amp": "bfloat16"}
    assert tables.dtype_label(row) == "float32, autocast bfloat16"
    assert tables.dtype_label({"dtype": "bfloat16"}) == "bfloat16"  # schema /1 and /2 rows ran without autocast
    assert tables.dtype_label({"dtype": "float32", "amp": "off"}) == "float32"
