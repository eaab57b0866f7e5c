"""``DualLoRALinear``, one adapted linear layer: a drop-in ``nn.Linear`` with DualLoRA's two
adapters and memory, and its forward. Its task lifecycle (``begin_task`` / ``end_task`` on the layer,
the task state they change) is :mod:`duallora_kernels.layer_tasks`, its task gates
:mod:`duallora_kernels.layer_gates`; the same lifecycle for every layer of a model, and the public
names, are :mod:`duallora_kernels.nn`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from . import _checks as check
from .layer_gates import TaskGates
from .layer_tasks import TaskLifecycle
from .memory import SUMMARIES, GramAccumulator
from .ops import BACKENDS, dual_lora_linear
from .ops.saved_input import SAVED_X

__all__ = ["DualLoRALinear", "DEFAULT_THRESHOLDS", "INITS", "GATE_MODES"]

DEFAULT_THRESHOLDS = (0.95, 0.96, 0.97, 0.98, 0.99)
INITS = ("pca", "random")
GATE_MODES = ("soft", "hard")


class DualLoRALinear(TaskGates, TaskLifecycle, nn.Module):
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
        train_a: train the down-projections C_o and C_r (default). False keeps them at their
            initial values for the whole task and trains only B_o and B_r (InfLoRA's B-only
            training): the op then keeps T = x A^T (m x r) for backward instead of x (m x d) and
            computes no dA, so a training step saves what the frozen layer saves plus T and the
            assembled A (r x d). docs/method.md ("Fixed down-projections") gives its accuracy.
        saved_x: how the op keeps x for the gradient of A: "exact" (default) or "float8" (e4m3 with a
            float32 scale per row: half of bfloat16's bytes; only dA sees the rounding). docs/method.md
            ("x saved in float8") gives its accuracy. Nothing to keep with ``train_a=False``.
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
        train_a: bool = True,
        saved_x: str = "exact",
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
        if not isinstance(train_a, bool):
            raise TypeError(f"train_a must be True or False, got {train_a!r}")
        self.train_a = train_a
        self.saved_x = check.choice("saved_x", saved_x, SAVED_X)
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

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}",
            f"rank_orth={self.rank_orth if self.use_orth else 'off'}",
            f"rank_res={self.rank_res if self.use_res else 'off'}",
            f"tasks_done={self.tasks_done}",
            f"frozen_blocks={self.frozen_tasks.numel()}",
            f"basis={self.basis_size}/{self.in_features}" if self.memory else "basis=off",
        ]
        if not self.train_a:
            parts.append("train_a=False")
        if self.saved_x != "exact":
            parts.append(f"saved_x={self.saved_x}")
        if self._in_task:
            parts.append(f"training_task={self.tasks_done}")
        return ", ".join(parts)

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
        return dual_lora_linear(x, self.weight, self.bias, backend=self.backend, check_basis=False,
                                saved_x=self.saved_x, **kw)
