"""Task identity with confidence, and the calibration of class-incremental logits by it (DESIGN §1).

Each DualLoRALinear gates its residual blocks from its own input and keeps that gate
(``last_gate``: samples x finished tasks). The model's task prediction is the mean of its
layers' gates: its argmax is the predicted task, its value the confidence. The logits of
task j's classes get ``beta * log g_j(x)`` added.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..nn import dual_lora_layers

__all__ = ["model_task_gate", "calibrate_logits", "clear_gates"]

_LOG_FLOOR = 1e-6  # a gate of 0 would send a task's logits to -inf: keep a finite, very low floor


def clear_gates(model: nn.Module) -> None:
    """Forget the layers' last gates, so the next forward's are the only ones read."""
    for layer in dual_lora_layers(model).values():
        layer.last_gate = None
        layer.last_scores = None


def model_task_gate(model: nn.Module, num_tasks: int) -> Tensor | None:
    """Mean over adapted layers of the gates their last forward computed (samples, num_tasks), or
    None when no layer computed a dynamic gate over ``num_tasks`` tasks."""
    gates = [
        layer.last_gate
        for layer in dual_lora_layers(model).values()
        if layer.last_gate is not None and layer.last_gate.shape[-1] == num_tasks
    ]
    if not gates:
        return None
    return torch.stack([g.float() for g in gates]).mean(0)


def calibrate_logits(logits: Tensor, gate: Tensor, label_ranges: Sequence[range], beta: float) -> Tensor:
    """Add ``beta * log g_j`` to the logits of each task j's classes."""
    if beta == 0:
        return logits
    if gate.shape[-1] != len(label_ranges):
        raise ValueError(f"gate has {gate.shape[-1]} tasks but the heads cover {len(label_ranges)}")
    task_of_class = torch.tensor([j for j, r in enumerate(label_ranges) for _ in r], device=logits.device)
    bonus = beta * gate.clamp_min(_LOG_FLOOR).log()
    return logits + bonus[:, task_of_class].to(logits.dtype)
