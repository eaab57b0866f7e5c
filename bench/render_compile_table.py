"""Render bench/results/compile-*.json (the ahead-of-time compile tables of
``python -m duallora_kernels.ops.aot``) into README.md between the
``<!-- compile-table:start -->`` and ``<!-- compile-table:end -->`` markers.

    python bench/render_compile_table.py            # rewrite the README section
    python bench/render_compile_table.py --check    # exit 1 when the README is out of date
    python bench/render_compile_table.py --print    # print the section instead
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
try:
    from duallora_kernels._readme import update
    from duallora_kernels.ops import aot
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
    from duallora_kernels._readme import update
    from duallora_kernels.ops import aot

SECTION = "compile-table"
DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
PER_KERNEL = 3  # problems listed in the README per kernel; the JSON has them all


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _cells(rows: list[dict[str, Any]], arch: int, limit: int) -> list[str]:
    """The table cells of one (kernel, dtype, rank, arch): ranges over its compiled configs."""
    ok = [r for r in rows if r["compiled"]]
    failed = len(rows) - len(ok)
    if not ok:
        return [str(len(rows)), f"**{failed} failed**"] + ["-"] * 7
    count = lambda group, key: _span([r[group][key] for r in ok])  # noqa: E731
    spills = max(r["stack_bytes"] + r["local_bytes"] for r in ok)
    if arch >= 90 and any(r["ptx"]["wgmma"] for r in ok):
        tensor_cores = "wgmma " + count("ptx", "wgmma")
    elif any(r["ptx"]["mma_sync"] for r in ok):
        tensor_cores = "mma " + count("ptx", "mma_sync")
    else:
        tensor_cores = "FMA only"
    fenced = max(r["sass"]["fenced_atomics"] for r in ok)
    atomics = count("sass", "atomics") + (f" ({fenced} fenced)" if fenced else "")
    return [
        str(len(rows)) + (f", **{failed} failed**" if failed else ""),
        _span([r["regs"] for r in ok]),
        f"{max(r['shared_bytes'] for r in ok) / 1024:.0f} / {limit // 1024}",
        "0" if spills == 0 else f"**{spills} B**",
        tensor_cores, count("sass", "LDGSTS"), count("sass", "TMA"), atomics,
        f"{sum(r['compile_s'] for r in ok):.0f}",
    ]


def _headline(rows: list[dict[str, Any]], kernels: list[str]) -> list[str]:
    """One line per kernel: its worst case over every dtype, rank, arch and config."""
    out = ["| kernel | compiles | failed | max regs | max smem (of the arch's limit) | bf16/fp16 compiles that spill "
           "| wgmma on sm_90 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for kernel in kernels:
        mine = [r for r in rows if r["kernel"] == kernel]
        ok = [r for r in mine if r["compiled"]]
        if not ok:
            out.append(f"| `{kernel}` | {len(mine)} | **{len(mine)}** | - | - | - | - |")
            continue
        worst = max(ok, key=lambda r: r["shared_bytes"] / aot.smem_limit(r["arch"]))
        worst_kb, worst_pct = worst["shared_bytes"] / 1024, 100 * worst["shared_bytes"] / aot.smem_limit(worst["arch"])
        spilling = sum(1 for r in ok if r["dtype"] in aot.LOWP and r["stack_bytes"] + r["local_bytes"])
        hopper = [r for r in ok if r["arch"] >= 90 and r["tensor_core_dots"]]
        wgmma = f"{sum(1 for r in hopper if r['ptx']['wgmma'])} of {len(hopper)}" if hopper else "no tensor-core dots"
        failed = len(mine) - len(ok)
        out.append(
            f"| `{kernel}` | {len(mine)} | {f'**{failed}**' if failed else 0} | {max(r['regs'] for r in ok)} "
            f"| {worst_kb:.0f} KB ({worst_pct:.0f}%, sm_{worst['arch']}) | {f'**{spilling}**' if spilling else 0} "
            f"| {wgmma} |")
    return out


def render(path: Path, doc: dict[str, Any]) -> str:
    rows, s = doc["rows"], doc["shapes"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["dtype"], r["rank"], r["arch"]), []).append(r)
    # A kernel whose compiles do not depend on the rank (gram, task scores) gets one line per dtype.
    lines: dict[tuple, tuple[list[int], list[str]]] = {}
    for (kernel, dtype, rank, arch), group in groups.items():
        cells = _cells(group, arch, doc["smem_limits"][str(arch)])
        lines.setdefault((kernel, dtype, arch, tuple(cells[:-1])), ([], cells))[0].append(rank)
    kernels = sorted({r["kernel"] for r in rows})
    ordered = sorted(lines.items(), key=lambda kv: (kernels.index(kv[0][0]), list(DTYPE).index(kv[0][1]),
                                                     min(kv[1][0]), -kv[0][2]))
    problems = [msg for r in rows for msg in aot.row_problems(r)]
    # The README lists a few per kernel, so that one kernel's many do not hide another's.
    shown = [msg for kernel in kernels for msg in [m for m in problems if m.startswith(kernel + " ")][:PER_KERNEL]]
    dirty = ", uncommitted kernel changes" if doc.get("git_dirty") else ""
    out = [
        "<!-- generated by bench/render_compile_table.py from bench/results/compile-*.json: do not edit by hand -->",
        "### Compiled kernels: registers, shared memory, spills, instruction mix",
        "",
        f"Every Triton kernel, compiled ahead of time on a CPU by Triton {doc['triton']} for "
        + ", ".join(f"sm_{a}" for a in doc["archs"])
        + f" (`{doc['command'].strip()}`, {doc['date'][:10]}, commit {doc['git_commit'][:10]}{dirty}), at ViT-B/16 "
        f"batch-64 shapes (x {s['batch']}x{s['tokens']}x{s['d']}, the fc1 layer {s['d']}→{s['n']}; r = the rank of "
        f"each adapter block: orthogonal, training residual and {s['frozen_blocks']} frozen ones), with the configs "
        "the autotuner keeps on each arch plus the `DUALLORA_AUTOTUNE=0` fixed one: "
        f"**{len(rows)} compiles of {len(kernels)} kernels, {len(problems) or 'no'} problems**. "
        f"Source: [{path.name}](bench/results/{path.name}); checked by tests/test_aot_compile.py.",
        "",
        *_headline(rows, kernels),
        "",
    ]
    if problems:
        out += ["Problems (compile errors; spills in bf16/fp16; shared memory over the limit; no wgmma/mma.sync), "
                f"the first {PER_KERNEL} of each kernel:", ""]
        out += [f"- `{msg}`" for msg in shown]
        out += [f"- ... and {len(problems) - len(shown)} more (see the JSON)"] if len(problems) > len(shown) else []
        out.append("")
    out += [
        "<details><summary>Per kernel, dtype/rank and arch (ranges over the compiled configs)</summary>",
        "",
        "compiles: the kept configs (and the fixed one where the pruning drops it) times the kernel's "
        "specialisations (one kernel launched with other flags); regs: registers per thread; smem: KB of shared "
        "memory / the arch's per-block limit; spills: local memory per thread; tensor cores: wgmma (Hopper) or "
        "mma.sync instructions in the PTX, FMA only for IEEE float32 dots; cp.async (LDGSTS), TMA and global "
        "atomics counted in the SASS; fenced: atomics behind a GPU-scope MEMBAR.",
        "",
        "| kernel | dtype, r | arch | compiles | regs | smem KB | spills | tensor cores | cp.async | TMA | atomics "
        "| compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (kernel, dtype, arch, _), (ranks, cells) in ordered:
        rank = ", ".join(f"r{r}" for r in sorted(ranks))
        out.append(f"| `{kernel}` | {DTYPE.get(dtype, dtype)} {rank} | sm_{arch} | " + " | ".join(cells) + " |")
    out += ["", "</details>"]
    return "\n".join(out) + "\n"


def section(results: Path) -> str:
    blocks = []
    for path in sorted(results.glob("compile-*.json")):
        doc = json.loads(path.read_text())
        errors = aot.validate(doc)
        if errors:
            print(f"render_compile_table: skipping {path}: {errors[0]}", file=sys.stderr)
            continue
        if doc["subset"] == "full":
            blocks.append(render(path, doc))
    return "\n".join(blocks) or ("No compile table committed yet: run "
                                  "`TRITON_INTERPRET=0 python -m duallora_kernels.ops.aot`.\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the README section is out of date")
    p.add_argument("--print", action="store_true", help="print the section instead of writing the README")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    block = section(args.results)
    if args.print:
        print(block, end="")
        return 0
    return update(args.readme, block, SECTION, check=args.check, script="bench/render_compile_table.py")


if __name__ == "__main__":
    sys.exit(main())
