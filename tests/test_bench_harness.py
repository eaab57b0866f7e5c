"""The benchmark / memory-profiling harness itself (duallora_kernels.harness, the bench and
profile-memory commands, the README's performance section), on tiny shapes. No time is ever asserted."""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duallora_kernels import readme as readme_cmd
from duallora_kernels.harness import device_memory, device_ops, devices, tables
from duallora_kernels.harness.device_memory import largest_batch, search_largest
from duallora_kernels.harness.devices import device_peaks, device_slug
from duallora_kernels.ops.fused_linear_cost import floor_ratio
from duallora_kernels.harness.memory_profile import add_ratios, needs_cuda_row, saved_row
from duallora_kernels.harness.problems import QUICK, RANKS, LayerShape, make_problem, parse_dtypes, parse_shapes, split_rank
from duallora_kernels.harness.results import READABLE_SCHEMAS, SCHEMA, default_out_path, run_metadata, validate_doc
from duallora_kernels.harness.saved_bytes import SavedBytes, count_saved, layer_saved_bytes
from duallora_kernels.harness.timing import byte_count, comparison_rows, flop_count
from duallora_kernels.harness.variants import PASSES, VARIANTS, UnfusedDualLoRALinear, layer_forward
from duallora_kernels.harness.vit_models import build_vit, build_vit_variant, prepare_dual_lora
from duallora_kernels._readme import markers
from duallora_kernels.commands import bench as bench_cmd
from duallora_kernels.commands import profile_memory as mem_cmd
from duallora_kernels.opcount import FROZEN_STEP, STEP_BUDGET
from duallora_kernels.ops import dual_lora_linear

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--img-size", "32"]
# The unfused composition's forward+backward, by hand: forward 15 ops (the projections 2 mm + sub
# and 2 mm; F.linear's addmm; x A_o^T, then B_o^T: 2 mm, a mul by s_o, an add; x A_r^T, * gate,
# * s_r, B_r^T: 2 mm, 2 mul, an add), backward 20 (dX = dY W0: 1 mm; each of the 4 adapter
# matmuls x A^T / T B^T: 2 mm; the 2 projections' mm chains: 2 mm each; 3 mul for the scales and
# the gate, a neg for the projection's minus, 3 adds accumulating dX (3 terms) and dC_o (2 terms)).
UNFUSED_STEP = 35


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
    got = count_saved(lambda: lin(x), exclude=lin.parameters())
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
    sq = count_saved(lambda: x * x)  # mul saves both operands: the same tensor
    assert sq.tensors == 2 and sq.storages == 1 and sq.saved_bytes == 6 * 4 * 4
    y = torch.randn(6, 4, requires_grad=True)
    views = count_saved(lambda: y[:2] * y[2:4])  # two views of y: y's whole storage, once
    assert views.storages == 1 and views.saved_bytes == 6 * 4 * 4


def test_layer_saved_bytes_of_frozen_and_full_finetune_layers():
    p = make_problem(LayerShape("custom", 12, 20), 4, "float32", "cpu", m=9, buffers=1)
    frozen = layer_saved_bytes("frozen", p)
    assert (frozen.saved_bytes, frozen.activation_bytes) == (20 * 12 * 4, 0)
    full = layer_saved_bytes("full_ft", p)
    assert (full.saved_bytes, full.activation_bytes) == (20 * 12 * 4 + 9 * 12 * 4, 9 * 12 * 4)
    unfused = layer_saved_bytes("unfused", p)
    assert unfused.activation_bytes >= full.activation_bytes  # it must keep x for dA too


def test_fused_op_saves_no_more_activation_bytes_than_the_unfused_composition():
    # backend="triton" in the interpreter, bfloat16. The fused op keeps x, T (m x r, in x's dtype),
    # the gate (m x 1, not a parameter here) and the assembled A (r x d), which spares the backward
    # two launches; B^T is rebuilt (fused_linear's "What is saved").
    m, d, n, r = 20, 48, 40, 8
    p = make_problem(LayerShape("custom", d, n), r, "bfloat16", "cpu", m=m, buffers=1)
    fused, unfused = layer_saved_bytes("fused", p), layer_saved_bytes("unfused", p)
    assert fused.activation_bytes <= unfused.activation_bytes
    assert fused.activation_bytes == (m * d + m * r + m * 1 + r * d) * 2


# ----------------------------------------------------------------------------- the unfused baseline is honest
def test_unfused_variant_equals_the_reference_op_forward_and_backward():
    p = make_problem(LayerShape("custom", 12, 10), 6, torch.float64, "cpu", m=9, buffers=1, seed=3)
    x = p.xs[0]
    kw = dict(orth_a=p.orth_a, orth_b=p.orth_b, res_a=p.res_a, res_b=p.res_b, basis=p.basis, gate=p.gate,
              orth_scale=p.orth_scale, res_scale=p.res_scale)
    f, trainable = layer_forward("unfused", p)
    dy = p.dys[0]
    y_u = f(x)
    g_u = torch.autograd.grad(y_u, [x, *trainable], dy)
    y_r = dual_lora_linear(x, p.weight, p.bias, backend="torch", **kw)
    g_r = torch.autograd.grad(y_r, [x, *trainable], dy)
    torch.testing.assert_close(y_u, y_r, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_u, g_r):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    f0, _ = layer_forward("frozen", p)
    torch.testing.assert_close(f0(x), F.linear(x, p.weight, p.bias))


def test_unfused_vit_equals_the_dual_lora_vit():
    kw = dict(img_size=32, depth=1, embed_dim=32, num_heads=2)
    fused = build_vit("vit_base_patch16_224", num_classes=5, dtype="float64", **kw)
    prepare_dual_lora(fused, 6, backend="torch")
    unfused = build_vit_variant("unfused", "vit_base_patch16_224", rank=6, dtype="float64", num_classes=5, **kw)
    assert sum(isinstance(m, UnfusedDualLoRALinear) for m in unfused.modules()) == 4
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
def test_bench_command_writes_a_valid_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DUALLORA_AUTOTUNE", "2")  # recorded: the fused timings depend on it
    out = tmp_path / "b.json"
    args = _parse(bench_cmd, ["--shapes", "16x24", "--ranks", "4", "--batch", "1", "--dtype", "float32",
                              "--warmup-ms", "1", "--rep-ms", "2", "--no-progress", "--out", str(out)])
    assert bench_cmd.run(args) == 0
    doc = json.loads(out.read_text())
    assert validate_doc(doc) == []
    assert doc["schema"] == SCHEMA and doc["command"] == "bench" and doc["complete"] is True
    assert doc["command_line"].startswith("duallora bench --shapes 16x24")
    assert doc["device"]["type"] == "cpu" and isinstance(doc["device"]["name"], str)
    assert isinstance(doc["versions"]["torch"], str)
    assert doc["git"]["commit"] is None or len(doc["git"]["commit"]) == 40
    timing = {(r["variant"], r["pass"]): r for r in doc["results"] if r["kind"] == "timing"}
    assert set(timing) == {(v, p) for v in VARIANTS for p in PASSES}
    for p in PASSES:
        for v in ("frozen", "unfused"):
            r = timing[(v, p)]
            assert r["status"] == "ok" and r["median_ms"] > 0 and r["tflops"] > 0 and r["m"] == 197
        assert timing[("fused", p)]["status"] == "skipped" and "CUDA" in timing[("fused", p)]["reason"]
        compiled = timing[("unfused_compiled", p)]
        assert compiled["status"] == "skipped" and "CUDA device only" in compiled["reason"]
    # one op_count row per variant: the fused kernel counted through the interpreter (TRITON_INTERPRET=1 here)
    counts = {r["variant"]: r for r in doc["results"] if r["kind"] == "op_count"}
    assert set(counts) == set(VARIANTS)
    assert counts["frozen"]["device_ops"] == FROZEN_STEP == 2 and counts["frozen"]["method"] == "opcount"
    assert counts["unfused"]["device_ops"] == UNFUSED_STEP
    assert counts["fused"]["status"] == "ok", counts["fused"]["reason"]
    assert counts["fused"]["kernels"] and counts["fused"]["device_ops"] == (
        sum(counts["fused"]["kernels"].values()) + sum(counts["fused"]["torch_ops"].values()))
    assert counts["fused"]["syncs"] == [] and counts["fused"]["budget"] == STEP_BUDGET
    # the layer's step (the basis validated where it is made, check_basis=False), as the budget counts it
    assert counts["fused"]["device_ops"] <= STEP_BUDGET and "_assert_async" not in counts["fused"]["torch_ops"]
    assert counts["unfused_compiled"]["status"] == "skipped" and counts["unfused_compiled"]["device_ops"] is None
    comps = [r for r in doc["results"] if r["kind"] == "comparison"]
    assert len(comps) == 2 and all(isinstance(c["unfused_over_frozen"], float) for c in comps)
    bwd = next(c for c in comps if c["pass"] == "fwd+bwd")
    assert (bwd["frozen_ops"], bwd["unfused_ops"], bwd["unfused_compiled_ops"]) == (2, UNFUSED_STEP, None)
    assert bwd["fused_ops"] == counts["fused"]["device_ops"]
    out_text = capsys.readouterr().out
    assert "unfused/fused" in out_text and "device operations per forward+backward" in out_text
    assert doc["settings"]["threads"] == torch.get_num_threads() and "threads: " in out_text
    assert doc["settings"]["duallora_autotune"] == "2"


def test_profile_memory_command_writes_a_valid_json(tmp_path):
    out = tmp_path / "m.json"
    args = _parse(mem_cmd, ["--shapes", "16x24", "--batch", "1", "--vit-batch", "1", "--rank", "4", "--dtype", "float32",
                            "--variants", "frozen,unfused,fused,full_ft", "--budgets", "8", "--no-progress",
                            "--out", str(out), *TINY_VIT])
    assert mem_cmd.run(args) == 0
    doc = json.loads(out.read_text())
    assert validate_doc(doc) == []
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
    doc = {"schema": SCHEMA, "results": [{"kind": "timing", "shape": 3}, {"kind": "nope"}]}
    errors = validate_doc(doc)
    text = "\n".join(errors)
    assert "missing key 'device'" in text and "'shape' is int" in text and "results[1]" in text
    assert validate_doc([]) != []


# ----------------------------------------------------------------------------- renderer
def _sample_doc() -> dict:
    doc = run_metadata("bench", ["--quick"], torch.device("cpu"), {})
    doc["complete"] = True
    doc["device"].update(type="cuda", name="NVIDIA H100 80GB HBM3", slug="h100-80gb-hbm3")
    doc["date"] = "2031-01-02T03:04:05+00:00"
    rows = []
    for variant, ms in (("frozen", 1.0), ("fused", 1.08), ("fused_fixed_a", 1.04), ("unfused", 2.5),
                        ("unfused_compiled", 1.5), ("cuda", 1.4), ("fused_single", 1.2), ("fused_split", 1.08),
                        ("fused_tma", 1.05)):
        rows.append({"kind": "timing", "layer": "vit_b.fc1", "shape": "768x3072", "d": 768, "n": 3072, "batch": 64,
                     "m": 12608, "rank": None if variant == "frozen" else 16, "dtype": "bfloat16", "amp": "off",
                     "pass": "fwd+bwd", "variant": variant, "status": "ok", "reason": None, "median_ms": ms, "flops": 1, "bytes": 1,
                     "tflops": 1.0, "gbps": 1.0})
    rows.append({**rows[-1], "variant": "peft", "status": "skipped", "reason": "peft is not installed",
                 "median_ms": None, "tflops": None, "gbps": None})
    for variant, n in (("frozen", 2), ("fused", 7), ("fused_fixed_a", 6), ("unfused", 35), ("unfused_compiled", 9),
                       ("peft", None)):
        rows.append({"kind": "op_count", "layer": "vit_b.fc1", "shape": "768x3072", "d": 768, "n": 3072, "batch": 64,
                     "m": 12608, "rank": None if variant == "frozen" else 16, "dtype": "bfloat16", "amp": "off",
                     "pass": "fwd+bwd", "variant": variant, "status": "ok" if n else "skipped", "reason": None if n else "peft is not installed",
                     "device_ops": n, "method": "torch.profiler" if n else None, "budget": None, "kernels": None,
                     "torch_ops": None, "syncs": None})
    peaks = device_peaks("NVIDIA H100 80GB HBM3")
    doc["device"]["peaks"] = {"source": peaks.name, "flops": peaks.flops, "bandwidth": peaks.bandwidth}
    return {**doc, "results": rows + comparison_rows(rows, doc["device"]["peaks"])}


def test_renderer_fills_the_readme_between_the_markers(tmp_path):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    doc = _sample_doc()
    assert validate_doc(doc) == []
    (results / "h100-2031-01-02.json").write_text(json.dumps(doc))
    (results / "broken.json").write_text("{")  # reported and left out
    readme = tmp_path / "README.md"
    start, end = markers("perf-table")
    readme.write_text(f"# x\n\n{start}\nold\n{end}\n\ntail\n")
    perf = ["--section", "perf-table", "--bench-results", str(results), "--readme", str(readme)]
    assert readme_cmd.main(perf) == 0
    text = readme.read_text()
    assert text.startswith("# x\n") and text.endswith("\ntail\n") and "old" not in text
    section = text[text.index(start):text.index(end)]
    speed, ops = [line for line in section.splitlines() if "vit_b.fc1 768→3072" in line]
    cells = [c.strip() for c in speed.strip("|").split("|")]
    floor = floor_ratio(12608, 3072, 768, 16, device_peaks("NVIDIA H100 80GB HBM3"))
    assert 1.0 < floor < 1.1  # rank 16 on fc1: a few percent more work than the frozen layer
    assert cells[:16] == ["H100 80GB HBM3, 2031-01-02", "bfloat16", "vit_b.fc1 768→3072", "12608", "16",
                          "1.000", f"{floor:.2f}x", "1.080", "1.200", "1.080", "1.050", "1.040", "2.500", "1.500", "-",
                          "1.400"]
    over = 1.08 / floor
    assert cells[16:22] == [f"{over:.2f}x {'✓' if over <= 1.05 else '✗'}", "1.08x", "1.04x", "2.31x ✓", "1.39x ✓",
                            "1.40x ✗"]
    assert "h100-2031-01-02.json" in cells[-1]
    assert "fused/floor (goal ≤ 1.05)" in section and "compiled/fused (goal ≥ 1.3)" in section
    assert "cuda/frozen (goal ≤ 1.35)" in section
    # device operations: one column per counted variant in VARIANTS' order, then the method
    cells = [c.strip() for c in ops.strip("|").split("|")]
    assert cells[4:] == ["16", "7 ✓", "6 ✓", "35", "2 ✓", "-", "9", "torch.profiler",
                         "[h100-2031-01-02.json](bench/results/h100-2031-01-02.json)"]
    assert "fused (budget ≤ 8)" in section
    assert readme_cmd.main([*perf, "--check"]) == 0
    readme.write_text(text.replace("1.080", "9.999"))
    assert readme_cmd.main([*perf, "--check"]) == 1


def test_ops_table_marks_the_budgets():
    doc = _sample_doc()
    for r in doc["results"]:
        if r["kind"] == "op_count" and r["variant"] in ("fused", "frozen"):
            r["device_ops"] = {"fused": 9, "frozen": 3}[r["variant"]]
    row = next(line for line in tables.ops_table([(ROOT / "x.json", doc)], ROOT).splitlines() if "vit_b.fc1" in line)
    assert [c.strip() for c in row.strip("|").split("|")][5:9] == ["9 ✗", "6 ✓", "35", "3 ✗"]


def test_committed_results_of_schema_1_are_still_read_and_rendered():
    # compile-*.json and cuda-compile-*.json are the compile tables (tests/test_aot_compile.py,
    # tests/test_cuda_compile.py), plan-*.json the memory planner's (tests/test_memory_plan.py),
    # tasks-*.json the cost growth with the tasks' (tests/test_task_growth.py)
    files = sorted(f for f in (ROOT / "bench" / "results").glob("*.json")
                   if not f.name.startswith(("compile-", "cuda-compile-", "plan-", "tasks-")))
    docs = [json.loads(f.read_text()) for f in files]
    assert {"duallora-bench/1", "duallora-bench/2"} <= set(READABLE_SCHEMAS) and SCHEMA == "duallora-bench/3"
    assert [validate_doc(d) for d in docs] == [[] for _ in docs]
    old = [f for f, d in zip(files, docs) if d["schema"] == "duallora-bench/1" and d["command"] == "bench"]
    assert old, "a committed /1 bench file"
    section = tables.render_performance(old, ROOT)
    assert "**One DualLoRA layer" in section and "Device operations" not in section  # /1 has no op counts
    assert validate_doc({"schema": "duallora-bench/0"} | {k: v for k, v in docs[0].items() if k != "schema"}) != []


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

        assert search_largest(fits, start=16, cap=4096) == limit
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

    monkeypatch.setattr(device_memory, "training_step", fake_step)
    got = largest_batch(nn.Linear(2, 2), 8 * 2**30, 10, torch.device("cuda", 0))
    assert got["max_batch"] == 100 and got["trials"]["101"] is False and got["trials"]["100"] is True
    assert fractions == [0.125, 1.0]
    monkeypatch.setattr(device_memory, "search_largest", lambda fits, start, cap: fits(0))
    with pytest.raises(RuntimeError, match="a real bug"):  # not an OOM: raised, and the fraction still reset
        largest_batch(nn.Linear(2, 2), 8 * 2**30, 10, torch.device("cuda", 0))
    assert fractions[-1] == 1.0


def test_counts_parsers_and_devices():
    assert flop_count(10, 3, 5, 4, "frozen", "fwd") == 2 * 10 * 3 * 5
    assert flop_count(10, 3, 5, 4, "frozen", "fwd+bwd") == 4 * 10 * 3 * 5
    assert flop_count(10, 3, 5, 4, "fused", "fwd+bwd") == 4 * 10 * 3 * 5 + 6 * 10 * 4 * (3 + 5)
    assert byte_count(10, 3, 5, 4, "frozen", "fwd", 2) == 2 * (30 + 15 + 50 + 5)
    assert parse_shapes("vit_b.fc1, 768x3072") == [LayerShape("vit_b.fc1", 768, 3072)]
    assert parse_shapes("12->7")[0] == LayerShape("custom", 12, 7)
    assert len(parse_shapes("all")) == 6
    with pytest.raises(ValueError, match="neither"):
        parse_shapes("vit_q.fc9")
    assert parse_dtypes("bf16,fp32") == ["bfloat16", "float32"]
    assert split_rank(5) == (3, 2)
    assert device_peaks("NVIDIA H200").bandwidth == 4.8e12
    assert device_peaks("NVIDIA H100 80GB HBM3").flops["bfloat16"] == 989e12
    assert device_peaks("NVIDIA H100 PCIe").bandwidth == 2.0e12
    assert device_peaks("NVIDIA GeForce RTX 4090").flops["bfloat16"] == 165.2e12  # half rate: fp32 accumulation
    assert device_peaks("Tesla T4") is None
    assert device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    out = default_out_path(torch.device("cpu"), "-memory")
    assert out.parent == Path("runs", "bench") and out.name.startswith("cpu-") and out.name.endswith("-memory.json")


def test_quick_flag_selects_the_small_matrix():
    s = bench_cmd.settings_from(_parse(bench_cmd, ["--quick"]))
    assert [x.key for x in s["shapes"]] == list(QUICK["shapes"]) and s["batch"] == QUICK["batch"]
    s = bench_cmd.settings_from(_parse(bench_cmd, []))
    assert len(s["shapes"]) == 6 and s["ranks"] == list(RANKS) and s["batch"] == 64
    assert bench_cmd.run(_parse(bench_cmd, ["--variants", "fast"])) == 2


# ----------------------------------------------------------------------------- device-operation counts
def test_op_counts_of_the_frozen_and_unfused_steps_match_a_hand_count():
    p = make_problem(LayerShape("custom", 24, 16), 4, "float32", "cpu", m=10, buffers=1)
    cpu = torch.device("cpu")
    frozen = device_ops.count_variant("frozen", p, cpu)
    assert (frozen["status"], frozen["method"], frozen["device_ops"]) == ("ok", "opcount", FROZEN_STEP)
    assert frozen["torch_ops"] == {"addmm": 1, "mm": 1} and frozen["rank"] is None and frozen["budget"] == 2
    unfused = device_ops.count_variant("unfused", p, cpu)
    assert unfused["device_ops"] == UNFUSED_STEP
    assert unfused["torch_ops"] == {"mm": 21, "addmm": 1, "sub": 1, "mul": 6, "add": 5, "neg": 1}
    assert unfused["syncs"] == [] and unfused["rank"] == 4 and unfused["budget"] is None
    compiled = device_ops.count_variant("unfused_compiled", p, cpu)
    assert compiled["status"] == "skipped" and "CUDA" in compiled["reason"] and compiled["device_ops"] is None
    assert validate_doc({**_sample_doc(), "results": [frozen, unfused, compiled]}) == []


def test_op_count_errors_become_error_rows(monkeypatch):
    p = make_problem(LayerShape("custom", 8, 8), 2, "float32", "cpu", m=3, buffers=1)

    def broken(variant, pass_, problem):
        raise RuntimeError("boom")

    monkeypatch.setattr(device_ops, "make_step", broken)
    row = device_ops.count_variant("unfused", p, torch.device("cpu"))
    assert row["status"] == "error" and row["reason"] == "RuntimeError: boom" and row["device_ops"] is None


def test_profiler_count_keeps_kernels_memcpy_and_memset_only():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def ev(name, device=DeviceType.CUDA, kind="kernel"):
        return SimpleNamespace(name=name, device_type=device, activity_type=kind)

    events = [ev("aten::mm", DeviceType.CPU, "cpu_op"), ev("cudaLaunchKernel", DeviceType.CPU, "cuda_runtime"),
              ev("_fwd_kernel"), ev("sm90_xmma_gemm"), ev("sm90_xmma_gemm"), ev("Memset (Device)", kind="gpu_memset"),
              ev("Memcpy DtoD (Device -> Device)", kind="gpu_memcpy"), ev("my range", kind="gpu_user_annotation")]
    got = device_ops.device_activities(events)
    assert got == {"_fwd_kernel": 1, "sm90_xmma_gemm": 2, "Memset (Device)": 1, "Memcpy DtoD (Device -> Device)": 1}
    old = [SimpleNamespace(name="k", device_type=DeviceType.CUDA), SimpleNamespace(name="ProfilerStep#3", device_type=DeviceType.CUDA)]
    assert device_ops.device_activities(old) == {"k": 1}  # torch without activity types: annotations left out by name


# ----------------------------------------------------------------------------- where results go, threads, --quick
@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_commands_write_to_runs_bench_by_default_never_to_bench_results(tmp_path, monkeypatch, keep_threads):
    results = ROOT / "bench" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    monkeypatch.chdir(tmp_path)
    tiny = ["--shapes", "16x24", "--batch", "1", "--dtype", "float32", "--no-progress"]
    assert bench_cmd.run(_parse(bench_cmd, [*tiny, "--ranks", "4", "--variants", "frozen", "--passes", "fwd",
                                            "--warmup-ms", "1", "--rep-ms", "1"])) == 0
    assert mem_cmd.run(_parse(mem_cmd, [*tiny, "--rank", "4", "--scope", "layer", "--variants", "frozen"])) == 0
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    today = datetime.date.today().isoformat()
    assert written == [f"runs/bench/cpu-{today}-memory.json", f"runs/bench/cpu-{today}.json"]
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before
    # an explicit --out goes where it says
    out = tmp_path / "bench" / "results" / "mine.json"
    assert bench_cmd.run(_parse(bench_cmd, [*tiny, "--ranks", "4", "--variants", "frozen", "--passes", "fwd",
                                            "--warmup-ms", "1", "--rep-ms", "1", "--out", str(out)])) == 0
    assert json.loads(out.read_text())["complete"] is True


def test_threads_are_capped_at_the_usable_cores_and_printed(monkeypatch, capsys, keep_threads, tmp_path):
    import duallora_kernels.cli as cli

    tiny = ["--shapes", "16x24", "--batch", "1", "--dtype", "float32", "--ranks", "4", "--variants", "frozen",
            "--passes", "fwd", "--warmup-ms", "1", "--rep-ms", "1", "--no-progress", "--no-count"]
    torch.set_num_threads(2)
    monkeypatch.setattr(cli, "usable_cores", lambda: 1)
    assert bench_cmd.run(_parse(bench_cmd, [*tiny, "--out", str(tmp_path / "a.json")])) == 0
    assert capsys.readouterr().out.startswith("threads: 1 (torch's choice, at most the usable cores; 1 core(s)")
    assert torch.get_num_threads() == 1
    assert json.loads((tmp_path / "a.json").read_text())["settings"]["threads"] == 1
    monkeypatch.setattr(cli, "usable_cores", lambda: 2)
    assert bench_cmd.run(_parse(bench_cmd, [*tiny, "--threads", "2", "--out", str(tmp_path / "b.json")])) == 0
    assert capsys.readouterr().out.startswith("threads: 2 (--threads")
    assert bench_cmd.main([*tiny, "--threads", "3", "--out", str(tmp_path / "c.json")]) == 2
    assert "more than the 2 core(s)" in capsys.readouterr().err and not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("supported", [True, False])
def test_quick_leaves_bfloat16_out_on_a_cpu_without_bf16_matmul(monkeypatch, supported):
    monkeypatch.setattr(devices, "cpu_bf16_matmul", lambda: (supported, "the CPU has no bfloat16 matmul instructions"))
    s = bench_cmd.settings_from(_parse(bench_cmd, ["--quick", "--device", "cpu"]))
    if supported:
        assert s["dtypes"] == ["float32", "bfloat16"] and s["notes"] == []
    else:
        assert s["dtypes"] == ["float32"]
        assert s["notes"] == ["--quick: float32 only: the CPU has no bfloat16 matmul instructions, so bfloat16 would take minutes"]
    explicit = bench_cmd.settings_from(_parse(bench_cmd, ["--quick", "--device", "cpu", "--dtype", "bf16"]))
    assert explicit["dtypes"] == ["bfloat16"] and explicit["notes"] == []  # an explicit --dtype is obeyed


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert devices.cpu_bf16_matmul() == (True, "the CPU has avx512_bf16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert devices.cpu_bf16_matmul() == (True, "the CPU has AMX")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    ok, why = devices.cpu_bf16_matmul()
    assert ok is False and "no bfloat16 matmul" in why


# ----------------------------------------------------------------------------- profile-memory's printed tables
def test_profile_memory_tables_are_narrow_and_reasons_are_notes():
    label = "vit_base_patch16_224 (img_size=32, depth=1, embed_dim=32, num_heads=2)"
    long_reason = "the fused Triton kernel needs a CUDA device (or TRITON_INTERPRET=1 set before launch, slow)"
    rows = []
    for scope, model, shape in (("layer", "vit_b.fc1", "768x3072"), ("vit", label, None)):
        for v, act in (("frozen", 0), ("unfused", 3 * 2**20), ("full_ft", 2 * 2**20)):
            rows.append(saved_row(scope, model, shape, v, "bfloat16", 64, 12608, 16,
                                           SavedBytes(act + 2**20, act, 2, 2)))
        rows.append(saved_row(scope, model, shape, "fused", "bfloat16", 64, 12608, 16,
                                       status="skipped", reason=long_reason))
    add_ratios(rows)
    rows.append(needs_cuda_row("step_memory", {"model_label": label, "rank": 16, "step_batch": 64}, "fused", "bfloat16"))
    import io

    buf = io.StringIO()
    mem_cmd.print_tables(rows, file=buf)
    text = buf.getvalue()
    lines = text.splitlines()
    assert all(line == line.rstrip() for line in lines)  # nothing padded at the end
    table_lines = [line for line in lines if line and not line.startswith("  ") and label not in line]
    assert max(map(len, table_lines)) <= 80, max(table_lines, key=len)
    assert f"  [1] skipped: {long_reason}" in lines and text.count(long_reason) == 2  # once per table, as a note
    row = next(line for line in lines if line.startswith("vit_b.fc1 768x3072") and "unfused" in line)
    assert row.split() == ["vit_b.fc1", "768x3072", "unfused", "4.00", "MiB", "3.00", "MiB", "-", "1.50x"]
    assert any(line.startswith(label + ", bfloat16, batch 64, rank 16") for line in lines)
    assert "  step_memory (fused): needs a CUDA device" in text
