"""The ahead-of-time compile table (bench/results/compile-<triton>.json, written by :mod:`.aot`):
its schema, its validation, its JSON layout, and :func:`row_problems`, what a compiled row breaks of
the cost contract (DESIGN §2), which tests/test_aot_compile.py asserts empty."""
from __future__ import annotations

import json
from typing import Any

from ..ops._kernel_utils import smem_limit
from .cubin import PTX_OPS, SASS_OPS

__all__ = ["SCHEMA", "LOWP", "GEMM_CLASS_KERNELS", "GEMM_CLASS_TILE", "row_problems", "table_problems", "DOC_KEYS",
           "ROW_KEYS", "COMPILED_KEYS", "validate", "to_json"]

SCHEMA = 1
#: The dtypes in which a kernel must not spill.
LOWP = ("bfloat16", "float16")
#: The kernels whose main loop is a plain GEMM (the split and tma designs of ops/fused_linear.py):
#: they must keep the tiles of the arch's fastest matrix products.
GEMM_CLASS_KERNELS = ("_gemm_forward_kernel", "_gemm_backward_kernel", "_gemm_forward_tma_kernel",
                      "_gemm_backward_tma_kernel")
#: The smallest GEMM-class tile (BLOCK_M, BLOCK_N or BLOCK_D, BLOCK_K) in bf16/fp16 (DESIGN §2).
GEMM_CLASS_TILE = (128, 128, 64)


def config_tile(config: str) -> tuple[int, int, int] | None:
    """(BLOCK_M, BLOCK_N or BLOCK_D, BLOCK_K) of a row's config label, None without them."""
    kv = dict(item.split("=", 1) for item in config.split() if "=" in item)
    try:
        return int(kv["BLOCK_M"]), int(kv.get("BLOCK_N", kv.get("BLOCK_D"))), int(kv["BLOCK_K"])
    except (KeyError, TypeError, ValueError):
        return None


def _gemm_class(tile: tuple[int, int, int] | None) -> bool:
    return tile is not None and all(t >= g for t, g in zip(tile, GEMM_CLASS_TILE))


def row_problems(row: dict) -> list[str]:
    """What a row breaks of the cost contract (empty: fine); the test asserts none."""
    where = f"{row['kernel']} sm_{row['arch']} {row['dtype']} r{row['rank']} [{row['config']}]"
    if not row.get("compiled"):
        last = [ln for ln in str(row.get("error")).splitlines() if ln.strip()] or ["?"]
        return [f"{where}: does not compile: {last[-1].strip()[:300]}"]
    problems = []
    if row["dtype"] in LOWP and (row["n_spills"] or row["sass"]["STL"] or row["sass"]["LDL"]):
        problems.append(f"{where}: spills ({row['stack_bytes'] + row['local_bytes']} B local, "
                        f"{row['sass']['STL']} STL / {row['sass']['LDL']} LDL)")
    if row["shared_bytes"] > smem_limit(row["arch"]):
        problems.append(f"{where}: {row['shared_bytes']} B shared > the {smem_limit(row['arch'])} B limit")
    tc = row["ptx"]["wgmma"] + row["ptx"]["mma_sync"]
    if row["tensor_core_dots"] and not (tc and row["sass"]["HGMMA"] + row["sass"]["HMMA"]):
        problems.append(f"{where}: {row['tensor_core_dots']} tensor-core dots but no wgmma/mma.sync")
    if row["arch"] >= 90 and row["gemm_dots"] and not (row["ptx"]["wgmma"] and row["sass"]["HGMMA"]):
        problems.append(f"{where}: {row['gemm_dots']} GEMM-shaped dots but no wgmma on sm_90")
    if row["arch"] < 90 and row["ptx"]["wgmma"]:
        problems.append(f"{where}: wgmma on sm_{row['arch']}")
    if row["atomic_sems"] == ["relaxed"] and row["sass"]["fenced_atomics"]:
        problems.append(f"{where}: requests relaxed atomics but {row['sass']['fenced_atomics']} are fenced")
    if (row["kernel"] in GEMM_CLASS_KERNELS and row["arch"] >= 90 and row["dtype"] == "bfloat16" and row.get("kept")
            and not _gemm_class(config_tile(row["config"]))):
        problems.append(f"{where}: a kept sm_90 bf16 tile below {'x'.join(map(str, GEMM_CLASS_TILE))}")
    if row["kernel"].endswith("_tma_kernel") and not (row["sass"]["TMA"] and row["sass"]["HGMMA"]):
        problems.append(f"{where}: a TMA kernel without TMA loads (UTMALDG) and HGMMA in its SASS")
    return problems


def table_problems(doc: dict) -> list[str]:
    """What a whole table breaks beyond its rows: every GEMM-class kernel keeps, per dtype (bf16/fp16),
    rank and arch it runs on, at least one tile of :data:`GEMM_CLASS_TILE` or larger that compiled
    within the contract (Hopper-class tiles on sm_90, Ampere-class on sm_80/86/89)."""
    groups: dict[tuple, list[dict]] = {}
    for row in doc["rows"]:
        if row["kernel"] in GEMM_CLASS_KERNELS and row["dtype"] in LOWP:
            groups.setdefault((row["kernel"], row["dtype"], row["rank"], row["arch"]), []).append(row)
    return [f"{kernel} sm_{arch} {dtype} r{rank}: no kept {'x'.join(map(str, GEMM_CLASS_TILE))}+ tile without problems"
            for (kernel, dtype, rank, arch), rows in sorted(groups.items())
            if not any(r.get("kept") and _gemm_class(config_tile(r["config"])) and not row_problems(r) for r in rows)]


#: Keys (and types) every table and every compiled row has; :func:`validate` checks them.
DOC_KEYS = {"schema": int, "kind": str, "triton": str, "torch": str, "date": str, "git_commit": str, "command": str,
            "subset": str, "archs": list, "shapes": dict, "smem_limits": dict, "pruning": list, "rows": list}
ROW_KEYS = {"kernel": str, "launch": str, "dtype": str, "rank": int, "arch": int, "config": str, "kept": bool,
            "fixed": bool, "variant": str, "compiled": bool}
COMPILED_KEYS = {"regs": int, "shared_bytes": int, "stack_bytes": int, "local_bytes": int, "n_spills": int,
                 "compile_s": float, "ptx": dict, "sass": dict, "dots": int, "tensor_core_dots": int,
                 "gemm_dots": int, "atomic_sems": list}


def validate(doc: Any) -> list[str]:
    """Schema errors of a compile table (empty: valid)."""
    if not isinstance(doc, dict):
        return ["not a JSON object"]
    errors = [f"{k}: missing or not {t.__name__}" for k, t in DOC_KEYS.items() if not isinstance(doc.get(k), t)]
    if errors:
        return errors
    if doc["schema"] != SCHEMA or doc["kind"] != "aot-compile":
        errors.append(f"schema {doc['schema']} / kind {doc['kind']!r}: expected {SCHEMA} / 'aot-compile'")
    for i, row in enumerate(doc["rows"]):
        wanted = {**ROW_KEYS, **(COMPILED_KEYS if isinstance(row, dict) and row.get("compiled") else {})}
        errors += [f"rows[{i}].{k}: missing or not {t.__name__}" for k, t in wanted.items()
                   if not isinstance(row.get(k) if isinstance(row, dict) else None, (float, int) if t is float else t)]
        if isinstance(row, dict) and row.get("compiled"):
            errors += [f"rows[{i}].sass.{k}: missing" for k in (*SASS_OPS, "fenced_atomics") if k not in row["sass"]]
            errors += [f"rows[{i}].ptx.{k}: missing" for k in PTX_OPS if k not in row["ptx"]]
    return errors


def to_json(doc: dict) -> str:
    """``doc`` as indented JSON with one line per row and per pruning entry: a table of hundreds
    of rows stays readable, and a re-run's diff shows which rows changed."""
    lists = {key: doc[key] for key in ("rows", "pruning")}
    text = json.dumps({**doc, **{key: f"@{key}@" for key in lists}}, indent=2)
    for key, items in lists.items():
        text = text.replace(f'"@{key}@"', "[\n" + ",\n".join("    " + json.dumps(item) for item in items) + "\n  ]")
    return text + "\n"
