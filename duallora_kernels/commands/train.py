"""``duallora train``: the class-incremental benchmark (default: Split Fashion-MNIST, 5 tasks x 2
classes, on the self-pretrained ViT), one method or several, same data and seed."""
from __future__ import annotations

import argparse
import dataclasses
import typing

from ..continual.trainer import GATE_SOURCES, METHODS, TrainConfig

_SKIP = {"method", "targets", "train_per_class", "test_per_class"}
_CHOICES = {"gate_mode": ("soft", "hard"), "gate_source": GATE_SOURCES, "summary": ("cls", "mean"),
            "backend": ("auto", "triton", "torch", "cuda")}
_HELP = {
    "seed": "seeds the class order, the subsets and training (logged in the results)",
    "data_root": "folder with Fashion-MNIST's IDX files (default: Debian's /usr/share/datasets/fashion-mnist)",
    "model": "a timm ViT name; default: the self-pretrained ViT of `duallora pretrain`",
    "checkpoint": "local .pth/.safetensors weights for --model",
    "rank_orth": "rank of the orthogonal adapter", "rank_res": "rank of each task's residual block",
    "threshold_start": "GPM energy threshold of the first task", "threshold_end": "... of the last task",
    "score_rank": "principal directions kept per task for task identity",
    "temperature": "softmax temperature of the task gate",
    "gate_source": "global: one gate from a first pass; layer: each layer gates from its own input",
    "summary": "per-sample summary a layer scores: mean token or class token",
    "beta": "calibration strength (0: off)",
    "lr": "learning rate of the adapters", "head_lr": "learning rate of the task's head",
    "out_dir": "runs go to OUT_DIR/<method>-seed<seed>/",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="run the continual-learning benchmark (default: DualLoRA on Split Fashion-MNIST)",
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--method", default="duallora",
                   help=f"one of {', '.join(METHODS)}; a comma-separated list; or 'all'")
    p.add_argument("--full", action="store_true", help="use all of Fashion-MNIST (default: a per-class subset)")
    p.add_argument("--train-per-class", type=int, default=TrainConfig.train_per_class)
    p.add_argument("--test-per-class", type=int, default=TrainConfig.test_per_class)
    p.add_argument("--targets", default=",".join(TrainConfig.targets), help="linear layers to adapt, by name")
    p.add_argument("--resume", action="store_true", help="continue from the run's last finished task")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SKIP:
            continue
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind) if typing.get_args(kind) else kind
        p.add_argument("--" + f.name.replace("_", "-"), type=base, default=f.default, help=_HELP.get(f.name),
                       choices=_CHOICES.get(f.name))
    return p


def configs_from_args(args: argparse.Namespace) -> list[TrainConfig]:
    methods = list(METHODS) if args.method == "all" else [m.strip() for m in args.method.split(",") if m.strip()]
    common = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in _SKIP}
    common["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    common["train_per_class"] = None if args.full else args.train_per_class
    common["test_per_class"] = None if args.full else args.test_per_class
    return [TrainConfig(method=m, **common) for m in methods]


def run(args: argparse.Namespace) -> int:
    from ..continual.trainer import Trainer

    configs = configs_from_args(args)  # every method's settings are checked before any runs
    for config in configs:
        Trainer(config, progress=not args.no_progress).run(resume=args.resume)
    return 0


if __name__ == "__main__":  # python -m duallora_kernels.commands.train ... (without the other subcommands)
    import sys

    parser = argparse.ArgumentParser(prog="duallora")
    add_parser(parser.add_subparsers(dest="command"))
    sys.exit(run(parser.parse_args(["train", *sys.argv[1:]])))
