"""``DualLoRALinear``: a drop-in ``nn.Linear`` with DualLoRA's two adapters and memory.

Task lifecycle (docs/method.md), driven from outside (the layer knows nothing of training loops)::

    with collect_inputs(model) as stats:   # one pass over task t's data
        ...forward passes...
    begin_task(model, stats)                # adapters initialised from those inputs
    ...train: the orthogonal adapter (C_o, B_o) and, from task 2 on, the residual block (C_r, B_r)...
    with collect_inputs(model) as stats:   # one pass over task t's data, through the trained model
        ...forward passes...
    end_task(model, stats)                  # fold B_o A_o into W0, freeze the residual block,
                                            # extend the memory basis M and the task bases U_t

Gates: while a task is in progress the residual gate is one-hot on it; otherwise each layer
gates from its own input (dynamic memory) unless ``set_gate`` fixed one.

This module is the public face: the layer itself is :mod:`duallora_kernels.layer`; here are the
functions that run its lifecycle over every DualLoRA layer of a model.
"""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .layer import DEFAULT_THRESHOLDS, GATE_MODES, INITS, DualLoRALinear
from .memory import InputStats

__all__ = [
    "DualLoRALinear", "inject", "dual_lora_layers", "collect_inputs", "begin_task", "end_task", "set_gate", "residual_off",
    "DEFAULT_THRESHOLDS", "INITS", "GATE_MODES",
]


def dual_lora_layers(module: nn.Module) -> dict[str, DualLoRALinear]:
    """Every DualLoRALinear inside ``module``, by qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, DualLoRALinear)}


def inject(module: nn.Module, targets: Sequence[str] = ("qkv", "proj", "fc1", "fc2"), **layer_kwargs) -> list[str]:
    """Replace every ``nn.Linear`` inside ``module`` whose own name (the last part of its
    qualified name) matches one of ``targets`` (exact names or fnmatch patterns) by a
    :meth:`DualLoRALinear.from_linear` copy; ``layer_kwargs`` go to it. Outputs are unchanged
    until the adapters train. Returns the replaced qualified names; raises ValueError when
    nothing matches."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"targets must be a non-empty sequence of layer names, got {targets!r}")
    replaced, linears = [], []
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            linears.append(qualified)
            if any(fnmatch.fnmatchcase(child_name, t) for t in targets):
                setattr(parent, child_name, DualLoRALinear.from_linear(child, **layer_kwargs))
                replaced.append(qualified)
    if not replaced:
        found = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"no nn.Linear named {list(targets)} in {type(module).__name__}; its linear layers are named {found}")
    return replaced


@contextlib.contextmanager
def collect_inputs(module: nn.Module) -> Iterator[dict[str, InputStats]]:
    """Within the block, every DualLoRALinear of ``module`` accumulates its inputs; the yielded
    dict (qualified name -> InputStats) is filled when the block exits."""
    layers = dual_lora_layers(module)
    stats: dict[str, InputStats] = {}
    for layer in layers.values():
        layer.start_collecting()
    try:
        yield stats
    finally:
        for name, layer in layers.items():
            stats[name] = layer.stop_collecting()


def begin_task(module: nn.Module, stats: dict[str, InputStats], generator: torch.Generator | None = None) -> None:
    """:meth:`DualLoRALinear.begin_task` on every layer, with the stats ``collect_inputs`` gave."""
    for name, layer in dual_lora_layers(module).items():
        layer.begin_task(_stats_for(stats, name), generator)


def end_task(
    module: nn.Module, stats: dict[str, InputStats], task_stats: dict[str, InputStats] | None = None
) -> dict[str, int]:
    """:meth:`DualLoRALinear.end_task` on every layer; returns the directions each added to M.

    Every layer's statistics are checked first (:func:`memory.check_finite_stats`): NaN or inf in
    any of them raises ValueError naming the layer and the task before any layer changes."""
    from .memory import check_finite_stats

    layers = dual_lora_layers(module)
    pairs = {name: (_stats_for(stats, name), None if task_stats is None else _stats_for(task_stats, name))
             for name in layers}
    for name, layer in layers.items():
        for which, s in zip(("end of task", "end of task, residual blocks off"), pairs[name]):
            if s is not None:
                check_finite_stats(s, layer=name, task=int(layer.tasks_done), when=which)
    return {name: layer.end_task(*pairs[name]) for name, layer in layers.items()}


@contextlib.contextmanager
def residual_off(module: nn.Module) -> Iterator[None]:
    """Within the block every DualLoRALinear of ``module`` runs with its residual blocks off (and
    still scores its input against the task bases): the first pass of a global gate, and the
    pass that collects the task bases such a gate is compared against."""
    layers = list(dual_lora_layers(module).values())
    before = [layer._gate for layer in layers]
    for layer in layers:
        layer._gate = torch.zeros(layer._tasks_known(), device=layer.weight.device)
    try:
        yield
    finally:
        for layer, gate in zip(layers, before):
            layer._gate = gate


def set_gate(module: nn.Module, gate: Tensor | None) -> None:
    """:meth:`DualLoRALinear.set_gate` on every layer (one global gate, e.g. from a first pass)."""
    for layer in dual_lora_layers(module).values():
        layer.set_gate(gate)


def _stats_for(stats: dict[str, InputStats], name: str) -> InputStats:
    if name not in stats:
        raise KeyError(f"no input statistics for layer {name!r}: collect them with collect_inputs(model)")
    return stats[name]
