"""Reading compiled GPU code without a GPU: resources and the instruction mix of a cubin (from
``cuobjdump``, which ships inside the triton wheel) and what a kernel's Triton IR asks for (its dots,
which of them tensor cores can run, its atomics' memory semantics). Used by :mod:`.aot` for every
Triton kernel; it reads any cubin, nvcc's as well."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["SASS_OPS", "PTX_OPS", "tool", "inspect_cubin", "ptx_counts", "ir_facts"]

_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)", re.M)
_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
#: SASS opcodes by what they mean: tensor cores (Hopper warpgroup / Ampere-style), cp.async,
#: TMA, global atomics, fences, local memory (spill) traffic and scalar float32 FMAs.
SASS_OPS = {"HGMMA": ("HGMMA",), "HMMA": ("HMMA",), "LDGSTS": ("LDGSTS",),
            "TMA": ("UTMALDG", "UTMASTG", "UTMAREDG", "UBLKCP"), "atomics": ("ATOM", "ATOMG", "RED", "REDG"),
            "MEMBAR": ("MEMBAR",), "FENCE": ("FENCE",), "STL": ("STL",), "LDL": ("LDL",), "FFMA": ("FFMA",)}
PTX_OPS = {"wgmma": r"\bwgmma\.mma_async", "mma_sync": r"\bmma\.sync", "cp_async": r"\bcp\.async\.c[ag]\b",
           "tma": r"\bcp\.async\.bulk\.tensor", "atom": r"\batom\.", "red": r"\bred\."}


def tool(name: str) -> str:
    """The path of a CUDA binary tool (``cuobjdump``, ``ptxas``, ...): triton's bundled copy, else PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else (shutil.which(name) or name)


def inspect_cubin(cubin: bytes) -> dict:
    """Registers, stack/local bytes, static shared bytes and SASS opcode counts from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs, stack, static_shared, local = map(int, _RESOURCES.search(usage).groups())
    ops = [m.group(1) for m in _SASS_LINE.finditer(sass)]
    counts = {label: sum(op in names for op in ops) for label, names in SASS_OPS.items()}
    # A fenced atomic: a GPU/system-scope MEMBAR within the few instructions before an ATOM/RED
    # (what a default acq_rel tl.atomic_add emits); CTA-scope MEMBARs order shared memory only.
    full = [m.group(1) + m.group(2) for m in _SASS_LINE.finditer(sass)]
    fenced = sum(1 for i, op in enumerate(ops) if op in SASS_OPS["atomics"] and any(
        p.startswith("MEMBAR") and (".GPU" in p or ".SYS" in p) for p in full[max(0, i - 4):i]))
    return {"regs": regs, "stack_bytes": stack, "local_bytes": local, "static_shared_bytes": static_shared,
            "sass": {**counts, "fenced_atomics": fenced}}


_DOT = re.compile(r"tt\.dot (?P<args>[^:]*): tensor<(?:\d+x)+(?P<a>\w+)> \* tensor<[^>]*> "
                  r"-> tensor<(?P<m>\d+)x(?P<n>\d+)x")


def ir_facts(ttir: str) -> dict:
    """What the kernel asks for, from its Triton IR: its dots, those tensor cores can run
    (bf16/fp16/fp8 operands, or float32 with a TF32/bf16x-based input precision; IEEE float32
    runs on FMA units), those of them GEMM-shaped (an output tile of at least 64 x 64, which
    Hopper runs as wgmma), and the memory semantics its atomics request."""
    dots = [m.groupdict() for m in _DOT.finditer(ttir)]
    tc = [d for d in dots if d["a"] != "f32" or re.search(r"inputPrecision = (tf32|bf16x)", d["args"])]
    gemm = [d for d in tc if int(d["m"]) >= 64 and int(d["n"]) >= 64]
    sems = sorted(set(re.findall(r"tt\.atomic_\w+ \w+, (\w+),", ttir)))
    return {"dots": len(dots), "tensor_core_dots": len(tc), "gemm_dots": len(gemm), "atomic_sems": sems}


def ptx_counts(ptx: str) -> dict:
    """How often each of :data:`PTX_OPS` occurs in ``ptx``."""
    return {label: len(re.findall(pattern, ptx)) for label, pattern in PTX_OPS.items()}
