"""The timm model families :func:`duallora_kernels.vit.create_vit` and ``ContinualViT`` support, and what
differs between them: the timm class, where the transformer blocks sit, how timm adapts a checkpoint
made at another size, and the names their linear layers go by.

Everything else they share: ``patch_embed`` (img_size, patch_size, ``proj`` kernel), pooled features
from ``forward`` when built with ``num_classes=0`` (``num_features`` wide), a classifier under
``head`` (``head_dist`` for distilled DeiT).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from torch import Tensor, nn

__all__ = ["Family", "FAMILIES", "SUPPORTED", "family_of", "resolve_targets"]


@dataclass(frozen=True)
class Family:
    """One supported timm family.

    Attributes:
        name: what the README and errors call it.
        models: the timm model names it covers (patterns).
        class_path: "module.Class" of its timm model class (subclasses included: distilled DeiT).
        blocks: the attribute holding the transformer blocks (Swin: its stages, each with blocks).
        filter_path: "module.function" of timm's own checkpoint filter for the family (resampling the
            position embeddings and relative-position tables to the model's grid and windows, dropping
            non-persistent buffers); None where :mod:`.vit_checkpoints` adapts the checkpoint itself.
    """

    name: str
    models: str
    class_path: str
    blocks: str
    filter_path: str | None

    def model_class(self) -> type:
        return _resolve(self.class_path)

    def checkpoint_filter(self) -> Callable[[dict, nn.Module], dict] | None:
        return None if self.filter_path is None else _resolve(self.filter_path)


def _resolve(path: str):
    import importlib

    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


FAMILIES = (
    Family("vit", "vit_*, deit_*, deit3_*", "timm.models.vision_transformer.VisionTransformer", "blocks", None),
    Family("beit", "beit_*, beitv2_*", "timm.models.beit.Beit", "blocks", "timm.models.beit.checkpoint_filter_fn"),
    Family("eva", "eva02_*, eva_*", "timm.models.eva.Eva", "blocks", "timm.models.eva.checkpoint_filter_fn"),
    Family("swin", "swin_*", "timm.models.swin_transformer.SwinTransformer", "layers",
           "timm.models.swin_transformer.checkpoint_filter_fn"),
)

#: One line naming what create_vit and ContinualViT build, for their errors.
SUPPORTED = "; ".join(f"{f.name} ({f.models})" for f in FAMILIES)


def family_of(model: nn.Module) -> Family | None:
    """The supported family ``model`` belongs to, or None."""
    return next((f for f in FAMILIES if isinstance(model, f.model_class())), None)


#: Layers that play the role of a default target under other names, used where the name itself is absent:
#: unfused q/k/v projections (EVA-02 base/large) and SwiGLU's two input layers (EVA-02's MLP).
_ROLE_NAMES = {"qkv": ("q_proj", "k_proj", "v_proj"), "fc1": ("fc1_g", "fc1_x")}


def resolve_targets(targets: Sequence[str], layer_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """``targets`` with each default name that matches none of ``layer_names`` (last parts) replaced by the
    names that play its role in this model (``_ROLE_NAMES``); returns (targets, the ones that still match
    nothing)."""
    import fnmatch

    def hits(t: str) -> bool:
        return any(fnmatch.fnmatchcase(n if "." in t else n.rsplit(".", 1)[-1], t) for n in layer_names)

    resolved: list[str] = []
    for t in targets:
        roles = [r for r in _ROLE_NAMES.get(t, ()) if hits(r)]
        resolved += [t] if hits(t) or not roles else roles
    return resolved, [t for t in resolved if not hits(t)]


def sizes_of(state: Mapping[str, Tensor]) -> dict:
    """The sizes a checkpoint of these families implies (num_heads is not recorded in the weights): embed_dim,
    in_chans, patch_size from the patch kernel; depth (blocks), or depths per stage for Swin; mlp_ratio."""
    import re

    sizes: dict = {}
    patch = state.get("patch_embed.proj.weight")
    if patch is not None and patch.ndim == 4:
        sizes.update(embed_dim=patch.shape[0], in_chans=patch.shape[1], patch_size=tuple(patch.shape[-2:]))
    staged: dict[int, set[int]] = {}
    for key in state:
        if m := re.match(r"(?:layers\.(\d+)\.)?blocks\.(\d+)\.", key):
            staged.setdefault(int(m.group(1) or 0), set()).add(int(m.group(2)))
    if any(k.startswith("layers.") for k in state):
        sizes["depths"] = tuple(max(staged[s]) + 1 for s in sorted(staged))
    else:
        sizes["depth"] = max(staged[0]) + 1 if staged else 0
    fc1 = next((v for k, v in state.items() if re.match(r"(layers\.0\.)?blocks\.0\.mlp\.fc1(_x)?\.weight$", k)), None)
    if fc1 is not None and fc1.ndim == 2:
        sizes["mlp_ratio"] = float(f"{fc1.shape[0] / fc1.shape[1]:g}")
    return sizes
