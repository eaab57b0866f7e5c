"""The benchmark and memory-profiling harness behind ``duallora bench``, ``duallora profile-memory``
and the pytest-benchmark suite in ``bench/`` (DESIGN §4: fused vs unfused vs frozen-only on the
same shapes, in one run, written to JSON with the device name).

What is compared, on one DualLoRA layer (W0 (n, d) frozen, bias frozen, x (m, d) requiring grad,
the state of a training step in task 2: trainable orthogonal adapter C_o/B_o, trainable residual
block C_r/B_r, memory basis M (d, k), a per-row gate):

* ``fused``: :func:`duallora_kernels.ops.dual_lora_linear` with ``backend="triton"`` and
  ``check_basis=False``, as DualLoRALinear calls it.
* ``unfused``: the same function written in plain PyTorch the way a user would write it
  (:func:`unfused_dual_lora_linear`): the projections ``A_o = C_o - (C_o M) M^T`` and
  ``A_r = (C_r M) M^T`` as a separate step, then
  ``F.linear(x, W0, b) + s_o (x A_o^T) B_o^T + s_r ((x A_r^T) * g) B_r^T`` with autograd. The
  frozen part is ``F.linear`` (bias fused into the GEMM, as ``nn.Linear`` does), so the baseline
  is not handicapped by a separate bias add.
* ``frozen``: ``F.linear(x, W0, b)`` alone with W0 frozen: the physical floor (cuBLAS forward
  ``x W0^T`` and backward ``dY W0``).
* ``peft``: PEFT's LoRA on the same ``nn.Linear`` with the same total rank r (only when
  ``import peft`` works).
* ``unfused_compiled``: ``unfused`` under ``torch.compile``, on a CUDA device only
  (:mod:`duallora_kernels.bench_ops`, which also counts each variant's device operations).

A rank r means the low-rank path's total rank: ``r_o = r - r // 2`` orthogonal plus
``r_r = r // 2`` residual columns (:func:`split_rank`); PEFT gets rank r.

Timing (:func:`time_callable`): on a GPU ``triton.testing.do_bench`` (median of the timed runs,
after its warm-up; it also flushes L2 before every run), on the CPU a wall-clock loop
(warm-up, then the median of single-call times). Either way the inputs x and dY rotate among
several buffers (:func:`buffer_count`) so that no run finds the previous run's data in cache.

Saved-for-backward bytes (:class:`SavedTensorCounter`) are counted with
``torch.autograd.graph.saved_tensors_hooks``. The rule: every tensor autograd saves is mapped
to its storage; a storage counts once, at its full size (``untyped_storage().nbytes()``), however
many tensors or views of it are saved, because that is the memory the graph keeps alive.
``saved_bytes`` is the total; ``activation_bytes`` leaves out storages of parameters and buffers
(and any tensor passed as ``exclude``), which exist whether or not anything is saved. Tensors a
custom autograd.Function keeps as ``ctx`` attributes instead of ``save_for_backward`` are not
seen by the hooks; on a GPU :func:`retained_bytes` (allocator growth across a forward) checks that.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TOKENS", "LayerShape", "SHAPES", "RANKS", "DTYPES", "VARIANTS", "PASSES", "GOALS", "QUICK",
    "VIT_TARGETS", "parse_shapes", "parse_ranks", "parse_dtypes", "parse_list", "split_rank",
    "DevicePeaks", "device_peaks", "resolve_device", "device_info", "device_slug",
    "LayerProblem", "make_problem", "unfused_dual_lora_linear", "UnfusedDualLoRALinear",
    "variant_unavailable", "layer_forward", "make_step", "Timing", "time_callable", "buffer_count",
    "flop_count", "byte_count", "timing_row", "comparison_rows", "run_bench",
    "SavedBytes", "SavedTensorCounter", "count_saved", "layer_saved_bytes", "retained_bytes",
    "build_vit", "prepare_dual_lora", "VIT_VARIANTS", "build_vit_variant", "vit_saved_bytes", "training_step", "step_memory",
    "search_largest", "largest_batch", "is_oom",
    "SCHEMA", "READABLE_SCHEMAS", "DEFAULT_OUT_DIR", "run_metadata", "default_out_path", "write_json", "validate_doc", "format_table",
    "format_bytes", "fmt_ratio", "ratio", "goal_met", "free_cuda", "error_text",
]

# ----------------------------------------------------------------------------- the matrix
TOKENS = 197  # a /16 ViT at 224 px: 196 patches + the class token; m = batch * TOKENS


@dataclass(frozen=True)
class LayerShape:
    """One linear layer of a ViT: ``d -> n`` (W0 is (n, d))."""

    name: str  # e.g. "vit_b.fc1"; "custom" for a shape given by size
    d: int
    n: int

    @property
    def key(self) -> str:
        return f"{self.d}x{self.n}"


SHAPES: tuple[LayerShape, ...] = (
    LayerShape("vit_s.qkv", 384, 1152),
    LayerShape("vit_b.proj", 768, 768),
    LayerShape("vit_b.qkv", 768, 2304),
    LayerShape("vit_b.fc1", 768, 3072),
    LayerShape("vit_b.fc2", 3072, 768),
    LayerShape("vit_l.fc1", 1024, 4096),
)
RANKS: tuple[int, ...] = (4, 8, 16, 32, 64)
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
VARIANTS: tuple[str, ...] = ("fused", "unfused", "frozen", "peft", "unfused_compiled")
PASSES: tuple[str, ...] = ("fwd", "fwd+bwd")
#: What the issue asks to report against (never asserted): op, bound, meaning.
GOALS: dict[str, tuple[str, float, str]] = {
    "fused_over_frozen": ("<=", 1.08, "fused fwd+bwd within 1.08x of the frozen nn.Linear"),
    "unfused_over_fused": (">=", 2.0, "fused at least 2x faster than the unfused composition"),
    "unfused_compiled_over_fused": (">=", 1.3, "fused at least 1.3x faster than the torch.compile'd unfused one"),
    "saved_over_frozen": ("<=", 1.05, "bytes saved for backward within 1.05x of the frozen layer's"),
}
#: The CPU-friendly subset of ``--quick``.
QUICK: dict[str, Any] = {
    "shapes": ("384x1152", "768x768", "768x3072"),
    "ranks": (4, 16),
    "dtypes": ("float32", "bfloat16"),
    "batch": 4,
}
#: Linear layers of a timm ViT block that DualLoRA (and the PEFT baseline) adapt.
VIT_TARGETS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
_PEFT_TARGET_REGEX = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_list(spec: str | Sequence[str] | None) -> list[str]:
    """``"a,b c"`` or a list of such strings -> ``["a", "b", "c"]``."""
    if spec is None:
        return []
    parts = [spec] if isinstance(spec, str) else list(spec)
    return [p for s in parts for p in re.split(r"[,\s]+", s.strip()) if p]


def parse_shapes(spec: str | Sequence[str] | None) -> list[LayerShape]:
    """Layer shapes from names (``vit_b.fc1``), sizes (``768x3072`` or ``768->3072``) or ``all``."""
    items = parse_list(spec) or ["all"]
    out: list[LayerShape] = []
    by_name = {s.name: s for s in SHAPES}
    by_key = {s.key: s for s in SHAPES}
    for item in items:
        if item == "all":
            out.extend(SHAPES)
            continue
        if item in by_name:
            out.append(by_name[item])
            continue
        m = re.fullmatch(r"(\d+)\s*(?:x|->|:)\s*(\d+)", item)
        if not m:
            raise ValueError(
                f"shape {item!r} is neither a known layer ({', '.join(by_name)}) nor 'D x N' like 768x3072"
            )
        d, n = int(m.group(1)), int(m.group(2))
        if d < 1 or n < 1:
            raise ValueError(f"shape {item!r} must have positive sizes")
        out.append(by_key.get(f"{d}x{n}", LayerShape("custom", d, n)))
    return list(dict.fromkeys(out))


def parse_ranks(spec: str | Sequence[str] | None) -> list[int]:
    items = parse_list(spec)
    if not items:
        return list(RANKS)
    try:
        ranks = [int(r) for r in items]
    except ValueError:
        raise ValueError(f"ranks must be integers like 4,16,64, got {spec!r}") from None
    if any(r < 1 for r in ranks):
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    return list(dict.fromkeys(ranks))


def parse_dtypes(spec: str | Sequence[str] | None) -> list[str]:
    items = parse_list(spec) or list(DTYPES)
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp64": "float64"}
    items = [aliases.get(i, i) for i in items]
    bad = [i for i in items if i not in _DTYPES]
    if bad:
        raise ValueError(f"unknown dtype(s) {bad}; choose from {sorted(_DTYPES)}")
    return list(dict.fromkeys(items))


def split_rank(rank: int) -> tuple[int, int]:
    """Total rank r -> (r_o, r_r): the orthogonal adapter gets the larger half."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return rank - rank // 2, rank // 2


# ----------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class DevicePeaks:
    """Dense peak throughput (FLOP/s by operand kind) and memory bandwidth (bytes/s) of a GPU,
    from the vendor's data sheet (dense, no sparsity)."""

    name: str
    flops: dict[str, float]
    bandwidth: float


# Matched in order against torch.cuda.get_device_name(): the first substring that occurs wins.
_PEAKS: tuple[tuple[str, DevicePeaks], ...] = (
    ("H200", DevicePeaks("H200 SXM", {"bfloat16": 989e12, "float16": 989e12, "tf32": 494e12, "float32": 67e12}, 4.8e12)),
    ("H100 NVL", DevicePeaks("H100 NVL", {"bfloat16": 835e12, "float16": 835e12, "tf32": 418e12, "float32": 60e12}, 3.9e12)),
    ("H100 PCIe", DevicePeaks("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "tf32": 378e12, "float32": 51e12}, 2.0e12)),
    ("H100", DevicePeaks("H100 SXM", {"bfloat16": 989e12, "float16": 989e12, "tf32": 494e12, "float32": 67e12}, 3.35e12)),
    ("A100-SXM4-80GB", DevicePeaks("A100 SXM 80GB", {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12}, 2.039e12)),
    ("A100 80GB PCIe", DevicePeaks("A100 PCIe 80GB", {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12}, 1.935e12)),
    ("A100", DevicePeaks("A100 40GB", {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12}, 1.555e12)),
)


def device_peaks(device_name: str) -> DevicePeaks | None:
    """The known ceilings of a GPU by its name, or None for an unknown device (ratios omitted)."""
    for key, peaks in _PEAKS:
        if key.lower() in device_name.lower():
            return peaks
    return None


def _peak_key(dtype: str) -> str:
    if dtype == "float32" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return dtype


def resolve_device(spec: str | None = "auto") -> torch.device:
    """``auto`` -> the current CUDA device if there is one, else the CPU. A CUDA device always
    comes back with its index."""
    if spec in (None, "", "auto"):
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, slug, ceilings and sizes of ``device`` for the JSON header."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        name = props.name
        peaks = device_peaks(name)
        return {
            "type": "cuda",
            "name": name,
            "slug": device_slug(name),
            "capability": f"{props.major}.{props.minor}",
            "total_memory": int(props.total_memory),
            "multiprocessors": int(props.multi_processor_count),
            "l2_cache_bytes": int(getattr(props, "L2_cache_size", 0)) or None,
            "peaks": None if peaks is None else {"source": peaks.name, "flops": peaks.flops, "bandwidth": peaks.bandwidth},
        }
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = [round(v, 2) for v in os.getloadavg()]  # other work on the machine skews CPU timings
    except OSError:
        load = None
    return {"type": "cpu", "name": cpu, "slug": "cpu", "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "loadavg_at_start": load, "peaks": None}


def device_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``."""
    s = re.sub(r"^(nvidia|amd)\s+", "", name.strip(), flags=re.I).lower()
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "device"


# ----------------------------------------------------------------------------- one layer
@dataclass
class LayerProblem:
    """The tensors of one benchmark case. ``xs``/``dys`` are the rotated input and output-grad buffers."""

    shape: LayerShape
    batch: int
    rank: int
    dtype: torch.dtype
    xs: list[Tensor]
    dys: list[Tensor]
    weight: Tensor
    bias: Tensor
    orth_a: Tensor
    orth_b: Tensor
    res_a: Tensor | None
    res_b: Tensor | None
    basis: Tensor
    basis_x: Tensor  # the basis in x's dtype, as user code keeps it (the unfused variant)
    gate: Tensor
    orth_scale: float = 0.5
    res_scale: float = 0.5
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def m(self) -> int:
        return self.xs[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def adapters(self) -> list[Tensor]:
        """The trainable tensors of the DualLoRA variants."""
        return [t for t in (self.orth_a, self.orth_b, self.res_a, self.res_b) if t is not None]

    def with_rank(self, rank: int) -> "LayerProblem":
        """The same x, dY, W0 and basis with adapters of another total rank."""
        adapters = _make_adapters(self.shape, rank, self.dtype, self.device, self.seed + 7919 * rank)
        return dataclasses.replace(self, rank=rank, _cache={}, **adapters)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, device: torch.device, scale: float = 1.0,
           requires_grad: bool = False) -> Tensor:
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    return (t * scale).to(dtype).requires_grad_(requires_grad)


def _make_adapters(shape: LayerShape, rank: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    r_o, r_r = split_rank(rank)
    g = _generator(device, seed)
    d, n = shape.d, shape.n
    out: dict[str, Tensor | None] = {
        "orth_a": _randn((r_o, d), g, dtype, device, d**-0.5, True),
        "orth_b": _randn((n, r_o), g, dtype, device, 0.1 * r_o**-0.5, True),
        "res_a": None,
        "res_b": None,
    }
    if r_r:
        out["res_a"] = _randn((r_r, d), g, dtype, device, d**-0.5, True)
        out["res_b"] = _randn((n, r_r), g, dtype, device, 0.1 * r_r**-0.5, True)
    return out


def make_problem(
    shape: LayerShape,
    rank: int,
    dtype: str | torch.dtype,
    device: torch.device | str,
    *,
    batch: int = 64,
    buffers: int = 2,
    seed: int = 0,
    basis_fraction: float = 0.25,
    m: int | None = None,
) -> LayerProblem:
    """Random tensors for one case: m = batch * 197 rows (or ``m``), ``buffers`` copies of x and dY,
    a basis of ``round(basis_fraction * d)`` orthonormal columns (kept in >= float32, as
    DualLoRALinear keeps it) and a per-row gate (m, 1)."""
    dt = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = torch.device(device)
    rows = batch * TOKENS if m is None else m
    g = _generator(device, seed)
    d, n = shape.d, shape.n
    xs = [_randn((rows, d), g, dt, device, 1.0, True) for _ in range(buffers)]
    dys = [_randn((rows, n), g, dt, device, 1.0) for _ in range(buffers)]
    weight = _randn((n, d), g, dt, device, d**-0.5)
    bias = _randn((n,), g, dt, device, 0.1)
    k = max(1, min(d - 1, round(basis_fraction * d))) if d > 1 else 1
    bdt = torch.promote_types(dt, torch.float32)
    basis = torch.linalg.qr(torch.randn(d, k, generator=g, device=device, dtype=torch.float32 if bdt != torch.float64 else bdt))[0].to(bdt)
    gate = torch.rand(rows, 1, generator=g, device=device, dtype=torch.float32).to(dt)
    adapters = _make_adapters(shape, rank, dt, device, seed + 7919 * rank)
    return LayerProblem(shape=shape, batch=batch, rank=rank, dtype=dt, xs=xs, dys=dys, weight=weight, bias=bias,
                        basis=basis, basis_x=basis.to(dt), gate=gate, seed=seed, **adapters)


def unfused_dual_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    orth_a: Tensor,
    orth_b: Tensor,
    res_a: Tensor | None = None,
    res_b: Tensor | None = None,
    basis: Tensor | None = None,
    gate: Tensor | None = None,
    orth_scale: float = 1.0,
    res_scale: float = 1.0,
) -> Tensor:
    """DualLoRA in plain PyTorch, the way a user writes it (the ``unfused`` baseline).

    The projections first, as their own step (the basis is cast to x's dtype, as a user keeps it)::

        A_o = C_o - (C_o M) M^T          A_r = (C_r M) M^T

    then ``F.linear(x, W0, b) + s_o (x A_o^T) B_o^T + s_r ((x A_r^T) * g) B_r^T``. ``gate`` is
    (..., 1) per row or None (all ones). Same function as ``dual_lora_linear`` with one residual
    block; autograd does the backward.
    """
    a_o = orth_a
    if basis is not None and basis.shape[1]:
        mb = basis.to(x.dtype)
        a_o = orth_a - (orth_a @ mb) @ mb.T
    y = F.linear(x, weight, bias)
    y = y + orth_scale * (x @ a_o.T) @ orth_b.T
    if res_a is not None:
        mb = basis.to(x.dtype)
        a_r = (res_a @ mb) @ mb.T
        t = x @ a_r.T
        if gate is not None:
            t = t * gate
        y = y + res_scale * t @ res_b.T
    return y


class UnfusedDualLoRALinear(nn.Module):
    """A DualLoRALinear in its training state, computed by :func:`unfused_dual_lora_linear`
    (for whole-model comparisons). W0 and b frozen; C_o, B_o and (from task 2 on) C_r, B_r trainable."""

    def __init__(self, weight: Tensor, bias: Tensor | None, orth_a: Tensor, orth_b: Tensor,
                 res_a: Tensor | None, res_b: Tensor | None, basis: Tensor | None,
                 orth_scale: float = 1.0, res_scale: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.orth_a = nn.Parameter(orth_a.detach().clone())
        self.orth_b = nn.Parameter(orth_b.detach().clone())
        self.res_a = None if res_a is None else nn.Parameter(res_a.detach().clone())
        self.res_b = None if res_b is None else nn.Parameter(res_b.detach().clone())
        self.register_buffer("basis", None if basis is None else basis.detach().to(weight.dtype).clone())
        self.orth_scale, self.res_scale = float(orth_scale), float(res_scale)

    @classmethod
    def from_dual_lora(cls, layer: nn.Module) -> "UnfusedDualLoRALinear":
        """The unfused twin of a DualLoRALinear that is training a task (same outputs and grads)."""
        res = bool(layer.res_active) and layer.use_res
        basis = layer.basis if layer.basis_size else None
        if not layer.use_orth:
            raise ValueError("the unfused twin needs the orthogonal adapter on (use_orth=True)")
        return cls(layer.weight, layer.bias, layer.orth_a, layer.orth_b,
                   layer.res_a if res else None, layer.res_b if res else None, basis,
                   layer.orth_scale, layer.res_scale)

    def forward(self, x: Tensor) -> Tensor:
        return unfused_dual_lora_linear(x, self.weight, self.bias, self.orth_a, self.orth_b, self.res_a, self.res_b,
                                        self.basis, None, self.orth_scale, self.res_scale)

    def extra_repr(self) -> str:
        r_r = 0 if self.res_a is None else self.res_a.shape[0]
        return f"in_features={self.in_features}, out_features={self.out_features}, rank_orth={self.orth_a.shape[0]}, rank_res={r_r}"


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def variant_unavailable(variant: str, device: torch.device, purpose: str = "time") -> str | None:
    """Why ``variant`` cannot run on ``device`` (None when it can). ``purpose`` is ``"time"`` or
    ``"count"``: the fused kernel can be *counted* on the CPU under TRITON_INTERPRET=1, but
    interpreter timings mean nothing, so it is only *timed* on CUDA."""
    if variant not in VARIANTS and variant != "full_ft":
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if variant == "unfused_compiled":
        from .bench_ops import compiled_unavailable

        return compiled_unavailable(device)
    if variant == "fused":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if device.type != "cuda":
            if purpose == "count" and _triton_interpreting():
                return None
            if purpose == "count":
                return "the fused Triton kernel needs a CUDA device (or TRITON_INTERPRET=1 set before launch, slow)"
            return "the fused Triton kernel needs a CUDA device (interpreter timings under TRITON_INTERPRET=1 mean nothing)"
    if variant == "peft":
        try:
            import peft  # noqa: F401
        except ImportError:
            return "peft is not installed (pip install peft)"
    return None


def _peft_linear(problem: LayerProblem) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    class _Holder(nn.Module):
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, x: Tensor) -> Tensor:
            return self.linear(x)

    d, n = problem.shape.d, problem.shape.n
    lin = nn.Linear(d, n, device=problem.device, dtype=problem.dtype)
    with torch.no_grad():
        lin.weight.copy_(problem.weight)
        lin.bias.copy_(problem.bias)
    cfg = LoraConfig(r=problem.rank, lora_alpha=problem.rank, lora_dropout=0.0, target_modules=["linear"], bias="none")
    model = inject_adapter_in_model(cfg, _Holder(lin))
    g = _generator(problem.device, problem.seed + 31)
    for name, p in model.named_parameters():
        is_lora = "lora_" in name
        p.requires_grad_(is_lora)
        if is_lora:  # PEFT starts B at zero; random values so nothing is special-cased
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).to(p.dtype) * 0.05)
    return model.to(device=problem.device, dtype=problem.dtype)


def layer_forward(variant: str, problem: LayerProblem) -> tuple[Callable[[Tensor], Tensor], list[Tensor]]:
    """``(f, trainable)``: the variant's forward ``f(x) -> y`` on ``problem`` and the tensors whose
    gradients a backward produces (besides x)."""
    p = problem
    if variant == "frozen":
        return (lambda x: F.linear(x, p.weight, p.bias)), []
    if variant == "unfused":
        return (lambda x: unfused_dual_lora_linear(x, p.weight, p.bias, p.orth_a, p.orth_b, p.res_a, p.res_b,
                                                   p.basis_x, p.gate, p.orth_scale, p.res_scale)), p.adapters
    if variant == "fused":
        from .ops import dual_lora_linear

        # check_basis=False: as DualLoRALinear does, the basis is validated where it is made (here:
        # a QR), not on every call; the unfused variant does not check it either.
        kw: dict[str, Any] = dict(orth_a=p.orth_a, orth_b=p.orth_b, basis=p.basis, orth_scale=p.orth_scale,
                                  check_basis=False)
        if p.res_a is not None:
            kw.update(res_a=p.res_a, res_b=p.res_b, gate=p.gate, res_scale=p.res_scale)
        return (lambda x: dual_lora_linear(x, p.weight, p.bias, backend="triton", **kw)), p.adapters
    if variant == "peft":
        module = p._cache.get("peft")
        if module is None:
            module = p._cache["peft"] = _peft_linear(p)
        return module, [q for q in module.parameters() if q.requires_grad]
    if variant == "unfused_compiled":
        from .bench_ops import compiled_forward

        return compiled_forward(p), p.adapters
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def make_step(variant: str, pass_: str, problem: LayerProblem) -> Callable[[], None]:
    """A zero-argument callable running one forward (``"fwd"``, autograd recording as in
    training) or forward+backward (``"fwd+bwd"``), on the next x/dY buffer each call. Gradients
    are reset to None at the start of each call, so nothing accumulates."""
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; choose from {PASSES}")
    f, trainable = layer_forward(variant, problem)
    xs, dys = problem.xs, problem.dys
    state = {"i": 0}

    def fwd() -> None:
        i = state["i"] = (state["i"] + 1) % len(xs)
        f(xs[i])

    def fwd_bwd() -> None:
        i = state["i"] = (state["i"] + 1) % len(xs)
        x = xs[i]
        x.grad = None
        for t in trainable:
            t.grad = None
        f(x).backward(dys[i])

    return fwd if pass_ == "fwd" else fwd_bwd


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int | None
    timer: str


def buffer_count(problem_bytes_per_buffer: int, device: torch.device, cap: int = 8) -> int:
    """How many x/dY buffers to rotate: enough that one round covers twice the GPU's L2 (2 on CPU)."""
    if device.type != "cuda":
        return 2
    props = torch.cuda.get_device_properties(device.index if device.index is not None else torch.cuda.current_device())
    l2 = int(getattr(props, "L2_cache_size", 0)) or 50 * 2**20
    return max(2, min(cap, math.ceil(2 * l2 / max(1, problem_bytes_per_buffer))))


def time_callable(fn: Callable[[], Any], device: torch.device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
                  min_reps: int = 5, max_reps: int = 10000) -> Timing:
    """Median time of ``fn()`` in ms. CUDA: ``triton.testing.do_bench`` (L2 flushed before each
    run). CPU: ``fn()`` once, warm-up calls for ``warmup_ms``, then single calls timed with
    ``time.perf_counter`` until ``rep_ms`` have passed and at least ``min_reps`` ran."""
    if device.type == "cuda":
        import triton.testing

        with torch.cuda.device(device):
            q50, q20, q80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(q50), float(q20), float(q80), None, "triton.testing.do_bench")
    fn()
    t_end = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < t_end:
        fn()
    times: list[float] = []
    t_stop = time.perf_counter() + rep_ms / 1e3
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_stop):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return Timing(statistics.median(times), qs[1], qs[7], len(times), "wall-clock (time.perf_counter)")


def flop_count(m: int, d: int, n: int, rank: int, variant: str, pass_: str) -> int:
    """The useful FLOPs of a pass (2 per multiply-add; bias and elementwise work ignored).
    frozen: fwd ``2mnd``, bwd ``2mnd`` (dX only). Low-rank variants add ``2mr(d+n)`` forward and
    ``4mr(d+n)`` backward (dY B, U A, dA, dB)."""
    base = 2 * m * n * d
    if variant == "frozen":
        return base if pass_ == "fwd" else 2 * base
    lo = 2 * m * rank * (d + n)
    return base + lo if pass_ == "fwd" else 2 * base + 3 * lo


def byte_count(m: int, d: int, n: int, rank: int, variant: str, pass_: str, elsize: int) -> int:
    """The least memory traffic of a pass: every large tensor moved once (the table in
    ``ops/fused_linear.py``). Forward: read X, W0, b; write Y. Backward: read dY, W0; write dX;
    the low-rank variants also read X again (for dA), write T (m x r, x's dtype) forward and read it
    backward, and move the factors and their gradients. Unfused code moves more; its GB/s is an
    effective rate over this count."""
    fwd = elsize * (m * d + n * d + m * n + n)
    bwd = elsize * (m * n + n * d + m * d)
    if variant != "frozen":
        small = elsize * rank * (d + n)
        fwd += small + elsize * m * rank
        bwd += elsize * m * d + elsize * m * rank + 2 * small
    return fwd if pass_ == "fwd" else fwd + bwd


def timing_row(problem: LayerProblem, variant: str, pass_: str, timing: Timing | None, *,
               status: str = "ok", reason: str | None = None, peaks: dict | None = None) -> dict[str, Any]:
    """One ``kind="timing"`` result row."""
    shape, m = problem.shape, problem.m
    dtype = str(problem.dtype).replace("torch.", "")
    rank = None if variant == "frozen" else problem.rank
    r_o, r_r = split_rank(problem.rank)
    fl = flop_count(m, shape.d, shape.n, problem.rank, variant, pass_)
    by = byte_count(m, shape.d, shape.n, problem.rank, variant, pass_, problem.dtype.itemsize)
    row: dict[str, Any] = {
        "kind": "timing", "layer": shape.name, "shape": shape.key, "d": shape.d, "n": shape.n,
        "batch": problem.batch, "m": m, "rank": rank,
        "rank_orth": None if rank is None else r_o, "rank_res": None if rank is None else r_r,
        "dtype": dtype, "pass": pass_, "variant": variant, "status": status, "reason": reason,
        "median_ms": None, "p20_ms": None, "p80_ms": None, "reps": None,
        "flops": fl, "bytes": by, "tflops": None, "gbps": None, "pct_peak_flops": None, "pct_peak_bw": None,
    }
    if timing is not None:
        s = timing.median_ms / 1e3
        row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
                   tflops=fl / s / 1e12, gbps=by / s / 1e9)
        if peaks:
            peak_f = peaks["flops"].get(_peak_key(dtype))
            if peak_f:
                row["pct_peak_flops"] = 100 * fl / s / peak_f
            row["pct_peak_bw"] = 100 * by / s / peaks["bandwidth"]
    return row


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def goal_met(name: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, bound, _ = GOALS[name]
    return value <= bound if op == "<=" else value >= bound


def comparison_rows(timing_rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``kind="comparison"`` row per (shape, batch, dtype, pass, rank): the variants' medians,
    the ratios fused/frozen, unfused/fused, peft/fused and unfused_compiled/fused (None where a
    side is missing) and, on fwd+bwd rows, each variant's device operations (``<variant>_ops``,
    from the ``op_count`` rows among ``timing_rows``)."""
    timing_rows = list(timing_rows)
    n_ops = {(r["shape"], r["batch"], r["dtype"], r["variant"], r["rank"]): r["device_ops"]
             for r in timing_rows if r["kind"] == "op_count"}
    rows = [r for r in timing_rows if r["kind"] == "timing"]
    ms = {(r["shape"], r["batch"], r["dtype"], r["pass"], r["variant"], r["rank"]): r["median_ms"] for r in rows}
    keys = sorted({(r["layer"], r["shape"], r["d"], r["n"], r["batch"], r["m"], r["dtype"], r["pass"], r["rank"])
                   for r in rows if r["rank"] is not None},
                  key=lambda k: (k[6], k[2], k[3], k[4], PASSES.index(k[7]), k[8]))
    out = []
    for layer, shape, d, n, batch, m, dtype, pass_, rank in keys:
        t = {v: ms.get((shape, batch, dtype, pass_, v, None if v == "frozen" else rank)) for v in VARIANTS}
        f_fr, u_f = ratio(t["fused"], t["frozen"]), ratio(t["unfused"], t["fused"])
        c_f = ratio(t["unfused_compiled"], t["fused"])
        ops = {v: n_ops.get((shape, batch, dtype, v, None if v == "frozen" else rank)) for v in VARIANTS}
        out.append({
            "kind": "comparison", "layer": layer, "shape": shape, "d": d, "n": n, "batch": batch, "m": m,
            "dtype": dtype, "pass": pass_, "rank": rank,
            **{f"{v}_ms": t[v] for v in VARIANTS},
            "fused_over_frozen": f_fr, "unfused_over_fused": u_f, "peft_over_fused": ratio(t["peft"], t["fused"]),
            "unfused_over_frozen": ratio(t["unfused"], t["frozen"]), "unfused_compiled_over_fused": c_f,
            "goal_fused_over_frozen": goal_met("fused_over_frozen", f_fr) if pass_ == "fwd+bwd" else None,
            "goal_unfused_over_fused": goal_met("unfused_over_fused", u_f) if pass_ == "fwd+bwd" else None,
            "goal_unfused_compiled_over_fused": goal_met("unfused_compiled_over_fused", c_f) if pass_ == "fwd+bwd" else None,
            **({f"{v}_ops": ops[v] for v in VARIANTS} if pass_ == "fwd+bwd" else {}),
        })
    return out


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) < 400 else text[:397] + "..."


def run_bench(
    *,
    device: torch.device,
    shapes: Sequence[LayerShape],
    ranks: Sequence[int],
    dtypes: Sequence[str],
    variants: Sequence[str] = VARIANTS,
    passes: Sequence[str] = PASSES,
    batch: int = 64,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    buffers: int | None = None,
    seed: int = 0,
    progress: bool = True,
    on_group: Callable[[list[dict[str, Any]]], None] | None = None,
    count_ops: bool = True,
) -> list[dict[str, Any]]:
    """Time the matrix; returns the ``timing`` and ``op_count`` rows followed by the ``comparison`` rows.

    The frozen layer does not depend on the rank and is timed once per (shape, dtype, pass).
    A variant that cannot run here gets a ``status="skipped"`` row with its reason; one that fails
    (e.g. out of memory) a ``status="error"`` row, and the run goes on. With ``count_ops``, each
    variant's forward+backward also gets an ``op_count`` row (:mod:`duallora_kernels.bench_ops`),
    counted once every variant of that (dtype, shape, rank) is timed.
    ``on_group`` is called with the rows so far after each variant of each (dtype, shape, rank),
    so a caller can save partial results.
    """
    from . import bench_ops
    peaks = device_info(device).get("peaks")
    cases = [(dt, s) for dt in dtypes for s in shapes]
    per_case = len(passes) * (("frozen" in variants) + len(ranks) * sum(v != "frozen" for v in variants))
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cases) * per_case, desc="bench", leave=False, dynamic_ncols=True)
    try:
        for dtype, shape in cases:
            elsize = _DTYPES[dtype].itemsize
            nbuf = buffers or buffer_count(batch * TOKENS * (shape.d + shape.n) * elsize, device)
            base = make_problem(shape, ranks[0], dtype, device, batch=batch, buffers=nbuf, seed=seed)
            for rank_i, rank in enumerate(ranks):
                problem = base if rank_i == 0 else base.with_rank(rank)
                for variant in variants:
                    if variant == "frozen" and rank_i:
                        continue
                    reason = variant_unavailable(variant, device, "time")
                    for pass_ in passes:
                        if bar is not None:
                            bar.set_postfix_str(f"{dtype} {shape.key} r={rank} {variant} {pass_}")
                        if reason:
                            rows.append(timing_row(problem, variant, pass_, None, status="skipped", reason=reason))
                        else:
                            try:
                                t = time_callable(make_step(variant, pass_, problem), device,
                                                  warmup_ms=warmup_ms, rep_ms=rep_ms)
                                rows.append(timing_row(problem, variant, pass_, t, peaks=peaks))
                            except Exception as exc:  # recorded, and the matrix goes on
                                if is_oom(exc) and device.type == "cuda":
                                    torch.cuda.empty_cache()
                                rows.append(timing_row(problem, variant, pass_, None, status="error",
                                                       reason=error_text(exc)))
                        if bar is not None:
                            bar.update(1)
                    if on_group is not None:
                        on_group(rows + comparison_rows(rows))
                if count_ops:  # after this problem's timings: a profiler session never precedes them
                    for variant in variants:
                        if variant != "frozen" or not rank_i:
                            rows.append(bench_ops.count_variant(variant, problem, device))
                    if on_group is not None:
                        on_group(rows + comparison_rows(rows))
            del base, problem
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if bar is not None:
            bar.close()
    return rows + comparison_rows(rows)


# ----------------------------------------------------------------------------- saved bytes
@dataclass
class SavedBytes:
    """What autograd saved for backward (see :class:`SavedTensorCounter` for the rule)."""

    saved_bytes: int
    activation_bytes: int
    tensors: int
    storages: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _storage_key(t: Tensor) -> tuple[Any, ...] | None:
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    ptr = st.data_ptr()
    return None if ptr == 0 else (str(t.device), ptr)


def _storage_bytes(t: Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError, TypeError):
        return t.numel() * t.element_size()


class SavedTensorCounter:
    """Counts the bytes autograd saves for backward while the block runs.

    Rule: each saved tensor is mapped to its storage; a storage counts once, at its full size,
    no matter how many tensors or views of it are saved (``x * x`` saves x twice: counted once;
    ``linear`` saving ``W.t()`` counts W's storage). Storages of the tensors in ``exclude``
    (parameters, buffers) count towards ``saved_bytes`` but not ``activation_bytes``. The counter
    holds a reference to every saved tensor until it is closed, so a storage freed and reused
    during the block cannot be mistaken for one already counted.

    Usage::

        with SavedTensorCounter(exclude=model.parameters()) as c:
            y = model(x)
        c.result()  # SavedBytes
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {k for k in (_storage_key(t) for t in exclude) if k is not None}
        self._storages: dict[Any, tuple[int, bool]] = {}
        self._keep: list[Tensor] = []
        self.tensors = 0
        self._hooks: contextlib.AbstractContextManager | None = None

    def _pack(self, t: Tensor) -> Tensor:
        self.tensors += 1
        key = _storage_key(t)
        if key is None:
            key = ("no-storage", id(t))
        if key not in self._storages:
            self._storages[key] = (_storage_bytes(t), key in self._exclude)
        self._keep.append(t)
        return t

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._keep.clear()

    def result(self) -> SavedBytes:
        total = sum(b for b, _ in self._storages.values())
        act = sum(b for b, excluded in self._storages.values() if not excluded)
        return SavedBytes(total, act, self.tensors, len(self._storages))


def count_saved(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> SavedBytes:
    """Run ``fn()`` (a forward) and count what autograd saved for its backward."""
    with SavedTensorCounter(exclude) as counter:
        out = fn()
    del out
    return counter.result()


def layer_saved_bytes(variant: str, problem: LayerProblem) -> SavedBytes:
    """Saved-for-backward bytes of one forward of ``variant`` on ``problem.xs[0]`` (x requires
    grad). Besides the four timed variants, ``full_ft`` is an ``nn.Linear`` whose weight trains
    (what full fine-tuning saves: x)."""
    p = problem
    exclude: list[Tensor] = [p.weight, p.bias, p.basis, p.basis_x, *p.adapters]
    if variant == "full_ft":
        w = p.weight.detach().clone().requires_grad_(True)
        b = p.bias.detach().clone().requires_grad_(True)
        f: Callable[[Tensor], Tensor] = lambda x: F.linear(x, w, b)  # noqa: E731
        exclude += [w, b]
    else:
        f, _ = layer_forward(variant, p)
        if isinstance(f, nn.Module):
            exclude += [*f.parameters(), *f.buffers()]
    return count_saved(lambda: f(p.xs[0]), exclude)


def retained_bytes(fn: Callable[[], Tensor], device: torch.device) -> int | None:
    """CUDA only: allocator bytes still held after ``fn()`` returns (its output and everything its
    graph keeps), a check on the hook count that also sees tensors kept outside ``save_for_backward``."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    after = torch.cuda.memory_allocated(device)
    del out
    return after - before


# ----------------------------------------------------------------------------- whole ViT
def build_vit(model_name: str = "vit_base_patch16_224", *, num_classes: int = 100, device: torch.device | str = "cpu",
              dtype: str | torch.dtype = "float32", seed: int = 0, **timm_kwargs: Any) -> nn.Module:
    """A randomly initialised timm ViT (no download) with every weight frozen but the head.
    ``timm_kwargs`` override its configuration (img_size, depth, embed_dim, num_heads, ...)."""
    import timm

    dt = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **timm_kwargs)
    model = model.to(device=device, dtype=dt)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head."))
    return model


def _vit_images(model: nn.Module, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0,
                requires_grad: bool = True) -> Tensor:
    size = model.patch_embed.img_size
    chans = model.patch_embed.proj.in_channels
    g = _generator(device, seed)
    img = torch.randn(batch, chans, *size, generator=g, device=device, dtype=torch.float32).to(dtype)
    return img.requires_grad_(requires_grad)


def prepare_dual_lora(model: nn.Module, rank: int, *, backend: str = "triton", basis_fraction: float = 0.25,
                      targets: Sequence[str] = VIT_TARGETS, seed: int = 0) -> nn.Module:
    """Inject DualLoRA layers of total rank ``rank`` and load each with the state of a layer in
    the middle of task 2 (through ``load_state_dict``, as when resuming a checkpoint): one task
    done, a memory basis M of ``round(basis_fraction * d)`` orthonormal columns, orthogonal adapter
    and residual block trainable, with random values (B != 0, so every product is real work)."""
    from .nn import dual_lora_layers, inject

    r_o, r_r = split_rank(rank)
    inject(model, targets, rank_orth=r_o, rank_res=max(1, r_r), use_res=r_r > 0, backend=backend)
    for i, layer in enumerate(dual_lora_layers(model).values()):
        d, n = layer.in_features, layer.out_features
        g = torch.Generator().manual_seed(seed + 1009 * i)
        k = max(1, min(d - 1, round(basis_fraction * d)))
        raw = torch.randn(d, k + layer.score_rank, generator=g, dtype=torch.float64)
        basis = torch.linalg.qr(raw.to(layer.weight.device))[0]  # float64: orthonormal to the layer's check
        state = layer.state_dict()
        wdt = layer.weight.dtype
        rnd = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(wdt)  # noqa: E731
        state.update(
            basis=basis[:, :k], basis_sizes=torch.tensor([k]), task_bases=basis[None, :, k:],
            in_task=torch.tensor(True), res_active=torch.tensor(r_r > 0),
            orth_a=rnd(layer.rank_orth, d, s=d**-0.5), orth_b=rnd(n, layer.rank_orth, s=0.01),
            res_a=rnd(layer.rank_res, d, s=d**-0.5), res_b=rnd(n, layer.rank_res, s=0.01),
        )
        layer.load_state_dict(state)
        for p in (layer.orth_a, layer.orth_b) + ((layer.res_a, layer.res_b) if r_r else ()):
            p.requires_grad_(True)
    return model


def _replace_modules(model: nn.Module, kind: type, make: Callable[[nn.Module], nn.Module]) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(child))
                count += 1
    return count


#: Whole-model variants: the four timed ones and ``full_ft`` (every weight trains), a reference
#: for what a trainable layer must save.
#: Whole-model variants of profile-memory (no compiled one: torch.compile changes no saved tensor's lifetime).
VIT_VARIANTS: tuple[str, ...] = ("fused", "unfused", "frozen", "peft", "full_ft")


def build_vit_variant(variant: str, model_name: str = "vit_base_patch16_224", *, rank: int = 16,
                      device: torch.device | str = "cpu", dtype: str = "bfloat16", seed: int = 0,
                      num_classes: int = 100, **timm_kwargs: Any) -> nn.Module:
    """A ViT (:func:`build_vit`) adapted as ``variant``: ``frozen`` (only the head trains),
    ``full_ft`` (everything trains), ``fused`` (DualLoRALinear, Triton backend), ``unfused``
    (:class:`UnfusedDualLoRALinear` twins of the same layers) or ``peft`` (LoRA rank ``rank`` on
    qkv/proj/fc1/fc2). The head trains in every variant."""
    if variant not in VIT_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VIT_VARIANTS}")
    model = build_vit(model_name, num_classes=num_classes, device=device, dtype=dtype, seed=seed, **timm_kwargs)
    if variant == "full_ft":
        for p in model.parameters():
            p.requires_grad_(True)
    elif variant in ("fused", "unfused"):
        prepare_dual_lora(model, rank, backend="triton" if variant == "fused" else "torch", seed=seed)
        if variant == "unfused":
            from .nn import DualLoRALinear

            _replace_modules(model, DualLoRALinear, UnfusedDualLoRALinear.from_dual_lora)
    elif variant == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=_PEFT_TARGET_REGEX, bias="none")
        model = inject_adapter_in_model(cfg, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name or name.startswith("head."))
        model = model.to(device=device, dtype=_DTYPES[dtype])
    return model.train()


def vit_saved_bytes(model: nn.Module, batch: int, seed: int = 0) -> SavedBytes:
    """Saved-for-backward bytes of one training forward of a whole ViT at ``batch``. The images
    require grad in every variant, so the backward runs through every block (as it must when
    every block holds trainable adapters, and so that the frozen model is a real floor rather
    than a head-only backward)."""
    p = next(model.parameters())
    images = _vit_images(model, batch, p.device, p.dtype, seed)
    exclude = [*model.parameters(), *model.buffers()]
    return count_saved(lambda: model(images), exclude)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: int, num_classes: int,
                  seed: int = 0) -> float:
    """One step: random images (requiring grad, as in :func:`vit_saved_bytes`) and labels,
    cross-entropy, backward, optimizer step, gradients set to None."""
    p = next(model.parameters())
    images = _vit_images(model, batch, p.device, p.dtype, seed)
    labels = torch.randint(0, num_classes, (batch,), device=p.device)
    loss = F.cross_entropy(model(images).float(), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def is_oom(exc: BaseException) -> bool:
    """True for the CUDA out-of-memory errors a trial may raise (the allocator's, cuBLAS's)."""
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def step_memory(model: nn.Module, batch: int, num_classes: int, device: torch.device, *, steps: int = 3) -> dict[str, Any]:
    """Peak allocator bytes and median time of a training step at ``batch`` (CUDA)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    training_step(model, opt, batch, num_classes)  # optimizer state and kernels warm
    torch.cuda.synchronize(device)
    free_cuda()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        training_step(model, opt, batch, num_classes, seed=s)
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": int(peak), "resident_bytes": int(base), "step_ms": statistics.median(times)}


def search_largest(fits: Callable[[int], bool], start: int = 16, cap: int = 4096) -> int:
    """The largest b in [1, cap] with ``fits(b)``, assuming fits is monotone (True up to some b):
    doubling from ``start`` (halving if it does not fit), then bisection. 0 if even 1 does not fit."""
    lo, hi = 0, None  # fits(lo) (0 trivially), not fits(hi)
    b = max(1, min(start, cap))
    if fits(b):
        lo = b
        while lo < cap:
            b = min(cap, lo * 2)
            if fits(b):
                lo = b
            else:
                hi = b
                break
        if hi is None:
            return lo
    else:
        hi = b
        while hi > 1:
            b = hi // 2
            if fits(b):
                lo = b
                break
            hi = b
        if lo == 0:
            return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def largest_batch(model: nn.Module, budget_bytes: int, num_classes: int, device: torch.device, *,
                  start: int = 32, cap: int = 4096) -> dict[str, Any]:
    """The largest batch whose training step fits when PyTorch's allocator may use at most
    ``budget_bytes`` (``torch.cuda.set_per_process_memory_fraction``; the model's weights count,
    the CUDA context does not). Out-of-memory errors are caught; memory is freed between trials
    and the fraction reset to 1 at the end."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(idx).total_memory
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    trials: dict[int, bool] = {}

    def fits(b: int) -> bool:
        ok = True
        free_cuda()
        try:
            training_step(model, opt, b, num_classes)
            torch.cuda.synchronize(device)
        except Exception as exc:
            if not is_oom(exc):
                raise
            ok = False
        opt.zero_grad(set_to_none=True)
        free_cuda()
        trials[b] = ok
        return ok

    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), idx)
    try:
        best = search_largest(fits, start=start, cap=cap)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, idx)
        free_cuda()
    return {"max_batch": best, "trials": {str(k): v for k, v in sorted(trials.items())}}


# ----------------------------------------------------------------------------- JSON
SCHEMA = "duallora-bench/2"
#: Schemas still read: /1 has no op_count rows and no unfused_compiled columns.
READABLE_SCHEMAS: tuple[str, ...] = ("duallora-bench/1", SCHEMA)
_TOP_KEYS: dict[str, type | tuple[type, ...]] = {
    "schema": str, "command": str, "command_line": str, "argv": list, "date": str, "git": dict, "device": dict,
    "versions": dict, "settings": dict, "complete": bool, "results": list,
}
_DEVICE_KEYS = {"type": str, "name": str, "slug": str}
_VERSION_KEYS = {"python": str, "torch": str, "triton": (str, type(None))}
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_ROW_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "timing": {"layer": str, "shape": str, "d": int, "n": int, "batch": int, "m": int, "rank": (int, type(None)),
               "dtype": str, "pass": str, "variant": str, "status": str, "reason": (str, type(None)),
               "median_ms": _OPT_NUM, "flops": int, "bytes": int, "tflops": _OPT_NUM, "gbps": _OPT_NUM},
    "comparison": {"shape": str, "batch": int, "dtype": str, "pass": str, "rank": int, "frozen_ms": _OPT_NUM,
                   "fused_ms": _OPT_NUM, "unfused_ms": _OPT_NUM, "peft_ms": _OPT_NUM,
                   "fused_over_frozen": _OPT_NUM, "unfused_over_fused": _OPT_NUM},
    "saved_bytes": {"scope": str, "model": str, "variant": str, "dtype": str, "batch": int, "rank": int,
                    "status": str, "reason": (str, type(None)), "saved_bytes": (int, type(None)),
                    "activation_bytes": (int, type(None)), "activation_over_frozen": _OPT_NUM},
    "step_memory": {"model": str, "variant": str, "dtype": str, "batch": int, "rank": int, "status": str,
                    "peak_bytes": (int, type(None)), "step_ms": _OPT_NUM},
    "max_batch": {"model": str, "variant": str, "dtype": str, "rank": int, "budget_gib": _NUM, "status": str,
                  "max_batch": (int, type(None))},
    "op_count": {"layer": str, "shape": str, "batch": int, "m": int, "rank": (int, type(None)), "dtype": str,
                 "variant": str, "status": str, "reason": (str, type(None)), "device_ops": (int, type(None)),
                 "method": (str, type(None))},
}


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def run_metadata(command: str, argv: Sequence[str], device: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON header: what ran, where, with which versions and code."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    if commit is None:  # a copy of the tree without .git: the caller may say which commit it is
        commit = os.environ.get("DUALLORA_GIT_COMMIT") or None
    from . import __version__

    cmd = ["duallora", command, *argv]
    return {
        "schema": SCHEMA,
        "command": command,
        "command_line": shlex.join(cmd),
        "argv": list(argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": {"commit": commit, "dirty": None if status is None else bool(status)},
        "device": device_info(device),
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
            "timm": _version("timm"), "peft": _version("peft"), "duallora_kernels": __version__,
            "cuda": torch.version.cuda,
        },
        "settings": {"float32_matmul_precision": torch.get_float32_matmul_precision(),
                     "triton_interpret": _triton_interpreting(),
                     # configs autotuned per kernel: unset = all, 0 = the fixed one, N = the first N
                     "duallora_autotune": os.environ.get("DUALLORA_AUTOTUNE") or None, **settings},
        "complete": False,
        "results": [],
    }


#: Where the commands write when ``--out`` is not given (relative to the current directory, like
#: ``duallora train``'s ``runs/``): a scratch place, never the tracked bench/results/.
DEFAULT_OUT_DIR = Path("runs") / "bench"


def default_out_path(device: torch.device, suffix: str = "", date: _dt.date | None = None) -> Path:
    """``runs/bench/<device-slug>-<YYYY-MM-DD><suffix>.json`` under the current directory.
    Committed results go to bench/results/ only by an explicit ``--out``."""
    slug = device_info(device)["slug"]
    date = date or _dt.date.today()
    return DEFAULT_OUT_DIR / f"{slug}-{date.isoformat()}{suffix}.json"


def write_json(path: str | os.PathLike, doc: dict[str, Any]) -> Path:
    """Write ``doc`` (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def _check_keys(where: str, obj: dict, spec: dict[str, type | tuple[type, ...]], errors: list[str]) -> None:
    for key, typ in spec.items():
        if key not in obj:
            errors.append(f"{where}: missing key {key!r}")
        elif not isinstance(obj[key], typ) or (isinstance(obj[key], bool) and bool not in (typ if isinstance(typ, tuple) else (typ,))):
            errors.append(f"{where}: {key!r} is {type(obj[key]).__name__}, expected {typ}")


def validate_doc(doc: Any) -> list[str]:
    """Schema errors of a results document (empty when valid)."""
    if not isinstance(doc, dict):
        return [f"document is {type(doc).__name__}, expected an object"]
    errors: list[str] = []
    _check_keys("document", doc, _TOP_KEYS, errors)
    if doc.get("schema") not in (None, *READABLE_SCHEMAS) and isinstance(doc.get("schema"), str):
        errors.append(f"document: schema {doc['schema']!r}, expected one of {READABLE_SCHEMAS}")
    if isinstance(doc.get("device"), dict):
        _check_keys("device", doc["device"], _DEVICE_KEYS, errors)
    if isinstance(doc.get("versions"), dict):
        _check_keys("versions", doc["versions"], _VERSION_KEYS, errors)
    for i, row in enumerate(doc.get("results") or []):
        if not isinstance(row, dict) or row.get("kind") not in _ROW_KEYS:
            errors.append(f"results[{i}]: not a row of a known kind ({', '.join(_ROW_KEYS)})")
            continue
        _check_keys(f"results[{i}] ({row['kind']})", row, _ROW_KEYS[row["kind"]], errors)
    return errors


# ----------------------------------------------------------------------------- tables
def fmt_ratio(v: float | None) -> str | None:
    return None if v is None else f"{v:.2f}x"


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """A table of strings: aligned plain text, or GitHub markdown."""
    cells = [[("-" if c is None else str(c)) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in cells)])
