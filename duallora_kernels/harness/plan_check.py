"""The memory planner checked on a GPU: the same training steps it predicts, measured with
``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` at two batches per variant, each
beside its prediction and the error (goal: within 10% of the measured reserved peak). Also
records what the planner estimates per GPU: the device's total memory and the CUDA context
(total - free - reserved, after the steps).

    python -m duallora_kernels.harness.plan_check --out plan-check-<slug>-<date>.json [--batches 32,64]

Each measurement: the variant's model on the GPU (parameters float32, uninitialised: memory does
not depend on the values; autocast bf16, AdamW), a
warm-up step at the batch (optimizer state, kernels, cuBLAS workspaces), ``empty_cache``, peak
statistics reset, one :func:`~.memory_trace.planned_step`. The JSON is rewritten after every
variant, so a run cut off at its time limit keeps what finished (``complete: false``).
"""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .gpus import GpuSpec, MiB, cublas_workspace_bytes
from .memory_plan import geometry, gpu_extras, peft_missing, plan_variant
from .memory_trace import make_optimizer, planned_step
from .problems import parse_list
from .results import run_metadata, write_json
from .vit_models import build_vit_variant

__all__ = ["this_gpu", "measure_step", "run_check", "build_parser", "main"]

CHECK_VARIANTS = ("fused", "fused_fixed_a", "unfused", "peft", "full_ft", "frozen")


def this_gpu(device: torch.device) -> GpuSpec:
    """The GPU we run on as a :class:`~.gpus.GpuSpec` (its reported memory, its arch)."""
    props = torch.cuda.get_device_properties(device)
    arch = props.major * 10 + props.minor
    cublas_workspace_bytes(arch)  # an arch the planner cannot size raises here, before any work
    return GpuSpec(f"this-gpu-sm{arch}", props.name, props.total_memory / 2**30, arch, "torch.cuda.get_device_properties")


def measure_step(model: torch.nn.Module, opt: Any, batch: int, num_classes: int, amp: torch.dtype | None,
                 device: torch.device) -> dict[str, int]:
    planned_step(model, opt, batch, num_classes, amp)  # warm-up: optimizer state, kernels, cuBLAS workspaces
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)  # parameters, optimizer state, cuBLAS workspaces
    planned_step(model, opt, batch, num_classes, amp, seed=1)
    torch.cuda.synchronize(device)
    return {"measured_allocated": int(torch.cuda.max_memory_allocated(device)),
            "measured_reserved": int(torch.cuda.max_memory_reserved(device)), "measured_resident": int(resident)}


def run_check(s: dict[str, Any], device: torch.device, save: Any) -> list[dict[str, Any]]:
    """Rows (variant, batch) of measured and predicted peaks; ``save(rows)`` after each variant."""
    g = this_gpu(device)
    geo = geometry(s)
    rows: list[dict[str, Any]] = []
    for variant in s["variants"]:
        reason = peft_missing() if variant == "peft" else None
        if reason:
            rows += [{"variant": variant, "batch": b, "status": "skipped", "reason": reason} for b in s["batches"]]
            save(rows)
            continue
        started = time.perf_counter()
        plan = plan_variant(variant, {**s, "batch": s["batches"][0]}, geo)
        plan_s = time.perf_counter() - started
        # Uninitialised weights (empty=True): the same modules, shapes and state, and no seconds of
        # init arithmetic per variant; a step's memory does not depend on the values (no host sync).
        model = build_vit_variant(variant, s["model"], rank=s["rank"], device=device, dtype=s["dtype"], empty=True,
                                  num_classes=s["num_classes"], targets=s["targets"], **s["timm_kwargs"])
        opt = make_optimizer(model, s["optimizer"])
        for b in s["batches"]:
            row: dict[str, Any] = {"variant": variant, "batch": b, "status": "ok", "reason": None,
                                   "plan_seconds": round(plan_s, 1)}
            try:
                row.update(measure_step(model, opt, b, s["num_classes"], s["amp"], device))
            except torch.cuda.OutOfMemoryError as exc:
                row.update(status="error", reason=f"out of memory: {str(exc).splitlines()[0]}")
                rows.append(row)
                continue
            row["predicted_allocated"] = plan.allocated(g, b)
            ws = gpu_extras(g, plan.geo, b, train=True, half_attention=plan.half_attention)["workspace_allocated"]
            row["predicted_resident"] = plan.traces[s["batches"][0]].resident_bytes + ws
            row["predicted_reserved"] = plan.reserved(g, b)
            row["allocated_error"] = row["predicted_allocated"] / row["measured_allocated"] - 1
            row["reserved_error"] = row["predicted_reserved"] / row["measured_reserved"] - 1
            rows.append(row)
            print(f"{variant:>8} batch {b:>4}: reserved measured {row['measured_reserved'] / MiB:8.0f} MiB, predicted "
                  f"{row['predicted_reserved'] / MiB:8.0f} MiB ({row['reserved_error']:+.1%}); allocated "
                  f"{row['measured_allocated'] / MiB:8.0f} / {row['predicted_allocated'] / MiB:8.0f} MiB "
                  f"({row['allocated_error']:+.1%})", flush=True)
        del model, opt, plan
        gc.collect()
        torch.cuda.empty_cache()
        save(rows)
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m duallora_kernels.harness.plan_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the JSON to write")
    ap.add_argument("--batches", default="32,64", help="two batches (default: 32,64; the second twice the first)")
    ap.add_argument("--variants", default=",".join(CHECK_VARIANTS), help=f"default: {','.join(CHECK_VARIANTS)}")
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--rank", type=int, default=16)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .plan_report import CHECK_SCHEMA

    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("plan_check: needs a CUDA device", file=sys.stderr)
        return 2
    batches = [int(b) for b in parse_list(args.batches)]
    if len(batches) != 2 or batches[1] != 2 * batches[0]:
        print(f"plan_check: --batches must be two batches b,2b; got {args.batches}", file=sys.stderr)
        return 2
    variants = parse_list(args.variants)
    if not variants or any(v not in CHECK_VARIANTS for v in variants):
        print(f"plan_check: --variants must be among {','.join(CHECK_VARIANTS)}; got {args.variants}", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    s = {"model": args.model, "model_label": args.model, "timm_kwargs": {}, "num_classes": 100, "rank": args.rank,
         "targets": ["qkv", "proj", "fc1", "fc2"], "dtype": "float32", "amp": torch.bfloat16, "optimizer": "adamw",
         "batches": batches, "max_batch_cap": 4096, "variants": variants}
    argv = sys.argv[1:] if argv is None else list(argv)
    doc = run_metadata("plan-check", argv, device, {**s, "amp": "bfloat16", "batch": batches[0]})
    doc["schema"] = CHECK_SCHEMA
    doc["command_line"] = shlex.join(["python", "-m", "duallora_kernels.harness.plan_check", *argv])  # not a CLI command

    doc["settings"]["pytorch_cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")  # the replay assumes the default

    def save(rows: list[dict[str, Any]]) -> None:
        # the CUDA context as it stands (kernels load as variants run): total - free - reserved
        free, total = torch.cuda.mem_get_info(device)
        doc["device"]["context_bytes_measured"] = int(total - free - torch.cuda.memory_reserved(device))
        doc["device"]["mem_get_info_total"] = int(total)
        doc["results"] = rows
        write_json(args.out, doc)

    rows = run_check(s, device, save)
    doc["complete"] = True
    save(rows)
    print(f"context (total - free - reserved): {doc['device']['context_bytes_measured'] / MiB:.0f} MiB of "
          f"{doc['device']['mem_get_info_total'] / 2**30:.2f} GiB; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
