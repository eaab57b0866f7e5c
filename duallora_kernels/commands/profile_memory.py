"""``duallora profile-memory``: what DualLoRA training costs in memory, fused vs unfused vs the
frozen model vs PEFT LoRA (and full fine-tuning as a reference).

(a) Bytes autograd saves for backward, counted with saved_tensors_hooks (works on the CPU):
    for one layer of each shape (``--scope layer``) and for a whole ViT (``--scope vit``).
(b) On a GPU: the peak memory and time of a ViT-B/16 training step at ``--step-batch``, and the
    largest batch whose step fits under each of ``--budgets`` GiB
    (torch.cuda.set_per_process_memory_fraction), for ``--max-batch-variants``.

    duallora profile-memory                      # everything the device allows
    duallora profile-memory --quick              # small and CPU-friendly (ViT at batch 2)
    python -m duallora_kernels.commands.profile_memory --scope layer
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any

from .. import benchmark as B
from .bench import add_common_arguments, finish, module_main, open_run

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
    p.add_argument("--variants", default=",".join(B.VIT_VARIANTS),
                   help=f"saved-bytes and step variants, subset of {','.join(B.VIT_VARIANTS)}")
    p.add_argument("--max-batch-variants", default="fused,unfused", help="variants of the largest-batch search")
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


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    scopes = B.parse_list(args.scope)
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise ValueError(f"--scope: unknown {bad}; choose from {SCOPES}")
    variants = B.parse_list(args.variants)
    mb_variants = B.parse_list(args.max_batch_variants)
    bad = [v for v in variants + mb_variants if v not in B.VIT_VARIANTS]
    if bad:
        raise ValueError(f"--variants/--max-batch-variants: unknown {bad}; choose from {B.VIT_VARIANTS}")
    dtypes = B.parse_dtypes(args.dtype or ["bfloat16"])
    try:
        budgets = [float(b) for b in B.parse_list(args.budgets)]
    except ValueError:
        raise ValueError(f"--budgets must be numbers of GiB like 8,12,16,24, got {args.budgets!r}") from None
    timm_kwargs = {k: getattr(args, k) for k in ("img_size", "patch_size", "depth", "embed_dim", "num_heads")
                   if getattr(args, k) is not None}
    if args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    label = args.model + ("" if not timm_kwargs else " (" + ", ".join(f"{k}={v}" for k, v in timm_kwargs.items()) + ")")
    return {
        "scopes": scopes, "variants": variants, "max_batch_variants": mb_variants, "dtypes": dtypes,
        "shapes": B.parse_shapes(args.shapes or (["768x768,768x2304,768x3072,3072x768"] if args.quick else None)),
        "rank": args.rank, "batch": args.batch or 64, "vit_batch": args.vit_batch or (2 if args.quick else 64),
        "step_batch": args.step_batch, "budgets_gib": budgets, "max_batch_cap": args.max_batch_cap,
        "model": args.model, "model_label": label, "num_classes": args.num_classes, "timm_kwargs": timm_kwargs, "seed": args.seed,
    }


def _saved_row(scope: str, model: str, shape: str | None, variant: str, dtype: str, batch: int, m: int | None,
               rank: int, saved: B.SavedBytes | None = None, *, status: str = "ok", reason: str | None = None,
               retained: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "kind": "saved_bytes", "scope": scope, "model": model, "shape": shape, "variant": variant, "dtype": dtype,
        "batch": batch, "m": m, "rank": rank, "status": status, "reason": reason,
        "saved_bytes": None, "activation_bytes": None, "tensors": None, "storages": None, "retained_bytes": retained,
        "saved_over_frozen": None, "activation_over_frozen": None, "activation_over_full_ft": None,
        "goal_saved_over_frozen": None,
    }
    if saved is not None:
        row.update(saved.as_dict())
    return row


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios of each saved-bytes row to the frozen (and full fine-tuning) row of its group."""
    def key(r: dict[str, Any]) -> tuple:
        return (r["scope"], r["model"], r["shape"], r["dtype"], r["batch"])

    ref = {(key(r), r["variant"]): r for r in rows if r["kind"] == "saved_bytes" and r["status"] == "ok"}
    for r in rows:
        if r["kind"] != "saved_bytes" or r["status"] != "ok":
            continue
        fr, ft = ref.get((key(r), "frozen")), ref.get((key(r), "full_ft"))
        if fr:
            r["saved_over_frozen"] = B.ratio(r["saved_bytes"], fr["saved_bytes"])
            r["activation_over_frozen"] = B.ratio(r["activation_bytes"], fr["activation_bytes"])
            goal_value = r["activation_over_frozen"] if r["scope"] == "vit" else r["saved_over_frozen"]
            r["goal_saved_over_frozen"] = B.goal_met("saved_over_frozen", goal_value)
        if ft:
            r["activation_over_full_ft"] = B.ratio(r["activation_bytes"], ft["activation_bytes"])


def _fail(exc: BaseException) -> str:
    traceback.print_exc(file=sys.stderr)
    return B.error_text(exc)


def profile_layers(s: dict[str, Any], device: Any, bar: Any) -> list[dict[str, Any]]:
    rows = []
    for dtype in s["dtypes"]:
        for shape in s["shapes"]:
            problem = B.make_problem(shape, s["rank"], dtype, device, batch=s["batch"], buffers=1, seed=s["seed"])
            for variant in s["variants"]:
                bar.set_postfix_str(f"layer {shape.key} {dtype} {variant}")
                args = ("layer", shape.name, shape.key, variant, dtype, s["batch"], problem.m, s["rank"])
                reason = None if variant == "full_ft" else B.variant_unavailable(variant, device, "count")
                if reason:
                    rows.append(_saved_row(*args, status="skipped", reason=reason))
                else:
                    try:
                        saved = B.layer_saved_bytes(variant, problem)
                        retained = None
                        if device.type == "cuda" and variant != "full_ft":
                            f, _ = B.layer_forward(variant, problem)
                            x0 = problem.xs[0]
                            retained = B.retained_bytes(lambda: f(x0), device)
                        rows.append(_saved_row(*args, saved, retained=retained))
                    except Exception as exc:
                        rows.append(_saved_row(*args, status="error", reason=_fail(exc)))
                bar.update(1)
            del problem
            B.free_cuda()
    return rows


def _needs_cuda_row(kind: str, s: dict[str, Any], variant: str, dtype: str, **extra: Any) -> dict[str, Any]:
    reason = "needs a CUDA device (allocator statistics, per-process memory fraction)"
    base = {"kind": kind, "model": s["model_label"], "variant": variant, "dtype": dtype, "rank": s["rank"],
            "status": "skipped", "reason": reason}
    if kind == "step_memory":
        return {**base, "batch": s["step_batch"], "peak_bytes": None, "resident_bytes": None, "step_ms": None, **extra}
    return {**base, "max_batch": None, "trials": None, **extra}


def profile_models(s: dict[str, Any], device: Any, bar: Any, save: Any = None) -> list[dict[str, Any]]:
    """Per dtype and variant, one model built once: its saved bytes, training step and max batch.
    ``save(rows)`` is called after each variant (partial results survive a time limit)."""
    rows: list[dict[str, Any]] = []
    scopes = s["scopes"]
    cuda = device.type == "cuda"
    for dtype in s["dtypes"]:
        variants = list(dict.fromkeys(
            (s["variants"] if {"vit", "step"} & set(scopes) else []) + (s["max_batch_variants"] if "max-batch" in scopes else [])))
        for variant in variants:
            reason = None if variant == "full_ft" else B.variant_unavailable(variant, device, "count")
            wants = {
                "vit": "vit" in scopes and variant in s["variants"],
                "step": "step" in scopes and variant in s["variants"],
                "max-batch": "max-batch" in scopes and variant in s["max_batch_variants"],
            }
            if not cuda:
                if wants["step"]:
                    rows.append(_needs_cuda_row("step_memory", s, variant, dtype))
                if wants["max-batch"]:
                    rows += [_needs_cuda_row("max_batch", s, variant, dtype, budget_gib=g) for g in s["budgets_gib"]]
                wants["step"] = wants["max-batch"] = False
            if not any(wants.values()):
                continue
            vit_args = ("vit", s["model_label"], None, variant, dtype, s["vit_batch"], None, s["rank"])
            if reason:
                if wants["vit"]:
                    rows.append(_saved_row(*vit_args, status="skipped", reason=reason))
                if wants["step"]:
                    rows.append({**_needs_cuda_row("step_memory", s, variant, dtype), "reason": reason})
                if wants["max-batch"]:
                    rows += [{**_needs_cuda_row("max_batch", s, variant, dtype, budget_gib=g), "reason": reason}
                             for g in s["budgets_gib"]]
                continue
            bar.set_postfix_str(f"{s['model']} {dtype} {variant}: building")
            model = B.build_vit_variant(variant, s["model"], rank=s["rank"], device=device, dtype=dtype, seed=s["seed"],
                                        num_classes=s["num_classes"], **s["timm_kwargs"])
            if wants["vit"]:
                bar.set_postfix_str(f"{s['model']} {dtype} {variant}: saved bytes")
                try:
                    rows.append(_saved_row(*vit_args, B.vit_saved_bytes(model, s["vit_batch"], s["seed"])))
                except Exception as exc:
                    rows.append(_saved_row(*vit_args, status="error", reason=_fail(exc)))
                B.free_cuda()
            if wants["step"]:
                bar.set_postfix_str(f"{s['model']} {dtype} {variant}: step at batch {s['step_batch']}")
                row = {"kind": "step_memory", "model": s["model_label"], "variant": variant, "dtype": dtype, "rank": s["rank"],
                       "batch": s["step_batch"], "status": "ok", "reason": None}
                try:
                    row.update(B.step_memory(model, s["step_batch"], s["num_classes"], device))
                except Exception as exc:
                    row.update(status="error", reason=_fail(exc), peak_bytes=None, resident_bytes=None, step_ms=None)
                B.free_cuda()
                rows.append(row)
            if wants["max-batch"]:
                for g in s["budgets_gib"]:
                    bar.set_postfix_str(f"{s['model']} {dtype} {variant}: largest batch under {g:g} GiB")
                    row = {"kind": "max_batch", "model": s["model_label"], "variant": variant, "dtype": dtype, "rank": s["rank"],
                           "budget_gib": g, "status": "ok", "reason": None}
                    try:
                        row.update(B.largest_batch(model, int(g * 2**30), s["num_classes"], device,
                                                   cap=s["max_batch_cap"]))
                    except Exception as exc:
                        row.update(status="error", reason=_fail(exc), max_batch=None, trials=None)
                    rows.append(row)
            bar.update(1)
            del model
            B.free_cuda()
            if save is not None:
                save(rows)
    return rows


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
            table.append([*first, B.format_bytes(r["saved_bytes"]), B.format_bytes(r["activation_bytes"]),
                          B.fmt_ratio(r["activation_over_frozen"]), B.fmt_ratio(r["activation_over_full_ft"])])
        headers = ["variant", "saved", "activations", "act/frozen", "act/full_ft"]
        print(B.format_table(["layer", *headers] if scope == "layer" else headers, table), file=file)
        for i, text in enumerate(reasons, 1):
            print(f"  [{i}] {text}", file=file)
    steps = [r for r in rows if r["kind"] == "step_memory" and r["status"] == "ok"]
    if steps:
        print("\ntraining step", file=file)
        print(B.format_table(["model", "dtype", "batch", "variant", "peak", "step ms"], [
            [r["model"], r["dtype"], r["batch"], r["variant"], B.format_bytes(r["peak_bytes"]), f"{r['step_ms']:.1f}"]
            for r in steps]), file=file)
    mb = [r for r in rows if r["kind"] == "max_batch" and r["status"] == "ok"]
    if mb:
        variants = list(dict.fromkeys(r["variant"] for r in mb))
        budgets = list(dict.fromkeys(r["budget_gib"] for r in mb))
        got = {(r["variant"], r["budget_gib"], r["dtype"]): r["max_batch"] for r in mb}
        dtypes = list(dict.fromkeys(r["dtype"] for r in mb))
        print("\nlargest training batch under a memory budget", file=file)
        print(B.format_table(["budget", "dtype", *variants], [
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
    try:
        s = settings_from(args)
    except ValueError as exc:
        print(f"duallora profile-memory: {exc}", file=sys.stderr)
        return 2
    device, out, doc = open_run("profile-memory", args, s, show_triton=False)
    from tqdm.auto import tqdm

    total = (len(s["dtypes"]) * len(s["shapes"]) * len(s["variants"]) if "layer" in s["scopes"] else 0) + \
        len(s["dtypes"]) * len(set(s["variants"]) | set(s["max_batch_variants"]))
    rows: list[dict[str, Any]] = []
    with tqdm(total=total, desc="profile-memory", disable=args.no_progress, leave=False, dynamic_ncols=True) as bar:
        def save(more: list[dict[str, Any]]) -> None:
            doc["results"] = rows + more
            _add_ratios(doc["results"])
            B.write_json(out, doc)

        if "layer" in s["scopes"]:
            rows += profile_layers(s, device, bar)
            save([])
        if {"vit", "step", "max-batch"} & set(s["scopes"]):
            rows += profile_models(s, device, bar, save)
    _add_ratios(rows)
    doc["results"] = rows
    print_tables(rows)
    finish(doc, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return module_main("duallora profile-memory", __doc__.split("\n\n")[0], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
