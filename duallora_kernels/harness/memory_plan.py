"""``duallora profile-memory --plan``: a training step's peak GPU memory and the largest batch that
fits each named GPU, predicted on the CPU, for each method variant side by side.

Per variant the step is traced on fake tensors (:mod:`.memory_trace`) at two batches, ``b`` and
``2b``; the trace at ``b`` gives the breakdown (parameters, gradients, optimizer state, saved
activations, transient, allocator overhead), the two together a line per phase (forward,
backward, optimizer) in the batch, from which the largest batch under each GPU's usable memory
follows. Each GPU then adds what no tensor of the trace holds (:mod:`.gpus`): the cuBLAS
workspaces, flash attention's backward scratch, the CUDA context. The figures a GPU has not
confirmed are labelled as estimates; :mod:`.plan_check` measures the same steps on a GPU.

Variants: ``fused`` (DualLoRALinear, Triton path), ``unfused`` (the same layers in plain
PyTorch), ``peft`` (PEFT LoRA of the same rank on the same layers), ``full_ft`` (every weight
trains), ``frozen`` (only the head trains; the backward still runs through every block, the
floor of any adapter) and ``inference`` (a no-grad forward). PEFT's saved tensors are traced
from PEFT itself; when peft is not installed that variant is reported as skipped, with the reason.
"""
from __future__ import annotations

import importlib.util
from functools import partial
from dataclasses import dataclass
from typing import Any, Callable

from .allocator_model import segment_bytes
from .gpus import GpuSpec, cublas_workspace_bytes
from .memory_trace import CATEGORIES, FakeTraining, StepTrace
from .vit_models import VIT_VARIANTS, build_vit, build_vit_variant

__all__ = ["PLAN_SCHEMA", "PLAN_VARIANTS", "peft_missing", "Geometry", "geometry", "gpu_extras", "fit_line",
           "VariantPlan", "plan_variant", "run_plan", "not_fitting", "estimate_note"]

PLAN_SCHEMA = "duallora-plan/1"
PLAN_VARIANTS: tuple[str, ...] = (*VIT_VARIANTS, "inference")


def peft_missing() -> str | None:
    """Why the PEFT variant cannot be planned here, or None."""
    if importlib.util.find_spec("peft") is None:
        return "peft is not installed (pip install peft): the PEFT LoRA variant is traced from PEFT itself"
    return None


@dataclass(frozen=True)
class Geometry:
    """What the attention scratch depends on: heads, tokens and head size of the model."""

    heads: int
    tokens: int
    head_dim: int
    blocks: int


def geometry(s: dict[str, Any]) -> Geometry:
    model = build_vit(s["model"], num_classes=s["num_classes"], device="meta", **s["timm_kwargs"])
    attn = model.blocks[0].attn
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    return Geometry(attn.num_heads, tokens, attn.head_dim, len(model.blocks))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def gpu_extras(g: GpuSpec, geo: Geometry, batch: int, *, train: bool, half_attention: bool) -> dict[str, int]:
    """Bytes a GPU step holds outside the traced tensors: cuBLAS workspaces (allocated through the
    caching allocator: counted in allocated and, as the segments they take, in reserved) and, in a
    training step with half-precision attention, flash attention's backward scratch for one layer
    (float32 dQ accumulator over tokens rounded to 128 and the softmax row sums;
    flash-attention 2's mha_bwd), at the backward's peak."""
    handles = 2 if train else 1
    ws = cublas_workspace_bytes(g.arch)
    rows = _round_up(geo.tokens, 128)
    scratch = batch * geo.heads * rows * (_round_up(geo.head_dim, 32) + 1) * 4 if train and half_attention else 0
    return {"workspace_allocated": handles * ws, "workspace_reserved": handles * segment_bytes(ws),
            "attention_scratch": scratch}


def fit_line(b1: int, y1: float, b2: int, y2: float) -> tuple[float, float]:
    """(intercept, slope) of the line through (b1, y1) and (b2, y2)."""
    slope = (y2 - y1) / (b2 - b1)
    return y1 - slope * b1, slope


class VariantPlan:
    """The traces of one variant at two batches and what follows from them."""

    def __init__(self, variant: str, s: dict[str, Any], geo: Geometry, trace: Callable[[int], StepTrace]) -> None:
        self.variant, self.s, self.geo = variant, s, geo
        self.train = variant != "inference"
        self.half_attention = s["amp"] is not None or s["dtype"] in ("bfloat16", "float16")
        b = s["batch"]
        self.traces = {b: trace(b), 2 * b: trace(2 * b)}
        t1, t2 = self.traces[b], self.traces[2 * b]
        self.alloc_lines = {ph: fit_line(b, t1.phases[ph].allocated, 2 * b, t2.phases[ph].allocated)
                            for ph in t1.phases}
        last = list(t1.phases)[-1]
        self.reserved_line = fit_line(b, t1.phases[last].reserved, 2 * b, t2.phases[last].reserved)

    def _tensors(self, batch: int) -> float:
        """The traced tensors' allocated peak at ``batch`` (the largest of the phases' lines)."""
        return max(a + s * batch for a, s in self.alloc_lines.values())

    def allocated(self, g: GpuSpec, batch: int) -> int:
        """Predicted ``max_memory_allocated``: the phases' lines, the attention scratch on the
        backward's, and the cuBLAS workspaces."""
        extras = gpu_extras(g, self.geo, batch, train=self.train, half_attention=self.half_attention)
        per_phase = [a + s * batch + (extras["attention_scratch"] if ph == "backward" else 0)
                     for ph, (a, s) in self.alloc_lines.items()]
        return int(max(per_phase)) + extras["workspace_allocated"]

    def reserved(self, g: GpuSpec, batch: int) -> int:
        """Predicted ``max_memory_reserved``: the allocator replay's line (at least the tensors'
        peak), the attention scratch and the cuBLAS workspaces' segments."""
        extras = gpu_extras(g, self.geo, batch, train=self.train, half_attention=self.half_attention)
        a, s = self.reserved_line
        tensors = max(a + s * batch, self._tensors(batch))
        return int(tensors) + extras["attention_scratch"] + extras["workspace_reserved"]

    def largest_batch(self, g: GpuSpec, cap: int) -> int:
        """The largest batch whose predicted reserved bytes fit ``g``'s usable memory (0: not even 1)."""
        usable = g.usable_bytes
        lo, hi = 0, 1
        while hi <= cap and self.reserved(g, hi) <= usable:
            lo, hi = hi, hi * 2
        hi = min(hi, cap + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.reserved(g, mid) <= usable else (lo, mid)
        return lo

    def breakdown(self) -> dict[str, int]:
        """The step at the plan's batch, by category (the peak phase's split), plus the allocator's
        overhead (reserved minus allocated, from the replay)."""
        t = self.traces[self.s["batch"]]
        peak = t.peak
        out = {c: int(peak.at_peak[c]) for c in CATEGORIES}
        out["allocator"] = int(list(t.phases.values())[-1].reserved - peak.allocated)
        return out

    def gpu_row(self, g: GpuSpec) -> dict[str, Any]:
        b, cap = self.s["batch"], self.s["max_batch_cap"]
        extras = gpu_extras(g, self.geo, b, train=self.train, half_attention=self.half_attention)
        best = self.largest_batch(g, cap)
        row = {"gpu": g.key, "batch": b, "allocated_bytes": self.allocated(g, b), "reserved_bytes": self.reserved(g, b),
               "workspace_bytes": extras["workspace_reserved"], "attention_scratch_bytes": extras["attention_scratch"],
               "context_bytes": g.context_bytes, "usable_bytes": g.usable_bytes, "max_batch": best,
               "max_batch_capped": best >= cap, "shortfall_at_batch_1": None}
        row["device_bytes"] = row["reserved_bytes"] + g.context_bytes
        row["fits_at_batch"] = row["reserved_bytes"] <= g.usable_bytes
        if best == 0:
            row["shortfall_at_batch_1"] = self.reserved(g, 1) - g.usable_bytes
        return row

    def row(self, gpus: list[GpuSpec]) -> dict[str, Any]:
        b = self.s["batch"]
        t1, t2 = self.traces[b], self.traces[2 * b]
        return {
            "kind": "plan", "variant": self.variant, "status": "ok", "reason": None, "batch": b,
            "traced_batches": [b, 2 * b], "peak_phase": next(ph for ph, p in t1.phases.items() if p is t1.peak),
            "breakdown": self.breakdown(), "saved_by_dtype": dict(sorted(t1.saved_by_dtype.items())),
            "saved_bytes": t1.saved_bytes, "saved_bytes_2b": t2.saved_bytes, "resident_bytes": t1.resident_bytes,
            "lines": {"allocated": {ph: [a, s] for ph, (a, s) in self.alloc_lines.items()},
                      "reserved": list(self.reserved_line)},
            "gpus": [self.gpu_row(g) for g in gpus],
        }


def skipped_row(variant: str, reason: str, batch: int) -> dict[str, Any]:
    return {"kind": "plan", "variant": variant, "status": "skipped", "reason": reason, "batch": batch}


def plan_variant(variant: str, s: dict[str, Any], geo: Geometry) -> VariantPlan:
    """Trace ``variant`` under the settings ``s`` (see :func:`run_plan`) at ``s['batch']`` and twice that.
    Optional ``s['tasks']`` and ``s['basis_per_task']``: the DualLoRA layers' task state
    (:func:`~.vit_models.load_training_state`)."""
    build = partial(build_vit_variant, "frozen" if variant == "inference" else variant, s["model"], rank=s["rank"],
                    dtype=s["dtype"], empty=True, num_classes=s["num_classes"], targets=s["targets"],
                    tasks=s.get("tasks", 1), basis_per_task=s.get("basis_per_task"), **s["timm_kwargs"])
    fake = FakeTraining(build, s["num_classes"], s["amp"], train=variant != "inference", optimizer=s["optimizer"])
    return VariantPlan(variant, s, geo, fake.trace)


def run_plan(s: dict[str, Any], progress: Callable[[str], None] = lambda msg: None) -> list[dict[str, Any]]:
    """One row per variant of ``s['variants']``. ``s``: model, timm_kwargs, num_classes, rank, targets,
    dtype (of the parameters), amp (autocast dtype or None), optimizer, batch, max_batch_cap, gpus
    (:class:`~.gpus.GpuSpec`)."""
    geo = geometry(s)
    rows = []
    for variant in s["variants"]:
        reason = peft_missing() if variant == "peft" else None
        if reason:
            rows.append(skipped_row(variant, reason, s["batch"]))
            continue
        progress(variant)
        rows.append(plan_variant(variant, s, geo).row(s["gpus"]))
    return rows


def not_fitting(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (variant, GPU) that does not fit even at batch 1, saying by how much."""
    lines = []
    for r in rows:
        for g in r.get("gpus", []):
            if g["max_batch"] == 0:
                lines.append(f"{r['variant']} does not fit {g['gpu']} even at batch 1: it needs "
                             f"{_gib(g['shortfall_at_batch_1'])} GiB more than the {_gib(g['usable_bytes'])} GiB usable")
    return lines


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}" if n < 10 * 2**30 else f"{n / 2**30:.1f}"


def estimate_note() -> str:
    return ("estimates, not measured: each GPU's driver reservation and CUDA context (harness/gpus.py); "
            "the planner is unvalidated on hardware until bench/run_gpu.sh's plan-check step has run on a GPU")
