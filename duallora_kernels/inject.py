"""``inject``: put DualLoRA layers in place of a model's ``nn.Linear`` layers, all of them or none.

Which layers: ``targets`` are names or fnmatch patterns. One without a dot matches the last part of
a layer's qualified name (``"qkv"`` matches ``blocks.3.attn.qkv``); one with a dot matches the whole
qualified name (``"*.mlp_channels.fc*"``), which tells apart layers that share a last name (timm's
Mixer calls both its token and its channel MLP layers ``fc1`` / ``fc2``).

All or nothing: every targeted layer is checked first (its DualLoRA twin is built on the meta device,
so every argument check runs and nothing is allocated); when any cannot be adapted -- a rank above
its ``in_features`` is the common case (CaiT's ``proj_l`` mixes 4 heads) -- one ValueError lists
them all and the model is left as it was. A failure while replacing puts the original layers back.

Modules that bypass the layer: timm's BEiT, EVA and Swin V2 attention compute their fused qkv as
``F.linear(x, self.qkv.weight, qkv_bias)`` when q and v have biases of their own, so a layer put in
place of ``qkv`` would never run. timm has a second path for the same computation,
``qkv = self.qkv(x); qkv += qkv_bias`` (``qkv_bias_separate=True``); inject switches such modules to
it, so the adapted layer takes part (same value: the bias is added after the product instead of
inside it). Any other module that reads a layer's weight instead of calling it is caught by
:func:`duallora_kernels.nn.collect_inputs`, which names the layers that saw no input.
"""
from __future__ import annotations

import fnmatch
from typing import Sequence

from torch import nn

from .layer import DualLoRALinear

__all__ = ["DEFAULT_TARGETS", "inject", "matches", "linear_layers", "call_fused_qkv_layers"]

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")


def matches(qualified: str, targets: Sequence[str]) -> bool:
    """Whether the layer named ``qualified`` is one of ``targets`` (module docstring: dotted targets
    match the qualified name, the others its last part)."""
    last = qualified.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(qualified if "." in t else last, t) for t in targets)


def linear_layers(module: nn.Module) -> dict[str, tuple[nn.Module, str, nn.Linear]]:
    """Every plain ``nn.Linear`` inside ``module`` (subclasses change what forward does, so they are
    not drop-in targets): qualified name -> (parent, attribute name, layer)."""
    found = {}
    for parent_name, parent in module.named_modules():
        for child_name, child in parent.named_children():
            if type(child) is nn.Linear:
                found[f"{parent_name}.{child_name}" if parent_name else child_name] = (parent, child_name, child)
    return found


def _fused_qkv_bypass(parent: nn.Module, child_name: str) -> bool:
    """``parent`` is a timm attention that computes qkv with F.linear on the layer's weight (module docstring)."""
    return (child_name == "qkv" and getattr(parent, "qkv_bias_separate", None) is False
            and getattr(parent, "q_bias", None) is not None)


def call_fused_qkv_layers(module: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Switch every timm attention inside ``module`` that computes its fused qkv with F.linear on its ``qkv``
    layer's weight to timm's path that calls the layer (module docstring); with ``names`` only those whose
    ``qkv`` layer is named there (qualified names). Returns the qualified names of the qkv layers switched.
    Forward hooks on those layers then see every input (prototype features of an unadapted copy)."""
    switched = []
    for name, parent in module.named_modules():
        qualified = f"{name}.qkv" if name else "qkv"
        if _fused_qkv_bypass(parent, "qkv") and (names is None or qualified in names):
            parent.qkv_bias_separate = True
            switched.append(qualified)
    return switched


def _why_not(linear: nn.Linear, layer_kwargs: dict) -> str | None:
    """The reason ``linear`` cannot become a DualLoRALinear with ``layer_kwargs``, or None when it can."""
    kwargs = {**layer_kwargs, "device": "meta"}
    try:
        DualLoRALinear(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def inject(module: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, **layer_kwargs) -> list[str]:
    """Replace every ``nn.Linear`` inside ``module`` that ``targets`` name (names or fnmatch patterns; one
    with a dot matches the qualified name, one without the last part of it) by a
    :meth:`DualLoRALinear.from_linear` copy; ``layer_kwargs`` go to it. Outputs are unchanged until the
    adapters train. Returns the replaced qualified names.

    All or nothing (module docstring): raises ValueError naming every targeted layer that cannot be
    adapted (e.g. narrower than the ranks) before anything changes, and when nothing matches; timm
    attention that would bypass its ``qkv`` layer is switched to call it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"targets must be a non-empty sequence of layer names, got {targets!r}")
    linears = linear_layers(module)
    chosen = {name: place for name, place in linears.items() if matches(name, targets)}
    if not chosen:
        found = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"no nn.Linear named {list(targets)} in {type(module).__name__}; its linear layers are named {found}")
    refused = {name: why for name, (_, _, linear) in chosen.items() if (why := _why_not(linear, layer_kwargs))}
    if refused:
        listed = "; ".join(f"{name} ({why})" for name, why in list(refused.items())[:8])
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise ValueError(
            f"inject changed nothing: {len(refused)} of the {len(chosen)} targeted layers cannot be adapted: {listed}{more}. "
            "Leave them out of targets (a target with a dot matches the qualified name, e.g. 'blocks.*.mlp.fc1'), "
            "or lower the ranks"
        )
    done: list[tuple[nn.Module, str, nn.Linear]] = []
    try:
        for parent, child_name, linear in chosen.values():
            setattr(parent, child_name, DualLoRALinear.from_linear(linear, **layer_kwargs))
            done.append((parent, child_name, linear))
    except BaseException:
        for parent, child_name, linear in done:
            setattr(parent, child_name, linear)
        raise
    call_fused_qkv_layers(module, list(chosen))
    return list(chosen)
