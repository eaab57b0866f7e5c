"""``duallora profile-memory``: what DualLoRA training costs in memory, fused vs unfused vs the
frozen model vs PEFT LoRA (and full fine-tuning as a reference).

(a) Bytes autograd saves for backward, counted with saved_tensors_hooks (works on the CPU):
    for one layer of each shape (``--scope layer``) and for a whole ViT (``--scope vit``).
(b) On a GPU: the peak memory and time of a ViT-B/16 training step at ``--step-batch``, and the
    largest batch whose step fits under each of ``--budgets`` GiB
    (torch.cuda.set_per_process_memory_fraction), for ``--max-batch-variants``.

(c) ``--plan``: no GPU needed. The peak memory of one training step at ``--step-batch``, split into
    parameters, gradients, optimizer state, saved activations, transient, allocator overhead,
    cuBLAS workspace and CUDA context, and the largest batch that fits each of ``--gpus``, for each
    variant side by side (harness/memory_plan.py: the step traced on fake tensors).

    duallora profile-memory                      # everything the device allows
    duallora profile-memory --quick              # small and CPU-friendly (ViT at batch 2)
    python -m duallora_kernels.commands.profile_memory --scope layer
    duallora profile-memory --plan --gpus rtx3060-12gb,rtx4090 --amp bf16 --rank 16
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..harness.memory_profile import run_profile
from ..harness.problems import parse_dtypes, parse_list, parse_shapes
from ..harness.tables import fmt_ratio, format_bytes, format_table
from ..harness.vit_models import VIT_VARIANTS
from .common import add_common_arguments, module_main, run_command
from .plan_memory import add_plan_arguments, model_settings, run_plan_command

HELP = "bytes saved for backward (layer, whole ViT); GPU peak memory and largest batch per memory budget"
SCOPES = ("layer", "vit", "step", "max-batch")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile-memory", help=HELP, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.set_defaults(command="profile-memory", _suffix="-memory")
    p.add_argument("--scope", default=",".join(SCOPES),
                   help="what to measure: layer, vit (saved bytes), step, max-batch (GPU only); default: all")
    p.add_argument("--variants", default=None,
                   help=f"saved-bytes and step variants, subset of {','.join(VIT_VARIANTS)} (default: all; "
                        "--plan also knows inference)")
    p.add_argument("--max-batch-variants", default="fused,fused_fixed_a,unfused",
                   help="variants of the largest-batch search (default: fused,fused_fixed_a,unfused)")
    p.add_argument("--shapes", action="append", default=None, help="layer shapes for --scope layer (default: all six)")
    p.add_argument("--rank", type=int, default=16, help="total adapter rank (default: 16)")
    p.add_argument("--batch", type=int, default=None, help="layer scope: images per batch, m = batch x 197 (default: 64)")
    p.add_argument("--vit-batch", type=int, default=None, help="vit scope: images per batch (default: 64; --quick: 2)")
    p.add_argument("--step-batch", type=int, default=64, help="GPU training step's batch (default: 64)")
    p.add_argument("--budgets", default="8,12,16,24", help="GiB budgets of the largest-batch search (default: 8,12,16,24)")
    p.add_argument("--max-batch-cap", type=int, default=2048, help="largest batch tried (default: 2048)")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model (random init; default: vit_base_patch16_224)")
    p.add_argument("--num-classes", type=int, default=100, help="classes of the head (default: 100)")
    for flag in ("img-size", "patch-size", "depth", "embed-dim", "num-heads"):
        p.add_argument(f"--{flag}", type=int, default=None, help=f"override the model's {flag.replace('-', ' ')}")
    add_plan_arguments(p)


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    scopes = parse_list(args.scope)
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise ValueError(f"--scope: unknown {bad}; choose from {SCOPES}")
    variants = parse_list(args.variants or ",".join(VIT_VARIANTS))
    mb_variants = parse_list(args.max_batch_variants)
    bad = [v for v in variants + mb_variants if v not in VIT_VARIANTS]
    if bad:
        raise ValueError(f"--variants/--max-batch-variants: unknown {bad}; choose from {VIT_VARIANTS}")
    dtypes = parse_dtypes(args.dtype or ["bfloat16"])
    try:
        budgets = [float(b) for b in parse_list(args.budgets)]
    except ValueError:
        raise ValueError(f"--budgets must be numbers of GiB like 8,12,16,24, got {args.budgets!r}") from None
    timm_kwargs, label = model_settings(args)
    if args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    return {
        "scopes": scopes, "variants": variants, "max_batch_variants": mb_variants, "dtypes": dtypes,
        "shapes": parse_shapes(args.shapes or (["768x768,768x2304,768x3072,3072x768"] if args.quick else None)),
        "rank": args.rank, "batch": args.batch or 64, "vit_batch": args.vit_batch or (2 if args.quick else 64),
        "step_batch": args.step_batch, "budgets_gib": budgets, "max_batch_cap": args.max_batch_cap,
        "model": args.model, "model_label": label, "num_classes": args.num_classes, "timm_kwargs": timm_kwargs, "seed": args.seed,
    }


def print_tables(rows: list[dict[str, Any]], file: Any = None) -> None:
    """The results as narrow tables: one per (scope, model, dtype, batch) with what they share in
    its heading, and the reasons of skipped or failed rows as numbered notes below it, so that no
    column is padded to the longest label or reason."""
    saved = [r for r in rows if r["kind"] == "saved_bytes"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in saved:
        groups.setdefault((r["scope"], r["model"] if r["shape"] is None else None, r["dtype"], r["batch"], r["rank"]), []).append(r)
    if groups:
        print("\nbytes saved for backward (activations: parameters and buffers left out)", file=file)
    for (scope, model, dtype, batch, rank), group in groups.items():
        what = "one layer" if scope == "layer" else model
        print(f"\n{what}, {dtype}, batch {batch}, rank {rank}", file=file)
        reasons: list[str] = []

        def note(r: dict[str, Any]) -> str:
            text = f"{r['status']}: {r['reason']}"
            if text not in reasons:
                reasons.append(text)
            return f"{r['status']} [{reasons.index(text) + 1}]"

        table = []
        for r in group:
            first = [f"{r['model']} {r['shape']}", r["variant"]] if scope == "layer" else [r["variant"]]
            if r["status"] != "ok":
                table.append([*first, note(r), None, None, None])
                continue
            table.append([*first, format_bytes(r["saved_bytes"]), format_bytes(r["activation_bytes"]),
                          fmt_ratio(r["activation_over_frozen"]), fmt_ratio(r["activation_over_full_ft"])])
        headers = ["variant", "saved", "activations", "act/frozen", "act/full_ft"]
        print(format_table(["layer", *headers] if scope == "layer" else headers, table), file=file)
        for i, text in enumerate(reasons, 1):
            print(f"  [{i}] {text}", file=file)
    steps = [r for r in rows if r["kind"] == "step_memory" and r["status"] == "ok"]
    if steps:
        print("\ntraining step", file=file)
        print(format_table(["model", "dtype", "batch", "variant", "peak", "step ms"], [
            [r["model"], r["dtype"], r["batch"], r["variant"], format_bytes(r["peak_bytes"]), f"{r['step_ms']:.1f}"]
            for r in steps]), file=file)
    mb = [r for r in rows if r["kind"] == "max_batch" and r["status"] == "ok"]
    if mb:
        variants = list(dict.fromkeys(r["variant"] for r in mb))
        budgets = list(dict.fromkeys(r["budget_gib"] for r in mb))
        got = {(r["variant"], r["budget_gib"], r["dtype"]): r["max_batch"] for r in mb}
        dtypes = list(dict.fromkeys(r["dtype"] for r in mb))
        print("\nlargest training batch under a memory budget", file=file)
        print(format_table(["budget", "dtype", *variants], [
            [f"{g:g} GiB", dt, *(got.get((v, g, dt)) for v in variants)] for dt in dtypes for g in budgets]), file=file)
    notes: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r.get("status") != "ok" and r["kind"] != "saved_bytes":
            variants = notes.setdefault((r["kind"], r["reason"]), [])
            if r["variant"] not in variants:
                variants.append(r["variant"])
    if notes:
        print("\nnot measured:", file=file)
    for (kind, reason), variants in notes.items():
        print(f"  {kind} ({', '.join(variants)}): {reason}", file=file)


def run(args: argparse.Namespace) -> int:
    if args.plan:
        return run_plan_command(args)
    return run_command(args, settings_from, run_profile, print_tables, show_triton=False)


def main(argv: list[str] | None = None) -> int:
    return module_main("duallora profile-memory", __doc__.split("\n\n")[0], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
