"""The task gate of a :class:`duallora_kernels.layer.DualLoRALinear`: which weight each task's residual
block gets, per row of the layer's input (docs/method.md, "Dynamic memory").

The layer's *samples* are its input's rows as :func:`duallora_kernels.memory.summarize` counts them: the
leading dims of a (..., N, d) input (tokens N share their sample's gate), the rows of a 2-D one. A
gate given per image (B, T) -- a global gate from a first pass -- also fits a layer whose input holds
k samples per image, the image's k consecutive: Swin's attention sees (B * windows, N, d), its MLP
(B, H, W, d); each image's gate row is repeated over its k samples.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as check
from .memory import summarize, task_gates, task_scores

__all__ = ["TaskGates", "num_samples", "rows_gate"]


def num_samples(x: Tensor) -> int:
    """Samples in x as :func:`summarize` counts them: leading dims of a (..., N, d) input, rows of a 2-D one."""
    return x.shape[:-2].numel() if x.dim() >= 3 else x.numel() // x.shape[-1]


def rows_gate(gate: Tensor, x: Tensor) -> Tensor:
    """A per-sample gate (S, G) shaped to broadcast against x's rows: S is x's samples, or divides them
    (k samples per gate row, consecutive: module docstring); any other gate is returned as it is."""
    samples, given = num_samples(x), gate.shape[0]
    if gate.dim() != 2 or given <= 1 or samples % given:
        return gate
    if samples != given:
        # one device op, only where an image's rows are split over several samples (windows)
        gate = gate.repeat_interleave(samples // given, 0)
    return gate.reshape(*x.shape[:-2], 1, gate.shape[-1]) if x.dim() >= 3 else gate


class TaskGates:
    """The gate logic of DualLoRALinear (a mixin: it reads the layer's task state)."""

    def set_gate(self, gate: Tensor | None) -> None:
        """Fix the task gate for the next forwards: (..., T) with one column per task seen so far
        (finished tasks, then the current one if a task is in progress), broadcastable to the
        input's samples or one row per image (module docstring); None returns to the default
        (one-hot on a task in progress, dynamic otherwise)."""
        if gate is not None:
            check.tensor("gate", gate)
            if gate.shape[-1] != self._tasks_known():
                raise ValueError(f"gate must have {self._tasks_known()} columns (one per task seen), got {tuple(gate.shape)}")
        self._gate = gate

    def _tasks_known(self) -> int:
        return self.tasks_done + int(self._in_task)

    def _block_tasks(self) -> list[int]:
        tasks = list(self._frozen_task_ids)
        if self._res_active:
            tasks.append(self.tasks_done)
        return tasks

    def _sample_gate(self, x: Tensor) -> Tensor | None:
        """The task gate (samples, T_known) for this input, or None for 'the current task only'.

        While a task is in progress (between begin_task and end_task, training or collecting its
        inputs) the gate is one-hot on it: its data passes through its own residual block, as it
        will when the dynamic memory recognises it. Otherwise the layer scores its input against
        every finished task's bases and keeps the scores and its own gate (``last_scores``,
        ``last_gate``) for task identification, also when ``set_gate`` fixed the gate it applies."""
        in_task = self._in_task
        if in_task and self._gate is None:
            return None
        dynamic = None
        if self.tasks_done and not in_task:
            z = summarize(x.detach(), self.summary)
            scores = task_scores(z.to(self.task_bases.dtype), self.task_bases, backend=self.backend)
            dynamic = task_gates(scores.float(), self.temperature, hard=self.gate_mode == "hard")
            self.last_scores, self.last_gate = scores.detach(), dynamic.detach()
        if self._gate is not None:
            return self._gate
        gate = torch.zeros(num_samples(x), self._tasks_known(), dtype=torch.float32, device=x.device)
        if dynamic is not None:
            gate[:, : self.tasks_done] = dynamic
        return gate

    def _block_gate(self, x: Tensor, task_gate: Tensor | None) -> Tensor | None:
        """Per-row gate over residual blocks, shaped to broadcast against x's rows."""
        tasks = self._block_tasks()
        if task_gate is None or not tasks:
            return None
        # a run of consecutive tasks (the usual case: every task after the first has a block) is a
        # slice, a view; any other set of columns is gathered (one device op)
        g = task_gate[..., tasks[0]: tasks[-1] + 1] if tasks == list(range(tasks[0], tasks[-1] + 1)) \
            else task_gate[..., tasks]
        return rows_gate(g, x)  # one gate per sample, shared by its tokens
