"""The results document every command writes: its header (what ran, where, with which code), the
schema its rows follow (``duallora-bench/3``; ``/1`` and ``/2`` files are still read), validation,
and where and how it is written."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .._source import git
from .devices import device_info, triton_interpreting

__all__ = ["SCHEMA", "READABLE_SCHEMAS", "DEFAULT_OUT_DIR", "run_metadata", "default_out_path", "write_json",
           "validate_doc", "load_docs", "error_text"]

SCHEMA = "duallora-bench/3"
#: Schemas still read: /1 has no op_count rows and no unfused_compiled columns; /2 has no ``amp``
#: field (its rows ran without autocast).
READABLE_SCHEMAS: tuple[str, ...] = ("duallora-bench/1", "duallora-bench/2", SCHEMA)
#: The row kinds that carry ``amp`` ("off" or the autocast dtype) from schema /3 on.
_AMP_KINDS = ("timing", "comparison", "op_count")
_TOP_KEYS: dict[str, type | tuple[type, ...]] = {
    "schema": str, "command": str, "command_line": str, "argv": list, "date": str, "git": dict, "device": dict,
    "versions": dict, "settings": dict, "complete": bool, "results": list,
}
_DEVICE_KEYS = {"type": str, "name": str, "slug": str}
_VERSION_KEYS = {"python": str, "torch": str, "triton": (str, type(None))}
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_ROW_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "timing": {"layer": str, "shape": str, "d": int, "n": int, "batch": int, "m": int, "rank": (int, type(None)),
               "dtype": str, "pass": str, "variant": str, "status": str, "reason": (str, type(None)),
               "median_ms": _OPT_NUM, "flops": int, "bytes": int, "tflops": _OPT_NUM, "gbps": _OPT_NUM},
    "comparison": {"shape": str, "batch": int, "dtype": str, "pass": str, "rank": int, "frozen_ms": _OPT_NUM,
                   "fused_ms": _OPT_NUM, "unfused_ms": _OPT_NUM, "peft_ms": _OPT_NUM,
                   "fused_over_frozen": _OPT_NUM, "unfused_over_fused": _OPT_NUM},
    "saved_bytes": {"scope": str, "model": str, "variant": str, "dtype": str, "batch": int, "rank": int,
                    "status": str, "reason": (str, type(None)), "saved_bytes": (int, type(None)),
                    "activation_bytes": (int, type(None)), "activation_over_frozen": _OPT_NUM},
    "step_memory": {"model": str, "variant": str, "dtype": str, "batch": int, "rank": int, "status": str,
                    "peak_bytes": (int, type(None)), "step_ms": _OPT_NUM},
    "max_batch": {"model": str, "variant": str, "dtype": str, "rank": int, "budget_gib": _NUM, "status": str,
                  "max_batch": (int, type(None))},
    "op_count": {"layer": str, "shape": str, "batch": int, "m": int, "rank": (int, type(None)), "dtype": str,
                 "variant": str, "status": str, "reason": (str, type(None)), "device_ops": (int, type(None)),
                 "method": (str, type(None))},
}


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def run_metadata(command: str, argv: Sequence[str], device: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON header: what ran, where, with which versions and code."""
    # Only the package's own checkout has a commit to record (never that of a repository an
    # installed copy happens to sit in: _source.py).
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    if commit is None:  # installed, or a copy of the tree without .git: the caller may say which commit it is
        commit = os.environ.get("DUALLORA_GIT_COMMIT") or None
    from .. import __version__

    cmd = ["duallora", command, *argv]
    return {
        "schema": SCHEMA,
        "command": command,
        "command_line": shlex.join(cmd),
        "argv": list(argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": {"commit": commit, "dirty": None if status is None else bool(status)},
        "device": device_info(device),
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
            "timm": _version("timm"), "peft": _version("peft"), "duallora_kernels": __version__,
            "cuda": torch.version.cuda,
        },
        "settings": {"float32_matmul_precision": torch.get_float32_matmul_precision(),
                     "triton_interpret": triton_interpreting(),
                     # configs autotuned per kernel: unset = all, 0 = the fixed one, N = the first N
                     "duallora_autotune": os.environ.get("DUALLORA_AUTOTUNE") or None, **settings},
        "complete": False,
        "results": [],
    }


#: Where the commands write when ``--out`` is not given (relative to the current directory, like
#: ``duallora train``'s ``runs/``): a scratch place, never the tracked bench/results/.
DEFAULT_OUT_DIR = Path("runs") / "bench"


def default_out_path(device: torch.device, suffix: str = "", date: _dt.date | None = None) -> Path:
    """``runs/bench/<device-slug>-<YYYY-MM-DD><suffix>.json`` under the current directory.
    Committed results go to bench/results/ only by an explicit ``--out``."""
    slug = device_info(device)["slug"]
    date = date or _dt.date.today()
    return DEFAULT_OUT_DIR / f"{slug}-{date.isoformat()}{suffix}.json"


def write_json(path: str | os.PathLike, doc: dict[str, Any]) -> Path:
    """Write ``doc`` (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def _check_keys(where: str, obj: dict, spec: dict[str, type | tuple[type, ...]], errors: list[str]) -> None:
    for key, typ in spec.items():
        if key not in obj:
            errors.append(f"{where}: missing key {key!r}")
        elif not isinstance(obj[key], typ) or (isinstance(obj[key], bool) and bool not in (typ if isinstance(typ, tuple) else (typ,))):
            errors.append(f"{where}: {key!r} is {type(obj[key]).__name__}, expected {typ}")


def validate_doc(doc: Any) -> list[str]:
    """Schema errors of a results document (empty when valid)."""
    if not isinstance(doc, dict):
        return [f"document is {type(doc).__name__}, expected an object"]
    errors: list[str] = []
    _check_keys("document", doc, _TOP_KEYS, errors)
    if doc.get("schema") not in (None, *READABLE_SCHEMAS) and isinstance(doc.get("schema"), str):
        errors.append(f"document: schema {doc['schema']!r}, expected one of {READABLE_SCHEMAS}")
    if isinstance(doc.get("device"), dict):
        _check_keys("device", doc["device"], _DEVICE_KEYS, errors)
    if isinstance(doc.get("versions"), dict):
        _check_keys("versions", doc["versions"], _VERSION_KEYS, errors)
    for i, row in enumerate(doc.get("results") or []):
        if not isinstance(row, dict) or row.get("kind") not in _ROW_KEYS:
            errors.append(f"results[{i}]: not a row of a known kind ({', '.join(_ROW_KEYS)})")
            continue
        _check_keys(f"results[{i}] ({row['kind']})", row, _ROW_KEYS[row["kind"]], errors)
        if doc.get("schema") == SCHEMA and row["kind"] in _AMP_KINDS:
            _check_keys(f"results[{i}] ({row['kind']})", row, {"amp": str}, errors)
    return errors


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) < 400 else text[:397] + "..."


def load_docs(paths: Sequence[str | os.PathLike]) -> list[tuple[Path, dict[str, Any]]]:
    """The valid results documents among ``paths``, sorted by path (invalid ones are reported on
    stderr and left out)."""
    docs = []
    for path in sorted(paths):
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        errors = validate_doc(doc)
        if errors:
            print(f"skipping {path}: {errors[0]} (+{len(errors) - 1} more)", file=sys.stderr)
            continue
        docs.append((Path(path), doc))
    return docs

