"""The memory planner (duallora profile-memory --plan), checked on the CPU against what it can be
checked against: the saved bytes against the existing saved_tensors_hooks counter on real small
models, the gradient and optimizer terms against a real step's tensors, linear scaling in the
batch, the allocator replay against its documented rules, and its answers to bad input."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from duallora_kernels.commands import profile_memory as mem_cmd
from duallora_kernels.harness import memory_plan, plan_report
from duallora_kernels.harness.allocator_model import MiB, AllocatorReplay
from duallora_kernels.harness.gpus import GPUS, GpuSpec, gpu
from duallora_kernels.harness.memory_trace import FakeTraining, block_bytes, make_optimizer, planned_step
from duallora_kernels.harness.saved_bytes import count_saved
from duallora_kernels.harness.vit_models import build_vit_variant
from duallora_kernels.nn import dual_lora_layers

TINY = {"img_size": 32, "depth": 1, "embed_dim": 64, "num_heads": 2}
MODEL = "vit_base_patch16_224"
CLASSES = 10


def _build(variant: str, empty: bool, dtype: str = "float32"):
    return build_vit_variant(variant, MODEL, rank=8, dtype=dtype, num_classes=CLASSES, empty=empty, **TINY)


def _settings(**over):
    s = {"model": MODEL, "model_label": MODEL, "timm_kwargs": TINY, "num_classes": CLASSES, "rank": 8,
         "targets": ["qkv", "proj", "fc1", "fc2"], "dtype": "float32", "amp": None, "optimizer": "adamw",
         "batch": 2, "max_batch_cap": 1 << 20, "variants": ["frozen"], "gpus": [gpu("rtx4090")]}
    return {**s, **over}


def _variants() -> list:
    """Every variant; those this environment cannot run show as skipped, with the reason."""
    interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the fused layer on the CPU runs the Triton interpreter: TRITON_INTERPRET=1")
    return ["unfused", "frozen", "full_ft",
            pytest.param("peft", marks=pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                                          reason="peft is not installed (pip install '.[peft]')")),
            pytest.param("fused", marks=interp), pytest.param("fused_fixed_a", marks=interp)]


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "amp-bf16"])
@pytest.mark.parametrize("variant", _variants())
def test_traced_saved_bytes_equal_the_hook_counter_on_a_real_model(variant, amp):
    batch = 3
    model = _build(variant, empty=False)
    images = torch.randn(batch, 3, 32, 32).requires_grad_(True)
    labels = torch.randint(0, CLASSES, (batch,))

    def forward():
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = model(images)
        return F.cross_entropy(logits.float(), labels)

    real = count_saved(forward, exclude=[*model.parameters(), *model.buffers()])
    traced = FakeTraining(partial(_build, variant, True), CLASSES, amp).trace(batch)
    assert traced.saved_bytes == real.activation_bytes
    assert real.activation_bytes > 0


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "amp-bf16"])
def test_b_only_training_saves_the_frozen_models_activations_plus_t_and_a_per_layer(amp):
    # issue 20: with A fixed each adapted layer keeps T = x A^T (m x r) and the assembled A (r x d), never x;
    # the Triton designs that keep B^T from forward (split, tma: ops/fused_linear.py) also keep it (r x n)
    from duallora_kernels.ops.fused_linear import launchers_for, resolve_design

    batch = 3
    traced = {v: FakeTraining(partial(_build, v, True), CLASSES, amp).trace(batch) for v in ("frozen", "fused_fixed_a")}
    model = _build("fused_fixed_a", empty=True)
    m = batch * (model.patch_embed.num_patches + 1)
    elsize = 2 if amp is not None else 4

    def kept(layer) -> int:
        r = layer.rank_orth + layer.rank_res
        design = resolve_design("auto", n=layer.out_features, d=layer.in_features, r=r, dtype=amp or torch.float32,
                                device=torch.device("cpu"))
        return (m * r + r * layer.in_features + (r * layer.out_features if launchers_for(design).keeps_bt else 0)) \
            * elsize

    extra = sum(kept(layer) for layer in dual_lora_layers(model).values())
    assert traced["fused_fixed_a"].saved_bytes == traced["frozen"].saved_bytes + extra
    rows = memory_plan.run_plan(_settings(variants=["frozen", "fused_fixed_a"], batch=batch, amp=amp))
    goals = plan_report.fixed_a_goals(rows)
    assert goals.startswith("B-only training (`fused_fixed_a`") and "frozen" in goals


@pytest.mark.parametrize("optimizer,states", [("adamw", 2), ("sgd", 1)])
def test_gradient_and_optimizer_terms_equal_a_real_steps_tensors(optimizer, states):
    batch = 2
    model = _build("unfused", empty=False)
    opt = make_optimizer(model, optimizer)
    planned_step(model, opt, 1, CLASSES, None)  # the warm-up step makes the optimizer's state
    state = [t for st in opt.state.values() for t in st.values() if t.dim() > 0]
    real_opt = sum(block_bytes(t.untyped_storage().nbytes()) for t in state)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert real_opt == sum(states * block_bytes(p.numel() * 4) for p in trainable)  # AdamW: exp_avg, exp_avg_sq
    images = torch.randn(batch, 3, 32, 32).requires_grad_(True)
    F.cross_entropy(model(images).float(), torch.randint(0, CLASSES, (batch,))).backward()
    real_grads = sum(block_bytes(p.grad.untyped_storage().nbytes()) for p in trainable)
    params = sum(block_bytes(t.untyped_storage().nbytes()) for t in {t.untyped_storage().data_ptr(): t
                 for t in [*model.parameters(), *model.buffers()]}.values())

    traced = FakeTraining(partial(_build, "unfused", True), CLASSES, None, optimizer=optimizer).trace(batch)
    step = traced.phases["optimizer"].at_peak
    assert step["optimizer"] == real_opt
    assert step["gradients"] == real_grads
    assert step["parameters"] == params
    assert traced.resident_bytes == params + real_opt


def test_saved_bytes_scale_linearly_in_the_batch_and_the_plan_line_predicts_a_third_batch():
    fake = FakeTraining(partial(_build, "unfused", True), CLASSES, torch.bfloat16)
    saved = {b: fake.trace(b).saved_bytes for b in (2, 4, 6)}
    assert saved[6] - saved[4] == saved[4] - saved[2] > 0  # activations are linear in the batch
    plan = memory_plan.VariantPlan("unfused", _settings(variants=["unfused"], amp=torch.bfloat16),
                                   memory_plan.Geometry(2, 5, 32, 1), fake.trace)
    traced6 = fake.trace(6)
    for ph, (a, slope) in plan.alloc_lines.items():
        assert a + slope * 6 == pytest.approx(traced6.phases[ph].allocated, rel=0.01)


def test_allocator_replay_follows_the_caching_allocators_rules():
    sim = AllocatorReplay()
    sim.alloc(1, 600 * 1024)  # small pool: a 2 MiB segment
    sim.alloc(2, 600 * 1024)  # fits the same segment's rest
    assert sim.reserved == 2 * MiB and sim.allocated == 1200 * 1024
    sim.alloc(3, 5 * MiB)  # large pool, under 10 MiB: a 20 MiB segment, split
    sim.alloc(4, 5 * MiB)  # from the split rest
    assert sim.reserved == 22 * MiB
    sim.alloc(5, 11 * MiB + 1)  # 10 MiB or more: its own segment, rounded up to 2 MiB
    assert sim.reserved == 22 * MiB + 12 * MiB
    sim.free(3)
    sim.free(4)  # merges with the freed block before it and the free rest after it: 20 MiB free again
    sim.alloc(6, 19 * MiB)  # the merged 20 MiB block, not split: the 1 MiB rest is not more than 1 MiB
    assert sim.reserved == 34 * MiB and sim.peak_reserved == 34 * MiB
    sim.alloc(7, 100)  # rounded up to 512 B
    assert sim.allocated == 1200 * 1024 + 12 * MiB + 20 * MiB + 512


def test_unknown_gpu_lists_the_known_ones(capsys):
    with pytest.raises(ValueError, match="unknown GPU 'rtx9999'; known: " + ", ".join(GPUS)):
        gpu("rtx9999")
    assert mem_cmd.main(["--plan", "--gpus", "rtx4090,rtx9999", "--no-progress"]) == 2
    assert "known: rtx3060-12gb" in capsys.readouterr().err


def test_a_model_that_does_not_fit_at_batch_1_says_by_how_much():
    tiny_gpu = GpuSpec("tiny-1gb", "a 0.4 GB card", 0.4, 86, "a test's own figure")  # less than its CUDA context
    s = _settings(variants=["full_ft"], gpus=[tiny_gpu, gpu("rtx4090")])
    (row,) = memory_plan.run_plan(s)
    small, big = row["gpus"]
    assert small["max_batch"] == 0 and big["max_batch"] > 0
    plan = memory_plan.plan_variant("full_ft", s, memory_plan.geometry(s))
    need = plan.reserved(tiny_gpu, 1) - tiny_gpu.usable_bytes
    assert small["shortfall_at_batch_1"] == need > 0
    (line,) = memory_plan.not_fitting([row])
    assert line.startswith("full_ft does not fit tiny-1gb even at batch 1: it needs ") and f"{need / 2**30:.2f} GiB more" in line


def test_a_missing_peft_is_a_skipped_variant_with_the_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    rows = memory_plan.run_plan(_settings(variants=["peft", "frozen"]))
    assert [r["status"] for r in rows] == ["skipped", "ok"]
    assert "peft is not installed" in rows[0]["reason"]


def test_the_plan_command_writes_json_tables_and_a_plot(tmp_path, capsys):
    out = tmp_path / "plan-tiny.json"
    argv = ["--plan", "--no-progress", "--img-size", "32", "--depth", "2", "--embed-dim", "64", "--num-heads", "2",
            "--num-classes", str(CLASSES), "--variants", "frozen,inference", "--step-batch", "2", "--amp", "off",
            "--gpus", "rtx3060-12gb,h100-80gb", "--out", str(out)]
    assert mem_cmd.main(argv) == 0
    text = capsys.readouterr().out
    assert "largest batch that fits" in text and "rtx3060-12gb" in text and "unvalidated on hardware" in text
    doc = json.loads(out.read_text())
    assert doc["schema"] == memory_plan.PLAN_SCHEMA and [r["variant"] for r in doc["results"]] == ["frozen", "inference"]
    frozen, inference = doc["results"]
    assert inference["breakdown"]["saved"] == 0 and inference["breakdown"]["gradients"] == 0
    assert frozen["breakdown"]["saved"] > 0
    for r in doc["results"]:
        small, big = r["gpus"]
        assert 0 < small["max_batch"] <= big["max_batch"]
    assert {g["key"] for g in doc["gpus"]} == {"rtx3060-12gb", "h100-80gb"} and all(g["source"] for g in doc["gpus"])
    from duallora_kernels.harness.plan_plot import plot_plan

    png = plot_plan(doc, tmp_path / "plan-tiny.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_settings_reject_bad_input():
    p = argparse.ArgumentParser()
    mem_cmd.add_arguments(p)
    from duallora_kernels.commands.plan_memory import plan_settings_from

    for argv, msg in ((["--variants", "lora"], "unknown"), (["--amp", "fp8"], "--amp"), (["--rank", "0"], "--rank"),
                      (["--dtype", "bf16,fp32"], "one parameter --dtype"), (["--gpus", ""], "at least one GPU")):
        with pytest.raises(ValueError, match=msg):
            plan_settings_from(p.parse_args(["--plan", *argv]))


def test_the_gpu_check_pairs_each_measurement_with_its_prediction(monkeypatch):
    from duallora_kernels.harness import plan_check

    monkeypatch.setattr(plan_check, "this_gpu", lambda device: gpu("h100-80gb"))
    monkeypatch.setattr(plan_check, "measure_step",
                        lambda *a: {"measured_allocated": 100 * MiB, "measured_reserved": 120 * MiB})
    s = {**_settings(), "batches": [2, 4], "variants": ["frozen", "full_ft"]}
    saved: list = []
    rows = plan_check.run_check(s, torch.device("cpu"), lambda r: saved.append(len(r)))
    assert [(r["variant"], r["batch"]) for r in rows] == [("frozen", 2), ("frozen", 4), ("full_ft", 2), ("full_ft", 4)]
    plan = memory_plan.plan_variant("full_ft", {**s, "batch": 2}, memory_plan.geometry(s))
    r = rows[3]
    assert r["predicted_reserved"] == plan.reserved(gpu("h100-80gb"), 4) > 0
    assert r["predicted_allocated"] == plan.allocated(gpu("h100-80gb"), 4)
    assert r["predicted_resident"] == plan.traces[2].resident_bytes + 2 * 32 * MiB  # two cuBLAS workspaces on sm_90
    assert r["reserved_error"] == pytest.approx(r["predicted_reserved"] / (120 * MiB) - 1)
    assert saved == [2, 4]  # the JSON is rewritten after each variant
    if not torch.cuda.is_available():
        assert plan_check.main(["--out", "unused.json"]) == 2
