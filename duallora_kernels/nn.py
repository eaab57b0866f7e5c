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
from typing import Callable, Iterator, TypeVar

import torch
from torch import Tensor, nn

from .inject import DEFAULT_TARGETS, inject
from .layer import DEFAULT_THRESHOLDS, GATE_MODES, INITS, DualLoRALinear
from .memory import InputStats, check_finite_stats

__all__ = [
    "DualLoRALinear", "inject", "dual_lora_layers", "collect_inputs", "begin_task", "end_task", "set_gate", "residual_off",
    "DEFAULT_THRESHOLDS", "DEFAULT_TARGETS", "INITS", "GATE_MODES",
]

_Result = TypeVar("_Result")


def dual_lora_layers(module: nn.Module) -> dict[str, DualLoRALinear]:
    """Every DualLoRALinear inside ``module``, by qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, DualLoRALinear)}


@contextlib.contextmanager
def collect_inputs(module: nn.Module) -> Iterator[dict[str, InputStats]]:
    """Within the block, every DualLoRALinear of ``module`` accumulates its inputs; the yielded
    dict (qualified name -> InputStats) is filled when the block exits.

    A pass in which some layer saw no input raises ValueError naming those layers: their statistics
    would start and extend nothing, and the usual cause is a module that computes with the layer's
    weight instead of calling it (see :mod:`duallora_kernels.inject`)."""
    layers = dual_lora_layers(module)
    stats: dict[str, InputStats] = {}
    for layer in layers.values():
        layer.start_collecting()
    try:
        yield stats
    finally:
        for name, layer in layers.items():
            stats[name] = layer.stop_collecting()
    _check_every_layer_saw_input(stats)


def _check_every_layer_saw_input(stats: dict[str, InputStats]) -> None:
    idle = [name for name, s in stats.items() if s.token_count == 0]
    if not idle:
        return
    listed = ", ".join(idle[:8]) + (f" and {len(idle) - 8} more" if len(idle) > 8 else "")
    no_data = "the block ran no data through the model, or " if len(idle) == len(stats) else ""
    raise ValueError(
        f"collect_inputs: {len(idle)} of the {len(stats)} DualLoRA layers saw no input in the pass: {listed}. "
        f"Either {no_data}the model ran without calling them: their module computes with the layer's weight instead "
        "of calling it (as timm's fused-qkv attention does with F.linear; inject switches beit/eva/swinv2 to call "
        "it), or the pass skipped them. Leave them out of inject's targets, or make their module call them"
    )


def _named(name: str, call: Callable[[], _Result]) -> _Result:
    """``call()``, its errors prefixed with the layer's qualified name (a model has dozens of layers)."""
    try:
        return call()
    except (ValueError, RuntimeError, TypeError) as err:
        raise type(err)(f"layer {name!r}: {err}") from err


def begin_task(module: nn.Module, stats: dict[str, InputStats], generator: torch.Generator | None = None) -> None:
    """:meth:`DualLoRALinear.begin_task` on every layer, with the stats ``collect_inputs`` gave. Every
    layer's state and statistics are checked before any layer begins; errors name the layer."""
    layers = dual_lora_layers(module)
    given = {name: _stats_for(stats, name) for name in layers}
    for name, layer in layers.items():
        _named(name, lambda: layer.check_begin(given[name]))
    for name, layer in layers.items():
        _named(name, lambda: layer.begin_task(given[name], generator))


def end_task(
    module: nn.Module, stats: dict[str, InputStats], task_stats: dict[str, InputStats] | None = None
) -> dict[str, int]:
    """:meth:`DualLoRALinear.end_task` on every layer; returns the directions each added to M.

    Every layer's state and statistics are checked first (NaN or inf in any of them:
    :func:`memory.check_finite_stats`) before any layer changes; errors name the layer."""
    layers = dual_lora_layers(module)
    pairs = {name: (_stats_for(stats, name), None if task_stats is None else _stats_for(task_stats, name))
             for name in layers}
    for name, layer in layers.items():
        _named(name, lambda: layer.check_end(*pairs[name]))
        for which, s in zip(("end of task", "end of task, residual blocks off"), pairs[name]):
            if s is not None:
                check_finite_stats(s, layer=name, task=int(layer.tasks_done), when=which)
    return {name: _named(name, lambda: layer.end_task(*pairs[name])) for name, layer in layers.items()}


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
