"""What runs on a :class:`~.problems.LayerProblem`, one variant each:

* ``fused``: :func:`duallora_kernels.ops.dual_lora_linear` with ``backend="triton"`` and
  ``check_basis=False``, as DualLoRALinear calls it (``design="auto"``).
* ``fused_fixed_a``: the same with the A factors fixed (not requiring grad: ``DualLoRALinear(train_a=False)``,
  B-only training): the op keeps T = x A^T for backward instead of x and computes no dA.
* ``fused_single`` / ``fused_split`` / ``fused_tma``: ``fused`` with each Triton design forced
  (ops/fused_linear.py), side by side in one run so a GPU run can decide the default;
  ``fused_tma`` on sm_90 only (elsewhere it would time the split design again).
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
* ``cuda``: :func:`duallora_kernels.ops.dual_lora_linear` with ``backend="cuda"``, the CUDA C++
  tensor-core kernels of csrc/ (a CUDA device, and the prebuilt extension or nvcc to build it on
  first use: minutes, before the first timed call).
* ``unfused_compiled``: ``unfused`` under ``torch.compile`` (default mode, ``dynamic=False``,
  ``fullgraph=True``, so a graph break is an error row rather than a silent eager fallback), on
  a CUDA device only: on the CPU, Inductor's C++ code takes minutes per shape and is not what the
  goals compare against, so the CPU gets a ``skipped`` row. Each new problem (shape, rank, dtype)
  starts from ``torch._dynamo.reset()``: dynamo keeps at most 8 compiled versions per function
  and silently runs eager code past that, which a matrix of 60 cases would hit.

:func:`make_step` turns a variant into the zero-argument step that is timed and counted.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .devices import triton_interpreting
from .problems import LayerProblem, seeded_generator

__all__ = ["VARIANTS", "FUSED_TRITON", "DESIGN_VARIANTS", "PASSES", "COMPILED", "unfused_dual_lora_linear",
           "UnfusedDualLoRALinear", "cuda_unavailable", "variant_unavailable", "layer_forward", "make_step"]

VARIANTS: tuple[str, ...] = ("fused", "fused_fixed_a", "unfused", "frozen", "peft", "unfused_compiled", "cuda",
                             "fused_single", "fused_split", "fused_tma")
#: The fused variants that force one Triton design, and the design each forces.
DESIGN_VARIANTS: dict[str, str] = {"fused_single": "single", "fused_split": "split", "fused_tma": "tma"}
#: The variants that run the fused Triton op (timed on a GPU, counted on the CPU under TRITON_INTERPRET=1).
FUSED_TRITON: tuple[str, ...] = ("fused", "fused_fixed_a", *DESIGN_VARIANTS)
PASSES: tuple[str, ...] = ("fwd", "fwd+bwd")
#: The torch.compile'd unfused variant's name in ``--variants`` and the JSON.
COMPILED = "unfused_compiled"


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


def compiled_unavailable(device: torch.device) -> str | None:
    """Why the compiled variant cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return ("torch.compile'd unfused variant runs on a CUDA device only (Inductor's CPU code takes minutes "
                "per shape and is not what the goals compare against)")
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    return None


def cuda_unavailable(device: torch.device) -> str | None:
    """Why the CUDA C++ backend cannot run on ``device`` (None when it can): it needs a CUDA device
    and either the prebuilt extension or nvcc to build it (said before anything is built)."""
    if device.type != "cuda":
        return "the CUDA C++ backend needs a CUDA device (its CPU check is tests/test_cuda_emulation.py)"
    from ..ops.cuda import extension_unavailable

    return extension_unavailable()


def compiled_forward(problem: LayerProblem) -> Callable[[Tensor], Tensor]:
    """``f(x)``: the unfused composition of ``problem`` under ``torch.compile`` (compiled on the
    first call, once per problem; see the module doc)."""
    f = problem._cache.get(COMPILED)
    if f is None:
        import torch._dynamo

        torch._dynamo.reset()
        fn = torch.compile(unfused_dual_lora_linear, dynamic=False, fullgraph=True)
        p = problem

        def f(x: Tensor) -> Tensor:
            return fn(x, p.weight, p.bias, p.orth_a, p.orth_b, p.res_a, p.res_b, p.basis_x, p.gate,
                      p.orth_scale, p.res_scale)

        problem._cache[COMPILED] = f
    return f


def variant_unavailable(variant: str, device: torch.device, purpose: str = "time") -> str | None:
    """Why ``variant`` cannot run on ``device`` (None when it can). ``purpose`` is ``"time"`` or
    ``"count"``: the fused kernel can be *counted* on the CPU under TRITON_INTERPRET=1, but
    interpreter timings mean nothing, so it is only *timed* on CUDA."""
    if variant not in VARIANTS and variant != "full_ft":
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if variant == COMPILED:
        return compiled_unavailable(device)
    if variant == "fused_tma" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return "the TMA design needs sm_90 (Hopper); elsewhere it runs the split design's pointer GEMMs"
    if variant in FUSED_TRITON:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if device.type != "cuda":
            if purpose == "count" and triton_interpreting():
                return None
            if purpose == "count":
                return "the fused Triton kernel needs a CUDA device (or TRITON_INTERPRET=1 set before launch, slow)"
            return "the fused Triton kernel needs a CUDA device (interpreter timings under TRITON_INTERPRET=1 mean nothing)"
    if variant == "cuda":
        return cuda_unavailable(device)
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
    g = seeded_generator(problem.device, problem.seed + 31)
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
    if variant in ("cuda", *FUSED_TRITON):
        from ..ops import dual_lora_linear

        # check_basis=False: as DualLoRALinear does, the basis is validated where it is made (here:
        # a QR), not on every call; the unfused variant does not check it either.
        fixed = variant == "fused_fixed_a"
        a_of = (lambda a: a.detach()) if fixed else (lambda a: a)  # noqa: E731  (detached: no dA, x not kept)
        kw: dict[str, Any] = dict(orth_a=a_of(p.orth_a), orth_b=p.orth_b, basis=p.basis, orth_scale=p.orth_scale,
                                  check_basis=False)
        if p.res_a is not None:
            kw.update(res_a=a_of(p.res_a), res_b=p.res_b, gate=p.gate, res_scale=p.res_scale)
        backend = "cuda" if variant == "cuda" else "triton"
        if variant in DESIGN_VARIANTS:
            kw["design"] = DESIGN_VARIANTS[variant]
        trainable = [t for t in (p.orth_b, p.res_b) if t is not None] if fixed else p.adapters
        return (lambda x: dual_lora_linear(x, p.weight, p.bias, backend=backend, **kw)), trainable
    if variant == "peft":
        module = p._cache.get("peft")
        if module is None:
            module = p._cache["peft"] = _peft_linear(p)
        return module, [q for q in module.parameters() if q.requires_grad]
    if variant == COMPILED:
        return compiled_forward(p), p.adapters
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def _under_autocast(f: Callable[[Tensor], Tensor], device_type: str, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        with torch.autocast(device_type, dtype=dtype):
            return f(x)

    return forward


def make_step(variant: str, pass_: str, problem: LayerProblem) -> Callable[[], None]:
    """A zero-argument callable running one forward (``"fwd"``, autograd recording as in
    training) or forward+backward (``"fwd+bwd"``), on the next x/dY buffer each call. Gradients
    are reset to None at the start of each call, so nothing accumulates. With ``problem.amp`` the
    forward runs under ``torch.autocast`` and the backward outside it, as a mixed-precision
    training loop does."""
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; choose from {PASSES}")
    f, trainable = layer_forward(variant, problem)
    if problem.amp is not None:
        f = _under_autocast(f, problem.device.type, problem.amp)
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

