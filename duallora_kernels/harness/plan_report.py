"""The memory plan as text: the terminal tables of ``duallora profile-memory --plan``, the README's
"Memory planner" section (from bench/results/plan-*.json, and the GPU checks among them), and
the JSON document the plan is written to."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .memory_plan import PLAN_SCHEMA, estimate_note, not_fitting
from .problems import GOALS, goal_met
from .tables import format_bytes, format_table

__all__ = ["breakdown_table", "largest_batch_table", "fixed_a_goals", "print_plan", "plan_document",
           "render_plan_section", "CHECK_SCHEMA"]

CHECK_SCHEMA = "duallora-plan-check/1"
_PARTS = (("parameters", "params"), ("gradients", "grads"), ("optimizer", "optimizer"), ("saved", "saved"),
          ("transient", "transient"), ("allocator", "allocator"))


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind") == "plan" and r["status"] == "ok"]


def breakdown_table(rows: Sequence[dict[str, Any]], gpu: str | None = None, markdown: bool = False) -> str:
    """Per variant: the step's memory at the plan's batch by part, and the total a GPU (the first
    one of the plan by default) adds its cuBLAS workspaces, attention scratch and context to."""
    ok = _ok(rows)
    if not ok:
        return ""
    key = gpu or ok[0]["gpus"][0]["gpu"]
    body = []
    for r in ok:
        g = next(x for x in r["gpus"] if x["gpu"] == key)
        extra = g["workspace_bytes"] + g["attention_scratch_bytes"]
        body.append([r["variant"], *(format_bytes(r["breakdown"][k]) for k, _ in _PARTS), format_bytes(extra),
                     format_bytes(g["context_bytes"]), format_bytes(g["device_bytes"])])
    headers = ["variant", *(h for _, h in _PARTS), "workspace", "context", f"total ({key})"]
    return format_table(headers, body, markdown=markdown)


def largest_batch_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    ok = _ok(rows)
    if not ok:
        return ""
    gpus = [g["gpu"] for g in ok[0]["gpus"]]
    usable = {g["gpu"]: g["usable_bytes"] for g in ok[0]["gpus"]}

    def cell(g: dict[str, Any]) -> str:
        return f">= {g['max_batch']}" if g["max_batch_capped"] else str(g["max_batch"])

    body = [[k, format_bytes(usable[k]), *(cell(next(x for x in r["gpus"] if x["gpu"] == k)) for r in ok)]
            for k in gpus]
    return format_table(["GPU", "usable", *(r["variant"] for r in ok)], body, markdown=markdown)


def fixed_a_goals(rows: Sequence[dict[str, Any]]) -> str | None:
    """One sentence: B-only training (``fused_fixed_a``) against ``frozen``, the step's total on each GPU and
    its largest batch (GPUs where both batches reach the search's cap left out), against the goals
    (:data:`~.problems.GOALS`); None when the plan lacks either variant."""
    by = {r["variant"]: r for r in _ok(rows)}
    if "fused_fixed_a" not in by or "frozen" not in by:
        return None
    gpus = {g["gpu"]: g for g in by["frozen"]["gpus"]}
    totals, batches = [], []
    for g in by["fused_fixed_a"]["gpus"]:
        f = gpus[g["gpu"]]
        totals.append(g["device_bytes"] / f["device_bytes"])
        if not (g["max_batch_capped"] and f["max_batch_capped"]) and f["max_batch"]:
            batches.append(g["max_batch"] / f["max_batch"])

    def verdict(name: str, value: float) -> str:
        op, bound, _ = GOALS[name]
        return f"goal {'≤' if op == '<=' else '≥'} {bound:g}: {'met' if goal_met(name, value) else 'missed'}"

    total = f"{min(totals):.3f}x-{max(totals):.3f}x" if len(totals) > 1 else f"{totals[0]:.3f}x"
    text = (f"B-only training (`fused_fixed_a`: A fixed, the op keeps T = x A^T instead of x) against frozen: step "
            f"total {total} of frozen's ({verdict('fixed_a_total_over_frozen', max(totals))})")
    if batches:
        text += (f", largest batch {min(batches):.3f}x-{max(batches):.3f}x of frozen's over the GPUs "
                 f"({verdict('fixed_a_batch_over_frozen', min(batches))})")
    return text + "."


def _heading(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    return (f"{s['model_label']}, parameters {s['dtype']}, autocast {s['amp']}, {s['optimizer']}, rank {s['rank']} "
            f"on {','.join(s['targets'])}, batch {s['batch']}")


def print_plan(doc: dict[str, Any], file: Any = None) -> None:
    rows = doc["results"]
    print(f"\npredicted peak of one training step: {_heading(doc)}", file=file)
    print(breakdown_table(rows), file=file)
    print("\nlargest batch that fits (predicted reserved memory <= usable)", file=file)
    print(largest_batch_table(rows), file=file)
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['variant']}: {r['status']}: {r['reason']}", file=file)
    for line in not_fitting(rows):
        print(f"  {line}", file=file)
    goals = fixed_a_goals(rows)
    if goals:
        print(f"\n{goals}", file=file)
    print(f"\nnote: {estimate_note()}", file=file)


def plan_document(meta: dict[str, Any], gpus: Sequence[Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The plan's JSON: the run header (:func:`~.results.run_metadata`) under its own schema, the
    GPU table with sources, and one row per variant."""
    return {**meta, "schema": PLAN_SCHEMA, "gpus": [g.as_dict() for g in gpus], "estimates": estimate_note(),
            "results": rows, "complete": True}


def _link(path: Path, root: Path) -> str:
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(path.name)
    return f"[{rel.as_posix()}]({rel.as_posix()})"


def _check_table(checks: list[tuple[Path, dict[str, Any]]], root: Path) -> list[str]:
    if not checks:
        return ["**Unvalidated on hardware**: no GPU has run the plan check yet (`bash bench/run_gpu.sh`, step "
                "plan-check, writes plan-check-*.json). Until one has, these are predictions only."]
    lines = ["Predictions checked on a GPU (error = predicted / measured - 1; goal: within 10% of the reserved peak):",
             ""]
    body = []
    for path, doc in checks:
        for r in doc["results"]:
            if r.get("status") != "ok":
                body.append([doc["device"]["name"], r["variant"], r.get("batch"), "-", "-", "-", "-",
                             f"{r['status']}: {r.get('reason')}", _link(path, root)])
                continue
            body.append([doc["device"]["name"], r["variant"], r["batch"], format_bytes(r["measured_reserved"]),
                         format_bytes(r["predicted_reserved"]), f"{r['reserved_error']:+.1%}",
                         f"{r['allocated_error']:+.1%}", "yes" if abs(r["reserved_error"]) <= 0.10 else "no",
                         _link(path, root)])
    lines.append(format_table(["GPU", "variant", "batch", "measured reserved", "predicted", "error (reserved)",
                               "error (allocated)", "within 10%", "file"], body, markdown=True))
    return lines


def render_plan_section(paths: Sequence[Path], root: Path) -> str:
    """The README's "Memory planner" section (without markers) from plan-*.json files: each plan's
    breakdown and largest batches, its plot when there is one, and the GPU checks."""
    docs, checks = [], []
    for p in sorted(paths):
        doc = json.loads(Path(p).read_text())
        if doc.get("schema") == PLAN_SCHEMA:
            docs.append((Path(p), doc))
        elif doc.get("schema") == CHECK_SCHEMA:
            checks.append((Path(p), doc))
    parts = ["<!-- generated by python -m duallora_kernels.readme from bench/results/plan-*.json: do not edit by hand -->",
             "## Memory planner", "",
             "`duallora profile-memory --plan` predicts one training step's peak GPU memory and the largest batch "
             "that fits each named GPU without a GPU: the step runs on fake tensors (shapes, no data) on the CPU, "
             "every storage's life is followed, and PyTorch's caching allocator is replayed on it "
             "([harness/memory_plan.py](duallora_kernels/harness/memory_plan.py)). Parts: *params* (and buffers: "
             "DualLoRA's memory bases), *grads*, *optimizer* (AdamW state), *saved* (what autograd keeps for "
             "backward beyond the parameters: activations, and under autocast the bf16 copies of frozen weights), "
             "*transient* (live at the peak, not saved: outputs in flight, activation gradients), *allocator* "
             "(reserved minus allocated in the allocator replay), *workspace* (cuBLAS workspaces and flash "
             "attention's backward scratch), *context* (the CUDA context, an estimate).", ""]
    if not docs:
        parts.append("No plan in bench/results/ yet.")
    for path, doc in docs:
        rows = doc["results"]
        took = doc["settings"].get("plan_seconds")
        took = f", planned in {took:g} s on one CPU core" if took is not None else ""
        parts += [f"**{_heading(doc)}** ({_link(path, root)}; {doc['date'][:10]}{took}):", "",
                  breakdown_table(rows, markdown=True), "", "Largest batch that fits:", "",
                  largest_batch_table(rows, markdown=True), ""]
        goals = fixed_a_goals(rows)
        if goals:
            parts += [goals, ""]
        png = path.with_suffix(".png")
        if png.exists():
            parts += [f"![memory plan]({_link(png, root).split('](')[1][:-1]})", ""]
        skipped = [f"{r['variant']} ({r['reason']})" for r in rows if r["status"] != "ok"]
        if skipped:
            parts += ["Not planned: " + "; ".join(skipped) + ".", ""]
        gpu_sources = "; ".join(f"{g['key']}: {g['memory_gb']:g} GB, {g['source']}" for g in doc["gpus"])
        parts += [f"GPU memory from the vendors' pages ({gpu_sources}). {doc['estimates'][0].upper()}"
                  f"{doc['estimates'][1:]}.", ""]
    parts += _check_table(checks, root)
    return "\n".join(parts).rstrip() + "\n"
