"""``duallora bench``: time one DualLoRA layer, fused (Triton) vs unfused PyTorch vs the frozen
nn.Linear alone vs PEFT LoRA, over ViT-S/B/L layer shapes, ranks and dtypes; print a table and
write JSON (device, versions, git commit, command line, per-row results).

    duallora bench                       # the full matrix on the first GPU (or the CPU)
    duallora bench --quick               # a small CPU-friendly subset
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

HELP = "time fused vs unfused vs frozen vs PEFT DualLoRA layers; write JSON"


# ----------------------------------------------------------------------------- shared with profile-memory
def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags both ``bench`` and ``profile-memory`` take."""
    p.add_argument("--device", default="auto", help="auto (first GPU, else CPU), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", action="append", default=None, metavar="DTYPE",
                   help="float32, bfloat16 (bf16), float16; comma-separated or repeated")
    p.add_argument("--out", type=Path, default=None, metavar="PATH",
                   help="JSON output (default: bench/results/<device-slug>-<YYYY-MM-DD>[-memory].json)")
    p.add_argument("--quick", action="store_true", help="a small, CPU-friendly subset")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (torch.set_num_threads); 1 gives steadier CPU timings on a busy machine")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 for float32 matmuls (torch and the kernels alike); default: full float32")


def start(args: argparse.Namespace) -> Any:
    """Resolve the device and float32 policy; returns the device."""
    import torch

    device = B.resolve_device(args.device)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    if args.threads:
        torch.set_num_threads(args.threads)
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


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The matrix the flags select (``--quick`` fills what is not given)."""
    quick = B.QUICK if args.quick else {}
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
        "variants": variants, "passes": passes, "batch": batch,
        "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "buffers": args.buffers, "seed": args.seed,
    }


def _fmt(v: float | None, spec: str) -> str | None:
    return None if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]], file: Any = None) -> None:
    """Times (ms), ratios and the fused kernel's achieved TFLOP/s and GB/s (% of the device's peak)."""
    timing = {(r["shape"], r["batch"], r["dtype"], r["pass"], r["variant"], r["rank"]): r
              for r in rows if r["kind"] == "timing"}
    headers = ["layer", "d->n", "m", "dtype", "pass", "r", "frozen ms", "fused ms", "unfused ms", "peft ms",
               "fused/frozen", "unfused/fused", "fused TFLOP/s", "fused GB/s", "frozen TFLOP/s"]
    table = []
    for c in (r for r in rows if r["kind"] == "comparison"):
        fused = timing.get((c["shape"], c["batch"], c["dtype"], c["pass"], "fused", c["rank"]), {})
        frozen = timing.get((c["shape"], c["batch"], c["dtype"], c["pass"], "frozen", None), {})
        tf, gb = fused.get("tflops"), fused.get("gbps")
        pf, pb = fused.get("pct_peak_flops"), fused.get("pct_peak_bw")
        table.append([
            c["layer"], f"{c['d']}->{c['n']}", c["m"], c["dtype"], c["pass"], c["rank"],
            *(_fmt(c[f"{v}_ms"], ".3f") for v in ("frozen", "fused", "unfused", "peft")),
            _fmt(c["fused_over_frozen"], ".2f"), _fmt(c["unfused_over_fused"], ".2f"),
            None if tf is None else f"{tf:.1f}" + (f" ({pf:.0f}%)" if pf is not None else ""),
            None if gb is None else f"{gb:.0f}" + (f" ({pb:.0f}%)" if pb is not None else ""),
            _fmt(frozen.get("tflops"), ".2f"),
        ])
    print(B.format_table(headers, table), file=file)
    skipped = {(r["variant"], r["reason"]) for r in rows if r["kind"] == "timing" and r["status"] != "ok"}
    for variant, reason in sorted(skipped, key=str):
        print(f"  {variant}: {reason}", file=file)


def open_run(command: str, args: argparse.Namespace, settings: dict[str, Any], *, show_triton: bool) -> tuple[Any, Path, dict[str, Any]]:
    """Start the device, choose the JSON's path and fill its metadata; say where it goes.
    Returns (device, out path, document)."""
    device = start(args)
    out = args.out or B.default_out_path(device, args._suffix)
    json_settings = {**settings, "shapes": [s.key for s in settings["shapes"]], "tokens_per_image": B.TOKENS}
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

    def save(rows: list[dict[str, Any]]) -> None:
        doc["results"] = rows
        B.write_json(out, doc)

    rows = B.run_bench(device=device, progress=not args.no_progress, on_group=save, **settings)
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
    return run_fn(args)


def main(argv: list[str] | None = None) -> int:
    return module_main("duallora bench", __doc__.split("\n\n")[0], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
