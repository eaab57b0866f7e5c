"""The settings of a continual-learning run (:class:`TrainConfig`) and what each method switches on.

Stored in every checkpoint and results.json; :mod:`.trainer` runs them, :mod:`.execution` checks
where and how (device, autocast, torch.compile).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["METHODS", "GATE_SOURCES", "TASK_SCORES", "PROTOTYPE_SOURCES", "AMP_MODES", "method_settings", "TrainConfig"]

METHODS = ("duallora", "orth-only", "res-only", "no-calibration", "seq-lora", "joint")
# "layer": each adapted layer gates its residual blocks from its own input (one pass);
# "global": a first pass (residual blocks off) gives the model's task gate, used by every layer.
GATE_SOURCES = ("layer", "global")
# Where the model's task scores come from (docs/method.md, "Task scores"; :mod:`.prototypes`).
TASK_SCORES = ("subspace", "prototype-means", "prototype-lda")
# Whose layer inputs the prototype scores summarise: a frozen copy of the pre-trained backbone, or the adapted model.
PROTOTYPE_SOURCES = ("pretrained", "adapted")
# Mixed precision of the training step (torch.autocast): the adapters' fused op computes in the autocast dtype,
# parameters, gradients and the memory statistics stay float32/float64.
AMP_MODES = ("bf16", "fp16", "off")


def method_settings(method: str) -> tuple[dict[str, Any], bool]:
    """The DualLoRALinear switches and whether calibration is on, for each method."""
    table = {
        "duallora": (dict(), True),
        "orth-only": (dict(use_res=False), True),
        "res-only": (dict(use_orth=False), True),
        "no-calibration": (dict(), False),
        "seq-lora": (dict(use_res=False, memory=False), False),
        "joint": (dict(use_res=False, memory=False), False),
    }
    if method not in table:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return table[method]


@dataclass
class TrainConfig:
    """Everything that determines a run; stored in its checkpoints and results."""

    method: str = "duallora"
    seed: int = 0
    # data (continual.datasets): the embedded Split Fashion-MNIST by default, class order shuffled by `seed`
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    # tasks: num_tasks (None: as many as the classes fill, the last taking the rest), classes_per_task (the
    # increment K of B<N>-Inc<K>), init_classes (N: the first task's classes; None or 0: K)
    num_tasks: int | None = 5
    classes_per_task: int = 2
    init_classes: int | None = None
    # class order: `seed`'s shuffle unless class_order_seed (PyCIL's rule) or class_order (a list of class
    # indices or names, or "sorted") is given
    class_order_seed: int | None = None
    class_order: tuple[int | str, ...] | str | None = None
    # imagefolder without a test split: the fraction of each class held out for testing, and its seed
    split_ratio: float | None = None
    split_seed: int = 0
    train_per_class: int | None = 500
    test_per_class: int | None = 300
    # backbone: None = the self-pretrained ViT shipped with the package; else a timm ViT name
    model: str | None = None
    checkpoint: str | None = None
    img_size: int | None = 28
    patch_size: int | None = None
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    # adapters (DualLoRALinear arguments)
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
    rank_orth: int = 8
    rank_res: int = 4
    orth_scale: float = 1.0
    res_scale: float = 1.0
    # False: the down-projections C_o, C_r stay at their initialisation, only B trains (InfLoRA's B-only
    # training; the op keeps T = x A^T for backward instead of x: docs/method.md, "Fixed down-projections")
    train_a: bool = True
    threshold_start: float = 0.95
    threshold_end: float = 0.99
    score_rank: int = 16
    temperature: float = 0.02
    gate_mode: str = "soft"
    gate_source: str = "global"
    summary: str = "mean"
    task_score: str = "prototype-lda"
    prototype_features: str = "pretrained"
    prototype_shrinkage: float = 2e-3
    prototype_temperature: float = 1.0
    beta: float = 1.0
    backend: str = "auto"
    # execution: autocast dtype of the training step; torch.compile backend of the training step ("off",
    # "auto" = inductor, or any torch._dynamo backend name such as "aot_eager")
    amp: str = "off"
    compile: str = "off"
    # DataLoader worker processes that decode images (None: continual.execution.default_workers; the embedded
    # benchmark's tensors need none)
    workers: int | None = None
    # optimisation
    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    head_lr: float = 1e-2
    weight_decay: float = 1e-2
    # output
    out_dir: str = "runs"
    run_name: str | None = None

    def __post_init__(self) -> None:
        method_settings(self.method)
        self.targets = tuple(self.targets)
        if isinstance(self.class_order, list):  # as read back from JSON
            self.class_order = tuple(self.class_order)
        for name in ("classes_per_task", "epochs", "batch_size", "rank_orth", "rank_res", "score_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name, least in (("num_tasks", 1), ("train_per_class", 1), ("test_per_class", 1), ("init_classes", 0),
                            ("workers", 0), ("img_size", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
                raise ValueError(f"{name} must be an int >= {least} or None, got {v!r}")
        self._check_data()
        for name in ("threshold_start", "threshold_end"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        for name in ("lr", "head_lr", "temperature", "prototype_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.train_a, bool):
            raise ValueError(f"train_a must be True or False, got {self.train_a!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if not isinstance(self.compile, str) or not self.compile:
            raise ValueError(f"compile must be 'off', 'auto' or a torch.compile backend name, got {self.compile!r}")
        if self.gate_source not in GATE_SOURCES:
            raise ValueError(f"gate_source must be one of {', '.join(GATE_SOURCES)}, got {self.gate_source!r}")
        if self.task_score not in TASK_SCORES:
            raise ValueError(f"task_score must be one of {', '.join(TASK_SCORES)}, got {self.task_score!r}")
        if self.task_score != "subspace" and self.gate_source != "global":
            raise ValueError(f"task_score={self.task_score!r} scores the model's features in the global gate's first "
                             "pass: it needs gate_source='global'")
        if self.prototype_features not in PROTOTYPE_SOURCES:
            raise ValueError(f"prototype_features must be one of {', '.join(PROTOTYPE_SOURCES)}, "
                             f"got {self.prototype_features!r}")
        if not 0.0 <= self.prototype_shrinkage <= 1.0:
            raise ValueError(f"prototype_shrinkage must be in [0, 1], got {self.prototype_shrinkage!r}")
        if self.beta < 0 or self.weight_decay < 0:
            raise ValueError("beta and weight_decay must be >= 0")
        if self.model is None and self.dataset != "fashion-mnist":
            raise ValueError(f"dataset {self.dataset!r} needs a timm ViT (--model NAME, e.g. --model vit_base_patch16_224 "
                             "--checkpoint FILE): the default backbone is a 28x28 grey-scale stand-in pretrained on "
                             "MNIST digits, for the embedded Fashion-MNIST benchmark only")
        if self.model is None:
            unused = [f"{n}={getattr(self, n)!r}" for n in ("checkpoint", "patch_size", "depth", "embed_dim", "num_heads")
                      if getattr(self, n) is not None] + ([f"img_size={self.img_size}"] if self.img_size != 28 else [])
            if unused:
                raise ValueError(
                    f"{', '.join(unused)} only {'applies' if len(unused) == 1 else 'apply'} with model= (--model): the default backbone, the shipped "
                    "self-pretrained ViT, has its own weights and sizes (28x28 input). Name a timm ViT with model= "
                    "or leave them out"
                )

    def _check_data(self) -> None:
        from .datasets import DATASETS

        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.split_ratio is not None and (self.dataset != "imagefolder" or not 0.0 < self.split_ratio < 1.0):
            raise ValueError(f"split_ratio (the fraction of each class held out for testing) must be in (0, 1) and "
                             f"applies to dataset 'imagefolder' only; got {self.split_ratio!r} with {self.dataset!r}")
        if isinstance(self.class_order, str) and self.class_order != "sorted":
            raise ValueError(f"class_order must be a sequence of class indices or names, or 'sorted'; "
                             f"got {self.class_order!r}")

    @property
    def in_chans(self) -> int:
        """Image channels the backbone reads: 1 for the embedded grey-scale benchmark, 3 for the others."""
        return 1 if self.dataset == "fashion-mnist" else 3

    @property
    def name(self) -> str:
        return self.run_name or f"{self.method}-seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def layer_kwargs(self, num_tasks: int | None = None) -> dict[str, Any]:
        """DualLoRALinear's arguments; the threshold schedule spans ``num_tasks`` (default: ``self.num_tasks``,
        which a split that fills the classes leaves None: the trainer passes the split's count)."""
        from ..memory import threshold_schedule

        switches, _ = method_settings(self.method)
        tasks = num_tasks or self.num_tasks
        if tasks is None:
            raise ValueError("num_tasks=None: the number of tasks comes from the data; pass layer_kwargs(num_tasks)")
        return dict(
            rank_orth=self.rank_orth, rank_res=self.rank_res, orth_scale=self.orth_scale, res_scale=self.res_scale,
            thresholds=threshold_schedule(tasks, self.threshold_start, self.threshold_end),
            score_rank=self.score_rank, temperature=self.temperature, gate_mode=self.gate_mode,
            summary=self.summary, train_a=self.train_a, backend=self.backend, **switches,
        )

    @property
    def calibrated(self) -> bool:
        return method_settings(self.method)[1] and self.beta > 0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        if isinstance(self.class_order, tuple):
            d["class_order"] = list(self.class_order)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        # a run recorded before task_score existed scored tasks by subspaces (other later settings: their defaults)
        return cls(**{"task_score": "subspace", **{k: v for k, v in d.items() if k in known}})
