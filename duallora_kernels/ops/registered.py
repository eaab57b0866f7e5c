"""The fused DualLoRA op registered with ``torch.library``, so torch.compile, torch.export, FakeTensor
/ meta tensors and ``torch.library.opcheck`` see it like any aten op.

Two custom ops, one autograd formula:

* ``duallora::fused_forward`` -> (Y, T, A, B^T): Y, plus what the backward needs and the op
  allocates -- ``T = X A^T`` (m x r, only when a B factor trains; the Triton split/tma designs keep
  ``S = (X A^T) .* scale`` in its place), the assembled ``A`` (r x d, only when anything trains) and,
  for designs that keep it (:attr:`.launchers.Launchers.keeps_bt`), the assembled ``B^T`` (r x n);
  empty (0,) tensors otherwise, and always for the torch backend's unneeded ones.
* ``duallora::fused_backward`` -> the seven gradients (x, weight, bias, orth_a, orth_b, res_a,
  res_b), an empty (0,) tensor for each one not asked for.

:func:`dual_lora_linear_op` calls the first and hides T and A; ``register_autograd`` connects the
second. Both run one of the :class:`.launchers.Launchers` implementations, named by the op's
``backend`` string: ``"triton:<design>"`` (:func:`.fused_linear.launchers_for`; the design is
resolved before the op is called, so forward and backward run the same one), ``"cuda"``
(:mod:`.cuda`) or ``"torch"`` (:data:`.launchers.TORCH`, also used for dtypes no kernel takes: float64). Arguments are validated by
:func:`duallora_kernels.ops.dual_lora_linear`; these functions assume valid ones.

torch.compile (Inductor too) keeps each op as one opaque node: the graph around it is compiled,
the kernels inside run as written, and nothing breaks the graph. Letting Inductor see the Triton
kernels themselves (``torch.library.triton_op`` with ``wrap_triton`` launches) is not done: it can
be neither traced nor run without a GPU -- under ``TRITON_INTERPRET=1`` torch's ``wrap_triton``
hands back the interpreted kernel unwrapped, and tracing a compiled one needs a GPU target for its
mutation analysis -- so it waits for a GPU session (tests/test_gpu_dropin.py checks the opaque op
under Inductor there).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .launchers import TORCH, GradPlan, Launchers, Layout, grad_buffer_dtype, project, rebuild_bt, stack
from .saved_input import dequantize_rows, quantize_rows

__all__ = ["dual_lora_linear_op", "KERNEL_DTYPES"]

#: Dtypes the Triton and CUDA kernels take (float32 accumulation); others run :data:`.launchers.TORCH`.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _launchers(backend: str, dtype: torch.dtype) -> Launchers:
    if backend == "torch" or dtype not in KERNEL_DTYPES:
        return TORCH
    if backend.startswith("triton:"):
        from .fused_linear import launchers_for

        return launchers_for(backend.split(":", 1)[1])
    from .cuda import cuda_launchers

    return cuda_launchers()


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _rank(t: Tensor | None) -> int:
    return 0 if t is None else t.shape[0]


@torch.library.custom_op("duallora::fused_forward", mutates_args=())
def fused_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], orth_a: Optional[Tensor], orth_b: Optional[Tensor],
    res_a: Optional[Tensor], res_b: Optional[Tensor], frozen_a: Optional[Tensor], frozen_b: Optional[Tensor],
    gate: Optional[Tensor], basis: Optional[Tensor], orth_scale: float, res_scale: float, backend: str,
    store_t: bool, keep_a: bool, x_float8: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kernels = _launchers(backend, x.dtype)
    a, bt, lay = stack(kernels, x, weight, orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, gate, basis,
                       orth_scale, res_scale)
    y, t = kernels.forward(x, weight, bias, a, bt, gate, lay, store_t=store_t and a is not None)
    if t is None:
        t = _empty(x)
    # A is kept rather than rebuilt in backward (two launches with a basis). B^T is kept too by the
    # designs whose backward clears the gradient sums itself; the others rebuild it in the backward's
    # first launch, which also clears the sums (fused_linear_single, "What is saved").
    keep = keep_a and a is not None
    return y, t, a if keep else _empty(x), bt if keep and kernels.keeps_bt else _empty(x)


@fused_forward.register_fake
def _(x, weight, bias, orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, gate, basis, orth_scale, res_scale,
      backend, store_t, keep_a, x_float8):
    n, d = weight.shape
    r = _rank(orth_a) + _rank(res_a) + _rank(frozen_a)
    y = x.new_empty((*x.shape[:-1], n))
    t = x.new_empty((x.numel() // d if d else 0, r)) if store_t and r else _empty(x)
    a = x.new_empty((r, d)) if keep_a and r else _empty(x)
    bt = x.new_empty((r, n)) if keep_a and r and _launchers(backend, x.dtype).keeps_bt else _empty(x)
    return y, t, a, bt


@torch.library.custom_op("duallora::fused_backward", mutates_args=())
def fused_backward(
    dy: Tensor, x: Optional[Tensor], weight: Tensor, t: Tensor, a: Tensor, bt: Tensor, gate: Optional[Tensor],
    basis: Optional[Tensor], orth_a: Optional[Tensor], orth_b: Optional[Tensor], res_a: Optional[Tensor],
    res_b: Optional[Tensor], frozen_a: Optional[Tensor], frozen_b: Optional[Tensor], bias: Optional[Tensor],
    orth_scale: float, res_scale: float, backend: str, needs: list[bool],
) -> list[Tensor]:
    kernels = _launchers(backend, dy.dtype)
    nx, nw, nbias, noa, nob, nra, nrb = needs
    n, d = weight.shape
    r_orth, r_train = _rank(orth_a), _rank(res_a)
    lora = a.numel() > 0
    lay = Layout(a if lora else None, r_orth, r_train, gate, orth_scale, res_scale)
    r = lay.r
    plan = GradPlan(
        need_dx=nx,
        da_orth_end=r_orth if lora and noa else 0, da_res_start=lay.r_res0 if lora and nra else r,
        db_orth_end=r_orth if lora and nob else 0, db_res_start=lay.r_res0 if lora and nrb else r,
        need_dbias=bias is not None and nbias, r=r,
    )
    m = dy.numel() // n if n else 0
    # One buffer for every sum the backward accumulates (dA, dB^T, dbias). Who clears it: the launch
    # that rebuilds B^T (designs that do not keep it), the backward launcher itself (designs that
    # keep B^T, when it runs), else one memset.
    sums = plan.need_da or plan.need_db or plan.need_dbias
    grad = torch.empty(r * d + r * n + n if sums else 1, dtype=grad_buffer_dtype(dy.dtype), device=dy.device)
    runs = bool((plan.need_dx or plan.need_da or plan.need_db) and m)
    rebuilds = lora and not kernels.keeps_bt
    if rebuilds:
        frozen_b = frozen_b if frozen_a is not None and frozen_a.shape[0] else None
        bt = rebuild_bt(kernels, lay, orth_b, frozen_b, res_b, n=n, d=d, dtype=a.dtype, device=a.device,
                        zero=grad if sums else None)
    elif sums and not (kernels.keeps_bt and runs):
        grad.zero_()
    dx = None
    if runs:
        dx = kernels.backward(dy, x, weight, a if lora else None, bt if lora else None, gate, t, lay, plan, grad)
    elif plan.need_dbias and m:
        grad[r * d + r * n:] = dy.reshape(-1, n).sum(0, dtype=grad.dtype)
    out = [_empty(dy) for _ in range(7)]
    x_shape = (*dy.shape[:-1], d)
    if nx:
        out[0] = dy.new_zeros(x_shape) if dx is None else dx.view(x_shape)
    if nw:
        out[1] = (dy.reshape(-1, n).T @ x.reshape(-1, d)).to(weight.dtype)
    want = (bool(plan.da_orth_end), plan.da_res_start < r, bool(plan.db_orth_end), plan.db_res_start < r,
            plan.need_dbias)
    if any(want):
        dtypes = tuple(dy.dtype if p is None else p.dtype for p in (orth_a, res_a, orth_b, res_b, bias))
        g_oa, g_ra, g_ob, g_rb, g_bias = project(kernels)(
            grad[: r * d].view(r, d), grad[r * d: r * d + r * n].view(r, n), grad[r * d + r * n:], basis,
            r_orth=lay.r_orth, r_res0=lay.r_res0, need=want, dtypes=dtypes,
        )
        for i, g in ((2, g_bias), (3, g_oa), (4, g_ob), (5, g_ra), (6, g_rb)):
            if g is not None:
                out[i] = g
    return out


@fused_backward.register_fake
def _(dy, x, weight, t, a, bt, gate, basis, orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, bias, orth_scale,
      res_scale, backend, needs):
    x_like = dy.new_empty((*dy.shape[:-1], weight.shape[1]))
    like = (x_like, weight, bias, orth_a, orth_b, res_a, res_b)
    return [torch.empty_like(p) if need and p is not None else _empty(dy) for need, p in zip(needs, like)]


def _setup_context(ctx, inputs, output):
    (x, weight, bias, orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, gate, basis, orth_scale, res_scale,
     backend, store_t, keep_a, x_float8) = inputs
    _, t, a, bt = output
    ctx.mark_non_differentiable(t, a, bt)
    ctx.set_materialize_grads(False)  # T, A and B^T get no gradient: no zero tensors made for them
    ctx.statics = (orth_scale, res_scale, backend)
    # x only when dA or dW0 will need it: with only the B factors training, the graph keeps T, not x.
    # The bias only when it trains: under autocast it is a low-precision copy, which nothing else would keep
    # (F.linear does not), and backward reads it only for its own gradient.
    need = ctx.needs_input_grad
    keep_x = need[1] or ((need[3] or need[5]) and a.numel() > 0)
    # x_float8 (saved_x="float8"): x kept as e4m3 codes and row scales when only dA reads it (dW0 wants it exact)
    ctx.x_float8, ctx.x_dtype = keep_x and x_float8 and not need[1], x.dtype
    saved_x, x_scale = quantize_rows(x) if ctx.x_float8 else (x if keep_x else None, None)
    ctx.save_for_backward(saved_x, weight, t, a, bt, gate, basis, orth_a, orth_b, res_a, res_b, frozen_a,
                          frozen_b, bias if need[2] else None, x_scale)


def _backward(ctx, dy, _dt, _da, _dbt):
    x, weight, t, a, bt, gate, basis, orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, bias, x_scale = \
        ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:7])
    if dy is None:  # Y took no part in the loss (grads are not materialised, see _setup_context)
        return (None,) * 17
    if ctx.x_float8:
        x = dequantize_rows(x, x_scale, ctx.x_dtype)
    grads = torch.ops.duallora.fused_backward(
        dy, x, weight, t, a, bt, gate, basis, orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, bias, *ctx.statics,
        needs,
    )
    out = [g if need else None for g, need in zip(grads, needs)]
    return (*out, *(None,) * 10)


torch.library.register_autograd("duallora::fused_forward", _backward, setup_context=_setup_context)


def dual_lora_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, orth_a: Tensor | None = None,
    orth_b: Tensor | None = None, res_a: Tensor | None = None, res_b: Tensor | None = None,
    frozen_a: Tensor | None = None, frozen_b: Tensor | None = None, gate: Tensor | None = None,
    basis: Tensor | None = None, orth_scale: float = 1.0, res_scale: float = 1.0, backend: str = "torch",
    design: str = "auto", saved_x: str = "exact",
) -> Tensor:
    """Y of the registered op on validated arguments (``gate`` of shape x.shape[:-1] + (G,), e.g. the
    broadcast view :func:`duallora_kernels.ops.dual_lora_linear` makes; ``basis`` None or with k >= 1
    columns; ``backend`` "torch", "triton" or "cuda"; ``design`` one of
    :data:`.fused_linear.DESIGNS`, for "triton"). Keeps T and A for backward only when a gradient
    will be asked for; x only when dA or dW0 will be, in float8 with ``saved_x="float8"`` when only
    dA will (:mod:`.saved_input`)."""
    if backend == "triton":
        from .fused_linear import resolve_design

        r = _rank(orth_a) + _rank(res_a) + _rank(frozen_a)
        backend = "triton:" + resolve_design(design, n=weight.shape[0], d=weight.shape[1], r=r, dtype=x.dtype,
                                             device=x.device)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and p is not None and p.requires_grad for p in (x, weight, bias, orth_a, orth_b, res_a, res_b)]
    y, _, _, _ = torch.ops.duallora.fused_forward(
        x, weight, bias, orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, gate, basis, float(orth_scale),
        float(res_scale), backend, need[4] or need[6], any(need), saved_x == "float8",
    )
    return y
