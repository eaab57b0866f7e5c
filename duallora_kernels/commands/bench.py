"""``duallora bench``: time one DualLoRA layer, fused (Triton) vs unfused PyTorch (eager and,
on a GPU, torch.compile'd) vs the frozen nn.Linear alone vs PEFT LoRA, over ViT-S/B/L layer
shapes, ranks and dtypes, and count each one's device operations per forward+backward; print a
table and write JSON (device, versions, git commit, command line, per-row results) to
runs/bench/ unless ``--out`` says where.

    duallora bench                       # the full matrix on the first GPU (or the CPU)
    duallora bench --quick               # a small subset, under a minute on 2 CPU cores
    duallora bench --shapes vit_b.fc1,3072x768 --ranks 16 --dtype bf16 --out bench/results/x.json
    duallora bench --amp bf16            # float32 layers, each forward under torch.autocast(bfloat16)
    duallora bench --tasks 1,5,10,20     # how a layer's and a ViT step's cost grow with the finished tasks

Run it as a module as well: ``python -m duallora_kernels.commands.bench --quick``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..harness import devices
from ..harness.problems import (AMP_DTYPES, GOALS, QUICK, RANKS, SHAPES, TOKENS, amp_name, parse_amp, parse_dtypes,
                                parse_list, parse_ranks, parse_shapes)
from ..harness.tables import dtype_label, format_table
from ..harness.timing import run_bench
from ..harness.variants import PASSES, VARIANTS
from ..opcount import FROZEN_STEP, STEP_BUDGET
from .common import add_common_arguments, module_main, run_command

HELP = ("time fused (Triton, CUDA C++) vs unfused (eager, compiled) vs frozen vs PEFT DualLoRA layers, count their "
        "device ops; write JSON")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help=HELP, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    add_arguments(p)
    return p


def _epilog() -> str:
    shapes = ", ".join(f"{s.name}={s.key}" for s in SHAPES)
    return f"shapes: {shapes}\ngoals (reported, never asserted): " + "; ".join(g[2] for g in GOALS.values())


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.set_defaults(command="bench", _suffix="")
    p.add_argument("--shapes", action="append", default=None, metavar="SHAPES",
                   help="layer names (vit_b.fc1) or sizes (768x3072), comma-separated; default: all six")
    p.add_argument("--ranks", action="append", default=None, metavar="RANKS",
                   help=f"total adapter ranks, comma-separated (default: {','.join(map(str, RANKS))})")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--passes", default=",".join(PASSES), help="fwd, fwd+bwd or both (default: both)")
    p.add_argument("--batch", type=int, default=None, help=f"images per batch; m = batch x {TOKENS} (default: 64)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up time per case (default: 25)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="timed time per case (default: 100)")
    p.add_argument("--buffers", type=int, default=None,
                   help="x/dY buffers rotated between runs (default: enough to cover 2x the GPU's L2; 2 on CPU)")
    p.add_argument("--amp", default="off", choices=tuple(AMP_DTYPES),
                   help="run every variant's forward under torch.autocast in this dtype, with float32 parameters and "
                        "inputs, as mixed-precision training does (default: off); --dtype must then be float32")
    p.add_argument("--no-count", action="store_true",
                   help="do not count each variant's device operations per forward+backward (op_count rows)")
    g = p.add_argument_group("--tasks: how the cost grows with the number of finished tasks (instead of the matrix)")
    g.add_argument("--tasks", default=None, metavar="T1,T2,...",
                   help="numbers of finished tasks, e.g. 1,5,10,20: one layer (the first of --shapes, default "
                        "vit_b.fc1; --batch images, default 8) and a whole ViT step (--vit-batch images) in the state "
                        "of training the next task, beside the frozen model: device ops, time, planned memory, "
                        "parameter bytes; writes a plot beside the JSON")
    g.add_argument("--vit-batch", type=int, default=2, help="--tasks: images per ViT step (default: 2)")
    g.add_argument("--basis-per-task", type=float, default=None,
                   help="--tasks: memory basis columns each finished task adds, as a fraction of the layer's input "
                        "width (default: 1/32)")
    g.add_argument("--model", default="vit_base_patch16_224", help="--tasks: timm ViT (random init; default: "
                   "vit_base_patch16_224)")
    for flag in ("img-size", "patch-size", "depth", "embed-dim", "num-heads"):
        g.add_argument(f"--{flag}", type=int, default=None, help=f"--tasks: override the model's {flag.replace('-', ' ')}")


def quick_dtypes(device_type: str) -> tuple[tuple[str, ...], str | None]:
    """``--quick``'s dtypes on a device, and why bfloat16 is left out (None when it is not).
    A CPU without bfloat16 matmul instructions runs bfloat16 100-400x slower than float32."""
    dtypes = tuple(QUICK["dtypes"])
    if device_type != "cpu" or "bfloat16" not in dtypes:
        return dtypes, None
    ok, why = devices.cpu_bf16_matmul()
    if ok:
        return dtypes, None
    return tuple(d for d in dtypes if d != "bfloat16"), f"--quick: float32 only: {why}, so bfloat16 would take minutes"


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The matrix the flags select (``--quick`` fills what is not given)."""
    quick = dict(QUICK) if args.quick else {}
    notes = []
    amp = parse_amp(args.amp)
    if amp is not None:
        dtypes = parse_dtypes(args.dtype or ["float32"])
        if dtypes != ["float32"]:
            raise ValueError(f"--amp {args.amp} casts float32 layers to {amp_name(amp)} as autocast does; "
                             f"give --dtype float32 (the default with --amp), not {','.join(dtypes)}")
        _check_amp(args.amp, _device_type(args.device))
        quick["dtypes"] = ["float32"]
    elif args.quick and not args.dtype:
        quick["dtypes"], note = quick_dtypes(_device_type(args.device))
        notes += [note] if note else []
    variants = parse_list(args.variants)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"--variants: unknown {bad}; choose from {VARIANTS}")
    passes = parse_list(args.passes)
    bad = [p for p in passes if p not in PASSES]
    if bad:
        raise ValueError(f"--passes: unknown {bad}; choose from {PASSES}")
    batch = args.batch or quick.get("batch", 64)
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    return {
        "shapes": parse_shapes(args.shapes or quick.get("shapes")),
        "ranks": parse_ranks(args.ranks or [",".join(map(str, quick.get("ranks", RANKS)))]),
        "dtypes": parse_dtypes(args.dtype or quick.get("dtypes")),
        "variants": variants, "passes": passes, "batch": batch, "count_ops": not args.no_count,
        "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "buffers": args.buffers, "seed": args.seed,
        "amp": args.amp, "notes": notes,
    }


def _check_amp(amp: str, device_type: str) -> None:
    """ValueError (one line, what to do) where ``device_type`` cannot compute in ``--amp``'s dtype;
    the trainer's own rule (:func:`duallora_kernels.continual.execution.amp_dtype`)."""
    import torch

    from ..continual.execution import amp_dtype

    if device_type == "cuda" and not torch.cuda.is_available():
        return  # --device cuda without CUDA: the start of the run says so
    amp_dtype(amp, torch.device(device_type))


def _device_type(spec: str) -> str:
    try:
        return devices.resolve_device(spec).type
    except RuntimeError:  # --device cuda without CUDA: start() says so
        return "cuda"


def _fmt(v: float | None, spec: str) -> str | None:
    return None if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]], file: Any = None) -> None:
    """Times (ms), ratios and the fused kernel's achieved TFLOP/s and GB/s (% of the device's peak)."""
    timing = {(r["shape"], r["batch"], r["dtype"], r["pass"], r["variant"], r["rank"]): r
              for r in rows if r["kind"] == "timing"}
    headers = ["layer", "d->n", "m", "dtype", "pass", "r", "frozen ms", "floor/frozen", "fused ms", "single ms",
               "split ms", "tma ms", "fixed-A ms", "unfused ms", "compiled ms", "peft ms", "cuda ms", "fused/floor",
               "fused/frozen", "fixed-A/frozen", "unfused/fused", "compiled/fused", "cuda/frozen", "fused TFLOP/s",
               "fused GB/s"]
    table = []
    for c in (r for r in rows if r["kind"] == "comparison"):
        fused = timing.get((c["shape"], c["batch"], c["dtype"], c["pass"], "fused", c["rank"]), {})
        tf, gb = fused.get("tflops"), fused.get("gbps")
        pf, pb = fused.get("pct_peak_flops"), fused.get("pct_peak_bw")
        table.append([
            c["layer"], f"{c['d']}->{c['n']}", c["m"], dtype_label(c), c["pass"], c["rank"],
            _fmt(c.get("frozen_ms"), ".3f"), _fmt(c.get("floor_over_frozen"), ".2f"),
            *(_fmt(c.get(f"{v}_ms"), ".3f") for v in ("fused", "fused_single", "fused_split", "fused_tma",
                                                      "fused_fixed_a", "unfused", "unfused_compiled", "peft", "cuda")),
            _fmt(c.get("fused_over_floor"), ".2f"), _fmt(c["fused_over_frozen"], ".2f"),
            _fmt(c.get("fused_fixed_a_over_frozen"), ".2f"), _fmt(c["unfused_over_fused"], ".2f"),
            _fmt(c.get("unfused_compiled_over_fused"), ".2f"), _fmt(c.get("cuda_over_frozen"), ".2f"),
            None if tf is None else f"{tf:.1f}" + (f" ({pf:.0f}%)" if pf is not None else ""),
            None if gb is None else f"{gb:.0f}" + (f" ({pb:.0f}%)" if pb is not None else ""),
        ])
    print(format_table(headers, table), file=file)
    skipped = {(r["variant"], r["reason"]) for r in rows if r["kind"] == "timing" and r["status"] != "ok"}
    for variant, reason in sorted(skipped, key=str):
        print(f"  {variant}: {reason}", file=file)
    print_op_counts(rows, file=file)


def print_op_counts(rows: list[dict[str, Any]], file: Any = None) -> None:
    """Device operations of one forward+backward, per case and variant, and how they were counted."""
    counts = [r for r in rows if r["kind"] == "op_count"]
    if not counts:
        return
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in counts)]
    got = {(r["shape"], r["batch"], dtype_label(r), r["rank"], r["variant"]): r for r in counts}
    cases = list(dict.fromkeys((r["layer"], r["shape"], r["batch"], dtype_label(r), r["rank"])
                               for r in counts if r["rank"] is not None))

    def cell(r: dict[str, Any] | None) -> str | None:
        return None if r is None or r["status"] != "ok" else str(r["device_ops"])

    table = [[layer, dtype, rank, *(cell(got.get((shape, batch, dtype, None if v == "frozen" else rank, v)))
                                    for v in variants)]
             for layer, shape, batch, dtype, rank in cases]
    methods = sorted({r["method"] for r in counts if r["method"]})
    print(f"\ndevice operations per forward+backward (budget: fused <= {STEP_BUDGET}, frozen = {FROZEN_STEP}; "
          f"counted by {', '.join(methods) or '-'})", file=file)
    print(format_table(["layer", "dtype", "r", *variants], table), file=file)
    notes = {(r["variant"], r["reason"]) for r in counts if r["status"] != "ok"}
    for variant, reason in sorted(notes, key=str):
        print(f"  {variant}: {reason}", file=file)


def measure(settings: dict[str, Any], device: Any, **kw: Any) -> list[dict[str, Any]]:
    """Say the settings' notes, then time the matrix (:func:`~duallora_kernels.harness.timing.run_bench`)."""
    for note in settings["notes"]:
        print(note, flush=True)
    given = {k: v for k, v in settings.items() if k not in ("notes", "amp")}
    return run_bench(device=device, amp=parse_amp(settings.get("amp")), **given, **kw)


def task_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``--tasks``'s settings (:mod:`duallora_kernels.harness.task_growth`); ValueError with a one-line reason."""
    from ..harness.task_growth import DEFAULT_BASIS_PER_TASK, parse_tasks
    from .plan_memory import model_settings

    tasks = parse_tasks(args.tasks)
    shapes = parse_shapes(args.shapes or "vit_b.fc1")
    ranks = parse_ranks(args.ranks or "16")
    dtypes = parse_dtypes(args.dtype or ["float32"])
    if len(shapes) != 1 or len(ranks) != 1 or len(dtypes) != 1:
        raise ValueError("--tasks measures one layer shape, one rank and one dtype: give at most one of each")
    if parse_amp(args.amp) is not None:
        raise ValueError("--tasks times its steps without autocast (the planner's rows assume bf16 autocast): "
                         "leave --amp out")
    batch = args.batch or 8
    per_task = DEFAULT_BASIS_PER_TASK if args.basis_per_task is None else args.basis_per_task
    if batch < 1 or args.vit_batch < 1:
        raise ValueError(f"--batch and --vit-batch must be >= 1, got {batch} and {args.vit_batch}")
    if not 0 < per_task <= 1:
        raise ValueError(f"--basis-per-task must be in (0, 1], got {per_task}")
    timm_kwargs, label = model_settings(args)
    return {"tasks": tasks, "shapes": shapes, "rank": ranks[0], "dtype": dtypes[0], "batch": batch,
            "vit_batch": args.vit_batch, "basis_per_task": per_task, "model": args.model, "model_label": label,
            "timm_kwargs": timm_kwargs, "num_classes": 100, "plan_batch": 64, "warmup_ms": args.warmup_ms,
            "rep_ms": args.rep_ms, "seed": args.seed}


def _plot_beside(out: Any, doc: dict[str, Any]) -> None:
    from ..harness.task_growth_report import plot_task_growth

    print(f"plot: {plot_task_growth(doc, out.with_suffix('.png'))}")


def run(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        from ..harness.task_growth import TASKS_SCHEMA, run_task_growth
        from ..harness.task_growth_report import print_task_growth

        args._suffix = "-tasks"
        return run_command(args, task_settings, run_task_growth, print_task_growth, show_triton=True,
                           schema=TASKS_SCHEMA, finished=_plot_beside)
    return run_command(args, settings_from, measure, print_table, show_triton=True)


def main(argv: list[str] | None = None) -> int:
    return module_main("duallora bench", __doc__.split("\n\n")[0], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
