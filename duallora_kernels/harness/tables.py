"""Tables: aligned plain text for the commands, GitHub markdown for the README's performance
section (:func:`render_performance`, rendered by ``python -m duallora_kernels.readme``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..opcount import FROZEN_STEP, STEP_BUDGET
from .problems import GOALS
from .results import load_docs
from .variants import FUSED_TRITON, VARIANTS
from .vit_models import VIT_VARIANTS

__all__ = ["dtype_label", "fmt_ratio", "format_bytes", "format_table", "HEADLINE_RANK", "speed_table", "ops_table", "saved_table",
           "step_tables", "render_performance"]


def fmt_ratio(v: float | None) -> str | None:
    return None if v is None else f"{v:.2f}x"


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """A table of strings: aligned plain text, or GitHub markdown."""
    cells = [[("-" if c is None else str(c)) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in cells)])


# ----------------------------------------------------------------------------- README: performance
HEADLINE_RANK = 16


def _source(path: Path, root: Path) -> str:
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = path.name
    return f"[{path.name}]({rel})"


def _device(doc: dict[str, Any]) -> str:
    d = doc["device"]
    return "CPU" if d["type"] == "cpu" else d["name"].replace("NVIDIA ", "")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _x(v: float | None, goal: bool | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}x" + ("" if goal is None else " ✓" if goal else " ✗")


def dtype_label(row: dict[str, Any]) -> str:
    """A row's dtype as the tables show it: ``float32``, or ``float32, autocast bfloat16`` for a
    run under ``--amp`` (rows of schema /1 and /2 ran without autocast)."""
    amp = row.get("amp", "off")
    return row["dtype"] if amp == "off" else f"{row['dtype']}, autocast {amp}"


def _with_note(doc: dict[str, Any]) -> str:
    note = "" if doc.get("complete", True) else " (incomplete run)"
    return f"{_device(doc)}, {doc['date'][:10]}{note}"


def speed_table(docs: list[tuple[Path, dict[str, Any]]], root: Path, rank: int = HEADLINE_RANK) -> str | None:
    rows, seen = [], set()
    for path, doc in docs:
        comps = [r for r in doc["results"] if r["kind"] == "comparison" and r["pass"] == "fwd+bwd"]
        if not comps:
            continue
        ranks = sorted({r["rank"] for r in comps})
        pick = rank if rank in ranks else ranks[-1]
        for c in comps:
            key = (doc["device"]["name"], doc["date"][:10], dtype_label(c), c["shape"], c["m"], c["rank"])
            if c["rank"] != pick or key in seen:  # a case measured by two files of one day: the first file's
                continue
            seen.add(key)
            rows.append([
                _with_note(doc), dtype_label(c), f"{c['layer']} {c['d']}→{c['n']}", c["m"], c["rank"],
                _ms(c["frozen_ms"]), _x(c.get("floor_over_frozen")), _ms(c["fused_ms"]),
                *(_ms(c.get(f"fused_{design}_ms")) for design in ("single", "split", "tma")),
                _ms(c.get("fused_fixed_a_ms")),
                _ms(c["unfused_ms"]), _ms(c.get("unfused_compiled_ms")), _ms(c["peft_ms"]), _ms(c.get("cuda_ms")),
                _x(c.get("fused_over_floor"), c.get("goal_fused_over_floor")), _x(c["fused_over_frozen"]),
                _x(c.get("fused_fixed_a_over_frozen")),
                _x(c["unfused_over_fused"], c.get("goal_unfused_over_fused")),
                _x(c.get("unfused_compiled_over_fused"), c.get("goal_unfused_compiled_over_fused")),
                _x(c.get("cuda_over_frozen"), c.get("goal_cuda_over_frozen")),
                _source(path, root),
            ])
    if not rows:
        return None
    headers = ["device, date", "dtype", "layer d→n", "m", "r", "frozen ms", "floor/frozen", "fused ms", "single ms",
               "split ms", "tma ms", "fixed-A ms", "unfused ms", "compiled ms", "peft ms", "cuda ms",
               f"fused/floor (goal {_goal('fused_over_floor')})", "fused/frozen", "fixed-A/frozen",
               f"unfused/fused (goal {_goal('unfused_over_fused')})",
               f"compiled/fused (goal {_goal('unfused_compiled_over_fused')})",
               f"cuda/frozen (goal {_goal('cuda_over_frozen')})", "source"]
    return ("**One DualLoRA layer, forward+backward** (median ms; rank "
            f"{rank} or the file's largest; every rank is in the JSON; floor = the frozen time x the roofline "
            "ratio of the fused op's unavoidable work to the frozen layer's at this rank, on the device's peaks "
            "(ops/fused_linear_cost.py); fused = the design `auto` picks, single / split / tma = each Triton design "
            "forced (ops/fused_linear.py); fixed-A = the fused op with A fixed (B-only training, `train_a=False`); "
            "compiled = the unfused composition under "
            "torch.compile, GPU only; cuda = the CUDA C++ tensor-core backend (csrc/); '-' = not run on that device, see the file's reasons)\n\n"
            + format_table(headers, rows, markdown=True))


def _goal(name: str) -> str:
    op, bound, _ = GOALS[name]
    return f"{'≤' if op == '<=' else '≥'} {bound:g}"


def ops_table(docs: list[tuple[Path, dict[str, Any]]], root: Path, rank: int = HEADLINE_RANK) -> str | None:
    """Device operations of one forward+backward per variant (``op_count`` rows; files of schema
    /1 have none)."""
    # the variants some file counted, in VARIANTS' order (a column of dashes says nothing)
    variants = [v for v in VARIANTS
                if any(r["kind"] == "op_count" and r["variant"] == v for _, doc in docs for r in doc["results"])]
    rows = []
    for path, doc in docs:
        counts = [r for r in doc["results"] if r["kind"] == "op_count"]
        ranks = sorted({r["rank"] for r in counts if r["rank"] is not None})
        if not ranks:
            continue
        pick = rank if rank in ranks else ranks[-1]
        got = {(r["shape"], r["batch"], dtype_label(r), r["variant"]): r for r in counts if r["rank"] in (None, pick)}
        cases = dict.fromkeys((r["layer"], r["d"], r["n"], r["shape"], r["batch"], r["m"], dtype_label(r))
                              for r in counts)
        for layer, d, n, shape, batch, m, dtype in cases:
            def cell(v: str) -> str:
                r = got.get((shape, batch, dtype, v))
                if r is None or r["status"] != "ok":
                    return "-"
                n = r["device_ops"]
                if r.get("amp", "off") != "off":  # the budgets are those of a step without autocast's casts
                    return str(n)
                if v in FUSED_TRITON:
                    return f"{n} {'✓' if n <= STEP_BUDGET else '✗'}"
                return f"{n} {'✓' if n == FROZEN_STEP else '✗'}" if v == "frozen" else str(n)

            methods = sorted({r["method"] for (s_, b_, dt_, _), r in got.items()
                              if (s_, b_, dt_) == (shape, batch, dtype) and r["method"]})
            rows.append([_with_note(doc), dtype, f"{layer} {d}→{n}", m, pick, *(cell(v) for v in variants),
                         ", ".join(methods) or "-", _source(path, root)])
    if not rows:
        return None
    names = {"fused": f"fused (budget ≤ {STEP_BUDGET})", "frozen": f"frozen (= {FROZEN_STEP})", "unfused_compiled": "compiled"}
    headers = ["device, date", "dtype", "layer d→n", "m", "r", *(names.get(v, v) for v in variants), "counted by", "source"]
    return ("**Device operations of one forward+backward** (kernels and torch ops that launch device work, memsets "
            "included, views and allocations aside; `opcount` = a TorchDispatchMode plus the Triton launch hook, on "
            "the CPU; `torch.profiler` = the CUDA kernel/memcpy/memset activities of one step after a warm-up, on a GPU, "
            "where autograd's backward threads are out of a dispatch mode's reach)\n\n"
            + format_table(headers, rows, markdown=True))


def saved_table(docs: list[tuple[Path, dict[str, Any]]], root: Path) -> str | None:
    variants = VIT_VARIANTS
    rows = []
    for path, doc in docs:
        saved = [r for r in doc["results"] if r["kind"] == "saved_bytes"]
        groups: dict[tuple, dict[str, dict]] = {}
        for r in saved:
            key = (r["scope"], r["model"], r.get("shape"), r["dtype"], r["batch"], r["rank"])
            groups.setdefault(key, {})[r["variant"]] = r
        for (scope, model, shape, dtype, batch, rk), by_v in groups.items():
            def act(v: str) -> str:
                r = by_v.get(v)
                return "-" if r is None or r["status"] != "ok" else format_bytes(r["activation_bytes"])

            def over(v: str, ref: str) -> str:
                r = by_v.get(v)
                return "-" if r is None or r["status"] != "ok" else _x(r[f"activation_over_{ref}"])

            rows.append([_with_note(doc), scope, model if shape is None else f"{model} {shape}", dtype, batch, rk,
                         *(act(v) for v in variants), over("fused", "frozen"), over("fused_fixed_a", "frozen"),
                         over("unfused", "frozen"),
                         over("fused", "full_ft"), over("unfused", "full_ft"), _source(path, root)])
    if not rows:
        return None
    headers = ["device, date", "scope", "layer / model", "dtype", "batch", "r", *variants,
               "fused/frozen", "fused_fixed_a/frozen", "unfused/frozen", "fused/full_ft", "unfused/full_ft", "source"]
    return ("**Bytes saved for backward** (activations: unique storages autograd saves, parameters and buffers "
            "left out; a frozen layer saves only its weight, so its activations are 0 B; fused_fixed_a = the fused op "
            "with A fixed (B-only training), which keeps T = x A^T and the assembled A instead of x; full_ft = every "
            "weight trains, what any trainable layer must keep; goal: within 1.05x of frozen)\n\n"
            + format_table(headers, rows, markdown=True))


def step_tables(docs: list[tuple[Path, dict[str, Any]]], root: Path) -> list[str]:
    out = []
    step_rows, mb_rows = [], []
    for path, doc in docs:
        steps = [r for r in doc["results"] if r["kind"] == "step_memory" and r["status"] == "ok"]
        for r in steps:
            step_rows.append([_with_note(doc), r["model"], r["dtype"], r["batch"], r["rank"], r["variant"],
                              format_bytes(r["peak_bytes"]), f"{r['step_ms']:.1f}", _source(path, root)])
        mb = [r for r in doc["results"] if r["kind"] == "max_batch" and r["status"] == "ok"]
        variants = list(dict.fromkeys(r["variant"] for r in mb))
        got = {(r["dtype"], r["budget_gib"], r["variant"]): r["max_batch"] for r in mb}
        for dtype, g in dict.fromkeys((r["dtype"], r["budget_gib"]) for r in mb):
            mb_rows.append([_with_note(doc), mb[0]["model"], dtype, f"{g:g} GiB",
                            ", ".join(f"{v}: {got.get((dtype, g, v), '-')}" for v in variants), _source(path, root)])
    if step_rows:
        out.append("**ViT training step** (peak allocator memory and median time)\n\n" + format_table(
            ["device, date", "model", "dtype", "batch", "r", "variant", "peak memory", "step ms", "source"],
            step_rows, markdown=True))
    if mb_rows:
        out.append("**Largest training batch under a memory budget** (torch.cuda.set_per_process_memory_fraction; "
                   "the CUDA context comes on top)\n\n" + format_table(
                       ["device, date", "model", "dtype", "budget", "largest batch", "source"], mb_rows, markdown=True))
    return out


def render_performance(paths: Sequence[Path], root: Path, rank: int = HEADLINE_RANK) -> str:
    """The README section (without the markers) for the results files ``paths``."""
    docs = load_docs(paths)
    parts = ["<!-- generated by python -m duallora_kernels.readme from bench/results/*.json: do not edit by hand -->",
             "## Performance", ""]
    if not docs:
        parts.append("No results in bench/results/ yet: see bench/README.md for the commands.")
        return "\n".join(parts)
    for t in [speed_table(docs, root, rank), ops_table(docs, root, rank), saved_table(docs, root), *step_tables(docs, root)]:
        if t:
            parts += [t, ""]
    parts.append("How each number is measured, and the commands that produce them: [bench/README.md](bench/README.md).")
    return "\n".join(parts)
