"""Every generated section of README.md, rendered from committed result files by one command:

    python -m duallora_kernels.readme            # rewrite every generated section
    python -m duallora_kernels.readme --check    # exit 1 when a section is out of date (tests/test_readme.py)
    python -m duallora_kernels.readme --print --section perf-table   # print a section, leave the README alone

The sections (between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``), in README order:

* ``results-table``: the continual-learning runs, results/split-fmnist/*/results.json and
  results/variation/ (rendered by results/render_table.py's ``render``)
* ``perf-table``: the benchmark and memory results, bench/results/*.json
  (:func:`duallora_kernels.harness.tables.render_performance`)
* ``memory-plan``: the memory planner's predictions and their GPU checks, bench/results/plan-*.json
  (:func:`duallora_kernels.harness.plan_report.render_plan_section`)
* ``design-estimate``: the Triton designs of the fused linear costed on paper per arch
  (:func:`duallora_kernels.harness.design_estimate.render_estimate`, from the kept tile lists)
* ``task-growth``: how a step's cost grows with the number of finished tasks, bench/results/tasks-*.json
  (:func:`duallora_kernels.harness.task_growth_report.render_task_growth_section`)
* ``compile-table``: the ahead-of-time kernel compiles, bench/results/compile-*.json
  (:func:`duallora_kernels.compiled.compile_table.render_compile`)
* ``cuda-compile-table``: the CUDA backend's kernels compiled per arch, bench/results/cuda-compile-*.json
  (:func:`duallora_kernels.compiled.cuda_compile_table.render_cuda_compile`)
* ``timm-families``: what ``inject`` adapts in 14 timm families and how far a finished task moves,
  results/timm-families/families.json (:func:`duallora_kernels.timm_families.render`)

Nothing in a section is typed by hand; every row names the file it comes from.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

from ._readme import update_sections

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python -m duallora_kernels.readme"


def _results_renderer() -> ModuleType:
    """results/render_table.py, the continual runs' renderer kept beside the runs it renders."""
    path = ROOT / "results" / "render_table.py"
    spec = importlib.util.spec_from_file_location("duallora_results_render_table", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise FileNotFoundError(f"{path}: the results renderer is part of a checkout, not of the installed package")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results_table(args: argparse.Namespace) -> str:
    runs = sorted(args.runs.glob("*/results.json"))
    return _results_renderer().render(runs, root=args.readme.resolve().parent, variation=args.variation)


def _perf_table(args: argparse.Namespace) -> str:
    from .harness.tables import render_performance

    # compile-*.json, cuda-compile-*.json, plan-*.json and tasks-*.json have their own sections
    files = sorted(p for p in args.bench_results.glob("*.json")
                   if not p.name.startswith(("compile-", "cuda-compile-", "plan-", "tasks-")))
    return render_performance(files, root=args.readme.resolve().parent, rank=args.rank)


def _memory_plan(args: argparse.Namespace) -> str:
    from .harness.plan_report import render_plan_section

    return render_plan_section(sorted(args.bench_results.glob("plan-*.json")), root=args.readme.resolve().parent)


def _design_estimate(args: argparse.Namespace) -> str:
    from .harness.design_estimate import render_estimate

    return render_estimate()


def _task_growth(args: argparse.Namespace) -> str:
    from .harness.task_growth_report import render_task_growth_section

    return render_task_growth_section(sorted(args.bench_results.glob("tasks-*.json")), root=args.readme.resolve().parent)


def _compile_table(args: argparse.Namespace) -> str:
    from .compiled.compile_table import render_compile

    return render_compile(args.bench_results)


def _cuda_compile_table(args: argparse.Namespace) -> str:
    from .compiled.cuda_compile_table import render_cuda_compile

    return render_cuda_compile(args.bench_results)


def _timm_families(args: argparse.Namespace) -> str:
    import json

    from .timm_families import render

    return render(json.loads(args.timm_families.read_text()))


SECTIONS: dict[str, Callable[[argparse.Namespace], str]] = {
    "results-table": _results_table,
    "perf-table": _perf_table,
    "memory-plan": _memory_plan,
    "design-estimate": _design_estimate,
    "task-growth": _task_growth,
    "compile-table": _compile_table,
    "cuda-compile-table": _cuda_compile_table,
    "timm-families": _timm_families,
}


def build_parser() -> argparse.ArgumentParser:
    from .harness.tables import HEADLINE_RANK

    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a section is out of date; write nothing")
    ap.add_argument("--print", action="store_true", help="print the sections instead of writing the README")
    ap.add_argument("--section", action="append", choices=list(SECTIONS), default=None,
                    help="only this section (repeatable; default: all)")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README to update")
    ap.add_argument("--bench-results", type=Path, default=ROOT / "bench" / "results",
                    help="folder of the benchmark and compile *.json")
    ap.add_argument("--runs", type=Path, default=ROOT / "results" / "split-fmnist",
                    help="folder of the default continual runs, one <method>-seed<seed>/results.json each")
    ap.add_argument("--variation", type=Path, default=ROOT / "results" / "variation",
                    help="folder of the variation runs and pretraining records")
    ap.add_argument("--rank", type=int, default=HEADLINE_RANK, help="rank shown in the speed table")
    ap.add_argument("--timm-families", type=Path, default=ROOT / "results" / "timm-families" / "families.json",
                    help="the survey of inject on timm families (python -m duallora_kernels.timm_families)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = list(dict.fromkeys(args.section or SECTIONS))
    blocks = {name: SECTIONS[name](args) for name in names}
    if args.print:
        print("\n".join(block.rstrip("\n") for block in blocks.values()))
        return 0
    return update_sections(args.readme, blocks, check=args.check, command=COMMAND)


if __name__ == "__main__":
    sys.exit(main())
