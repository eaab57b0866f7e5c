"""The thin timm ViT wrapper: build a (pre-trained) Vision Transformer, and hold it with per-task heads.

- :func:`create_vit` builds any timm ``VisionTransformer`` by name with optional size overrides and loads a
  local checkpoint (.pth/.pt/.bin or .safetensors) offline: a classifier head that does not fit is dropped,
  position embeddings are resampled to the model's patch grid, the patch kernel to its patch size and input
  channels; anything else that does not fit is a ValueError that names the tensors.
- :class:`ContinualViT` is the class-incremental model: a frozen backbone whose linear layers DualLoRA
  adapts (via :func:`duallora_kernels.nn.inject`) and one linear head per task, whose logits concatenate.

No training loops here (they live in ``duallora_kernels.continual``).
"""
from __future__ import annotations

import difflib
import fnmatch
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

__all__ = ["DEFAULT_MODEL", "DEFAULT_TARGETS", "create_vit", "load_state_dict_file", "load_vit_weights", "ContinualViT"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "vit_tiny_patch16_224"
DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")
# Classifier tensors of timm ViTs: never part of the backbone, so dropped when they do not fit.
_HEAD_PREFIXES = ("head.", "head_dist.")
# Keys that locate the backbone inside a wrapped state dict ("module.", "backbone.", "model.visual." ...).
_ANCHOR_KEYS = ("pos_embed", "patch_embed.proj.weight", "cls_token")


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
) -> VisionTransformer:
    """Build timm's ``model_name`` (default ``num_classes=0``: the model returns pooled features), with any of
    the size arguments overriding the named configuration, and load ``checkpoint`` into it if given.

    ``pretrained=True`` (in ``kw``) asks timm to download the named weights instead (needs a network).

    Raises ValueError for an unknown name (with close matches), a model that is not a timm VisionTransformer,
    or a checkpoint that does not fit; FileNotFoundError for a missing checkpoint file.
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
    if embed_dim is not None and num_heads is not None and embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
    try:
        model = timm.create_model(model_name, pretrained=download, num_classes=num_classes, **overrides, **kw)
    except TypeError as err:
        raise ValueError(
            f"timm could not build {model_name!r} with {dict(overrides, num_classes=num_classes, **kw)}: {err}. "
            "create_vit builds timm VisionTransformer models (vit_*, deit_*)"
        ) from None
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"{model_name!r} builds a timm {type(model).__name__}, not a VisionTransformer; create_vit supports "
            "VisionTransformer models such as vit_tiny_patch16_224, vit_small_patch16_224, deit_tiny_patch16_224"
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


# ------------------------------------------------------------------------------------------------- checkpoints


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from .safetensors or a torch pickle (.pth/.pt/.bin, loaded with weights_only=True).

    Unwraps {"model": ...} / {"state_dict": ...} containers. Raises FileNotFoundError or ValueError.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every reader failure means the same thing to the caller
        kind = "safetensors" if path.suffix == ".safetensors" else "torch (.pth/.pt/.bin)"
        raise ValueError(f"could not read checkpoint {path} as a {kind} file: {err}") from None
    for container in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(container), Mapping):
            state = state[container]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def load_vit_weights(model: VisionTransformer, state_dict: Mapping[str, Tensor], *, source: str = "checkpoint") -> list[str]:
    """Load a ViT backbone's weights into ``model``, adapting what timm can adapt; returns the dropped keys.

    Adapted: a prefix around the backbone ("module.", "backbone." ...) is stripped; classifier tensors that
    ``model`` lacks or that differ in shape are dropped; position embeddings are resampled to the model's
    patch grid; the patch-embedding kernel is resampled to its patch size and its input channels adapted.
    Anything else that does not fit raises ValueError naming the tensors and the checkpoint's sizes.
    """
    state = _strip_prefix(dict(state_dict))
    expected = model.state_dict()
    dropped = []
    for key in [k for k in state if k.startswith(_HEAD_PREFIXES)]:
        if key not in expected or expected[key].shape != state[key].shape:
            dropped.append(key)
            del state[key]
    if dropped:
        logger.info("%s: dropped classifier tensors that do not fit the model: %s", source, ", ".join(dropped))
    if "patch_embed.proj.weight" in state:
        state["patch_embed.proj.weight"] = _fit_patch_kernel(model, state["patch_embed.proj.weight"])
    if "pos_embed" in state and model.pos_embed is not None:
        state["pos_embed"] = _fit_pos_embed(model, state["pos_embed"], source)

    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                  if k in expected and v.shape != expected[k].shape]
    missing = [k for k in expected if k not in state and not k.startswith(_HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in expected]
    if mismatched or missing or unexpected:
        raise ValueError(_misfit_message(model, state, source, mismatched, missing, unexpected))
    model.load_state_dict(state, strict=False)  # only head tensors may be absent; checked above
    return dropped


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    if any(k in state for k in _ANCHOR_KEYS):
        return state
    for anchor in _ANCHOR_KEYS:
        hits = [k[: -len(anchor)] for k in state if k.endswith("." + anchor)]
        if hits:
            prefix = min(hits, key=len)
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _fit_patch_kernel(model: VisionTransformer, weight: Tensor) -> Tensor:
    target = model.patch_embed.proj.weight
    if weight.ndim != 4 or weight.shape[0] != target.shape[0]:
        return weight  # a different embed_dim: reported as a misfit
    if weight.shape[1] != target.shape[1]:
        # e.g. an RGB checkpoint on grey-scale images: timm sums (or repeats) the channels.
        weight = adapt_input_conv(target.shape[1], weight, base_chans=weight.shape[1])
    if weight.shape[-2:] != target.shape[-2:]:
        weight = resample_patch_embed(weight, list(target.shape[-2:]), verbose=False)
    return weight


def _fit_pos_embed(model: VisionTransformer, pos_embed: Tensor, source: str) -> Tensor:
    target = model.pos_embed
    if pos_embed.shape == target.shape or pos_embed.ndim != 3 or pos_embed.shape[-1] != target.shape[-1]:
        return pos_embed  # fits already, or a different embed_dim: reported as a misfit
    num_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    old_tokens = pos_embed.shape[1] - num_prefix
    side = math.isqrt(max(old_tokens, 0))
    if side * side != old_tokens:
        raise ValueError(
            f"{source}: pos_embed has {pos_embed.shape[1]} tokens; with {num_prefix} prefix token(s) that leaves "
            f"{old_tokens}, not a square patch grid, so it cannot be resampled to the model's grid "
            f"{tuple(model.patch_embed.grid_size)}"
        )
    new_grid = list(model.patch_embed.grid_size)
    logger.info("%s: resampling position embeddings from a %dx%d grid to %s", source, side, side, new_grid)
    return resample_abs_pos_embed(pos_embed, new_grid, [side, side], num_prefix_tokens=num_prefix, verbose=False)


def _misfit_message(model: VisionTransformer, state: Mapping[str, Tensor], source: str,
                    mismatched: list, missing: list[str], unexpected: list[str]) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

    def sizes(sd: Mapping[str, Tensor]) -> str:
        return ", ".join(f"{k}={v}" for k, v in _sizes_of(sd).items())

    lines = [f"checkpoint {source} does not fit the model as built ({sizes(model.state_dict())}); "
             f"the checkpoint has ({sizes(state)})."]
    if mismatched:
        lines.append(f"{len(mismatched)} tensor(s) differ in shape: " + "; ".join(
            f"{k}: checkpoint {c}, model {m}" for k, c, m in mismatched[:6]) + (" ..." if len(mismatched) > 6 else ""))
    if missing:
        lines.append(f"Missing from the checkpoint: {some(missing)}.")
    if unexpected:
        lines.append(f"Not in the model: {some(unexpected)}.")
    # Patch size and input channels are adapted on load, so only the sizes that cannot be are suggested.
    fix = {k: v for k, v in _sizes_of(state).items() if k in ("embed_dim", "depth", "mlp_ratio")}
    lines.append(f"Build the model with the checkpoint's sizes (create_vit(..., "
                 + ", ".join(f"{k}={v}" for k, v in fix.items())
                 + ", num_heads=<a divisor of embed_dim>)) or use a checkpoint made for this model.")
    sidecar = Path(source).with_suffix(".json")
    if sidecar.is_file():
        lines.append(f"The checkpoint's own configuration is in {sidecar}.")
    return " ".join(lines)


def _sizes_of(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The sizes a ViT state dict implies (num_heads is not recorded in the weights)."""
    sizes: dict[str, Any] = {}
    patch = state.get("patch_embed.proj.weight")
    if patch is not None and patch.ndim == 4:
        sizes.update(embed_dim=patch.shape[0], in_chans=patch.shape[1], patch_size=tuple(patch.shape[-2:]))
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    sizes["depth"] = max(blocks) + 1 if blocks else 0
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.ndim == 2:
        sizes["mlp_ratio"] = float(f"{fc1.shape[0] / fc1.shape[1]:g}")
    return sizes


# ------------------------------------------------------------------------------------------- continual wrapper


class ContinualViT(nn.Module):
    """A frozen ViT backbone (optionally DualLoRA-adapted) with one linear head per task.

    Args:
        backbone: a timm VisionTransformer; a classifier head it has is removed (``reset_classifier(0)``),
            so it returns pooled features.
        adapter: keyword arguments for :class:`duallora_kernels.nn.DualLoRALinear` (rank_orth, rank_res, ...);
            the linear layers inside ``backbone.blocks`` named by ``targets`` are replaced. None: no adapters.
        targets: names (or fnmatch patterns) of the linear layers to adapt, matched against the last part of
            their qualified names. Each must match a linear layer inside ``backbone.blocks``.
        freeze_backbone: the pre-trained weights stay frozen (docs/method.md, "Setting"); only adapters and
            heads train.

    ``forward(x)`` returns the logits of all heads concatenated in task order: column ``j`` is global label
    ``j`` of the class-incremental split.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        *,
        adapter: Mapping[str, Any] | None = None,
        targets: Sequence[str] = DEFAULT_TARGETS,
        freeze_backbone: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"backbone must be a timm VisionTransformer, got {type(backbone).__name__}")
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
        blocks = self.backbone.blocks
        # Layer names inside one block ("attn.qkv"), whatever the block's index.
        found = sorted({name.split(".", 1)[1] if "." in name else name
                        for name, m in blocks.named_modules() if type(m) is nn.Linear})
        unmatched = [t for t in targets if not any(fnmatch.fnmatchcase(n.rsplit(".", 1)[-1], t) for n in found)]
        if unmatched:
            raise ValueError(
                f"targets {unmatched} match no nn.Linear inside backbone.blocks of this "
                f"{type(self.backbone).__name__}; its blocks' linear layers are {found or 'none'}. Pass targets= "
                "with those names (the last part, e.g. 'qkv'), or use a ViT whose blocks name them "
                f"{', '.join(DEFAULT_TARGETS)}"
            )
        from .nn import inject  # imported late: the layers are optional for an unadapted model

        replaced = inject(blocks, targets=tuple(targets), **dict(adapter))
        return [f"backbone.blocks.{name}" for name in replaced]

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
