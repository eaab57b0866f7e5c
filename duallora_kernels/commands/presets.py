"""``duallora train --preset NAME``: published continual-learning settings that this design can honour, as
the options they expand to. Each is taken from the public InfLoRA configurations (Liang & Li, CVPR 2024,
repository liangyanshuo/InfLoRA, ``configs/*.json``; docs/method.md, "Presets", says what is and is not
carried over): classes per task (``init_cls``, ``increment``), epochs, batch size, learning rate (the
classifier trains at the same rate: one optimizer), Adam without weight decay (AdamW with weight decay 0 is
the same update), ``"shuffle": false`` (the data set's own class order), the adapter rank, and GPM's
threshold rising from ``lamb`` towards ``lame`` = 1 (InfLoRA's eps after task t is lamb + (1 - lamb) t / T,
which our linear schedule from --threshold-start to --threshold-end reproduces exactly).

Options given beside ``--preset`` win over the preset's; the command prints the expanded command line.
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Preset", "PRESETS", "expand_preset", "expanded_command"]


@dataclass(frozen=True)
class Preset:
    """A named setting: the ``duallora train`` options it stands for, and where they come from."""

    name: str
    options: tuple[tuple[str, str], ...]
    source: str


def _inflora(dataset: str, per_task: int, tasks: int, epochs: int, lamb: float) -> tuple:
    end = lamb + (1.0 - lamb) * (tasks - 1) / tasks  # InfLoRA's threshold after the last task
    return (("--dataset", dataset), ("--model", "vit_base_patch16_224"), ("--init-classes", str(per_task)),
            ("--increment", str(per_task)), ("--class-order", "sorted"), ("--epochs", str(epochs)),
            ("--batch-size", "128"), ("--lr", "0.0005"), ("--head-lr", "0.0005"), ("--weight-decay", "0"),
            ("--rank-orth", "10"), ("--threshold-start", f"{lamb:g}"), ("--threshold-end", f"{end:g}"))


PRESETS = {p.name: p for p in (
    Preset("cifar100-b0inc10", _inflora("cifar100", 10, 10, 20, 0.95), "InfLoRA configs/cifar100_inflora.json"),
    Preset("imagenetr-b0inc40", _inflora("imagefolder", 40, 5, 50, 0.98), "InfLoRA configs/mimg5_inflora.json"),
    Preset("imagenetr-b0inc20", _inflora("imagefolder", 20, 10, 50, 0.98), "InfLoRA configs/mimg10_inflora.json"),
    Preset("imagenetr-b0inc10", _inflora("imagefolder", 10, 20, 50, 0.98), "InfLoRA configs/mimg20_inflora.json"),
)}


def expand_preset(argv: Sequence[str], parser: argparse.ArgumentParser) -> tuple[list[str], Preset | None]:
    """``argv`` with ``--preset NAME`` replaced by the preset's options, less those that ``argv`` gives itself
    (under any of their spellings: ``--increment`` is ``--classes-per-task``). ValueError for an unknown
    preset; ``(argv, None)`` without one."""
    argv = list(argv)
    name, rest, i = None, [], 0
    while i < len(argv):
        word = argv[i]
        if word == "--preset" and i + 1 < len(argv):
            name, i = argv[i + 1], i + 2
            continue
        if word.startswith("--preset="):
            name = word.split("=", 1)[1]
        else:
            rest.append(word)
        i += 1
    if name is None:
        return argv, None
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is not one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    actions = parser._option_string_actions
    given = {actions[w.split("=", 1)[0]].dest for w in rest if w.split("=", 1)[0] in actions}
    kept = [w for flag, value in preset.options if actions[flag].dest not in given for w in (flag, value)]
    return kept + rest, preset


def expanded_command(argv: Sequence[str]) -> str:
    return shlex.join(["duallora", "train", *argv])
