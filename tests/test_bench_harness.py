"""The benchmark / memory-profiling harness itself (duallora_kernels.benchmark, the bench and
profile-memory commands, bench/render_table.py), on tiny shapes. No time is ever asserted."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duallora_kernels import benchmark as B
from duallora_kernels._readme import markers
from duallora_kernels.commands import bench as bench_cmd
from duallora_kernels.commands import profile_memory as mem_cmd
from duallora_kernels.ops import dual_lora_linear

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--img-size", "32"]


def _render_module():
    spec = importlib.util.spec_from_file_location("render_table", ROOT / "bench" / "render_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    p = module.add_parser(sub)
    assert isinstance(p, argparse.ArgumentParser)
    name = "bench" if module is bench_cmd else "profile-memory"
    args = parser.parse_args([name, *argv])
    args._argv = argv
    return args


# ----------------------------------------------------------------------------- saved bytes
@pytest.mark.parametrize("lead", [(), (3,)], ids=["2d", "3d"])
@pytest.mark.parametrize("weight_grad, x_grad", [(False, True), (True, True), (True, False), (False, False)])
def test_saved_bytes_of_nn_linear_match_a_hand_count(lead, weight_grad, x_grad):
    m, d, n = 5, 7, 4
    lin = nn.Linear(d, n)
    lin.requires_grad_(weight_grad)
    x = torch.randn(*lead, m, d, requires_grad=x_grad)
    got = B.count_saved(lambda: lin(x), exclude=lin.parameters())
    w_bytes, x_bytes = n * d * 4, x.numel() * 4
    # What autograd keeps: W (as W^T, a view of W's storage) only to compute dX; x (or its 2-D
    # view, x's storage) only to compute dW. The bias gradient needs nothing.
    want_w = w_bytes if x_grad else 0
    want_x = x_bytes if weight_grad else 0
    assert got.saved_bytes == want_w + want_x
    assert got.activation_bytes == want_x  # W is a parameter: not an activation
    assert got.storages == (want_w > 0) + (want_x > 0)


def test_a_storage_saved_twice_or_through_views_counts_once_at_full_size():
    x = torch.randn(6, 4, requires_grad=True)
    sq = B.count_saved(lambda: x * x)  # mul saves both operands: the same tensor
    assert sq.tensors == 2 and sq.storages == 1 and sq.saved_bytes == 6 * 4 * 4
    y = torch.randn(6, 4, requires_grad=True)
    views = B.count_saved(lambda: y[:2] * y[2:4])  # two views of y: y's whole storage, once
    assert views.storages == 1 and views.saved_bytes == 6 * 4 * 4


def test_layer_saved_bytes_of_frozen_and_full_finetune_layers():
    p = B.make_problem(B.LayerShape("custom", 12, 20), 4, "float32", "cpu", m=9, buffers=1)
    frozen = B.layer_saved_bytes("frozen", p)
    assert (frozen.saved_bytes, frozen.activation_bytes) == (20 * 12 * 4, 0)
    full = B.layer_saved_bytes("full_ft", p)
    assert (full.saved_bytes, full.activation_bytes) == (20 * 12 * 4 + 9 * 12 * 4, 9 * 12 * 4)
    unfused = B.layer_saved_bytes("unfused", p)
    assert unfused.activation_bytes >= full.activation_bytes  # it must keep x for dA too


def test_fused_op_saves_no_more_activation_bytes_than_the_unfused_composition():
    # backend="triton" in the interpreter, bfloat16. The fused op keeps only x, T (m x r, in x's
    # dtype) and the gate (m x 1, not a parameter here): no stacked A/B copies (fused_linear's
    # "What is saved").
    m, d, n, r = 20, 48, 40, 8
    p = B.make_problem(B.LayerShape("custom", d, n), r, "bfloat16", "cpu", m=m, buffers=1)
    fused, unfused = B.layer_saved_bytes("fused", p), B.layer_saved_bytes("unfused", p)
    assert fused.activation_bytes <= unfused.activation_bytes
    assert fused.activation_bytes == (m * d + m * r + m * 1) * 2


# ----------------------------------------------------------------------------- the unfused baseline is honest
def test_unfused_variant_equals_the_reference_op_forward_and_backward():
    p = B.make_problem(B.LayerShape("custom", 12, 10), 6, torch.float64, "cpu", m=9, buffers=1, seed=3)
    x = p.xs[0]
    kw = dict(orth_a=p.orth_a, orth_b=p.orth_b, res_a=p.res_a, res_b=p.res_b, basis=p.basis, gate=p.gate,
              orth_scale=p.orth_scale, res_scale=p.res_scale)
    f, trainable = B.layer_forward("unfused", p)
    dy = p.dys[0]
    y_u = f(x)
    g_u = torch.autograd.grad(y_u, [x, *trainable], dy)
    y_r = dual_lora_linear(x, p.weight, p.bias, backend="torch", **kw)
    g_r = torch.autograd.grad(y_r, [x, *trainable], dy)
    torch.testing.assert_close(y_u, y_r, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_u, g_r):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    f0, _ = B.layer_forward("frozen", p)
    torch.testing.assert_close(f0(x), F.linear(x, p.weight, p.bias))


def test_unfused_vit_equals_the_dual_lora_vit():
    kw = dict(img_size=32, depth=1, embed_dim=32, num_heads=2)
    fused = B.build_vit("vit_base_patch16_224", num_classes=5, dtype="float64", **kw)
    B.prepare_dual_lora(fused, 6, backend="torch")
    unfused = B.build_vit_variant("unfused", "vit_base_patch16_224", rank=6, dtype="float64", num_classes=5, **kw)
    assert sum(isinstance(m, B.UnfusedDualLoRALinear) for m in unfused.modules()) == 4
    fused.train()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y_f, y_u = fused(images), unfused(images)
    torch.testing.assert_close(y_f, y_u, rtol=1e-10, atol=1e-12)
    y_f.square().sum().backward()
    y_u.square().sum().backward()
    grads_u = {n: p.grad for n, p in unfused.named_parameters() if p.requires_grad}
    grads_f = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    assert set(grads_u) == set(grads_f) and any("orth_a" in n for n in grads_u)
    for n in grads_f:
        torch.testing.assert_close(grads_u[n], grads_f[n], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- JSON from the commands
def test_bench_command_writes_a_valid_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = _parse(bench_cmd, ["--shapes", "16x24", "--ranks", "4", "--batch", "1", "--dtype", "float32",
                              "--warmup-ms", "1", "--rep-ms", "2", "--no-progress", "--out", str(out)])
    assert bench_cmd.run(args) == 0
    doc = json.loads(out.read_text())
    assert B.validate_doc(doc) == []
    assert doc["schema"] == B.SCHEMA and doc["command"] == "bench" and doc["complete"] is True
    assert doc["command_line"].startswith("duallora bench --shapes 16x24")
    assert doc["device"]["type"] == "cpu" and isinstance(doc["device"]["name"], str)
    assert isinstance(doc["versions"]["torch"], str)
    assert doc["git"]["commit"] is None or len(doc["git"]["commit"]) == 40
    timing = {(r["variant"], r["pass"]): r for r in doc["results"] if r["kind"] == "timing"}
    assert set(timing) == {(v, p) for v in B.VARIANTS for p in B.PASSES}
    for p in B.PASSES:
        for v in ("frozen", "unfused"):
            r = timing[(v, p)]
            assert r["status"] == "ok" and r["median_ms"] > 0 and r["tflops"] > 0 and r["m"] == 197
        assert timing[("fused", p)]["status"] == "skipped" and "CUDA" in timing[("fused", p)]["reason"]
    comps = [r for r in doc["results"] if r["kind"] == "comparison"]
    assert len(comps) == 2 and all(isinstance(c["unfused_over_frozen"], float) for c in comps)
    assert "unfused/fused" in capsys.readouterr().out


def test_profile_memory_command_writes_a_valid_json(tmp_path):
    out = tmp_path / "m.json"
    args = _parse(mem_cmd, ["--shapes", "16x24", "--batch", "1", "--vit-batch", "1", "--rank", "4", "--dtype", "float32",
                            "--variants", "frozen,unfused,fused,full_ft", "--budgets", "8", "--no-progress",
                            "--out", str(out), *TINY_VIT])
    assert mem_cmd.run(args) == 0
    doc = json.loads(out.read_text())
    assert B.validate_doc(doc) == []
    saved = {(r["scope"], r["variant"]): r for r in doc["results"] if r["kind"] == "saved_bytes"}
    for scope in ("layer", "vit"):
        for v in ("frozen", "unfused", "fused", "full_ft"):  # fused runs here under TRITON_INTERPRET=1
            assert saved[(scope, v)]["status"] == "ok", saved[(scope, v)]["reason"]
            assert isinstance(saved[(scope, v)]["activation_bytes"], int)
    assert saved[("layer", "frozen")]["saved_bytes"] == 24 * 16 * 4
    assert saved[("layer", "frozen")]["activation_bytes"] == 0
    assert saved[("vit", "frozen")]["activation_over_frozen"] == 1.0
    others = [r for r in doc["results"] if r["kind"] in ("step_memory", "max_batch")]
    assert others and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in others)


def test_validate_doc_names_missing_and_mistyped_keys():
    doc = {"schema": B.SCHEMA, "results": [{"kind": "timing", "shape": 3}, {"kind": "nope"}]}
    errors = B.validate_doc(doc)
    text = "\n".join(errors)
    assert "missing key 'device'" in text and "'shape' is int" in text and "results[1]" in text
    assert B.validate_doc([]) != []


# ----------------------------------------------------------------------------- renderer
def _sample_doc() -> dict:
    doc = B.run_metadata("bench", ["--quick"], torch.device("cpu"), {})
    doc["complete"] = True
    doc["device"].update(type="cuda", name="NVIDIA H100 80GB HBM3", slug="h100-80gb-hbm3")
    doc["date"] = "2031-01-02T03:04:05+00:00"
    rows = []
    for variant, ms in (("frozen", 1.0), ("fused", 1.08), ("unfused", 2.5)):
        rows.append({"kind": "timing", "layer": "vit_b.fc1", "shape": "768x3072", "d": 768, "n": 3072, "batch": 64,
                     "m": 12608, "rank": None if variant == "frozen" else 16, "dtype": "bfloat16", "pass": "fwd+bwd",
                     "variant": variant, "status": "ok", "reason": None, "median_ms": ms, "flops": 1, "bytes": 1,
                     "tflops": 1.0, "gbps": 1.0})
    rows.append({**rows[-1], "variant": "peft", "status": "skipped", "reason": "peft is not installed",
                 "median_ms": None, "tflops": None, "gbps": None})
    return {**doc, "results": rows + B.comparison_rows(rows)}


def test_renderer_fills_the_readme_between_the_markers(tmp_path):
    rt = _render_module()
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    doc = _sample_doc()
    assert B.validate_doc(doc) == []
    (results / "h100-2031-01-02.json").write_text(json.dumps(doc))
    (results / "broken.json").write_text("{")  # reported and left out
    readme = tmp_path / "README.md"
    start, end = markers("perf-table")
    readme.write_text(f"# x\n\n{start}\nold\n{end}\n\ntail\n")
    assert rt.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n") and text.endswith("\ntail\n") and "old" not in text
    section = text[text.index(start):text.index(end)]
    row = next(line for line in section.splitlines() if "vit_b.fc1 768→3072" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:10] == ["H100 80GB HBM3, 2031-01-02", "bfloat16", "vit_b.fc1 768→3072", "12608", "16",
                          "1.000", "1.080", "2.500", "-", "1.08x ✓"]
    assert cells[10] == "2.31x ✓" and "h100-2031-01-02.json" in cells[-1]
    assert rt.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    readme.write_text(text.replace("1.080", "9.999"))
    assert rt.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1


def test_renderer_needs_the_markers():
    from duallora_kernels._readme import splice

    with pytest.raises(ValueError, match="markers"):
        splice("no markers here", "x", "perf-table")


# ----------------------------------------------------------------------------- small pieces
def test_search_largest_finds_the_boundary():
    for limit in (0, 1, 2, 37, 64, 100, 4096):
        calls = []

        def fits(b, limit=limit):
            calls.append(b)
            return b <= limit

        assert B.search_largest(fits, start=16, cap=4096) == limit
        assert len(calls) <= 2 * 13  # doubling + bisection, never a linear scan


def test_largest_batch_catches_oom_and_resets_the_memory_fraction(monkeypatch):
    from types import SimpleNamespace

    fractions = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=64 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i=None: fractions.append(f))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def fake_step(model, opt, batch, num_classes, seed=0):
        if batch > 100:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if batch == 0:
            raise RuntimeError("a real bug")

    monkeypatch.setattr(B, "training_step", fake_step)
    got = B.largest_batch(nn.Linear(2, 2), 8 * 2**30, 10, torch.device("cuda", 0))
    assert got["max_batch"] == 100 and got["trials"]["101"] is False and got["trials"]["100"] is True
    assert fractions == [0.125, 1.0]
    monkeypatch.setattr(B, "search_largest", lambda fits, start, cap: fits(0))
    with pytest.raises(RuntimeError, match="a real bug"):  # not an OOM: raised, and the fraction still reset
        B.largest_batch(nn.Linear(2, 2), 8 * 2**30, 10, torch.device("cuda", 0))
    assert fractions[-1] == 1.0


def test_counts_parsers_and_devices():
    assert B.flop_count(10, 3, 5, 4, "frozen", "fwd") == 2 * 10 * 3 * 5
    assert B.flop_count(10, 3, 5, 4, "frozen", "fwd+bwd") == 4 * 10 * 3 * 5
    assert B.flop_count(10, 3, 5, 4, "fused", "fwd+bwd") == 4 * 10 * 3 * 5 + 6 * 10 * 4 * (3 + 5)
    assert B.byte_count(10, 3, 5, 4, "frozen", "fwd", 2) == 2 * (30 + 15 + 50 + 5)
    assert B.parse_shapes("vit_b.fc1, 768x3072") == [B.LayerShape("vit_b.fc1", 768, 3072)]
    assert B.parse_shapes("12->7")[0] == B.LayerShape("custom", 12, 7)
    assert len(B.parse_shapes("all")) == 6
    with pytest.raises(ValueError, match="neither"):
        B.parse_shapes("vit_q.fc9")
    assert B.parse_dtypes("bf16,fp32") == ["bfloat16", "float32"]
    assert B.split_rank(5) == (3, 2)
    assert B.device_peaks("NVIDIA H200").bandwidth == 4.8e12
    assert B.device_peaks("NVIDIA H100 80GB HBM3").flops["bfloat16"] == 989e12
    assert B.device_peaks("NVIDIA H100 PCIe").bandwidth == 2.0e12
    assert B.device_peaks("NVIDIA GeForce RTX 4090") is None
    assert B.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    out = B.default_out_path(torch.device("cpu"), "-memory")
    assert out.parent.name == "results" and out.name.startswith("cpu-") and out.name.endswith("-memory.json")


def test_quick_flag_selects_the_small_matrix():
    s = bench_cmd.settings_from(_parse(bench_cmd, ["--quick"]))
    assert [x.key for x in s["shapes"]] == list(B.QUICK["shapes"]) and s["batch"] == B.QUICK["batch"]
    s = bench_cmd.settings_from(_parse(bench_cmd, []))
    assert len(s["shapes"]) == 6 and s["ranks"] == list(B.RANKS) and s["batch"] == 64
    assert bench_cmd.run(_parse(bench_cmd, ["--variants", "fast"])) == 2
