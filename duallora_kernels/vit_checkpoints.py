"""Loading a checkpoint into a model of a supported timm family (:mod:`.vit_families`), offline.

Reads .safetensors or a torch pickle, strips a wrapper's prefix ("module.", "backbone." ...), fits the
patch kernel to the model's patch size and input channels, resamples position embeddings to its patch
grid (ViT here; BEiT, EVA and Swin by timm's own checkpoint filter of the family, which also resamples
their relative-position tables to the model's windows), drops a classifier head that does not fit, and
raises one ValueError naming every tensor that still does not.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Mapping

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv
from torch import Tensor, nn

from .vit_families import family_of, sizes_of

__all__ = ["load_state_dict_file", "load_vit_weights"]

logger = logging.getLogger(__name__)

# Classifier tensors of timm ViTs: never part of the backbone, so dropped when they do not fit.
_HEAD_PREFIXES = ("head.", "head_dist.")
# Keys that locate the backbone inside a wrapped state dict ("module.", "backbone.", "model.visual." ...).
_ANCHOR_KEYS = ("pos_embed", "patch_embed.proj.weight", "cls_token")


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


def load_vit_weights(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "checkpoint") -> list[str]:
    """Load a backbone's weights into ``model`` (a supported timm family), adapting what timm can adapt;
    returns the dropped keys.

    Adapted: a prefix around the backbone ("module.", "backbone." ...) is stripped; classifier tensors that
    ``model`` lacks or that differ in shape are dropped; the patch-embedding kernel is resampled to its patch
    size and its input channels adapted; position embeddings (and BEiT's and Swin's relative-position
    tables) are resampled to the model's patch grid and windows. Anything else that does not fit raises
    ValueError naming the tensors and the checkpoint's sizes.
    """
    family = family_of(model)
    if family is None:
        raise TypeError(f"load_vit_weights: {type(model).__name__} is not a supported timm family")
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
    timm_filter = family.checkpoint_filter()
    if timm_filter is not None:
        state = _filtered(timm_filter, state, model, source)
    elif "pos_embed" in state and model.pos_embed is not None:
        state["pos_embed"] = _fit_pos_embed(model, state["pos_embed"], source)

    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                  if k in expected and v.shape != expected[k].shape]
    missing = [k for k in expected if k not in state and not k.startswith(_HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in expected]
    if mismatched or missing or unexpected:
        raise ValueError(_misfit_message(model, state, source, mismatched, missing, unexpected))
    model.load_state_dict(state, strict=False)  # only head tensors may be absent; checked above
    return dropped


def _filtered(timm_filter, state: dict[str, Tensor], model: nn.Module, source: str) -> dict[str, Tensor]:
    """``state`` through timm's checkpoint filter of the model's family; tensors of modules the model lacks
    are left for the misfit report (the filter would look those modules up and fail)."""
    names = {name for name, _ in model.named_modules()}
    keep = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] in names or "." not in k}
    try:
        out = timm_filter(keep, model)
    except (RuntimeError, ValueError, AttributeError, IndexError) as err:
        raise ValueError(f"{source}: timm could not adapt the checkpoint to the model ({type(err).__name__}: {err}); "
                         "build the model with the checkpoint's sizes") from None
    out.update({k: v for k, v in state.items() if k not in keep})
    return out


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    if any(k in state for k in _ANCHOR_KEYS):
        return state
    for anchor in _ANCHOR_KEYS:
        hits = [k[: -len(anchor)] for k in state if k.endswith("." + anchor)]
        if hits:
            prefix = min(hits, key=len)
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _fit_patch_kernel(model: nn.Module, weight: Tensor) -> Tensor:
    target = model.patch_embed.proj.weight
    if weight.ndim != 4 or weight.shape[0] != target.shape[0]:
        return weight  # a different embed_dim: reported as a misfit
    if weight.shape[1] != target.shape[1]:
        # e.g. an RGB checkpoint on grey-scale images: timm sums (or repeats) the channels.
        weight = adapt_input_conv(target.shape[1], weight, base_chans=weight.shape[1])
    if weight.shape[-2:] != target.shape[-2:]:
        weight = resample_patch_embed(weight, list(target.shape[-2:]), verbose=False)
    return weight


def _fit_pos_embed(model: nn.Module, pos_embed: Tensor, source: str) -> Tensor:
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


def _misfit_message(model: nn.Module, state: Mapping[str, Tensor], source: str,
                    mismatched: list, missing: list[str], unexpected: list[str]) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

    def sizes(sd: Mapping[str, Tensor]) -> str:
        return ", ".join(f"{k}={v}" for k, v in sizes_of(sd).items())

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
    fix = {k: v for k, v in sizes_of(state).items() if k in ("embed_dim", "depth", "depths", "mlp_ratio")}
    lines.append(f"Build the model with the checkpoint's sizes (create_vit(..., "
                 + ", ".join(f"{k}={v}" for k, v in fix.items())
                 + ", num_heads=<a divisor of embed_dim>)) or use a checkpoint made for this model.")
    sidecar = Path(source).with_suffix(".json")
    if sidecar.is_file():
        lines.append(f"The checkpoint's own configuration is in {sidecar}.")
    return " ".join(lines)
