"""A :class:`~duallora_kernels.layer.DualLoRALinear`'s task state and its lifecycle: collecting a
task's inputs, ``begin_task`` (the adapters initialised from them, what trains switched on),
``end_task`` (fold, freeze, extend the memory basis and the task bases), and the checks on state
loaded from a checkpoint. The layer's forward and gates are :mod:`duallora_kernels.layer`; the same
lifecycle over every layer of a model is :mod:`duallora_kernels.nn`.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn

from . import _checks as check
from .memory import GramAccumulator, InputStats, extend_basis, principal_directions, threshold_for_task
from .ops import autocast_off
from .ops.reference import project_onto, project_out

__all__ = ["TaskLifecycle"]

def _memory_precision(method: Callable) -> Callable:
    """``method`` runs with autocast off: the lifecycle builds bases in float32/float64 also when a
    mixed-precision loop calls it inside ``torch.autocast``."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with autocast_off(self.weight.device):
            return method(self, *args, **kwargs)
    return run


# Buffers whose shape grows with the tasks; load_state_dict resizes them to what it loads.
_GROWING = ("basis", "basis_sizes", "task_bases", "frozen_a", "frozen_b", "frozen_tasks")


class TaskLifecycle:
    """The task methods of :class:`~duallora_kernels.layer.DualLoRALinear` (a mixin before
    ``nn.Module``): they read and write the buffers and host-side copies its ``__init__`` makes."""

    @property
    def tasks_done(self) -> int:
        """Number of finished tasks (the index of the task being trained, 0-based)."""
        return self.task_bases.shape[0]

    @property
    def basis_size(self) -> int:
        return self.basis.shape[1]

    def threshold(self, task: int) -> float:
        return threshold_for_task(self.thresholds.tolist(), task)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Bases and frozen blocks grow with every task: take the loaded shapes before copying.
        for name in _GROWING:
            key = prefix + name
            if key in state_dict:
                cur = getattr(self, name)
                setattr(self, name, torch.empty(state_dict[key].shape, dtype=cur.dtype, device=cur.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        # The one place besides end_task where the basis changes: validate it here (a host sync,
        # once), so that forward need not (it passes check_basis=False to the op).
        if prefix + "basis" in state_dict:
            try:
                check.orthonormal(f"{prefix}basis", self.basis)
            except ValueError as err:
                errors.append(str(err))
        self._in_task = bool(self.in_task)
        self._res_active = bool(self.res_active)
        self._frozen_task_ids = [int(t) for t in self.frozen_tasks.tolist()]


    def start_collecting(self) -> GramAccumulator:
        """Accumulate this layer's inputs (all forwards until :meth:`stop_collecting`)."""
        self._collector = GramAccumulator(self.in_features, self.summary, self.backend, device=self.weight.device)
        return self._collector

    def stop_collecting(self) -> InputStats:
        if self._collector is None:
            raise RuntimeError("stop_collecting() without start_collecting()")
        stats, self._collector = self._collector, None
        return stats

    def _check_stats(self, stats: InputStats, what: str) -> None:
        if not isinstance(stats, InputStats):
            raise TypeError(f"stats must be InputStats (from collect_inputs / start_collecting), got {type(stats).__name__}")
        if stats.dim != self.in_features:
            raise ValueError(f"stats are for d={stats.dim} but this layer has in_features={self.in_features}")
        if stats.token_count == 0:
            raise ValueError(f"{what} needs the task's inputs: stats hold no rows (did the collecting pass see any data?)")

    def check_begin(self, stats: InputStats) -> None:
        """Raise what :meth:`begin_task` would raise for its arguments and this layer's state, changing nothing."""
        if self._in_task:
            raise RuntimeError(f"task {self.tasks_done} is still in progress: call end_task() first")
        self._check_stats(stats, "begin_task")

    def check_end(self, stats: InputStats, task_stats: InputStats | None = None) -> None:
        """Raise what :meth:`end_task` would raise for its arguments and this layer's state, changing nothing."""
        if not self._in_task:
            raise RuntimeError("end_task() without begin_task()")
        self._check_stats(stats, "end_task")
        if task_stats is not None:
            self._check_stats(task_stats, "end_task")

    @_memory_precision
    @torch.no_grad()
    def begin_task(self, stats: InputStats, generator: torch.Generator | None = None) -> None:
        """Start the next task: initialise the orthogonal adapter outside span(M) and, when M is
        not empty, a residual block inside span(M), from the task's input statistics. Their B
        factors train; their down-projections C too unless the layer's ``train_a`` is False."""
        self.check_begin(stats)
        m = self.basis if self.basis_size else None
        if self.use_orth:
            self.orth_a.copy_(self._init_rows(self.rank_orth, stats, self.orth_init, generator, exclude=m))
            self.orth_b.zero_()
            self._set_trainable(self.orth_b, True)
            self._set_trainable(self.orth_a, self.train_a)
        res = self.use_res and m is not None
        if res:
            self.res_a.copy_(self._init_rows(self.rank_res, stats, self.res_init, generator, within=m))
            self.res_b.zero_()
        self._set_trainable(self.res_b, res)
        self._set_trainable(self.res_a, res and self.train_a)
        self.res_active.fill_(res)
        self.in_task.fill_(True)
        self._res_active, self._in_task = res, True

    def _init_rows(self, rank: int, stats: InputStats, how: str, generator, *, exclude=None, within=None) -> Tensor:
        if how == "pca":
            return principal_directions(stats.tokens, rank, exclude=exclude, within=within).T
        rows = torch.empty(rank, self.in_features, dtype=torch.float64)
        bound = 1.0 / self.in_features**0.5  # Kaiming-uniform with a = sqrt(5), as nn.Linear
        rows.uniform_(-bound, bound, generator=generator)
        rows = rows.to(self.weight.device)
        return project_out(rows, exclude) if within is None else project_onto(rows, within)

    @staticmethod
    def _set_trainable(p: nn.Parameter, on: bool) -> None:
        # gradients left from the previous task belong to other values of this tensor
        p.grad = None
        p.requires_grad_(on)

    @_memory_precision
    @torch.no_grad()
    def end_task(self, stats: InputStats, task_stats: InputStats | None = None) -> int:
        """Finish the task: fold s_o B_o A_o into W0 (outputs unchanged), freeze the residual
        block, extend M by GPM's criterion and store the task's bases U_t. Returns the number of
        directions added to M.

        ``stats``: the task's inputs as the trained layer sees them (M is built from its tokens).
        ``task_stats``: the inputs U_t is built from, when they differ -- with a global gate the
        task is recognised in a pass with the residual blocks off (:func:`residual_off`), so U_t
        must come from such a pass; default ``stats``."""
        self.check_end(stats, task_stats)
        t = self.tasks_done
        m = self.basis if self.basis_size else None
        if self.use_orth:
            a_o = project_out(self.orth_a.to(torch.float64), m)
            delta = self.orth_scale * (self.orth_b.to(torch.float64) @ a_o)
            self.weight.copy_((self.weight.to(torch.float64) + delta).to(self.weight.dtype))
            self.orth_b.zero_()
        if self._res_active:
            self.frozen_a = torch.cat([self.frozen_a, project_onto(self.res_a, m)], 0)
            self.frozen_b = torch.cat([self.frozen_b, self.res_b.detach().clone()], 1)
            self.frozen_tasks = torch.cat([self.frozen_tasks, self.frozen_tasks.new_tensor([t])])
            self._frozen_task_ids.append(t)
            self.res_b.zero_()
        for p in (self.orth_a, self.orth_b, self.res_a, self.res_b):
            self._set_trainable(p, False)
        added = 0
        if self.memory:
            new = extend_basis(m, stats.tokens, self.threshold(t)).to(self.basis.dtype)
            check.orthonormal("the extended basis", new)  # validated once here, not in every forward
            added = new.shape[1] - self.basis_size
            self.basis = new
        self.basis_sizes = torch.cat([self.basis_sizes, self.basis_sizes.new_tensor([added])])
        source = task_stats or stats
        summary_gram = source.summary if source.summary_count else source.tokens
        u_t = principal_directions(summary_gram, self.score_rank).to(self.task_bases.dtype)
        self.task_bases = torch.cat([self.task_bases, u_t[None]], 0)
        self.res_active.fill_(False)
        self.in_task.fill_(False)
        self._res_active = self._in_task = False
        return added

