"""A run's checkpoint after each finished task: the weights (``task-<t>.safetensors``: the model's state and
the task identity's statistics, or after the last task the class weights its score applies:
:meth:`.prototypes.ClassPrototypes.state_tensors`) and ``checkpoint.json`` (format, tasks done, the weights' file name, the run's
settings and its history so far), written atomically; ``checkpoint.json`` is the commit point.

The trainer (:mod:`.trainer`) decides when and on which rank; these functions only write and read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from .._io import atomic_write, atomic_write_json
from .config import TrainConfig

__all__ = ["CHECKPOINT_FORMAT", "RESUME_FREE", "RUN_OUTPUTS", "write_checkpoint", "read_checkpoint",
           "tasks_done_on_disk", "set_aside_earlier_outputs"]

CHECKPOINT_FORMAT = 1
# Fields that may differ between a run and its resumption without changing its results (the data loader's
# workers do not: augmentation is seeded per sample, continual.datasets.images).
RESUME_FREE = ("out_dir", "run_name", "data_root", "backend", "compile", "workers")
# What a run writes into its folder; a run that starts from task 0 moves an earlier run's into previous/.
RUN_OUTPUTS = ("results.json", "results.png", "checkpoint.json", "task-*.safetensors")


def write_checkpoint(run_dir: Path, tasks_done: int, tensors: dict[str, Tensor], config: TrainConfig,
                     history: dict[str, Any]) -> int:
    """Write the weights, then checkpoint.json naming them, then drop the weights of earlier tasks. Returns the
    weights file's size in bytes, which checkpoint.json's history records too (``checkpoint_bytes``, one per
    task: results.json reports it, and a resumed run keeps the sizes of the tasks before it)."""
    from safetensors.torch import save_file

    weights = f"task-{tasks_done - 1}.safetensors"
    atomic_write(run_dir / weights, lambda tmp: save_file(tensors, tmp))
    size = (run_dir / weights).stat().st_size
    history = {**history, "checkpoint_bytes": [*history.get("checkpoint_bytes", []), size]}
    state = {"format": CHECKPOINT_FORMAT, "tasks_done": tasks_done, "weights": weights,
             "config": config.to_json(), "history": history}
    atomic_write_json(run_dir / "checkpoint.json", state)  # the commit point: names the weights
    for old in run_dir.glob("task-*.safetensors"):
        if old.name != weights:
            old.unlink(missing_ok=True)
    return size


def tasks_done_on_disk(run_dir: Path) -> int | None:
    """``tasks_done`` of the checkpoint.json in ``run_dir`` (None when there is none or it is unreadable)."""
    try:
        return int(json.loads((run_dir / "checkpoint.json").read_text())["tasks_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_checkpoint(config: TrainConfig) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """checkpoint.json's state and its weights from ``config.run_dir``, or None when there is none;
    ValueError for another format or a checkpoint made with other settings."""
    from safetensors.torch import load_file

    path = config.run_dir / "checkpoint.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {state.get('format')}, this version reads {CHECKPOINT_FORMAT}")
    # settings added since the checkpoint was made count as what runs did before them (TrainConfig.from_json)
    saved = {k: v for k, v in TrainConfig.from_json(state["config"]).to_json().items() if k not in RESUME_FREE}
    mine = {k: v for k, v in config.to_json().items() if k not in RESUME_FREE}
    diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if diff:
        raise ValueError(f"--resume: the checkpoint in {config.run_dir} was made with other settings {diff} "
                         "(checkpoint, now); use the same settings or another --out-dir/--run-name")
    return state, load_file(str(config.run_dir / state["weights"]))


def set_aside_earlier_outputs(run_dir: Path, start: int, total: int) -> list[Path]:
    """Move an earlier run's outputs out of the way of a run of ``total`` tasks starting at task ``start``: from
    task 0 all of them go into ``previous/`` (replacing what an older run left there); a resumed, unfinished run
    moves a results.json/png that cannot be its own (results are written only when a run finishes). Returns
    the files moved (their old paths)."""
    names = RUN_OUTPUTS if start == 0 else ("results.json", "results.png") if start < total else ()
    found = sorted({p for pattern in names for p in run_dir.glob(pattern) if p.is_file()})
    if not found:
        return []
    previous = run_dir / "previous"
    if previous.is_dir():
        for old in previous.iterdir():
            if old.is_file():
                old.unlink()
    previous.mkdir(exist_ok=True)
    for path in found:
        os.replace(path, previous / path.name)
    return found
