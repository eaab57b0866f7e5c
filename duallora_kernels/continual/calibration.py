"""Task identity with confidence, and the calibration of class-incremental logits by it (docs/method.md,
"Task identity, confidence and calibration").

Each DualLoRALinear scores its own input against every finished task's bases and keeps the
scores (``last_scores``: samples x tasks). The model's task scores are their mean over the
adapted layers; ``softmax(scores / temperature)`` is the model's task gate: its argmax is the
predicted task, its value the confidence. Each head's logits are normalised within the head
(log-softmax, log p(class | task j)) and get ``beta * log g_j(x)`` added.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..memory import task_gates
from ..nn import dual_lora_layers, residual_off

__all__ = ["model_task_gate", "first_pass_gate", "calibrate_logits", "clear_gates"]

_LOG_FLOOR = 1e-6  # a gate of 0 would send a task's logits to -inf: keep a finite, very low floor


def clear_gates(model: nn.Module) -> None:
    """Forget the layers' last scores, so the next forward's are the only ones read."""
    for layer in dual_lora_layers(model).values():
        layer.last_gate = None
        layer.last_scores = None


def model_task_gate(model: nn.Module, num_tasks: int, temperature: float, hard: bool = False,
                    samples: int | None = None) -> Tensor | None:
    """The model's task gate (samples, num_tasks) from the mean of its layers' last task scores,
    or None when no layer scored its input against ``num_tasks`` tasks.

    ``samples``: the batch's images. A layer that sees k rows per image (Swin's windows, the rows of a
    (B, H, W, C) map: :mod:`duallora_kernels.layer_gates`) scored each; an image's score there is their
    mean."""
    scores = [
        _per_image(layer.last_scores.float(), samples)
        for layer in dual_lora_layers(model).values()
        if layer.last_scores is not None and layer.last_scores.shape[-1] == num_tasks
    ]
    if not scores:
        return None
    return task_gates(torch.stack(scores).mean(0), temperature, hard=hard)


def _per_image(scores: Tensor, samples: int | None) -> Tensor:
    rows = scores.shape[0]
    if samples is None or rows == samples or samples <= 0 or rows % samples:
        return scores
    return scores.reshape(samples, rows // samples, scores.shape[-1]).mean(1)


def first_pass_gate(model: nn.Module, x: Tensor, num_tasks: int, temperature: float, hard: bool = False) -> Tensor | None:
    """The global gate: one forward of ``model.features`` with the residual blocks off, then the
    model's task gate from the layers' scores (task bases must come from such passes too)."""
    clear_gates(model)
    with residual_off(model):
        model.features(x)
    return model_task_gate(model, num_tasks, temperature, hard, samples=x.shape[0])


def calibrate_logits(logits: Tensor, gate: Tensor, label_ranges: Sequence[range], beta: float) -> Tensor:
    """``log p(class | task j) + beta * log g_j``: each head's logits are first normalised within
    the head (log-softmax), because heads trained on their own tasks' data alone have logits on
    unrelated scales; with beta = 1 this is log p(task) + log p(class | task)."""
    if beta == 0:
        return logits
    if gate.shape[-1] != len(label_ranges):
        raise ValueError(f"gate has {gate.shape[-1]} tasks but the heads cover {len(label_ranges)}")
    within = torch.cat([logits[:, r.start : r.stop].float().log_softmax(-1) for r in label_ranges], -1)
    task_of_class = torch.tensor([j for j, r in enumerate(label_ranges) for _ in r], device=logits.device)
    bonus = beta * gate.float().clamp_min(_LOG_FLOOR).log()
    return (within + bonus[:, task_of_class]).to(logits.dtype)
