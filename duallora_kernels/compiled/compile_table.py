"""The README's compile table: bench/results/compile-*.json (the ahead-of-time compiles of every
Triton kernel by ``python -m duallora_kernels.compiled.aot``) as registers, shared memory, spills and
instruction mix per kernel, dtype, rank and arch. Rendered by ``python -m duallora_kernels.readme``."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from . import aot_table
from ..ops._kernel_utils import smem_limit

__all__ = ["render", "render_compile", "rerun_command"]

DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
PER_KERNEL = 3  # problems listed in the README per kernel; the JSON has them all


#: Where the compile commands lived before they had a package of their own (issue 24): a table written
#: then records the old module, which no longer runs.
_MOVED = {"duallora_kernels.ops.aot": "duallora_kernels.compiled.aot",
          "duallora_kernels.ops.cuda_aot": "duallora_kernels.compiled.cuda_aot"}


def rerun_command(doc: dict[str, Any]) -> str:
    """The command a table records, under the module name that runs it today."""
    return " ".join(_MOVED.get(word, word) for word in doc["command"].split())


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
        worst = max(ok, key=lambda r: r["shared_bytes"] / smem_limit(r["arch"]))
        worst_kb, worst_pct = worst["shared_bytes"] / 1024, 100 * worst["shared_bytes"] / smem_limit(worst["arch"])
        spilling = sum(1 for r in ok if r["dtype"] in aot_table.LOWP and r["stack_bytes"] + r["local_bytes"])
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
    problems = [msg for r in rows for msg in aot_table.row_problems(r)] + aot_table.table_problems(doc)
    # The README lists a few per kernel, so that one kernel's many do not hide another's.
    shown = [msg for kernel in kernels for msg in [m for m in problems if m.startswith(kernel + " ")][:PER_KERNEL]]
    dirty = ", uncommitted kernel changes" if doc.get("git_dirty") else ""
    out = [
        "<!-- generated by python -m duallora_kernels.readme from bench/results/compile-*.json: do not edit by hand -->",
        "### Compiled kernels: registers, shared memory, spills, instruction mix",
        "",
        f"Every Triton kernel, compiled ahead of time on a CPU by Triton {doc['triton']} for "
        + ", ".join(f"sm_{a}" for a in doc["archs"])
        + f" (`{rerun_command(doc)}`, {doc['date'][:10]}, commit {doc['git_commit'][:10]}{dirty}), at ViT-B/16 "
        f"batch-64 shapes (x {s['batch']}x{s['tokens']}x{s['d']}, the fc1 layer {s['d']}→{s['n']}; r = the rank of "
        f"each adapter block: orthogonal, training residual and {s['frozen_blocks']} frozen ones, so the stacked rank "
        f"is {s['frozen_blocks'] + 2}r: r 8, 16, 32, 64 are the tile buckets R_PAD 32, 64, 128, 256), every Triton design "
        "of the linear op (single, split, tma: ops/fused_linear.py), with the configs "
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


def _version(doc: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(p) for p in doc["triton"].split("+")[0].split(".") if p.isdigit())


def summarise(path: Path, doc: dict[str, Any]) -> str:
    """One paragraph for a full table of another Triton version than the one rendered in full."""
    rows = doc["rows"]
    problems = [msg for r in rows for msg in aot_table.row_problems(r)] + aot_table.table_problems(doc)
    dirty = ", uncommitted kernel changes" if doc.get("git_dirty") else ""
    from .._versions import TESTED, _minor

    oldest = ": the oldest Triton we admit, the GPU machine's" if _minor(doc["triton"]) == _minor(
        TESTED["triton"][0]) else ""
    return (f"The same compiles by Triton {doc['triton']} (with torch {doc['torch']}{oldest}; "
            f"`{rerun_command(doc)}` in that environment, {doc['date'][:10]}, commit "
            f"{doc['git_commit'][:10]}{dirty}): **{len(rows)} compiles of {len({r['kernel'] for r in rows})} kernels, "
            f"{len(problems) or 'no'} problems**. Source: [{path.name}](bench/results/{path.name}).\n")


def render_compile(results: Path) -> str:
    """The README section for the full compile tables among ``results``/compile-*.json: the newest
    Triton's in full, each older one as a paragraph (its own JSON keeps every row)."""
    tables = []
    for path in sorted(results.glob("compile-*.json")):
        doc = json.loads(path.read_text())
        errors = aot_table.validate(doc)
        if errors:
            print(f"render_compile_table: skipping {path}: {errors[0]}", file=sys.stderr)
            continue
        if doc["subset"] == "full":
            tables.append((path, doc))
    if not tables:
        return "No compile table committed yet: run `TRITON_INTERPRET=0 python -m duallora_kernels.compiled.aot`.\n"
    tables.sort(key=lambda t: _version(t[1]), reverse=True)
    newest, *older = tables
    return render(*newest) + "".join("\n" + summarise(*t) for t in older)
