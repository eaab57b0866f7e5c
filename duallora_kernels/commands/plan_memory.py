"""``duallora profile-memory --plan``: its flags, settings and run (the planner itself is
:mod:`duallora_kernels.harness.memory_plan`; the tables :mod:`~duallora_kernels.harness.plan_report`)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..harness.gpus import GPUS, parse_gpus
from ..harness.memory_trace import OPTIMIZERS
from ..harness.problems import AMP_DTYPES, amp_name, parse_amp, parse_dtypes, parse_list

__all__ = ["DEFAULT_GPUS", "add_plan_arguments", "model_settings", "plan_settings_from", "run_plan_command"]

DEFAULT_GPUS = "rtx3060-12gb,rtx4070,rtx4060ti-16gb,rtx3090,rtx4090,a100-40gb,h100-80gb"


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--plan (no GPU needed)")
    g.add_argument("--plan", action="store_true",
                   help="predict the step's peak memory and the largest batch per GPU on the CPU (fake tensors)")
    g.add_argument("--gpus", default=DEFAULT_GPUS, help=f"GPUs by name (default: {DEFAULT_GPUS}); known: {', '.join(GPUS)}")
    g.add_argument("--amp", default="bf16", help=f"autocast dtype of the planned step: {', '.join(AMP_DTYPES)} "
                   "(default: bf16, with --dtype float32 parameters)")
    g.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="optimizer of the planned step (default: adamw)")
    g.add_argument("--targets", default="qkv,proj,fc1,fc2", help="adapted linear layers (default: qkv,proj,fc1,fc2)")


def model_settings(args: argparse.Namespace) -> tuple[dict[str, int], str]:
    """The timm overrides the flags give, and the model's label."""
    timm_kwargs = {k: getattr(args, k) for k in ("img_size", "patch_size", "depth", "embed_dim", "num_heads")
                   if getattr(args, k) is not None}
    label = args.model + ("" if not timm_kwargs else " (" + ", ".join(f"{k}={v}" for k, v in timm_kwargs.items()) + ")")
    return timm_kwargs, label


def plan_settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The planner's settings from the flags (ValueError with a one-line reason when they are wrong)."""
    from ..harness.memory_plan import PLAN_VARIANTS

    variants = parse_list(args.variants) or list(PLAN_VARIANTS)
    bad = [v for v in variants if v not in PLAN_VARIANTS]
    if bad:
        raise ValueError(f"--variants: unknown {bad}; choose from {', '.join(PLAN_VARIANTS)}")
    dtypes = parse_dtypes(args.dtype or ["float32"])
    if len(dtypes) != 1 or dtypes[0] == "float64":
        raise ValueError(f"--plan takes one parameter --dtype of float32, bfloat16, float16; got {dtypes}")
    amp = parse_amp(args.amp)
    targets = parse_list(args.targets)
    if not targets:
        raise ValueError("--targets needs at least one layer name (qkv, proj, fc1, fc2)")
    if args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    if args.step_batch < 1:
        raise ValueError(f"--step-batch must be >= 1, got {args.step_batch}")
    timm_kwargs, label = model_settings(args)
    return {"model": args.model, "model_label": label, "timm_kwargs": timm_kwargs, "num_classes": args.num_classes,
            "rank": args.rank, "targets": targets, "dtype": dtypes[0], "amp": amp, "optimizer": args.optimizer,
            "batch": args.step_batch, "max_batch_cap": args.max_batch_cap, "variants": variants,
            "gpus": parse_gpus(parse_list(args.gpus))}


def run_plan_command(args: argparse.Namespace) -> int:
    import torch

    from ..cli import apply_threads
    from ..harness.memory_plan import run_plan
    from ..harness.plan_report import plan_document, print_plan
    from ..harness.results import default_out_path, run_metadata, write_json

    try:
        s = plan_settings_from(args)
    except ValueError as exc:
        print(f"duallora profile-memory --plan: {exc}", file=sys.stderr)
        return 2
    apply_threads(args.threads)
    cpu = torch.device("cpu")
    out = args.out or default_out_path(cpu, "-plan")
    json_settings = {**s, "amp": amp_name(s["amp"]), "gpus": [g.key for g in s["gpus"]]}
    argv = getattr(args, "_argv", None)
    meta = run_metadata("profile-memory", list(argv) if argv is not None else sys.argv[1:], cpu, json_settings)
    started = time.perf_counter()
    progress = (lambda v: None) if args.no_progress else (
        lambda v: print(f"  tracing {v} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True))
    rows = run_plan(s, progress=progress)
    doc = plan_document(meta, s["gpus"], rows)
    doc["settings"]["plan_seconds"] = round(time.perf_counter() - started, 1)
    print_plan(doc)
    write_json(out, doc)
    print(f"\nwrote {out} (planned in {doc['settings']['plan_seconds']} s on the CPU)")
    return 0
