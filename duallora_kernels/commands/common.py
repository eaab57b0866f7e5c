"""What ``duallora bench`` and ``duallora profile-memory`` share: their common flags, the start of a
run (device, threads, float32 policy, the JSON document and where it goes), its end, and running
either as ``python -m duallora_kernels.commands.<name>``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .. import cli
from ..harness.devices import resolve_device
from ..harness.problems import TOKENS
from ..harness.results import DEFAULT_OUT_DIR, default_out_path, run_metadata, write_json

__all__ = ["add_common_arguments", "run_command", "module_main"]


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags both ``bench`` and ``profile-memory`` take."""
    p.add_argument("--device", default="auto", help="auto (first GPU, else CPU), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", action="append", default=None, metavar="DTYPE",
                   help="float32, bfloat16 (bf16), float16; comma-separated or repeated")
    p.add_argument("--out", type=Path, default=None, metavar="PATH",
                   help=f"JSON output (default: {DEFAULT_OUT_DIR}/<device-slug>-<YYYY-MM-DD>[-memory].json, a scratch "
                        "place; committed results are written to bench/results/ by naming it here)")
    p.add_argument("--quick", action="store_true",
                   help="a small, CPU-friendly subset (float32 only on a CPU without bfloat16 matmul instructions)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    cli.add_threads_option(p)  # 1 gives steadier CPU timings on a busy machine
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 for float32 matmuls (torch and the kernels alike); default: full float32")


def _start(args: argparse.Namespace) -> Any:
    """Resolve the device, CPU threads and float32 policy (the thread count is printed); returns the device."""
    import torch

    device = resolve_device(args.device)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    threads = cli.apply_threads(args.threads)  # ValueError when not 1..usable_cores()
    why = "--threads" if args.threads else "torch's choice, at most the usable cores"
    print(f"threads: {threads} ({why}; {cli.usable_cores()} core(s) usable by this process)", flush=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _cli_argv(args: argparse.Namespace) -> list[str]:
    """The argv this run was started with (for the JSON's command line)."""
    argv = getattr(args, "_argv", None)
    return list(argv) if argv is not None else sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == args.command else sys.argv[1:]


def _open_run(args: argparse.Namespace, settings_from: Callable[[argparse.Namespace], dict[str, Any]], *,
             show_triton: bool) -> tuple[Any, Path, dict[str, Any], dict[str, Any]] | None:
    """The settings the flags select (None after printing why when they are wrong), then the start
    of the run: device, the JSON's path and its metadata; says where it goes.
    Returns (device, out path, document, settings)."""
    import torch

    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"duallora {args.command}: {exc}", file=sys.stderr)
        return None
    device = _start(args)
    out = args.out or default_out_path(device, args._suffix)
    json_settings = {**settings, "shapes": [s.key for s in settings["shapes"]], "tokens_per_image": TOKENS,
                     "threads": torch.get_num_threads()}
    doc = run_metadata(args.command, _cli_argv(args), device, json_settings)
    triton = f", triton {doc['versions']['triton']}" if show_triton else ""
    print(f"device: {doc['device']['name']} ({device}); torch {doc['versions']['torch']}{triton}; writing {out}",
          flush=True)
    return device, out, doc, settings


def _saver(doc: dict[str, Any], out: Path) -> Callable[[list[dict[str, Any]]], None]:
    """``save(rows)``: write ``doc`` with the rows so far (partial results survive a time limit)."""
    def save(rows: list[dict[str, Any]]) -> None:
        doc["results"] = rows
        write_json(out, doc)

    return save


def _finish(doc: dict[str, Any], out: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``doc`` with all its ``rows``, marked complete (with the CPU load at the end)."""
    doc["results"] = rows
    doc["complete"] = True
    if doc["device"]["type"] == "cpu" and hasattr(os, "getloadavg"):
        doc["device"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    write_json(out, doc)
    print(f"\nwrote {out}")


def run_command(args: argparse.Namespace, settings_from: Callable[[argparse.Namespace], dict[str, Any]],
                measure: Callable[..., list[dict[str, Any]]], show: Callable[[list[dict[str, Any]]], None], *,
                show_triton: bool, schema: str | None = None,
                finished: Callable[[Path, dict[str, Any]], None] | None = None) -> int:
    """A whole run: the settings (exit 2 when the flags are wrong), the start, ``measure(settings,
    device, progress=, on_group=)`` saving partial results as it goes, ``show(rows)``, the JSON (under
    ``schema`` when given, else the bench schema), then ``finished(out, doc)`` (e.g. a plot beside it)."""
    started = _open_run(args, settings_from, show_triton=show_triton)
    if started is None:
        return 2
    device, out, doc, settings = started
    if schema is not None:
        doc["schema"] = schema
    rows = measure(settings, device, progress=not args.no_progress, on_group=_saver(doc, out))
    show(rows)
    _finish(doc, out, rows)
    if finished is not None:
        finished(out, doc)
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
