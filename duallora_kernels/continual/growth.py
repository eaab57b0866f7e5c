"""What grows with the tasks in each adapted layer, read after every task: the memory basis M (columns of
d), the frozen residual blocks (one per finished task that trained one) and their stacked rank, and the bytes
of the buffers that hold them. Over a long task stream this is the cost DualLoRA pays for not forgetting
(docs/method.md): the orthogonal adapter is folded away after each task, the residual blocks are not.

The trainer prints :func:`format_growth` after each task and stores :func:`memory_growth` in results.json.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

__all__ = ["memory_growth", "format_growth"]

_GROWING_BUFFERS = ("basis", "task_bases", "frozen_a", "frozen_b")


def memory_growth(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per adapted layer: ``basis_columns`` (of ``in_features``), ``frozen_blocks``, ``frozen_rank`` (rows of the
    stacked frozen A), ``stacked_rank`` (what the fused op's low-rank path carries at inference: the
    orthogonal adapter's rank, when the method has one, plus the frozen rank) and ``buffer_bytes`` (basis,
    task bases and frozen blocks)."""
    from ..nn import dual_lora_layers

    out = {}
    for name, layer in dual_lora_layers(model).items():
        frozen_rank = int(layer.frozen_a.shape[0])
        out[name] = {
            "in_features": int(layer.in_features),
            "basis_columns": int(layer.basis_size),
            "frozen_blocks": int(layer.frozen_tasks.numel()),
            "frozen_rank": frozen_rank,
            "stacked_rank": (layer.rank_orth if layer.use_orth else 0) + frozen_rank,
            "buffer_bytes": sum(getattr(layer, b).numel() * getattr(layer, b).element_size() for b in _GROWING_BUFFERS),
        }
    return out


def format_growth(growth: Mapping[str, Mapping[str, Any]], task: int) -> str:
    """A few lines: per kind of layer (qkv, fc1, ...) the basis columns of each block, then the frozen residual
    blocks and stacked rank (the same in every layer) and the bytes all layers hold."""
    if not growth:
        return f"memory after task {task}: no adapted layers"
    kinds: dict[str, list[Mapping[str, Any]]] = {}
    for name, g in growth.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(g)
    lines = [f"memory after task {task} (basis columns per block, of the layer's input width):"]
    for kind, layers in kinds.items():
        lines.append(f"  {kind:>5}: " + " ".join(str(g["basis_columns"]) for g in layers)
                     + f"  (of {layers[0]['in_features']})")
    blocks = sorted({g["frozen_blocks"] for g in growth.values()})
    ranks = sorted({g["stacked_rank"] for g in growth.values()})
    total = sum(g["buffer_bytes"] for g in growth.values())
    lines.append(f"  frozen residual blocks per layer {'/'.join(map(str, blocks))}, stacked rank "
                 f"{'/'.join(map(str, ranks))}, {total / 2**20:.2f} MiB of bases and frozen blocks in "
                 f"{len(growth)} layers")
    return "\n".join(lines)
