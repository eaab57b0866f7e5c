"""``DualLoRALinear``, one adapted linear layer: a drop-in ``nn.Linear`` with DualLoRA's two
adapters and memory, and its task lifecycle (``begin_task`` / ``end_task`` on the layer); its task gates are
:mod:`duallora_kernels.layer_gates`.
The same lifecycle for every layer of a model, and the public names, are :mod:`duallora_kernels.nn`.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import _checks as check
from .memory import (
    SUMMARIES,
    GramAccumulator,
    InputStats,
    extend_basis,
    principal_directions,
    threshold_for_task,
)
from .layer_gates import TaskGates
from .ops import BACKENDS, autocast_off, dual_lora_linear
from .ops.reference import project_onto, project_out

__all__ = ["DualLoRALinear", "DEFAULT_THRESHOLDS", "INITS", "GATE_MODES"]

DEFAULT_THRESHOLDS = (0.95, 0.96, 0.97, 0.98, 0.99)
INITS = ("pca", "random")
GATE_MODES = ("soft", "hard")

# Buffers whose shape grows with the tasks; load_state_dict resizes them to what it loads.
_GROWING = ("basis", "basis_sizes", "task_bases", "frozen_a", "frozen_b", "frozen_tasks")


def _memory_precision(method: Callable) -> Callable:
    """``method`` runs with autocast off: the lifecycle builds bases in float32/float64 also when a
    mixed-precision loop calls it inside ``torch.autocast``."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with autocast_off(self.weight.device):
            return method(self, *args, **kwargs)
    return run


class DualLoRALinear(TaskGates, nn.Module):
    """``y = x W0^T + b + s_o (x A_o^T) B_o^T + s_r ((x A_R^T) .* G) B_R^T`` (docs/method.md).

    Args:
        in_features, out_features, bias: as ``nn.Linear``; W0 and b are frozen.
        rank_orth: r_o, rank of the orthogonal adapter (trained in the complement of span(M)).
        rank_res: r_r, rank of each task's residual block (trained inside span(M)).
        orth_scale, res_scale: s_o and s_r.
        use_orth, use_res: switch either adapter off (the ablations orth-only / res-only).
        memory: keep the memory basis M (False: M stays empty, the orthogonal adapter is a plain
            LoRA folded into W0 after each task: the sequential-LoRA baseline).
        thresholds: GPM energy threshold per task (a float, or one value per task; tasks beyond
            the list reuse its last value). Each in (0, 1]: the share of a finished task's input
            energy M keeps. Later tasks' orthogonal updates leave the outputs on inputs inside
            span(M) unchanged, not on the rest (at most 1 - threshold of the energy); 1.0 keeps
            all of it (README, "timm families": how far outputs moved).
        score_rank: number of principal directions U_t kept per task for task scores.
        temperature: softmax temperature of the dynamic gate. gate_mode: "soft" or "hard".
        summary: per-sample summary of a 3-D input for the gate: "cls" token or "mean" token.
        orth_init, res_init: "pca" (top principal directions of the task's inputs in the
            adapter's subspace, InfLoRA-style) or "random" (Kaiming-uniform, then projected).
        backend: "auto" | "triton" | "torch" | "cuda" for the fused op and the memory ops.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank_orth: int = 8,
        rank_res: int = 4,
        orth_scale: float = 1.0,
        res_scale: float = 1.0,
        use_orth: bool = True,
        use_res: bool = True,
        memory: bool = True,
        thresholds: float | Sequence[float] = DEFAULT_THRESHOLDS,
        score_rank: int = 8,
        temperature: float = 0.1,
        gate_mode: str = "soft",
        summary: str = "mean",
        orth_init: str = "pca",
        res_init: str = "pca",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check.rank("in_features", in_features)
        self.out_features = check.rank("out_features", out_features)
        self.rank_orth = check.rank("rank_orth", rank_orth)
        self.rank_res = check.rank("rank_res", rank_res)
        if rank_orth > in_features or rank_res > in_features:
            raise ValueError(f"rank_orth and rank_res must be <= in_features={in_features}")
        self.orth_scale = check.finite("orth_scale", orth_scale)
        self.res_scale = check.finite("res_scale", res_scale)
        self.use_orth, self.use_res, self.memory = bool(use_orth), bool(use_res), bool(memory)
        self.score_rank = check.rank("score_rank", score_rank)
        if score_rank > in_features:
            raise ValueError(f"score_rank must be <= in_features={in_features}, got {score_rank}")
        self.temperature = check.positive("temperature", temperature)
        self.gate_mode = check.choice("gate_mode", gate_mode, GATE_MODES)
        self.summary = check.choice("summary", summary, SUMMARIES)
        self.orth_init = check.choice("orth_init", orth_init, INITS)
        self.res_init = check.choice("res_init", res_init, INITS)
        self.backend = check.choice("backend", backend, BACKENDS)
        if isinstance(thresholds, (int, float)):
            thresholds = [thresholds]
        thresholds = [check.threshold(f"thresholds[{i}]", t) for i, t in enumerate(thresholds)]
        if not thresholds:
            raise ValueError("thresholds must hold at least one value in (0, 1]")
        if dtype is not None and dtype not in check.FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")

        f = dict(device=device, dtype=dtype)
        d, n = in_features, out_features
        self.weight = nn.Parameter(torch.empty(n, d, **f), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n, **f), requires_grad=False) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.orth_a = nn.Parameter(torch.zeros(self.rank_orth, d, **f), requires_grad=False)
        self.orth_b = nn.Parameter(torch.zeros(n, self.rank_orth, **f), requires_grad=False)
        self.res_a = nn.Parameter(torch.zeros(self.rank_res, d, **f), requires_grad=False)
        self.res_b = nn.Parameter(torch.zeros(n, self.rank_res, **f), requires_grad=False)
        wdt = self.weight.dtype
        bdt = torch.promote_types(wdt, torch.float32)  # bases in >= float32: projections stay exact
        dev = self.weight.device
        self.register_buffer("thresholds", torch.tensor(thresholds, dtype=torch.float64, device=dev))
        self.register_buffer("basis", torch.zeros(d, 0, dtype=bdt, device=dev))
        self.register_buffer("basis_sizes", torch.zeros(0, dtype=torch.int64, device=dev))
        self.register_buffer("task_bases", torch.zeros(0, d, self.score_rank, dtype=bdt, device=dev))
        self.register_buffer("frozen_a", torch.zeros(0, d, dtype=wdt, device=dev))
        self.register_buffer("frozen_b", torch.zeros(n, 0, dtype=wdt, device=dev))
        self.register_buffer("frozen_tasks", torch.zeros(0, dtype=torch.int64, device=dev))
        self.register_buffer("in_task", torch.zeros((), dtype=torch.bool, device=dev))
        self.register_buffer("res_active", torch.zeros((), dtype=torch.bool, device=dev))
        # Host-side copies of the task state (the buffers above are its persistent form): forward
        # reads these, so a training step never synchronises with the device to branch on state.
        # Written with the buffers in begin_task / end_task, read back from them in load_state_dict.
        self._in_task = False
        self._res_active = False
        self._frozen_task_ids: list[int] = []
        self._gate: Tensor | None = None
        self._collector: GramAccumulator | None = None
        self.last_scores: Tensor | None = None
        self.last_gate: Tensor | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, rank_orth: int = 8, rank_res: int = 4, **kwargs) -> "DualLoRALinear":
        """A DualLoRALinear whose frozen W0 and b are copies of ``linear``'s; outputs are
        identical to ``linear``'s until an adapter trains."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        kwargs.setdefault("device", linear.weight.device)
        kwargs.setdefault("dtype", linear.weight.dtype)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    rank_orth=rank_orth, rank_res=rank_res, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    # ------------------------------------------------------------------ state
    @property
    def tasks_done(self) -> int:
        """Number of finished tasks (the index of the task being trained, 0-based)."""
        return self.task_bases.shape[0]

    @property
    def basis_size(self) -> int:
        return self.basis.shape[1]

    def threshold(self, task: int) -> float:
        return threshold_for_task(self.thresholds.tolist(), task)

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}",
            f"rank_orth={self.rank_orth if self.use_orth else 'off'}",
            f"rank_res={self.rank_res if self.use_res else 'off'}",
            f"tasks_done={self.tasks_done}",
            f"frozen_blocks={self.frozen_tasks.numel()}",
            f"basis={self.basis_size}/{self.in_features}" if self.memory else "basis=off",
        ]
        if self._in_task:
            parts.append(f"training_task={self.tasks_done}")
        return ", ".join(parts)

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

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self._collector is not None:
            self._collector.update(x.detach())
        kw: dict = {}
        if self.use_orth:
            kw.update(orth_a=self.orth_a, orth_b=self.orth_b, orth_scale=self.orth_scale)
        if self.basis_size:
            kw["basis"] = self.basis
        task_gate = self._sample_gate(x)
        if task_gate is None:
            # training the current task: only its own residual block is on (no cross-task interaction)
            if self._res_active:
                kw.update(res_a=self.res_a, res_b=self.res_b)
        else:
            gate = self._block_gate(x, task_gate)
            if gate is not None:
                if self._frozen_task_ids:
                    kw.update(frozen_a=self.frozen_a, frozen_b=self.frozen_b)
                if self._res_active:
                    kw.update(res_a=self.res_a, res_b=self.res_b)
                kw["gate"] = gate  # any float dtype: the kernels read it in float32
        kw.setdefault("res_scale", self.res_scale)
        # The basis was validated where it was made (end_task, load_state_dict): no per-step check.
        return dual_lora_linear(x, self.weight, self.bias, backend=self.backend, check_basis=False, **kw)

    # ------------------------------------------------------------------ task lifecycle
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

    @torch.no_grad()
    @_memory_precision
    def begin_task(self, stats: InputStats, generator: torch.Generator | None = None) -> None:
        """Start the next task: initialise the orthogonal adapter outside span(M) and, when M is
        not empty, a residual block inside span(M), from the task's input statistics."""
        self.check_begin(stats)
        m = self.basis if self.basis_size else None
        if self.use_orth:
            self.orth_a.copy_(self._init_rows(self.rank_orth, stats, self.orth_init, generator, exclude=m))
            self.orth_b.zero_()
            self._set_trainable(self.orth_a, self.orth_b, True)
        res = self.use_res and m is not None
        if res:
            self.res_a.copy_(self._init_rows(self.rank_res, stats, self.res_init, generator, within=m))
            self.res_b.zero_()
        self._set_trainable(self.res_a, self.res_b, res)
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
    def _set_trainable(a: nn.Parameter, b: nn.Parameter, on: bool) -> None:
        # gradients left from the previous task belong to other values of these tensors
        for p in (a, b):
            p.grad = None
            p.requires_grad_(on)

    @torch.no_grad()
    @_memory_precision
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
        self._set_trainable(self.orth_a, self.orth_b, False)
        self._set_trainable(self.res_a, self.res_b, False)
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
