"""What ``duallora profile-memory`` measures, as result rows: bytes saved for backward by one
layer of each shape (:func:`profile_layers`) and by whole ViTs, and on a GPU a ViT training
step's peak memory and the largest batch under each budget (:func:`profile_models`). A variant
that cannot run gets a ``skipped`` row with the reason, one that fails an ``error`` row."""
from __future__ import annotations

import sys
import traceback
from typing import Any, Callable

from .device_memory import free_cuda, largest_batch, step_memory
from .problems import goal_met, make_problem, ratio
from .results import error_text
from .saved_bytes import SavedBytes, layer_saved_bytes, retained_bytes, vit_saved_bytes
from .variants import layer_forward, variant_unavailable
from .vit_models import build_vit_variant

__all__ = ["saved_row", "add_ratios", "needs_cuda_row", "profile_layers", "profile_models", "run_profile"]


def saved_row(scope: str, model: str, shape: str | None, variant: str, dtype: str, batch: int, m: int | None,
              rank: int, saved: SavedBytes | None = None, *, status: str = "ok", reason: str | None = None,
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


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios of each saved-bytes row to the frozen (and full fine-tuning) row of its group."""
    def key(r: dict[str, Any]) -> tuple:
        return (r["scope"], r["model"], r["shape"], r["dtype"], r["batch"])

    ref = {(key(r), r["variant"]): r for r in rows if r["kind"] == "saved_bytes" and r["status"] == "ok"}
    for r in rows:
        if r["kind"] != "saved_bytes" or r["status"] != "ok":
            continue
        fr, ft = ref.get((key(r), "frozen")), ref.get((key(r), "full_ft"))
        if fr:
            r["saved_over_frozen"] = ratio(r["saved_bytes"], fr["saved_bytes"])
            r["activation_over_frozen"] = ratio(r["activation_bytes"], fr["activation_bytes"])
            goal_value = r["activation_over_frozen"] if r["scope"] == "vit" else r["saved_over_frozen"]
            r["goal_saved_over_frozen"] = goal_met("saved_over_frozen", goal_value)
        if ft:
            r["activation_over_full_ft"] = ratio(r["activation_bytes"], ft["activation_bytes"])


def _fail(exc: BaseException) -> str:
    traceback.print_exc(file=sys.stderr)
    return error_text(exc)


def profile_layers(s: dict[str, Any], device: Any, bar: Any) -> list[dict[str, Any]]:
    rows = []
    for dtype in s["dtypes"]:
        for shape in s["shapes"]:
            problem = make_problem(shape, s["rank"], dtype, device, batch=s["batch"], buffers=1, seed=s["seed"])
            for variant in s["variants"]:
                bar.set_postfix_str(f"layer {shape.key} {dtype} {variant}")
                args = ("layer", shape.name, shape.key, variant, dtype, s["batch"], problem.m, s["rank"])
                reason = None if variant == "full_ft" else variant_unavailable(variant, device, "count")
                if reason:
                    rows.append(saved_row(*args, status="skipped", reason=reason))
                else:
                    try:
                        saved = layer_saved_bytes(variant, problem)
                        retained = None
                        if device.type == "cuda" and variant != "full_ft":
                            f, _ = layer_forward(variant, problem)
                            x0 = problem.xs[0]
                            retained = retained_bytes(lambda: f(x0), device)
                        rows.append(saved_row(*args, saved, retained=retained))
                    except Exception as exc:
                        rows.append(saved_row(*args, status="error", reason=_fail(exc)))
                bar.update(1)
            del problem
            free_cuda()
    return rows


def needs_cuda_row(kind: str, s: dict[str, Any], variant: str, dtype: str, **extra: Any) -> dict[str, Any]:
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
            reason = None if variant == "full_ft" else variant_unavailable(variant, device, "count")
            wants = {
                "vit": "vit" in scopes and variant in s["variants"],
                "step": "step" in scopes and variant in s["variants"],
                "max-batch": "max-batch" in scopes and variant in s["max_batch_variants"],
            }
            if not cuda:
                if wants["step"]:
                    rows.append(needs_cuda_row("step_memory", s, variant, dtype))
                if wants["max-batch"]:
                    rows += [needs_cuda_row("max_batch", s, variant, dtype, budget_gib=g) for g in s["budgets_gib"]]
                wants["step"] = wants["max-batch"] = False
            if not any(wants.values()):
                continue
            vit_args = ("vit", s["model_label"], None, variant, dtype, s["vit_batch"], None, s["rank"])
            if reason:
                if wants["vit"]:
                    rows.append(saved_row(*vit_args, status="skipped", reason=reason))
                if wants["step"]:
                    rows.append({**needs_cuda_row("step_memory", s, variant, dtype), "reason": reason})
                if wants["max-batch"]:
                    rows += [{**needs_cuda_row("max_batch", s, variant, dtype, budget_gib=g), "reason": reason}
                             for g in s["budgets_gib"]]
                continue
            bar.set_postfix_str(f"{s['model']} {dtype} {variant}: building")
            model = build_vit_variant(variant, s["model"], rank=s["rank"], device=device, dtype=dtype, seed=s["seed"],
                                        num_classes=s["num_classes"], **s["timm_kwargs"])
            if wants["vit"]:
                bar.set_postfix_str(f"{s['model']} {dtype} {variant}: saved bytes")
                try:
                    rows.append(saved_row(*vit_args, vit_saved_bytes(model, s["vit_batch"], s["seed"])))
                except Exception as exc:
                    rows.append(saved_row(*vit_args, status="error", reason=_fail(exc)))
                free_cuda()
            if wants["step"]:
                bar.set_postfix_str(f"{s['model']} {dtype} {variant}: step at batch {s['step_batch']}")
                row = {"kind": "step_memory", "model": s["model_label"], "variant": variant, "dtype": dtype, "rank": s["rank"],
                       "batch": s["step_batch"], "status": "ok", "reason": None}
                try:
                    row.update(step_memory(model, s["step_batch"], s["num_classes"], device))
                except Exception as exc:
                    row.update(status="error", reason=_fail(exc), peak_bytes=None, resident_bytes=None, step_ms=None)
                free_cuda()
                rows.append(row)
            if wants["max-batch"]:
                for g in s["budgets_gib"]:
                    bar.set_postfix_str(f"{s['model']} {dtype} {variant}: largest batch under {g:g} GiB")
                    row = {"kind": "max_batch", "model": s["model_label"], "variant": variant, "dtype": dtype, "rank": s["rank"],
                           "budget_gib": g, "status": "ok", "reason": None}
                    try:
                        row.update(largest_batch(model, int(g * 2**30), s["num_classes"], device,
                                                   cap=s["max_batch_cap"]))
                    except Exception as exc:
                        row.update(status="error", reason=_fail(exc), max_batch=None, trials=None)
                    rows.append(row)
            bar.update(1)
            del model
            free_cuda()
            if save is not None:
                save(rows)
    return rows


def run_profile(s: dict[str, Any], device: Any, *, progress: bool = True,
                on_group: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Every scope of the settings ``s`` (``duallora profile-memory``'s); the rows with their ratios.
    ``on_group`` is called with the rows so far (ratios filled) after the layers and after each model."""
    from tqdm.auto import tqdm

    total = (len(s["dtypes"]) * len(s["shapes"]) * len(s["variants"]) if "layer" in s["scopes"] else 0) + \
        len(s["dtypes"]) * len(set(s["variants"]) | set(s["max_batch_variants"]))
    rows: list[dict[str, Any]] = []

    def save(more: list[dict[str, Any]]) -> None:
        if on_group is not None:
            so_far = rows + more
            add_ratios(so_far)
            on_group(so_far)

    with tqdm(total=total, desc="profile-memory", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        if "layer" in s["scopes"]:
            rows += profile_layers(s, device, bar)
            save([])
        if {"vit", "step", "max-batch"} & set(s["scopes"]):
            rows += profile_models(s, device, bar, save)
    add_ratios(rows)
    return rows
