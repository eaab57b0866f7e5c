"""The README's CUDA compile table: bench/results/cuda-compile-*.json (the tensor-core kernels of
csrc/ compiled for each arch by ``python -m duallora_kernels.compiled.cuda_aot``) as registers, shared
memory, spills and instruction mix per kernel, padded rank and arch. Rendered by
``python -m duallora_kernels.readme`` (section ``cuda-compile-table``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .compile_table import rerun_command
from .cuda_aot import row_problems

__all__ = ["render_cuda_compile"]


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _table(path: Path, doc: dict[str, Any]) -> list[str]:
    rows = doc["rows"]
    problems = [p for r in rows for p in row_problems(r)]
    seconds = {}
    for c in doc["compiles"]:
        seconds[c["arch"]] = seconds.get(c["arch"], 0.0) + c["seconds"]
    per_arch = ", ".join(f"sm_{a} {s:.0f} s" for a, s in sorted(seconds.items()))
    kernels = sorted({r["kernel"] for r in rows})
    out = [
        f"The CUDA backend's tensor-core kernels (csrc/{', csrc/'.join(doc['sources'])}), compiled on a CPU by nvcc "
        f"{doc['nvcc']} for {', '.join(f'sm_{a}' for a in doc['archs'])} (`{rerun_command(doc)}`, "
        f"{doc['date'][:10]}, commit {doc['git_commit'][:10]}{', uncommitted changes' if doc['git_dirty'] else ''}): "
        f"**{len(rows)} instantiations of {len(kernels)} kernels (bf16/fp16 x padded rank x arch), "
        f"{len(problems) or 'no'} problems**; device-code compile time per arch (nvcc on one shared core): "
        f"{per_arch}. One line holds bf16 and fp16 (a range where they differ). Shared memory = static + the "
        f"dynamic bytes of csrc/fused_tiles.h. Source: "
        f"[{path.name}](bench/results/{path.name}); checked by tests/test_cuda_compile.py.",
        "",
        "<details><summary>per kernel, padded rank and arch</summary>",
        "",
        "| kernel | R_PAD | arch | regs | smem KB (of limit) | spills | HMMA (in loops) | LDGSTS | LDSM | atomics | FFMA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["rank_pad"], -r["arch"]), []).append(r)
    for (kernel, rank, neg_arch), group in sorted(groups.items()):
        spills = max(r["stack_bytes"] + r["local_bytes"] for r in group)
        smem = max(r["shared_bytes"] for r in group)
        cell = lambda key: _span([r["sass"][key] for r in group])  # noqa: E731
        out.append(
            f"| `{kernel}` | {rank} | sm_{-neg_arch} | {_span([r['regs'] for r in group])} "
            f"| {smem / 1024:.0f} / {group[0]['smem_limit'] // 1024} | {'0' if not spills else f'**{spills} B**'} "
            f"| {cell('HMMA')} ({cell('HMMA_in_loops')}) | {cell('LDGSTS')} | {cell('LDSM')} | {cell('atomics')} | {cell('FFMA')} |")
    out += ["", "</details>"]
    for p in problems:
        out.append(f"\n**problem:** {p}")
    return out


def render_cuda_compile(results: Path) -> str:
    """The section's markdown from the newest bench/results/cuda-compile-*.json."""
    files = sorted(results.glob("cuda-compile-*.json"))
    lines = ["### CUDA backend: compiled tensor-core kernels", ""]
    if not files:
        return "\n".join(lines + ["No cuda-compile-*.json yet: run `python -m duallora_kernels.compiled.cuda_aot`."]) + "\n"
    path = files[-1]
    return "\n".join(lines + _table(path, json.loads(path.read_text()))) + "\n"
