"""Compile every Triton kernel ahead of time for the GPUs the library targets, on a CPU.

Why: the cost contract (DESIGN §2) promises that every kernel compiles for sm_90 (H100/H200),
sm_89 (RTX 4090), sm_86 (RTX 3090) and sm_80 (A100) without register spills in bf16/fp16, within
each arch's shared memory, and with wgmma on Hopper. CI has no GPU, and the interpreter the tests
use compiles nothing, so those promises would otherwise be checked only by whoever next gets a GPU
of each kind. Triton's compiler builds PTX and a cubin for any compute capability given an
explicit ``GPUTarget``; ptxas and cuobjdump ship inside the triton wheel. So this module:

1. captures the real launches: the public ops run on CPU tensors inside
   ``observe_launches(..., capture=True)`` (nothing runs) at ViT-B/16 batch-64 shapes, for each
   dtype and rank of :data:`CASES`. Whatever kernels get launched are compiled, so a new kernel
   is covered without touching this file;
2. for each launch and arch, takes the configs the autotuner would keep there (its own pruning
   under :class:`._kernel_utils.target_arch`) and the ``DUALLORA_AUTOTUNE=0`` fixed config (config
   lists are fixed at import, so that one is captured in a child process);
3. binds the captured arguments with the JITFunction's own binder (signature, constexprs and
   divisibility attributes exactly as a launch would specialise them; see :func:`_bind`);
4. compiles (a process pool with ``--jobs``) and reads registers, local memory and the instruction
   mix from the PTX and from ``cuobjdump`` on the cubin.

    python -m duallora_kernels.compiled.aot [--subset ci|full] [--archs 90,86] [--jobs N] [--out FILE]

writes bench/results/compile-<triton version>.json (the full table; the README shows it, rendered by
:mod:`.compile_table`). tests/test_aot_compile.py runs the ci subset and applies
:func:`.aot_table.row_problems` to it and to every committed table. Reading the cubins is
:mod:`.cubin`; the table's schema and checks are :mod:`.aot_table`.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator

import torch

from .._source import checkout_root, git
from ..ops._kernel_utils import ARCHS, AUTOTUNE_ENV, kernel_name, observe_launches, smem_limit, target_arch
from .aot_table import SCHEMA, row_problems, to_json
from .cubin import inspect_cubin, ir_facts, ptx_counts

ROOT = Path(__file__).resolve().parents[2]
#: (dtype, rank of each adapter block) compiled by the full table. With an orthogonal, a training
#: residual and two frozen blocks the stacked rank is 4x the block's: ranks 8, 16, 32, 64 are the
#: padded ranks 32, 64, 128, 256 -- each tile bucket of fused_linear_tiles.py.
CASES = (("bfloat16", 8), ("bfloat16", 16), ("bfloat16", 32), ("bfloat16", 64),
         ("float16", 8), ("float16", 16), ("float16", 32), ("float16", 64), ("float32", 16))
#: (arch, dtype, rank) of the CI subset, fixed config only: one Hopper, one Ampere consumer card,
#: one float32 case; every kernel of each. A few minutes on one core.
CI_SUBSET = ((90, "bfloat16", 16), (86, "float16", 64), (80, "float32", 16))
#: The Triton designs of the linear op whose launches are captured (ops/fused_linear.py).
DESIGNS = ("single", "split", "tma")
#: ViT-B/16 at batch 64 (197 tokens), its fc1 layer; a memory basis of k columns; T task bases of u.
SHAPES = {"batch": 64, "tokens": 197, "d": 768, "n": 3072, "basis_k": 192, "frozen_blocks": 2,
          "score_rows": 64, "tasks": 10, "task_basis_u": 64}


# ---------------------------------------------------------------------------------- capture
def capture(dtype_name: str, rank: int) -> list[tuple[str, Any, tuple, dict]]:
    """(phase, kernel, args, kwargs) of every launch of one training step of the linear op (forward and
    backward, every adapter kind, in each of :data:`DESIGNS`), gram and task_scores, on CPU tensors
    that nothing touches: only shapes, dtypes, strides and integer divisibility matter to the compiler."""
    from ..ops import dual_lora_linear, gram, task_scores

    dt, s = getattr(torch, dtype_name), SHAPES
    launches: list[tuple[str, Any, tuple, dict]] = []
    phase = "forward"

    def record(kernel, grid, args, kwargs) -> bool:
        launches.append((phase, kernel, args, kwargs))
        return True  # skip the launch

    def leaf(*shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype).requires_grad_()

    b, L, d, n, r, frozen = s["batch"], s["tokens"], s["d"], s["n"], rank, s["frozen_blocks"]
    with observe_launches(record, capture=True):
        x = leaf(b, L, d)
        for design in DESIGNS:
            phase = f"{design} forward"
            y = dual_lora_linear(
                x, torch.empty(n, d, dtype=dt), torch.empty(n, dtype=dt),
                orth_a=leaf(r, d), orth_b=leaf(n, r), res_a=leaf(r, d), res_b=leaf(n, r),
                frozen_a=torch.empty(frozen * r, d, dtype=dt), frozen_b=torch.empty(n, frozen * r, dtype=dt),
                gate=torch.empty(b, L, frozen + 1), basis=torch.eye(d, s["basis_k"]), backend="triton", design=design,
            )
            phase = f"{design} backward"
            y.backward(torch.empty_like(y))
        phase = "gram"
        gram(x.detach(), backend="triton")
        phase = "task_scores"
        task_scores(torch.empty(s["score_rows"], d, dtype=dt), torch.empty(s["tasks"], d, s["task_basis_u"], dtype=dt),
                    backend="triton")
    return launches


def _chain(kernel) -> list:
    """The wrappers from the launched object down to its JITFunction (last)."""
    chain = [kernel]
    while hasattr(chain[-1], "fn") and not hasattr(chain[-1], "params"):
        chain.append(chain[-1].fn)
    return chain


def _unwrap(kernel):
    return _chain(kernel)[-1]


def _configs(kernel, args: tuple, kwargs: dict, arch: int | None) -> tuple[list[dict], list[dict]]:
    """(kept, all) configs as keyword dicts: those the autotuner's own pruning keeps on ``arch``
    (all of them when ``arch`` is None or there is no pruner), and its whole list. A kernel
    without ``triton.autotune`` has one empty config."""
    from triton.runtime.errors import AutotunerError

    kept = every = [{}]
    for wrapper in _chain(kernel)[:-1]:
        if not hasattr(wrapper, "configs"):  # triton.heuristics: see _heuristics
            continue
        kept = every = [c.all_kwargs() for c in wrapper.configs]
        if arch is not None:
            wrapper.nargs = dict(zip(wrapper.arg_names, args))  # what Autotuner.run sets before pruning
            try:
                with target_arch(arch):
                    kept = [c.all_kwargs() for c in wrapper.prune_configs(dict(kwargs))]
            except AutotunerError:  # the pruning keeps nothing: the kernel never runs on that arch (TMA below sm_90)
                kept = []
            finally:
                wrapper.nargs = None
    return kept, every


def _pre_hooked(kernel, args: tuple, kwargs: dict, config: dict) -> tuple:
    """``args`` as the autotuner would launch them with ``config``: its configs' ``pre_hook`` (the
    TMA kernels set each tensor descriptor's block to the config's tile there) applied to copies
    of the captured descriptors."""
    import dataclasses

    hooks = [c.pre_hook for w in _chain(kernel)[:-1] if hasattr(w, "configs") for c in w.configs[:1] if c.pre_hook]
    if not hooks:
        return args
    copied = tuple(dataclasses.replace(a) if dataclasses.is_dataclass(a) and hasattr(a, "block_shape") else a
                   for a in args)
    hooks[0]({**dict(zip(_unwrap(kernel).arg_names, copied)), **kwargs, **config})
    return copied


def _heuristics(kernel, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` plus the values of any ``triton.heuristics`` wrappers, as a launch adds them."""
    jit = _unwrap(kernel)
    for wrapper in _chain(kernel)[:-1]:
        if hasattr(wrapper, "values") and not hasattr(wrapper, "configs"):
            named = {**dict(zip(jit.arg_names, args)), **kwargs}
            kwargs = {**kwargs, **{k: h(named) for k, h in wrapper.values.items()}}
    return kwargs


def _bind(jit, args: tuple, kwargs: dict, arch: int) -> dict:
    """What a launch on ``arch`` would hand the compiler: signature, constexprs, attrs, options.

    The one place that uses Triton's private binder API (``create_function_from_signature`` and
    ``JITFunction._pack_args``), identical in Triton 3.6 and 3.8; a version that moves them fails
    here with a clear error instead of somewhere in the middle."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    try:
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    except (AttributeError, TypeError, ValueError) as exc:  # pragma: no cover - a Triton API change
        import triton

        raise RuntimeError(f"Triton {triton.__version__}'s launch binder changed; update aot._bind: {exc!r}") from exc
    return {"signature": signature, "constexprs": constexprs, "attrs": attrs, "options": dict(options.__dict__)}


def fixed_configs() -> dict[str, dict]:
    """``"kernel|dtype|rank"`` -> the kernel's ``DUALLORA_AUTOTUNE=0`` config for that case, from a
    child process (config lists are built when the op modules are imported; the fixed config
    depends on the dtype: float32 has its own)."""
    env = {**os.environ, AUTOTUNE_ENV: "0", "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-m", "duallora_kernels.compiled.aot", "--print-fixed-configs"],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"capturing the DUALLORA_AUTOTUNE=0 configs failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fixed_key(name: str, dtype_name: str, rank: int) -> str:
    return f"{name}|{dtype_name}|{rank}"


def _print_fixed_configs() -> None:
    fixed = {}
    for dtype_name, rank in CASES:
        for _, kernel, args, kwargs in capture(dtype_name, rank):
            # The pruning under DUALLORA_AUTOTUNE=0 picks the case's fixed config (any arch).
            key = _fixed_key(kernel_name(kernel), dtype_name, rank)
            fixed.setdefault(key, _configs(kernel, args, kwargs, 90)[0][0])
    print(json.dumps(fixed))


# ---------------------------------------------------------------------------------- jobs
def _label(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def plan(subset: str, archs: tuple[int, ...], kernels: set[str] | None = None,
         max_configs: int | None = None, cases: set[tuple[str, int]] | None = None) -> tuple[list[dict], list[dict]]:
    """(jobs, pruning): one job per (case, launch, arch, config) to compile, and per (case,
    launch, arch) the configs kept and dropped by the pruning (dropped ones are not compiled)."""
    fixed = fixed_configs()
    wanted = [(a, dt, r) for a, dt, r in CI_SUBSET if a in archs] if subset == "ci" else \
        [(a, dt, r) for dt, r in CASES for a in archs]
    wanted = [w for w in wanted if not cases or w[1:] in cases]
    jobs, pruning, seen = [], [], set()
    for dtype_name, rank in dict.fromkeys((dt, r) for _, dt, r in wanted):
        launches = capture(dtype_name, rank)
        per_phase, nth = Counter((p, kernel_name(k)) for p, k, _, _ in launches), Counter()
        for phase, kernel, args, kwargs in launches:
            name, jit = kernel_name(kernel), _unwrap(kernel)
            # Which launch of the step: its phase, numbered when the kernel runs more than once in it.
            nth[phase, name] += 1
            launch = phase if per_phase[phase, name] == 1 else f"{phase}#{nth[phase, name]}"
            if kernels and name not in kernels:
                continue
            for arch in (a for a, dt, r in wanted if (dt, r) == (dtype_name, rank)):
                kept, every = _configs(kernel, args, kwargs, arch)
                if not kept:  # the pruning says the kernel does not run there (TMA below sm_90)
                    continue
                kept = kept[:max_configs] if max_configs else kept
                pruning.append({"kernel": name, "launch": launch, "dtype": dtype_name, "rank": rank, "arch": arch,
                                "kept": [_label(c) for c in kept],
                                "fixed": _label(fixed.get(_fixed_key(name, dtype_name, rank), {})),
                                "dropped": [_label(c) for c in every if c not in kept]})
                chosen = [] if subset == "ci" else list(kept)
                fixed_config = fixed.get(_fixed_key(name, dtype_name, rank))
                if fixed_config is not None and fixed_config not in chosen:
                    chosen.append(fixed_config)
                chosen = chosen or kept[:1]
                for config in chosen:
                    full = _heuristics(kernel, args, {**kwargs, **config})
                    bound = _bind(jit, _pre_hooked(kernel, args, kwargs, config), full, arch)
                    # Rows are per (case, launch); the same specialisation (gram at both ranks, a
                    # kernel launched twice) is compiled once, by key.
                    key = repr((name, arch, sorted(bound["signature"].items()), sorted(bound["constexprs"].items()),
                                sorted(bound["attrs"].items()), sorted(map(repr, bound["options"].items()))))
                    if (key, dtype_name, rank) in seen:
                        continue
                    seen.add((key, dtype_name, rank))
                    variant = {k: v for k, v in kwargs.items() if k not in config}
                    jobs.append({
                        "kernel": name, "launch": launch, "module": jit.module, "qualname": jit.fn.__qualname__,
                        "dtype": dtype_name, "rank": rank, "arch": arch, "config": _label(config),
                        "kept": config in kept, "kept_index": kept.index(config) if config in kept else None,
                        "fixed": config == fixed_config, "variant": _label(variant), "r_pad": kwargs.get("R_PAD"),
                        "smem_limit": smem_limit(arch), "key": key, **bound,
                    })
    return jobs, pruning


# ---------------------------------------------------------------------------------- compile
_JOB_ONLY = ("signature", "constexprs", "attrs", "options", "module", "qualname", "key")


def compile_job(job: dict) -> dict:
    """Compile one job (see :func:`plan`) and measure it; errors are recorded, not raised."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    row = {k: v for k, v in job.items() if k not in _JOB_ONLY}
    jit = _unwrap(getattr(importlib.import_module(job["module"]), job["qualname"]))
    start = time.perf_counter()
    try:
        src = ASTSource(jit, job["signature"], job["constexprs"], job["attrs"])
        kernel = triton_compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    except Exception as exc:  # noqa: BLE001 - the table records what failed and why
        return {**row, "compiled": False, "error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
    row.update(compiled=True, error=None, compile_s=round(time.perf_counter() - start, 2),
               shared_bytes=int(kernel.metadata.shared), num_warps=kernel.metadata.num_warps)
    row.update(inspect_cubin(kernel.asm["cubin"]))
    row["n_spills"] = (row["stack_bytes"] + row["local_bytes"]) // 4  # as Triton's n_spills: local bytes / 4
    row["ptx"] = ptx_counts(kernel.asm["ptx"])
    row.update(ir_facts(kernel.asm["ttir"]))
    return row


def run_jobs(jobs: list[dict], n_jobs: int = 1) -> Iterator[dict]:
    """One row per job: each distinct compile key is compiled once, in this
    process (``n_jobs`` 1) or a pool of spawned processes, and its result copied to its jobs."""
    by_key: dict[str, list[dict]] = {}
    for job in jobs:
        by_key.setdefault(job["key"], []).append(job)

    def fan_out(result: dict) -> list[dict]:
        same = by_key[result.pop("key")]
        return [{**result, **{k: v for k, v in job.items() if k not in _JOB_ONLY}} for job in same]

    unique = [group[0] for group in by_key.values()]
    if n_jobs <= 1:
        for job in unique:
            rows = fan_out({**compile_job(job), "key": job["key"]})
            yield from rows
        return
    import multiprocessing

    with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(compile_job, job): job["key"] for job in unique}
        for future in as_completed(futures):
            rows = fan_out({**future.result(), "key": futures[future]})
            yield from rows


def _git(*args: str) -> str:
    """``git args`` in the package's own checkout ("" when installed: :mod:`.._source`)."""
    return git(*args) or ""


def _kernels_changed() -> bool:
    """Whether the package differs from the commit recorded (``git diff``, which unlike ``git
    status`` never writes the index that other processes may be using)."""
    root = checkout_root()
    if root is None:
        return False
    try:
        return subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "duallora_kernels"], cwd=root).returncode == 1
    except OSError:
        return False


def default_output() -> Path:
    import triton

    return ROOT / "bench" / "results" / f"compile-{triton.__version__}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m duallora_kernels.compiled.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--subset", choices=("ci", "full"), default="full",
                   help="ci: a few (arch, dtype, rank) with the fixed config; full: every case, kept configs")
    p.add_argument("--archs", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 90,86")
    p.add_argument("--kernels", default="", help="only these kernel names (comma-separated)")
    p.add_argument("--max-configs", type=int, default=None, help="at most the first N kept configs per arch")
    p.add_argument("--jobs", type=int, default=1, help="compiler processes (default 1)")
    p.add_argument("--cases", default="", help="only these (dtype:rank) cases, e.g. bfloat16:16,float16:64")
    p.add_argument("--sweep", action="store_true",
                   help="compile every candidate tile of the linear kernels (fused_linear_tiles.CANDIDATES) on "
                        "every arch: how the tile lists are measured")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/compile-<triton version>.json")
    p.add_argument("--print-fixed-configs", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        p.error("compiling needs TRITON_INTERPRET unset or 0 (the interpreter's kernels cannot be compiled)")
    if args.print_fixed_configs:
        _print_fixed_configs()
        return 0
    os.environ.pop(AUTOTUNE_ENV, None)  # pruning keeps every config that fits, not the first N
    if args.sweep:
        from ..ops.fused_linear_tiles import SWEEP_ENV

        os.environ[SWEEP_ENV] = "1"  # before the kernel modules are imported (their config lists)
    with tempfile.TemporaryDirectory(prefix="duallora-aot-cache-") as cache:
        # A fresh Triton cache: every kernel is really compiled (and timed), and nothing is left
        # in the user's ~/.triton for targets this machine cannot run.
        os.environ["TRITON_CACHE_DIR"] = cache
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    import triton
    from tqdm import tqdm

    from .._io import atomic_write

    start = time.time()
    archs = tuple(int(a) for a in args.archs.split(","))
    cases = {(c.split(":")[0], int(c.split(":")[1])) for c in filter(None, args.cases.split(","))}
    jobs, pruning = plan(args.subset, archs, set(filter(None, args.kernels.split(","))), args.max_configs, cases)
    rows = []
    with tqdm(total=len(jobs), desc="compiling", unit="kernel", file=sys.stderr) as bar:
        for row in run_jobs(jobs, args.jobs):
            rows.append(row)
            bar.update(1)
    rows.sort(key=lambda r: (r["kernel"], r["dtype"], r["rank"], -r["arch"], r["kept_index"] is None,
                             r["kept_index"] or 0, r["config"]))
    doc = {
        "schema": SCHEMA, "kind": "aot-compile", "triton": triton.__version__, "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": _kernels_changed(),
        "command": "python -m duallora_kernels.compiled.aot " + " ".join(argv if argv is not None else sys.argv[1:]),
        "subset": args.subset, "archs": list(archs), "cases": [list(c) for c in CASES], "shapes": SHAPES,
        "smem_limits": {str(a): smem_limit(a) for a in archs}, "seconds": round(time.time() - start, 1),
        "pruning": pruning, "rows": rows,
    }
    out = args.out or default_output()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(to_json(doc)))
    problems = [msg for row in rows for msg in row_problems(row)]
    print(f"wrote {out}: {len(rows)} compiles in {doc['seconds']} s, {len(problems)} problems", file=sys.stderr)
    for msg in problems:
        print("  " + msg, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
