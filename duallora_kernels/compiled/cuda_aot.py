"""Compile the CUDA backend's tensor-core kernels for sm_80/86/89/90 on a CPU and read what came out.

The checks of issue 11 without a GPU: nvcc compiles the device code of csrc/fused_forward.cu and
csrc/fused_backward.cu (the extension's own sources; ``-cubin`` runs only the device pass, which
never parses torch's headers, see csrc/fused_common.cuh) for each arch, and ``cuobjdump`` reads
every kernel instantiation's registers, stack / local memory and SASS instruction mix: HMMA
(mma.sync tensor cores) or HGMMA (wgmma), also counted inside the kernel's loops (between a
backward branch and its target: the K-loop, so the main products are shown on tensor cores), FFMA (scalar float32), LDGSTS (cp.async), LDG.128
(16-byte loads through registers), LDSM (ldmatrix), atomics, STL / LDL (local-memory spills).
Shared memory per block = the static shared memory cuobjdump reports + the dynamic bytes the host
code launches with (csrc/fused_tiles.h's ``forward_smem`` / ``backward_smem``, printed by a tiny
host program compiled against that header), checked against each arch's opt-in limit.

    python -m duallora_kernels.compiled.cuda_aot [--archs 80,86,89,90] [--out FILE]

writes bench/results/cuda-compile-<nvcc version>.json (the README's CUDA compile table, rendered
by :mod:`.cuda_compile_table`); tests/test_cuda_compile.py compiles one
arch with :func:`compile_arch` and applies :func:`row_problems` to it and to the committed table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..ops._kernel_utils import ARCHS, smem_limit
from .aot import _git
from .cubin import _RESOURCES, _SASS_LINE, SASS_OPS, tool
from ..ops.cuda import CSRC
from ..ops.cuda_build import nvcc_path

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = 1
#: The sources whose kernels must run on tensor cores (csrc/memory_ops.cu is SIMT: see ops/cuda.py).
SOURCES = ("fused_forward.cu", "fused_backward.cu")
#: SASS counted beyond :data:`.cubin.SASS_OPS`: ldmatrix and 16-byte global loads.
EXTRA_OPS = {"LDSM": re.compile(r"^LDSM"), "LDG128": re.compile(r"^LDG\..*\.128\b")}
#: The fewest HMMA a kernel's loops may hold: one k-slab of its warp tile (2 k16 steps x 16 mma).
MIN_HMMA = 32
_KERNEL = re.compile(r"(fused_(?:forward|backward)_kernel)ILb([01])ELi(\d+)E")
_SMEM_PRINTER = """#include "fused_tiles.h"
#include <cstdio>
int main() {
  for (int r = 16; r <= duallora::tiles::kMaxRank; r *= 2)
    std::printf("%d %d %d\\n", r, duallora::tiles::forward_smem(r), duallora::tiles::backward_smem(r));
}
"""


def nvcc_version(nvcc: str) -> str:
    """``13.0`` from ``nvcc --version`` ("release 13.0, V13.0.88")."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"release (\d+\.\d+)", out).group(1)


def dynamic_smem(workdir: Path) -> dict[tuple[str, int], int]:
    """{(kernel, padded rank): dynamic shared bytes} from csrc/fused_tiles.h, via the host compiler."""
    src, exe = workdir / "smem.cpp", workdir / "smem"
    src.write_text(_SMEM_PRINTER)
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no host C++ compiler (c++ / g++) to read csrc/fused_tiles.h")
    subprocess.run([cxx, "-std=c++17", f"-I{CSRC}", str(src), "-o", str(exe)], check=True)
    out: dict[tuple[str, int], int] = {}
    for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines():
        r, fwd, bwd = map(int, line.split())
        out["fused_forward_kernel", r] = fwd
        out["fused_backward_kernel", r] = bwd
    return out


_BRANCH = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?BRA\s+(?:!?U?P[T0-9]+,\s+)?0x([0-9a-f]+)")
_ADDR_OP = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def hmma_in_loops(sass: str) -> int:
    """HMMA / HGMMA instructions inside a loop body: between a backward branch's target and the
    branch (a loop the compiler kept, e.g. the K-loop over pipeline stages), counted once."""
    loops = [(int(t, 16), int(a, 16)) for a, t in _BRANCH.findall(sass) if int(t, 16) < int(a, 16)]
    mma = [int(a, 16) for a, op in _ADDR_OP.findall(sass) if op.startswith(("HMMA", "HGMMA"))]
    return sum(1 for at in mma if any(lo <= at <= hi for lo, hi in loops))


def _functions(text: str, header: re.Pattern) -> dict[str, str]:
    """cuobjdump output split per function: {mangled name: its text}."""
    parts = header.split(text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def inspect_kernels(cubin: Path) -> dict[str, dict[str, Any]]:
    """Per kernel of a cubin: registers, stack / local / static shared bytes and SASS counts."""
    run = lambda *a: subprocess.run([tool("cuobjdump"), *a, str(cubin)], capture_output=True, text=True,  # noqa: E731
                                    check=True).stdout
    usage = _functions(run("--dump-resource-usage"), re.compile(r"Function (\S+):"))
    sass = _functions(run("--dump-sass"), re.compile(r"Function : (\S+)"))
    out = {}
    for name, text in sass.items():
        regs, stack, shared, local = map(int, _RESOURCES.search(usage[name]).groups())
        ops = [m.group(1) + m.group(2) for m in _SASS_LINE.finditer(text)]
        counts = {label: sum(op.split(".")[0] in names for op in ops) for label, names in SASS_OPS.items()}
        counts.update({label: sum(bool(p.match(op)) for op in ops) for label, p in EXTRA_OPS.items()})
        counts["HMMA_in_loops"] = hmma_in_loops(text)
        out[name] = {"regs": regs, "stack_bytes": stack, "local_bytes": local, "static_shared_bytes": shared,
                     "sass": counts}
    return out


def compile_arch(arch: int, workdir: Path, nvcc: str | None = None) -> tuple[list[dict], list[dict]]:
    """Compile :data:`SOURCES` for ``arch``; (one row per kernel instantiation, one per source's compile)."""
    nvcc = nvcc or str(nvcc_path() or "nvcc")
    smem = dynamic_smem(workdir)
    rows, compiles = [], []
    for source in SOURCES:
        cubin = workdir / f"{Path(source).stem}.sm_{arch}.cubin"
        cmd = [nvcc, "-std=c++20", "-O3", "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}",
               "-Xptxas=-v", str(CSRC / source), "-o", str(cubin)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = round(time.perf_counter() - start, 1)
        if done.returncode:
            raise RuntimeError(f"nvcc failed for {source} on sm_{arch}:\n{done.stderr[-4000:]}")
        compiles.append({"source": source, "arch": arch, "seconds": seconds})
        for name, facts in sorted(inspect_kernels(cubin).items()):
            m = _KERNEL.search(name)
            if m is None:
                continue
            kernel, rank = m.group(1), int(m.group(3))
            dynamic = smem[kernel, rank]
            rows.append({"kernel": kernel, "source": source, "dtype": "bfloat16" if m.group(2) == "1" else "float16",
                         "rank_pad": rank, "arch": arch, **facts, "dynamic_shared_bytes": dynamic,
                         "shared_bytes": facts["static_shared_bytes"] + dynamic, "smem_limit": smem_limit(arch)})
    return rows, compiles


def row_problems(row: dict) -> list[str]:
    """What is wrong with one compiled kernel (empty when nothing is)."""
    where = f"{row['kernel']} {row['dtype']} R={row['rank_pad']} sm_{row['arch']}"
    problems = []
    in_loops = row["sass"]["HMMA_in_loops"]
    if in_loops < MIN_HMMA:
        problems.append(f"{where}: {in_loops} HMMA/HGMMA in its loops, expected at least {MIN_HMMA} "
                        "(the main loop on tensor cores)")
    spills = row["stack_bytes"] + row["local_bytes"] + row["sass"]["STL"] + row["sass"]["LDL"]
    if spills:
        problems.append(f"{where}: spills to local memory (stack {row['stack_bytes']} B, local "
                        f"{row['local_bytes']} B, {row['sass']['STL']} STL, {row['sass']['LDL']} LDL)")
    if row["shared_bytes"] > row["smem_limit"]:
        problems.append(f"{where}: {row['shared_bytes']} B of shared memory, the arch allows {row['smem_limit']}")
    if row["sass"]["LDGSTS"] == 0:
        problems.append(f"{where}: no cp.async (LDGSTS)")
    return problems


def build_table(archs: list[int]) -> dict[str, Any]:
    nvcc = str(nvcc_path() or "")
    if not nvcc:
        raise RuntimeError("nvcc was not found (PATH or CUDA_HOME): the CUDA compile table needs it")
    rows, compiles = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            r, c = compile_arch(arch, Path(tmp), nvcc)
            rows += r
            compiles += c
    return {
        "schema": SCHEMA, "kind": "cuda-compile", "nvcc": nvcc_version(nvcc),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "csrc", "duallora_kernels/compiled/cuda_aot.py")),
        "command": "python -m duallora_kernels.compiled.cuda_aot " + " ".join(sys.argv[1:]),
        "archs": archs, "sources": list(SOURCES), "compiles": compiles, "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m duallora_kernels.compiled.cuda_aot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(str(a) for a in sorted(ARCHS)), help="comma-separated, e.g. 80,86")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/cuda-compile-<nvcc>.json")
    args = ap.parse_args(argv)
    doc = build_table([int(a) for a in args.archs.split(",")])
    out = args.out or ROOT / "bench" / "results" / f"cuda-compile-{doc['nvcc']}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    problems = [p for row in doc["rows"] for p in row_problems(row)]
    for c in doc["compiles"]:
        print(f"sm_{c['arch']} {c['source']}: {c['seconds']} s")
    print(f"{len(doc['rows'])} kernels, {len(problems)} problems -> {out}")
    for p in problems:
        print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
