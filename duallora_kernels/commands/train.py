"""`duallora train`: the class-incremental benchmark (default: Split Fashion-MNIST, 5 tasks x 2
classes, on the self-pretrained ViT shipped with the package), one method or several, same data and seed;
or the user's own data set (``--dataset``, ``--data-root``; ``--preset`` for published settings).

Options that a run would ignore are refused before anything runs (:func:`configs_from_args`)."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import typing

from ..cli import INTERRUPTED, HelpFormatter, add_threads_option, apply_threads
from ..continual.config import AMP_MODES, GATE_SOURCES, METHODS, PROTOTYPE_SOURCES, TASK_SCORES, TrainConfig
from ..continual.datasets import DATASETS, RUN_DEFAULTS
from .presets import PRESETS, expand_preset, expanded_command

DESCRIPTION = (
    "Run the class-incremental benchmark: by default DualLoRA on Split Fashion-MNIST (5 tasks x 2 classes, "
    "class order shuffled by --seed; --seeds 0,1,2 runs each method once per seed) on the self-pretrained ViT shipped with the package. After every task: "
    "the accuracy matrix, task-identity accuracy and a checkpoint; --resume continues from the last finished "
    "task (Ctrl-C prints the exact command). Writes OUT_DIR/<method>-seed<seed>/results.json and results.png. "
    "Options a run would not use (e.g. --checkpoint without --model) are refused. Your own data: --dataset "
    "cifar100|cifar10|imagefolder --data-root DIR --model NAME --checkpoint FILE, or --preset NAME for a "
    "published setting (see the README, 'Your own data')."
)
CURVES_PNG = "a_t-curves.png"  # beside the runs, when one command makes several
_SKIP = {"method", "targets", "train_per_class", "test_per_class", "amp", "compile", "class_order", "train_a"}
_CHOICES = {"dataset": DATASETS, "gate_mode": ("soft", "hard"), "gate_source": GATE_SOURCES, "summary": ("cls", "mean"),
            "task_score": TASK_SCORES, "prototype_features": PROTOTYPE_SOURCES,
            "backend": ("auto", "triton", "torch", "cuda")}
_HELP = {
    "seed": "seeds the class order, the subsets and training (logged in the results)",
    "dataset": "the data set: fashion-mnist (the embedded benchmark), cifar100 / cifar10 (the python-pickle folders "
               "cifar-100-python/, cifar-10-batches-py/), imagefolder (train/ + test/ class folders, or one tree with "
               "--split-ratio); nothing is downloaded",
    "data_root": "the data set's folder (default: Debian's /usr/share/datasets/fashion-mnist for fashion-mnist; the "
                 "other data sets need it)",
    "num_tasks": "number of tasks (default: 5 for fashion-mnist; other data sets: as many as the classes fill, the "
                 "last task taking the rest)",
    "classes_per_task": "classes per task, K of B<N>-Inc<K> (default: 2 for fashion-mnist and cifar10, 10 for "
                        "cifar100 and imagefolder)",
    "init_classes": "classes of the first task, N of B<N>-Inc<K> (B50-Inc10: --init-classes 50 --increment 10; "
                    "default: as many as the others, B0)",
    "class_order_seed": "shuffle the class order with PyCIL's rule (numpy.random.seed(S); permutation); 1993 gives "
                        "the order PyCIL and PILOT use (default: the order --seed shuffles, as the embedded "
                        "benchmark always did)",
    "split_ratio": "imagefolder without a test split: the fraction of each class held out for testing, e.g. 0.2 "
                   "(default: none, the folder must have train/ and test/)",
    "split_seed": "seeds the per-class --split-ratio split (recorded in results.json)",
    "workers": "DataLoader worker processes decoding images (default: the usable cores less one, at most 8; "
               "fashion-mnist's tensors need none)",
    "model": "a timm ViT, DeiT, DeiT III, BEiT, EVA/EVA-02 or Swin name, e.g. vit_small_patch16_224 (default: the "
             "self-pretrained ViT shipped with the package, see `duallora pretrain`)",
    "checkpoint": "local .pth/.safetensors weights for --model (default: none, --model starts from random "
                  "weights)",
    "img_size": "input size of --model (default: 28 for fashion-mnist, whose images are 28x28; other data sets: the "
                "model's own, e.g. 224)",
    "patch_size": "patch size of --model; must divide --img-size, e.g. 4 or 7 for 28 (default: the model's own)",
    "depth": "number of blocks of --model; not Swin, whose blocks go per stage (default: the model's own)",
    "embed_dim": "width of --model (default: the model's own)",
    "num_heads": "attention heads of --model; not Swin, whose heads go per stage (default: the model's own)",
    "rank_orth": "rank of the orthogonal adapter",
    "rank_res": "rank of each task's residual block",
    "orth_scale": "scale s_o of the orthogonal adapter's output",
    "res_scale": "scale s_r of the residual blocks' output",
    "threshold_start": "GPM energy threshold of the first task",
    "threshold_end": "GPM energy threshold of the last task (linear in between)",
    "score_rank": "principal directions kept per task for task identity",
    "temperature": "softmax temperature of the task gate",
    "gate_mode": "soft: softmax over tasks; hard: one-hot of the best-scoring task",
    "gate_source": "global: one gate from a first pass with the residual blocks off; layer: each layer gates from "
                   "its own input",
    "summary": "per-sample summary a layer scores: mean token or class token",
    "task_score": "where the task gate's scores come from: subspace (each layer's task bases U_t), "
                  "prototype-means (nearest class mean of the layers' input summaries), prototype-lda (class means "
                  "and a shared covariance: linear discriminant analysis); see docs/method.md",
    "prototype_features": "whose layer inputs prototype scores summarise: pretrained (a frozen copy of the "
                          "pre-trained backbone: no drift) or adapted (the adapted model, residual blocks off)",
    "prototype_shrinkage": "prototype-lda: shrinkage of the shared covariance towards its mean eigenvalue",
    "prototype_temperature": "softmax temperature of the gate from prototype scores (log-likelihoods)",
    "beta": "calibration strength (0: off)",
    "backend": "auto: Triton on CUDA tensors, the PyTorch reference on the CPU; triton on the CPU needs "
               "TRITON_INTERPRET=1; cuda: the CUDA C++ kernels",
    "epochs": "passes over each task's training data",
    "batch_size": "training batch size (passes without gradients use twice as many)",
    "lr": "learning rate of the adapters",
    "head_lr": "learning rate of the task's head",
    "weight_decay": "AdamW weight decay",
    "out_dir": "runs go to OUT_DIR/<method>-seed<seed>/",
    "run_name": "the run's folder under OUT_DIR (default: <method>-seed<seed>); one method only",
}
_METAVAR = {"data_root": "DIR", "out_dir": "DIR", "checkpoint": "FILE", "model": "NAME", "run_name": "NAME",
            "class_order_seed": "S", "split_ratio": "R", "init_classes": "N", "classes_per_task": "K"}
_ALIASES = {"classes_per_task": ("--increment",)}  # PyCIL's and PILOT's name for it
# Options only the timm model of --model uses: the shipped backbone has its own weights and sizes.
_MODEL_ONLY = ("checkpoint", "img_size", "patch_size", "depth", "embed_dim", "num_heads")
# What each method does not use, and why (an option given only to methods that ignore it is refused).
_NO_RES = "has no residual blocks"
_NO_MEMORY = "keeps no memory basis"
_NO_CALIBRATION = "does not calibrate"
_ONE_TASK = "trains one task holding every class (no task identity)"
_IGNORED: dict[str, dict[str, str]] = {
    "orth-only": {"rank_res": _NO_RES, "res_scale": _NO_RES},
    "res-only": {"rank_orth": "has no orthogonal adapter", "orth_scale": "has no orthogonal adapter"},
    "no-calibration": {"beta": _NO_CALIBRATION},
    "seq-lora": {"rank_res": _NO_RES, "res_scale": _NO_RES, "threshold_start": _NO_MEMORY,
                 "threshold_end": _NO_MEMORY, "beta": _NO_CALIBRATION},
    "joint": {name: _ONE_TASK for name in ("rank_res", "res_scale", "threshold_start", "threshold_end", "beta",
                                           "score_rank", "temperature", "gate_mode", "gate_source", "summary",
                                           "task_score", "prototype_features", "prototype_shrinkage",
                                           "prototype_temperature")},
}


class _RecordsGiven:
    """Mixin for store actions: also records that the option was given (in ``namespace._given``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace._given = set(getattr(namespace, "_given", ())) | {self.dest}


class _Given(_RecordsGiven, argparse._StoreAction):
    pass


class _GivenFlag(_RecordsGiven, argparse._StoreTrueAction):
    pass


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="run the continual-learning benchmark (default: DualLoRA on Split Fashion-MNIST)",
        description=DESCRIPTION, formatter_class=HelpFormatter,
    )
    p.register("action", None, _Given)
    p.register("action", "store", _Given)
    p.register("action", "store_true", _GivenFlag)
    p.set_defaults(_train_parser=p)  # --preset re-reads the command line with its options
    p.add_argument("--method", default="duallora",
                   help=f"one of {', '.join(METHODS)}; a comma-separated list; or 'all'")
    p.add_argument("--preset", default=None, metavar="NAME", choices=tuple(PRESETS),
                   help=f"a published setting ({', '.join(PRESETS)}: the InfLoRA configurations, docs/method.md) as "
                        "the options it stands for, printed in full; options given beside it win. Needs "
                        "--data-root and --checkpoint (ViT-B/16 weights) (default: none)")
    p.add_argument("--class-order", default=None, metavar="FILE|sorted",
                   help="the class order, given: a file of class indices or names (JSON list, or separated by "
                        "commas / white space), or 'sorted' for the data set's own order (default: shuffled, "
                        "see --class-order-seed)")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="run every method once per seed (comma-separated), into OUT_DIR/<method>-seed<seed>/, "
                        "and plot their A_t into OUT_DIR/a_t-curves.png; instead of --seed (default: --seed's one "
                        "run)")
    p.add_argument("--full", action="store_true",
                   help="use all of Fashion-MNIST instead of --train-per-class/--test-per-class images per class")
    p.add_argument("--train-per-class", type=int, default=TrainConfig.train_per_class,
                   help=f"training images per class, a seeded subset (default: {TrainConfig.train_per_class} for "
                        "fashion-mnist; other data sets: all)")
    p.add_argument("--test-per-class", type=int, default=TrainConfig.test_per_class,
                   help=f"test images per class, a seeded subset (default: {TrainConfig.test_per_class} for "
                        "fashion-mnist; other data sets: all)")
    p.add_argument("--targets", default=",".join(TrainConfig.targets),
                   help="linear layers to adapt, by name, comma-separated")
    p.add_argument("--resume", action="store_true", help="continue from the run's last finished task")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--amp", choices=AMP_MODES, default=None,
                   help="mixed precision of the training step (torch.autocast; parameters, gradients and the "
                        "memory statistics stay float32/float64). Default: bf16 on a CUDA GPU, off on the CPU. "
                        "fp16 on a CPU needs native float16 matrix products (AVX512-FP16 or AMX-FP16, as oneDNN "
                        "reports them)")
    p.add_argument("--compile", nargs="?", const="auto", default="off", metavar="BACKEND",
                   help="torch.compile the training step (fullgraph); BACKEND: inductor (what --compile alone "
                        "uses; on the CPU it needs a C++ compiler), aot_eager (no code generation), or another "
                        "torch.compile backend. Default: off")
    p.add_argument("--train-a", choices=("on", "off"), default="on",
                   help="on: train the adapters' down-projections A and up-projections B; off: keep A at its "
                        "initialisation (the task's principal input directions) and train B only, InfLoRA-style: "
                        "each adapted layer then keeps T = x A^T for backward instead of its input x "
                        "(docs/method.md, 'Fixed down-projections'). Default: on")
    add_threads_option(p)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SKIP:
            continue
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind) if typing.get_args(kind) else kind
        p.add_argument("--" + f.name.replace("_", "-"), *_ALIASES.get(f.name, ()), type=base, default=f.default,
                       help=_HELP[f.name], choices=_CHOICES.get(f.name), metavar=_METAVAR.get(f.name))
    return p


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def configs_from_args(args: argparse.Namespace) -> list[TrainConfig]:
    """One TrainConfig per method; ValueError for settings a run would not use, before anything runs."""
    methods = list(METHODS) if args.method == "all" else [m.strip() for m in args.method.split(",") if m.strip()]
    given = set(getattr(args, "_given", ()))
    if args.model is None:
        unused = [_flag(n) for n in _MODEL_ONLY if n in given]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} only {'applies' if len(unused) == 1 else 'apply'} with --model: the default backbone (the shipped self-pretrained "
                "ViT) has its own weights and sizes. Add --model NAME (e.g. --model vit_small_patch16_224 "
                "--checkpoint weights.safetensors --patch-size 4) or leave them out"
            )
    if args.full:
        unused = [_flag(n) for n in ("train_per_class", "test_per_class") if n in given]
        if unused:
            raise ValueError(f"--full uses every image, so {' and '.join(unused)} would be ignored: give one or the other")
    data = _data_settings(args, given)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [args.seed]
    if args.seeds is not None and "seed" in given:
        raise ValueError("give --seed or --seeds, not both")
    if args.run_name is not None and len(seeds) > 1:
        raise ValueError(f"--run-name names one run, but --seeds {args.seeds} starts {len(seeds)} per method: "
                         "each would overwrite the last. Leave --run-name out (runs are named <method>-seed<seed>)")
    if args.run_name is not None and len(methods) > 1:
        raise ValueError(f"--run-name names one run, but --method {args.method} starts {len(methods)}: "
                         "each would overwrite the last. Leave --run-name out (runs are named <method>-seed<seed>)")
    for name in sorted(given):
        reasons = [_IGNORED.get(m, {}).get(name) for m in methods]
        if methods and all(reasons):
            why = "; ".join(sorted({f"{m} {r}" for m, r in zip(methods, reasons)}))
            raise ValueError(f"{_flag(name)} is not used by --method {args.method} ({why}): leave it out")
    common = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in _SKIP}
    common["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    common["train_per_class"] = None if args.full else args.train_per_class
    common["test_per_class"] = None if args.full else args.test_per_class
    common["amp"] = args.amp or default_amp()
    common["compile"] = args.compile
    common.update(data)
    common["train_a"] = args.train_a == "on"
    del common["seed"]
    return [TrainConfig(method=m, seed=seed, **common) for seed in seeds for m in methods]


def _data_settings(args: argparse.Namespace, given: set[str]) -> dict[str, typing.Any]:
    """The data options of a run: the data set's own defaults where the options were not given (the embedded
    benchmark's are TrainConfig's), the class order read from --class-order; ValueError for data options the
    data set would not use."""
    from ..continual.datasets.splits import SORTED, read_class_order

    dataset = args.dataset
    settings = {k: v for k, v in RUN_DEFAULTS.get(dataset, {}).items() if k not in given}
    if dataset != "fashion-mnist" and args.full:
        raise ValueError(f"--full selects every Fashion-MNIST image; --dataset {dataset} uses every image unless "
                         "--train-per-class / --test-per-class say otherwise: leave --full out")
    if dataset == "fashion-mnist" and "workers" in given:
        raise ValueError("--workers: fashion-mnist is held in memory as tensors, there is nothing to decode in "
                         "worker processes; leave it out")
    if "split_seed" in given and args.split_ratio is None:
        raise ValueError("--split-seed draws the --split-ratio split; without --split-ratio it would be ignored: "
                         "leave it out")
    if args.class_order is not None and "class_order_seed" in given:
        raise ValueError("give --class-order (the order itself) or --class-order-seed (a shuffle), not both")
    if args.class_order is not None:
        settings["class_order"] = SORTED if args.class_order == SORTED else read_class_order(args.class_order)
    if args.preset is not None and (args.checkpoint is None or args.data_root is None):
        missing = " and ".join(f for f, v in (("--data-root DIR", args.data_root), ("--checkpoint FILE", args.checkpoint))
                               if v is None)
        raise ValueError(f"--preset {args.preset} is a setting for a pre-trained ViT-B/16 on your own files: add "
                         f"{missing} (README, 'Your own data')")
    return settings


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: distinct integers >= 0, comma-separated, in the order given."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    try:
        seeds = [int(w) for w in words]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds takes distinct integers >= 0, e.g. 0,1,2; got {text!r}")
    return seeds


def default_amp() -> str:
    """--amp's default: bf16 where training runs on a CUDA GPU, off on the CPU."""
    import torch

    return "bf16" if torch.cuda.is_available() else "off"


def resume_command(argv: typing.Sequence[str]) -> str:
    """The command line that continues an interrupted ``duallora train`` with these arguments."""
    import os

    rest = list(argv)
    if "--resume" not in rest:
        rest.append("--resume")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: the same launch (one node's share of it)
        launch = ["torchrun", f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])}"]
        return shlex.join([*launch, "-m", "duallora_kernels", "train", *rest])
    return shlex.join(["duallora", "train", *rest])


def run(args: argparse.Namespace) -> int:
    from ..continual import distributed

    started = distributed.init_from_env()  # under torchrun (WORLD_SIZE > 1): join the process group
    try:
        return _run(args)
    except ValueError as err:
        if distributed.world_size() == 1:
            raise  # cli.main prints it
        # Under torchrun every rank finds the same bad input (the checks are deterministic): rank 0 says it, once,
        # and no rank exits before it has (torchrun stops the others when the first one exits).
        if distributed.rank() == 0:
            print(f"duallora train: error: {err}", file=sys.stderr, flush=True)
        distributed.barrier()
        return 2
    finally:
        if started:
            distributed.destroy()


def _run(args: argparse.Namespace) -> int:
    from ..continual import distributed
    from ..continual.datasets import check_data_root
    from ..continual.execution import check_execution
    from ..continual.trainer import Trainer

    if args.preset is not None:  # the preset's options, then the user's: read again as one command line
        argv, _ = expand_preset(getattr(args, "_argv", sys.argv[1:]), args._train_parser)
        args = args._train_parser.parse_args([*argv, "--preset", args.preset])
        args._argv = argv
        if distributed.rank() == 0:
            print(f"duallora train: --preset {args.preset} is: {expanded_command(argv)}", flush=True)
    configs = configs_from_args(args)  # every method's settings are checked before any runs
    check_data_root(configs[0].dataset, configs[0].data_root)  # a folder that is not the data set: one line, now
    threads = apply_threads(args.threads)
    for config in configs:  # --amp, --compile: refused on this machine before any run writes anything
        check_execution(config)
    from ..cli import usable_cores

    if distributed.rank() == 0:
        print(f"duallora train: {threads} CPU thread(s) ({usable_cores()} core(s) usable by this process; "
              "--threads N to change)", flush=True)
    results = []
    for config in configs:
        trainer = Trainer(config, progress=not args.no_progress)
        try:
            results.append(trainer.run(resume=args.resume))
        except KeyboardInterrupt:
            if distributed.rank() == 0:
                print(f"duallora train: {trainer.where_stopped()}; continue with: "
                      f"{resume_command(getattr(args, '_argv', sys.argv[1:]))}", file=sys.stderr, flush=True)
            return INTERRUPTED
    if len(results) > 1 and distributed.rank() == 0:
        _plot_curves(results, configs[0], trainer.stream)
    return 0


def _plot_curves(results: list[dict], config: TrainConfig, stream: typing.Any) -> None:
    """OUT_DIR/a_t-curves.png: every method's A_t over this command's seeds (mean, one std, each seed)."""
    from pathlib import Path

    from ..continual.seeds import group_by_method, plot_curves

    from ..continual.record import data_title

    groups = group_by_method(results, METHODS)
    seeds = sorted({s for g in groups for s in g.seeds})
    path = Path(config.out_dir) / CURVES_PNG
    plot_curves(groups, path, f"{data_title(config, stream)}, seeds {', '.join(map(str, seeds))}: A_t, mean ± std")
    print(f"duallora train: A_t of {len(groups)} method(s) over seed(s) {', '.join(map(str, seeds))} -> {path}",
          flush=True)


if __name__ == "__main__":  # python -m duallora_kernels.commands.train ... (without the other subcommands)
    from ..cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
