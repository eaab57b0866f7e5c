"""What limits the joint upper bound of the default benchmark (issue 12, item 4): the adapters' training
budget, the head's pooling, or the self-pretraining (augmentation, schedule, an auxiliary objective).

Every row trains `joint` (one task holding all ten classes, plain LoRA on the frozen backbone, the trainer's
own `_train_task`) on seed 0 of the default benchmark and reports its accuracy on the training images (does
the model fit them at all?) and on the test images (the README's joint A_last). Rows with a pretraining
variant first self-pretrain a backbone on the 4,500 MNIST training digits with that one change (the rest is
`PretrainConfig()`), then also report, for that backbone, the class-prototype LDA of `task_score=
"prototype-lda"` (frozen features, shrinkage 2e-3): its task identity and its accuracy as a 10-way
classifier. Like every default here, measured on the test split (there is no validation split).

    OMP_NUM_THREADS=2 python results/upper-bound/probe_upper_bound.py   # ~20 min on 2 idle cores

Writes upper-bound.json beside this file after every row (a crash keeps the rows done). Training is
deterministic for one CPU type and thread count; the `shipped` rows use the backbone shipped with the package,
the `pretrain` rows backbones rebuilt here (a rebuild of the default settings is the `default (rebuilt)` row).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from duallora_kernels.continual import pretrain as P
from duallora_kernels.continual.config import TrainConfig
from duallora_kernels.continual.data import Normalisation, fashion_mnist_tasks, load_mnist_5k
from duallora_kernels.continual.prototypes import ClassPrototypes
from duallora_kernels.continual.trainer import Trainer
from duallora_kernels.vit import create_vit

sys.path.insert(0, str(Path(__file__).parents[1] / "task-identity"))
from probe_features import _adapted_linears, _features  # noqa: E402  (the task-identity probe's feature reader)

OUT = Path(__file__).with_name("upper-bound.json")
SEED = 0
THREADS = 2

# (name, TrainConfig overrides, pool): the adapters' budget and the head's pooling, on the shipped backbone
ADAPTER_ROWS = [
    ("default (3 epochs, lr 2e-3)", {}, None),
    ("10 epochs", {"epochs": 10}, None),
    ("lr 5e-3", {"lr": 5e-3}, None),
    ("lr 1e-2", {"lr": 1e-2}, None),
    ("lr 1e-2, 10 epochs", {"lr": 1e-2, "epochs": 10}, None),
    ("lr 1e-3, 6 epochs", {"lr": 1e-3, "epochs": 6}, None),
    ("batch 32", {"batch_size": 32}, None),
    ("weight decay 0", {"weight_decay": 0.0}, None),
    ("rank_orth 32", {"rank_orth": 32}, None),
    ("head on the mean token (global_pool avg)", {}, "avg"),
]
STRONG_WARPS = {"degrees": 15.0, "scale": 0.15, "shift_px": 3.0}  # pretrain._augment's, default 5, 0.05, 2
# (name, PretrainConfig overrides, options of this probe's pretraining loop)
PRETRAIN_ROWS = [
    ("default (rebuilt)", {}, {}),
    ("stronger warps (rotation 15 deg, scale 0.85-1.15, shift 3 px)", {}, {"warp": STRONG_WARPS}),
    ("stronger warps + horizontal flips (p 0.5)", {}, {"warp": STRONG_WARPS, "flip": 0.5}),
    ("label smoothing 0.1", {"label_smoothing": 0.1}, {}),
    ("90 epochs", {"epochs": 90}, {}),
    ("+ patch reconstruction (weight 1)", {}, {"reconstruction": 1.0}),
    ("+ patch reconstruction (weight 4)", {}, {"reconstruction": 4.0}),
    ("+ patch reconstruction, 30% patches erased", {}, {"reconstruction": 1.0, "erase": 0.3}),
    ("+ rotation prediction (RotNet, 4-way)", {}, {"rotation": True}),
    ("90 epochs + patch reconstruction (weight 1)", {"epochs": 90}, {"reconstruction": 1.0}),
    ("4x4 patches (49 tokens)", {"patch_size": 4}, {}),
    ("width 192", {"embed_dim": 192}, {}),
    ("+ procedural shapes (10 more classes, half a batch more)", {}, {"shapes": 0.5}),
    ("+ procedural shapes (a batch more) + patch reconstruction", {}, {"shapes": 1.0, "reconstruction": 1.0}),
]
SIZES = ("model_name", "patch_size", "depth", "embed_dim", "num_heads")


def procedural_shapes(n: int, g: torch.Generator, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of 10 procedural classes (5 silhouettes: ellipse, rectangle, triangle, cross, ring; solid or
    striped) at a random position, size, tilt and brightness, on the 0..1 scale: a labelled source with no
    image in common with Fashion-MNIST, in the spirit of formula-driven pretraining (Kataoka et al. 2020)."""
    cls = torch.randint(0, 10, (n,), generator=g)
    shape, striped = cls % 5, cls // 5
    r = torch.rand(n, 8, generator=g)
    grid = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    x, y = xx[None] - (r[:, 0, None, None] - 0.5) * 0.4, yy[None] - (r[:, 1, None, None] - 0.5) * 0.4
    a, b = (0.35 + 0.5 * r[:, 2])[:, None, None], (0.35 + 0.5 * r[:, 3])[:, None, None]
    tilt = ((r[:, 4] - 0.5) * math.pi / 3)[:, None, None]
    u = (torch.cos(tilt) * x + torch.sin(tilt) * y) / a
    v = (-torch.sin(tilt) * x + torch.cos(tilt) * y) / b
    ellipse = u ** 2 + v ** 2 < 1
    masks = torch.stack([ellipse, (u.abs() < 1) & (v.abs() < 1), (v.abs() < 1) & (u.abs() < (1 + v) / 2),
                         ((u.abs() < 0.33) & (v.abs() < 1)) | ((v.abs() < 0.33) & (u.abs() < 1)),
                         ellipse & (u ** 2 + v ** 2 > 0.4)], 1)[torch.arange(n), shape].float()
    stripes = (torch.sin((4 + 8 * r[:, 5, None, None]) * u * 3 + r[:, 6, None, None] * 2 * math.pi) > 0).float() * 0.7 + 0.3
    texture = torch.where(striped[:, None, None].bool(), stripes, torch.ones_like(u))
    image = masks * texture * (0.5 + 0.5 * r[:, 7, None, None]) + 0.05 * torch.randn(masks.shape, generator=g)
    return image.clamp(0, 1).unsqueeze(1), cls


def pretrain_variant(config: P.PretrainConfig, warp: dict[str, float] | None = None, flip: float = 0.0, reconstruction: float = 0.0,
                     erase: float = 0.0, rotation: bool = False, shapes: float = 0.0) -> tuple[dict, dict[str, Any]]:
    """`pretrain.pretrain`'s loop (same data split, optimizer, schedule, clipping) with this probe's options:
    `warp` passes other warp ranges to `pretrain._augment`;
    `reconstruction` adds w * MSE of a linear decoder from each final patch token to its (un-erased) pixels;
    `erase` zeroes that share of patches in the input; `rotation` rotates each image by k * 90 degrees and adds
    a 4-way head predicting k; `shapes` appends that share of a batch of :func:`procedural_shapes` (labels
    10-19 of a 20-way head)."""
    digits = load_mnist_5k()
    train, val = P._hold_out(digits, config.val_per_class, SEED)
    norm = Normalisation.of(train.images)
    x_all = torch.from_numpy(train.images).float().div_(255).unsqueeze(1)
    y_all = torch.from_numpy(train.labels)
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    model = create_vit(**config.create_vit_kwargs(), num_classes=10 + (4 if rotation else 0) + (10 if shapes else 0))
    p, side = config.patch_size, config.img_size // config.patch_size
    decoder = torch.nn.Linear(config.embed_dim, p * p) if reconstruction else None
    named = list(model.named_parameters()) + (list(decoder.named_parameters(prefix="decoder")) if decoder else [])
    params = [q for _, q in named]
    opt = P._adamw(named, config)  # pretrain.pretrain's optimizer and weight-decay groups
    total = math.ceil(len(y_all) / config.batch_size) * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, P._warmup_cosine(config.warmup_steps, total))
    start, step = time.perf_counter(), 0
    model.train()
    while step < total:
        for index in torch.randperm(len(y_all), generator=g).split(config.batch_size):
            if step == total:
                break
            x, y = P._augment(x_all[index], g, **(warp or {})), y_all[index]
            if flip:
                x = torch.where((torch.rand(len(y), generator=g) < flip)[:, None, None, None], x.flip(-1), x)
            if rotation:
                k = torch.randint(0, 4, (len(y),), generator=g)
                x = torch.stack([torch.rot90(xi, int(ki), (1, 2)) for xi, ki in zip(x, k)])
            if shapes:
                extra_x, extra_y = procedural_shapes(int(len(y) * shapes), g)
                x, y = torch.cat([x, extra_x]), torch.cat([y, extra_y + 10])
            clean = x
            if erase:
                keep = (torch.rand(len(y), 1, side, side, generator=g) >= erase).float()
                x = x * keep.repeat_interleave(p, 2).repeat_interleave(p, 3)
            tokens = model.forward_features((x - norm.mean) / norm.std)
            logits = model.forward_head(tokens)
            loss = F.cross_entropy(logits if shapes else logits[:, :10], y, label_smoothing=config.label_smoothing)
            if rotation:
                loss = loss + F.cross_entropy(logits[:, 10:], k)
            if decoder is not None:
                target = clean.unfold(2, p, p).unfold(3, p, p).reshape(len(y), side * side, p * p)
                loss = loss + reconstruction * F.mse_loss(decoder(tokens[:, 1:]), (target - norm.mean) / norm.std)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            step += 1
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        val_acc = float((model(norm.apply(val.images))[:, :10].argmax(-1) == torch.from_numpy(val.labels)).float().mean())
    model.reset_classifier(0)
    return model.state_dict(), {"pretrain_seconds": round(seconds, 1), "mnist_val_accuracy": round(val_acc, 4)}


@torch.no_grad()
def _accuracy(model: torch.nn.Module, dataset) -> float:
    model.eval()
    hits = total = 0
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=500):
        hits += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return round(hits / total, 4)


def joint(overrides: dict[str, Any], pool: str | None = None, checkpoint: Path | None = None,
          sizes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `joint` with the trainer's own task loop; accuracy on its training and test images."""
    extra = {"model": sizes["model_name"], "checkpoint": str(checkpoint),
             **{k: sizes[k] for k in SIZES[1:]}} if checkpoint is not None else {}
    config = TrainConfig(method="joint", seed=SEED, out_dir="/tmp/duallora-upper-bound", **overrides, **extra)
    trainer = Trainer(config, progress=False)
    torch.manual_seed(SEED)
    model, tasks = trainer.build_model(), trainer._tasks()
    if pool:
        model.backbone.global_pool = pool
    start = time.perf_counter()
    trainer._train_task(model, tasks, 0)
    return {"joint_train_accuracy": _accuracy(model, tasks[0].train), "joint_test_accuracy": _accuracy(model, tasks[0].test),
            "joint_seconds": round(time.perf_counter() - start, 1)}


def prototype_lda(backbone: torch.nn.Module) -> dict[str, float]:
    """The default task score's statistics on this frozen backbone: task identity and 10-way class accuracy."""
    defaults = TrainConfig()
    backbone.eval()
    layers = _adapted_linears(backbone)
    tasks = fashion_mnist_tasks(None, num_tasks=defaults.num_tasks, classes_per_task=defaults.classes_per_task,
                                seed=SEED, train_per_class=defaults.train_per_class,
                                test_per_class=defaults.test_per_class)
    protos = ClassPrototypes("prototype-lda", defaults.prototype_shrinkage)
    cpt = defaults.classes_per_task
    for t, task in enumerate(tasks):
        f, y = _features(backbone, layers, task.train, True)
        protos.add_task(f, y, range(t * cpt, (t + 1) * cpt))
    w, b = protos._class_weights()
    task_hits = class_hits = total = 0
    for t, task in enumerate(tasks):
        f, y = _features(backbone, layers, task.test, True)
        task_hits += int((protos.task_scores(f).argmax(1) == t).sum())
        class_hits += int(((f.double() @ w.T + b).argmax(1) == y).sum())
        total += len(y)
    return {"lda_task_id_accuracy": round(task_hits / total, 4), "lda_class_accuracy": round(class_hits / total, 4)}


def main() -> int:
    torch.set_num_threads(THREADS)
    rows: list[dict[str, Any]] = []

    def save(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        OUT.write_text(json.dumps({"command": f"OMP_NUM_THREADS={THREADS} python results/upper-bound/probe_upper_bound.py",
                                   "seed": SEED, "threads": THREADS, "hardware": P.hardware(), "rows": rows}, indent=1) + "\n")

    shipped = P.load_pretrained_backbone(P.shipped_backbone())
    save({"backbone": "shipped", "change": "-", **prototype_lda(shipped)})
    for name, overrides, pool in ADAPTER_ROWS:
        save({"backbone": "shipped", "change": name, **joint(overrides, pool)})
    folder = Path("/tmp/duallora-upper-bound")
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, overrides, options) in enumerate(PRETRAIN_ROWS):
        config = P.PretrainConfig(**overrides)
        state, info = pretrain_variant(config, **options)
        weights = folder / f"variant{i}.safetensors"
        P._save_safetensors(state, str(weights))
        weights.with_suffix(".json").write_text(json.dumps({"create_vit": config.create_vit_kwargs()}))
        backbone = P.load_pretrained_backbone(weights)
        save({"backbone": "pretrain", "change": name, **info, **prototype_lda(backbone),
              **joint({}, None, weights, config.create_vit_kwargs())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
