"""What the model expects of an image: input size, interpolation, mean and standard deviation, from timm's
data configuration of that model (its pretrained configuration), the input size from the model as built
(``--img-size`` may change it; timm's configuration keeps the pretrained size).

* test (and the passes that collect statistics): resize the shorter side to size / crop_pct, centre crop
  (timm's evaluation transform);
* training: random-resized crop (scale 0.08-1, aspect 3/4-4/3) and a horizontal flip, the recipe of the
  continual-learning code bases (PyCIL, InfLoRA, CODA-Prompt).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["Preprocessing"]


@dataclass(frozen=True)
class Preprocessing:
    """An image pipeline's settings: output (channels, height, width), interpolation name, per-channel mean and
    std on the 0..1 scale, and the centre-crop fraction of the test transform."""

    channels: int
    size: tuple[int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float

    @classmethod
    def of_model(cls, model: nn.Module) -> "Preprocessing":
        """The pipeline timm's data configuration gives ``model`` (a timm ViT), at the model's own input size."""
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        channels = int(model.patch_embed.proj.in_channels)
        size = tuple(int(s) for s in model.patch_embed.img_size)
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        if len(mean) != channels:  # e.g. a grey-scale (in_chans=1) model under an RGB configuration
            mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
        return cls(channels, size, str(cfg.get("interpolation") or "bilinear"), tuple(map(float, mean)),
                   tuple(map(float, std)), float(cfg.get("crop_pct") or 1.0))

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def _mode(self):
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.interpolation)

    def _finish(self) -> list[Callable]:
        from torchvision import transforms as T

        grey = [T.Grayscale(1)] if self.channels == 1 else []
        return [*grey, T.ToTensor(), T.Normalize(self.mean, self.std)]

    def test_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> float32 (C, H, W): resize the shorter side to size / crop_pct, centre crop."""
        from torchvision import transforms as T

        scale = math.floor(max(self.size) / self.crop_pct)
        resize = scale if self.size[0] == self.size[1] else tuple(math.floor(s / self.crop_pct) for s in self.size)
        return T.Compose([T.Resize(resize, interpolation=self._mode()), T.CenterCrop(self.size), *self._finish()])

    def train_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> float32 (C, H, W): random-resized crop and horizontal flip (draws torch random numbers)."""
        from torchvision import transforms as T

        return T.Compose([T.RandomResizedCrop(self.size, interpolation=self._mode()), T.RandomHorizontalFlip(),
                          *self._finish()])
