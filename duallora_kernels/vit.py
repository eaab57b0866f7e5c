"""The thin timm ViT wrapper: build a (pre-trained) vision transformer, and hold it with per-task heads.

- :func:`create_vit` builds a timm model of a supported family (:mod:`.vit_families`: ViT/DeiT/DeiT III,
  BEiT, EVA/EVA-02, Swin) by name with optional size overrides and loads a local checkpoint
  (.pth/.pt/.bin or .safetensors) offline (:mod:`.vit_checkpoints`): a classifier head that does not fit
  is dropped, position embeddings and relative-position tables are resampled to the model's patch grid
  and windows, the patch kernel to its patch size and input channels; anything else that does not fit is
  a ValueError that names the tensors.
- :class:`ContinualViT` is the class-incremental model: a frozen backbone whose linear layers DualLoRA
  adapts (via :func:`duallora_kernels.nn.inject`) and one linear head per task, whose logits concatenate.

No training loops here (they live in ``duallora_kernels.continual``).
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import timm
import torch
from torch import Tensor, nn

from .vit_checkpoints import load_state_dict_file, load_vit_weights
from .vit_families import SUPPORTED, family_of, resolve_targets

__all__ = ["DEFAULT_MODEL", "DEFAULT_TARGETS", "create_vit", "load_state_dict_file", "load_vit_weights", "ContinualViT"]

DEFAULT_MODEL = "vit_tiny_patch16_224"
DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")


def create_vit(
    model_name: str = DEFAULT_MODEL,
    *,
    img_size: int | tuple[int, int] | None = None,
    patch_size: int | None = None,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    in_chans: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int = 0,
    **kw: Any,
) -> nn.Module:
    """Build timm's ``model_name`` (default ``num_classes=0``: the model returns pooled features), with any of
    the size arguments overriding the named configuration, and load ``checkpoint`` into it if given.

    Families (:data:`.vit_families.FAMILIES`): ViT, DeiT, DeiT III, BEiT, EVA/EVA-02 and Swin. Swin's sizes go
    per stage: pass timm's ``depths=(...)`` (and ``num_heads`` as a tuple) in ``kw`` instead of ``depth``.
    ``pretrained=True`` (in ``kw``) asks timm to download the named weights instead (needs a network).

    Raises ValueError for an unknown name (with close matches), a model of another family, or a checkpoint
    that does not fit; FileNotFoundError for a missing checkpoint file.
    """
    _check_model_name(model_name)
    download = bool(kw.pop("pretrained", False))
    if download and checkpoint is not None:
        raise ValueError("pass either checkpoint= (a local file) or pretrained=True (a timm download), not both")
    path = None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist (create_vit(checkpoint=...))")
    sizes = dict(img_size=img_size, patch_size=patch_size, depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                 in_chans=in_chans)
    overrides = {k: v for k, v in sizes.items() if v is not None}
    if isinstance(embed_dim, int) and isinstance(num_heads, int) and embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
    try:
        model = timm.create_model(model_name, pretrained=download, num_classes=num_classes, **overrides, **kw)
    except TypeError as err:
        raise ValueError(
            f"timm could not build {model_name!r} with {dict(overrides, num_classes=num_classes, **kw)}: {err}. "
            f"create_vit builds these timm families: {SUPPORTED} (Swin takes depths=(...) and num_heads=(...) per "
            "stage, not one depth or num_heads)"
        ) from None
    if family_of(model) is None:
        raise ValueError(
            f"{model_name!r} builds a timm {type(model).__name__}, not a VisionTransformer of a family create_vit "
            f"supports: {SUPPORTED}"
        )
    image, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    if image is not None and any(i % p for i, p in zip(image, patch)):
        raise ValueError(f"img_size {tuple(image)} is not a multiple of patch_size {tuple(patch)} for {model_name!r}"
                         + _patch_size_hint(tuple(image), tuple(patch)))
    if path is not None:
        load_vit_weights(model, load_state_dict_file(path), source=str(path))
    return model


def _patch_size_hint(image: tuple[int, ...], patch: tuple[int, ...]) -> str:
    """Patch sizes that divide every side of ``image`` (at least a 4x4 grid), the two closest to ``patch``."""
    side = min(image)
    fits = [p for p in range(2, side // 4 + 1) if all(i % p == 0 for i in image)]
    if not fits:
        return f": pass a patch_size that divides {side}"
    best = sorted(sorted(fits, key=lambda p: (abs(p - max(patch)), -p))[:2])
    sizes = " or ".join(str(p) for p in best)
    return (f": pass a patch size that divides it, e.g. patch_size={sizes} (duallora train --patch-size {best[0]}); "
            "a checkpoint's patch kernel is resampled to it")


def _check_model_name(model_name: str) -> None:
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a timm model name, got {model_name!r}")
    if timm.is_model(model_name):
        return
    names = timm.list_models()
    arch = model_name.split(".", 1)[0]
    close = difflib.get_close_matches(arch, names, n=8, cutoff=0.6)
    # Substring matches catch what edit distance misses ("tiny_patch16" -> the vit_tiny variants).
    for part in re.split(r"[_\-.]", arch):
        if len(close) >= 8 or len(part) < 4:
            continue
        close += [n for n in timm.list_models(f"*{part}*") if n.startswith("vit") and n not in close][: 8 - len(close)]
    hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models('vit_*')"
    raise ValueError(f"unknown timm model {model_name!r}{hint}")


# ------------------------------------------------------------------------------------------- continual wrapper


class ContinualViT(nn.Module):
    """A frozen vision-transformer backbone (optionally DualLoRA-adapted) with one linear head per task.

    Args:
        backbone: a timm model of a supported family (:func:`create_vit`: ViT/DeiT/DeiT III, BEiT, EVA, Swin);
            a classifier head it has is removed (``reset_classifier(0)``), so it returns pooled features.
        adapter: keyword arguments for :class:`duallora_kernels.nn.DualLoRALinear` (rank_orth, rank_res, ...);
            the linear layers inside the backbone's transformer blocks (``blocks``; Swin: ``layers``) named by
            ``targets`` are replaced. None: no adapters.
        targets: names (or fnmatch patterns) of the linear layers to adapt, matched against the last part of
            their qualified names (a dotted target: a pattern of the qualified name inside the blocks, e.g.
            ``"*.mlp.fc1"``). Each must match a linear layer
            inside the blocks; a default name the family calls otherwise stands for those layers ("qkv": EVA-02's
            q_proj, k_proj, v_proj; "fc1": its SwiGLU fc1_g, fc1_x).
        freeze_backbone: the pre-trained weights stay frozen (docs/method.md, "Setting"); only adapters and
            heads train.

    ``forward(x)`` returns the logits of all heads concatenated in task order: column ``j`` is global label
    ``j`` of the class-incremental split.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        adapter: Mapping[str, Any] | None = None,
        targets: Sequence[str] = DEFAULT_TARGETS,
        freeze_backbone: bool = True,
    ) -> None:
        super().__init__()
        family = family_of(backbone)
        if family is None:
            raise TypeError(f"backbone must be a timm model of a supported family ({SUPPORTED}), got "
                            f"{type(backbone).__name__}")
        self.blocks_name = family.blocks
        if backbone.num_classes != 0:
            backbone.reset_classifier(0)
        self.backbone = backbone
        self.feature_dim = int(backbone.num_features)
        self.heads = nn.ModuleList()
        if freeze_backbone:
            backbone.requires_grad_(False)
        self.adapted_layers: list[str] = []
        if adapter is not None:
            self.adapted_layers = self._inject(adapter, targets)

    def _inject(self, adapter: Mapping[str, Any], targets: Sequence[str]) -> list[str]:
        if isinstance(targets, str) or not targets:
            raise ValueError(f"targets must be a non-empty sequence of layer names, got {targets!r}")
        blocks = getattr(self.backbone, self.blocks_name)
        names = [name for name, m in blocks.named_modules() if type(m) is nn.Linear]
        resolved, unmatched = resolve_targets(targets, names)
        if unmatched:
            # Layer names inside one block ("attn.qkv"; Swin: "blocks.*.attn.qkv"), whatever the indices.
            found = sorted({re.sub(r"\.\d+\.", ".*.", re.sub(r"^\d+\.", "", n)) for n in names})
            raise ValueError(
                f"targets {unmatched} match no nn.Linear inside backbone.{self.blocks_name} of this "
                f"{type(self.backbone).__name__}; its blocks' linear layers are {found or 'none'}. Pass targets= "
                "with those names (the last part, e.g. 'qkv'), or use a model whose blocks name them "
                f"{', '.join(DEFAULT_TARGETS)}"
            )
        from .nn import inject  # imported late: the layers are optional for an unadapted model

        try:
            replaced = inject(blocks, targets=tuple(resolved), **dict(adapter))
        except ValueError as err:  # inject names layers inside the blocks: say where those are
            raise ValueError(f"backbone.{self.blocks_name}: {err}") from None
        return [f"backbone.{self.blocks_name}.{name}" for name in replaced]

    # -------------------------------------------------------------------------------------------- heads
    def add_task_head(self, num_classes: int, *, freeze_previous: bool = True) -> int:
        """Append a linear head over the next ``num_classes`` global labels; returns its task index.

        Each head is trained with its own task only (docs/method.md, "Head"), so by default earlier heads are
        frozen.
        """
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if freeze_previous:
            for head in self.heads:
                head.requires_grad_(False)
        ref = next(self.backbone.parameters())
        head = nn.Linear(self.feature_dim, num_classes, device=ref.device, dtype=ref.dtype)
        self.heads.append(head)
        return len(self.heads) - 1

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    @property
    def num_classes(self) -> int:
        return sum(h.out_features for h in self.heads)

    @property
    def task_label_ranges(self) -> list[range]:
        """The global labels (columns of ``forward``'s logits) each task's head owns."""
        ranges, start = [], 0
        for head in self.heads:
            ranges.append(range(start, start + head.out_features))
            start += head.out_features
        return ranges

    # ------------------------------------------------------------------------------------------ forward
    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone features (B, feature_dim)."""
        return self.backbone(x)

    def logits_per_task(self, x: Tensor) -> list[Tensor]:
        """Each task head's logits, [(B, classes of task t) for t in tasks]."""
        if not self.heads:
            raise RuntimeError("the model has no task heads yet: call add_task_head(num_classes) first")
        z = self.features(x)
        return [head(z) for head in self.heads]

    def forward(self, x: Tensor) -> Tensor:
        """Class-incremental logits (B, num_classes): all heads concatenated in task order."""
        return torch.cat(self.logits_per_task(x), dim=-1)
