"""``duallora bench``: time one DualLoRA layer, fused (Triton) vs unfused PyTorch (eager and,
on a GPU, torch.compile'd) vs the frozen nn.Linear alone vs PEFT LoRA, over ViT-S/B/L layer
shapes, ranks and dtypes, and count each one's device operations per forward+backward; print a
table and write JSON (device, versions, git commit, command line, per-row results) to
runs/bench/ unless ``--out`` says where.

    duallora bench                       # the full matrix on the first GPU (or the CPU)
    duallora bench --quick               # a small subset, under a minute on 2 CPU cores
    duallora bench --shapes vit_b.fc1,3072x768 --ranks 16 --dtype bf16 --out bench/results/x.json

Run it as a module as well: ``python -m duallora_kernels.commands.bench --quick``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .. import benchmark as B
from ..cli import add_threads_option, apply_threads, usable_cores

HELP = "time fused vs unfused (eager, compiled) vs frozen vs PEFT DualLoRA layers, count their device ops; write JSON"


# ----------------------------------------------------------------------------- shared with profile-memory
def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags both ``bench`` and ``profile-memory`` take."""
    p.add_argument("--device", default="auto", help="auto (first GPU, else CPU), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", action="append", default=None, metavar="DTYPE",
                   help="float32, bfloat16 (bf16), float16; comma-separated or repeated")
    p.add_argument("--out", type=Path, default=None, metavar="PATH",
                   help=f"JSON output (default: {B.DEFAULT_OUT_DIR}/<device-slug>-<YYYY-MM-DD>[-memory].json, a scratch "
                        "place; committed results are written to bench/results/ by naming it here)")
    p.add_argument("--quick", action="store_true",
                   help="a small, CPU-friendly subset (float32 only on a CPU without bfloat16 matmul instructions)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    add_threads_option(p)  # 1 gives steadier CPU timings on a busy machine
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 for float32 matmuls (torch and the kernels alike); default: full float32")


def start(args: argparse.Namespace) -> Any:
    """Resolve the device, CPU threads and float32 policy (the thread count is printed); returns the device."""
    import torch

    device = B.resolve_device(args.device)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    threads = apply_threads(args.threads)  # ValueError when not 1..usable_cores()
    why = "--threads" if args.threads else "torch's choice, at most the usable cores"
    print(f"threads: {threads} ({why}; {usable_cores()} core(s) usable by this process)", flush=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def cli_argv(args: argparse.Namespace) -> list[str]:
    """The argv this run was started with (for the JSON's command line)."""
    argv = getattr(args, "_argv", None)
    return list(argv) if argv is not None else sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == args.command else sys.argv[1:]


def finish(doc: dict[str, Any], out: Path) -> None:
    doc["complete"] = True
    if doc["device"]["type"] == "cpu" and hasattr(os, "getloadavg"):
        doc["device"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    B.write_json(out, doc)
    print(f"\nwrote {out}")


# ----------------------------------------------------------------------------- bench
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help=HELP, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    add_arguments(p)
    return p


def _epilog() -> str:
    shapes = ", ".join(f"{s.name}={s.key}" for s in B.SHAPES)
    return f"shapes: {shapes}\ngoals (reported, never asserted): " + "; ".join(g[2] for g in B.GOALS.values())


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.set_defaults(command="bench", _suffix="")
    p.add_argument("--shapes", action="append", default=None, metavar="SHAPES",
                   help="layer names (vit_b.fc1) or sizes (768x3072), comma-separated; default: all six")
    p.add_argument("--ranks", action="append", default=None, metavar="RANKS",
                   help=f"total adapter ranks, comma-separated (default: {','.join(map(str, B.RANKS))})")
    p.add_argument("--variants", default=",".join(B.VARIANTS), help=f"subset of {','.join(B.VARIANTS)}")
    p.add_argument("--passes", default=",".join(B.PASSES), help="fwd, fwd+bwd or both (default: both)")
    p.add_argument("--batch", type=int, default=None, help=f"images per batch; m = batch x {B.TOKENS} (default: 64)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up time per case (default: 25)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="timed time per case (default: 100)")
    p.add_argument("--buffers", type=int, default=None,
                   help="x/dY buffers rotated between runs (default: enough to cover 2x the GPU's L2; 2 on CPU)")
    p.add_argument("--no-count", action="store_true",
                   help="do not count each variant's device operations per forward+backward (op_count rows)")


def quick_dtypes(device_type: str) -> tuple[tuple[str, ...], str | None]:
    """``--quick``'s dtypes on a device, and why bfloat16 is left out (None when it is not).
    A CPU without bfloat16 matmul instructions runs bfloat16 100-400x slower than float32."""
    dtypes = tuple(B.QUICK["dtypes"])
    if device_type != "cpu" or "bfloat16" not in dtypes:
        return dtypes, None
    from ..bench_ops import cpu_bf16_matmul

    ok, why = cpu_bf16_matmul()
    if ok:
        return dtypes, None
    return tuple(d for d in dtypes if d != "bfloat16"), f"--quick: float32 only: {why}, so bfloat16 would take minutes"


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The matrix the flags select (``--quick`` fills what is not given)."""
    quick = dict(B.QUICK) if args.quick else {}
    notes = []
    if args.quick and not args.dtype:
        quick["dtypes"], note = quick_dtypes(_device_type(args.device))
        notes += [note] if note else []
    variants = B.parse_list(args.variants)
    bad = [v for v in variants if v not in B.VARIANTS]
    if bad:
        raise ValueError(f"--variants: unknown {bad}; choose from {B.VARIANTS}")
    passes = B.parse_list(args.passes)
    bad = [p for p in passes if p not in B.PASSES]
    if bad:
        raise ValueError(f"--passes: unknown {bad}; choose from {B.PASSES}")
    batch = args.batch or quick.get("batch", 64)
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    return {
        "shapes": B.parse_shapes(args.shapes or quick.get("shapes")),
        "ranks": B.parse_ranks(args.ranks or [",".join(map(str, quick.get("ranks", B.RANKS)))]),
        "dtypes": B.parse_dtypes(args.dtype or quick.get("dtypes")),
        "variants": variants, "passes": passes, "batch": batch, "count_ops": not args.no_count,
        "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "buffers": args.buffers, "seed": args.seed,
        "notes": notes,
    }


def _device_type(spec: str) -> str:
    try:
        return B.resolve_device(spec).type
    except RuntimeError:  # --device cuda without CUDA: start() says so
        return "cuda"


def _fmt(v: float | None, spec: str) -> str | None:
    return None if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]], file: Any = None) -> None:
    """Times (ms), ratios and the fused kernel's achieved TFLOP/s and GB/s (% of the device's peak)."""
    timing = {(r["shape"], r["batch"], r["dtype"], r["pass"], r["variant"], r["rank"]): r
              for r in rows if r["kind"] == "timing"}
    headers = ["layer", "d->n", "m", "dtype", "pass", "r", "frozen ms", "fused ms", "unfused ms", "compiled ms",
               "peft ms", "fused/frozen", "unfused/fused", "compiled/fused", "fused TFLOP/s", "fused GB/s"]
    table = []
    for c in (r for r in rows if r["kind"] == "comparison"):
        fused = timing.get((c["shape"], c["batch"], c["dtype"], c["pass"], "fused", c["rank"]), {})
        tf, gb = fused.get("tflops"), fused.get("gbps")
        pf, pb = fused.get("pct_peak_flops"), fused.get("pct_peak_bw")
        table.append([
            c["layer"], f"{c['d']}->{c['n']}", c["m"], c["dtype"], c["pass"], c["rank"],
            *(_fmt(c.get(f"{v}_ms"), ".3f") for v in ("frozen", "fused", "unfused", "unfused_compiled", "peft")),
            _fmt(c["fused_over_frozen"], ".2f"), _fmt(c["unfused_over_fused"], ".2f"),
            _fmt(c.get("unfused_compiled_over_fused"), ".2f"),
            None if tf is None else f"{tf:.1f}" + (f" ({pf:.0f}%)" if pf is not None else ""),
            None if gb is None else f"{gb:.0f}" + (f" ({pb:.0f}%)" if pb is not None else ""),
        ])
    print(B.format_table(headers, table), file=file)
    skipped = {(r["variant"], r["reason"]) for r in rows if r["kind"] == "timing" and r["status"] != "ok"}
    for variant, reason in sorted(skipped, key=str):
        print(f"  {variant}: {reason}", file=file)
    print_op_counts(rows, file=file)


def print_op_counts(rows: list[dict[str, Any]], file: Any = None) -> None:
    """Device operations of one forward+backward, per case and variant, and how they were counted."""
    from ..opcount import FROZEN_STEP, STEP_BUDGET

    counts = [r for r in rows if r["kind"] == "op_count"]
    if not counts:
        return
    variants = [v for v in B.VARIANTS if any(r["variant"] == v for r in counts)]
    got = {(r["shape"], r["batch"], r["dtype"], r["rank"], r["variant"]): r for r in counts}
    cases = list(dict.fromkeys((r["layer"], r["shape"], r["batch"], r["dtype"], r["rank"])
                               for r in counts if r["rank"] is not None))

    def cell(r: dict[str, Any] | None) -> str | None:
        return None if r is None or r["status"] != "ok" else str(r["device_ops"])

    table = [[layer, dtype, rank, *(cell(got.get((shape, batch, dtype, None if v == "frozen" else rank, v)))
                                    for v in variants)]
             for layer, shape, batch, dtype, rank in cases]
    methods = sorted({r["method"] for r in counts if r["method"]})
    print(f"\ndevice operations per forward+backward (budget: fused <= {STEP_BUDGET}, frozen = {FROZEN_STEP}; "
          f"counted by {', '.join(methods) or '-'})", file=file)
    print(B.format_table(["layer", "dtype", "r", *variants], table), file=file)
    notes = {(r["variant"], r["reason"]) for r in counts if r["status"] != "ok"}
    for variant, reason in sorted(notes, key=str):
        print(f"  {variant}: {reason}", file=file)


def open_run(command: str, args: argparse.Namespace, settings: dict[str, Any], *, show_triton: bool) -> tuple[Any, Path, dict[str, Any]]:
    """Start the device, choose the JSON's path and fill its metadata; say where it goes.
    Returns (device, out path, document)."""
    import torch

    device = start(args)
    out = args.out or B.default_out_path(device, args._suffix)
    json_settings = {**settings, "shapes": [s.key for s in settings["shapes"]], "tokens_per_image": B.TOKENS,
                     "threads": torch.get_num_threads()}
    doc = B.run_metadata(command, cli_argv(args), device, json_settings)
    triton = f", triton {doc['versions']['triton']}" if show_triton else ""
    print(f"device: {doc['device']['name']} ({device}); torch {doc['versions']['torch']}{triton}; writing {out}",
          flush=True)
    return device, out, doc


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"duallora bench: {exc}", file=sys.stderr)
        return 2
    device, out, doc = open_run("bench", args, settings, show_triton=True)
    for note in settings["notes"]:
        print(note, flush=True)

    def save(rows: list[dict[str, Any]]) -> None:
        doc["results"] = rows
        B.write_json(out, doc)

    run_kw = {k: v for k, v in settings.items() if k != "notes"}
    rows = B.run_bench(device=device, progress=not args.no_progress, on_group=save, **run_kw)
    doc["results"] = rows
    print_table(rows)
    finish(doc, out)
    return 0


def module_main(prog: str, description: str, add_args: Any, run_fn: Any, argv: list[str] | None) -> int:
    """``python -m duallora_kernels.commands.<name>``: parse, remember the argv for the JSON, run."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_args(parser)
    args = parser.parse_args(argv)
    args._argv = sys.argv[1:] if argv is None else argv
    try:
        return run_fn(args)
    except ValueError as exc:  # bad input found after parsing (e.g. --threads over the usable cores)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return module_main("duallora bench", __doc__.split("\n\n")[0], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
