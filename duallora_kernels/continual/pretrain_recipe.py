"""The recipe of self-pretraining (:mod:`.pretrain`): what its training does to the digits and to the
optimizer -- the held-out split, the augmentation, the normalisation, AdamW's parameter groups, the
learning-rate schedule, and how accuracy is measured. :func:`.pretrain.pretrain` runs them in its loop
and caches what comes out."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import LabelledImages, Normalisation

if TYPE_CHECKING:
    from .pretrain import PretrainConfig

__all__ = ["normalise", "hold_out", "adamw", "augment", "warmup_cosine", "accuracy"]


def normalise(x: Tensor, normalisation: Normalisation) -> Tensor:
    return (x - normalisation.mean) / normalisation.std


def hold_out(data: LabelledImages, per_class: int, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """Split off ``per_class`` samples of each class (a seeded choice) as a validation set."""
    rng = np.random.default_rng([seed, 7])
    val = np.concatenate([rng.choice(np.flatnonzero(data.labels == c), size=per_class, replace=False)
                          for c in data.classes]) if per_class > 0 else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(data)), val)
    return (LabelledImages(data.images[keep], data.labels[keep]),
            LabelledImages(data.images[np.sort(val)], data.labels[np.sort(val)]))


def adamw(named_parameters: Iterable[tuple[str, Tensor]], config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with ``config.weight_decay`` on the weight matrices, none on biases, norms and the position
    embedding."""
    named = list(named_parameters)
    decay = [p for n, p in named if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "pos_embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


def augment(x: Tensor, generator: torch.Generator, *, degrees: float = 5.0, scale: float = 0.05,
             shift_px: float = 2.0) -> Tensor:
    """Random affine warps of images on the 0..1 scale, by default small ones (rotation ±5°, scale 0.95-1.05,
    shift ±2 px): without them a ViT memorises 4,500 digits long before it generalises."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    angle, scale, shift = (u[:, 0] * math.radians(degrees), 1 + scale * u[:, 1],
                           u[:, 2:] * (2 * shift_px / x.shape[-1]))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: LabelledImages, normalisation: Normalisation) -> float:
    if len(data) == 0:
        return float("nan")
    model.eval()
    x = normalisation.apply(data.images)
    predictions = torch.cat([model(batch).argmax(-1) for batch in x.split(500)])
    model.train()
    return float((predictions == torch.from_numpy(data.labels)).float().mean())
