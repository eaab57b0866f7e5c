"""What every implementation of the fused DualLoRA op shares: the call's layout, the backward's
plan, the :class:`Launchers` contract a backend fills in, and the torch implementation of it.

A backend (Triton in :mod:`.fused_linear`, CUDA C++ in :mod:`.cuda`, torch here) supplies the two
big passes -- ``forward`` (Y and the saved ``T = X A^T``) and ``backward`` (dX, and the float32
sums dA, dB^T, dbias) -- and optionally the small-matrix steps (``assemble``: the stacked A and
B^T with the memory projections; ``project_grads``: the adapter gradients out of those sums). The
driver that runs them for autograd is :mod:`.registered` (the op as registered with
``torch.library``). :data:`TORCH` computes the same contract with torch ops, in any float dtype:
the CPU path, float64, and the op's backward where no kernel applies. The spec every backend is
tested against stays :func:`.reference.dual_lora_linear_reference` (plain differentiable torch).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ._kernel_utils import pow2_at_least
from .reference import adapter_matrices, column_scales, project_onto, project_out

__all__ = ["Layout", "GradPlan", "Launchers", "TORCH", "stack", "rebuild_bt", "project", "grad_buffer_dtype",
           "rows_in_shape"]


class Layout:
    """Sizes of one call: the stacked adapter (rows: orth, frozen, training residual) and its gate."""

    def __init__(self, a: Tensor | None, r_orth: int, r_train: int, gate: Tensor | None,
                 orth_scale: float, res_scale: float):
        self.r = 0 if a is None else a.shape[0]
        self.r_orth = r_orth
        self.r_res0 = self.r - r_train  # the training residual block is rows r_res0..r
        r_resid = self.r - r_orth
        self.has_gate = gate is not None and r_resid > 0
        self.r_blk = r_resid // gate.shape[-1] if self.has_gate else 1
        self.r_pad = pow2_at_least(self.r)
        self.orth_scale, self.res_scale = orth_scale, res_scale


class GradPlan(NamedTuple):
    """What one backward computes. dA / dB^T rows are accumulated only in [0, *_orth_end) and
    [*_res_start, r): the trainable blocks, never the frozen ones."""

    need_dx: bool
    da_orth_end: int
    da_res_start: int
    db_orth_end: int
    db_res_start: int
    need_dbias: bool
    r: int

    @property
    def need_da(self) -> bool:
        return self.da_orth_end > 0 or self.da_res_start < self.r

    @property
    def need_db(self) -> bool:
        return self.db_orth_end > 0 or self.db_res_start < self.r


class Launchers(NamedTuple):
    """An implementation of the op (Triton in :mod:`.fused_linear`, CUDA in :mod:`.cuda`, torch here),
    run for autograd by :mod:`.registered`.

    ``forward(x, weight, bias, a, bt, gate, lay, store_t) -> (Y (..., n), T (m, r) in x's dtype or None)``;
    ``backward(dy, x, weight, a, bt, gate, t, lay, plan, grad) -> dX (m, d) | None``, adding dA, dB^T
    and dbias into ``grad``, one zeroed float32 buffer (r*d + r*n + n: dA (r, d), dB^T (r, n),
    dbias (n,)), only in the plan's rows. ``gate`` is x.shape[:-1] + (G,) (a broadcast view) or None.
    backward is called only when the plan needs dX, dA or dB, and m > 0.
    ``assemble`` and ``project_grads``: the small-matrix steps (:mod:`.adapter_prep`'s signatures);
    None runs them in torch.

    ``keeps_bt``: the op keeps forward's B^T for backward (instead of rebuilding it there, in the
    launch that also clears ``grad``), and ``backward`` clears ``grad`` itself before adding into it.
    """

    forward: Callable
    backward: Callable
    assemble: Callable | None = None
    project_grads: Callable | None = None
    keeps_bt: bool = False


def grad_buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the backward's gradient sums: float32, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def rows_in_shape(y: Tensor, lead: torch.Size) -> Tensor:
    """Y (m, n), as a launcher made it (fresh, contiguous), given x's leading dims ``lead`` in place.

    ``resize_`` to the same number of elements changes only the sizes: no copy, no device op. A ``view``
    would do the same but hand back a view, and autograd forbids modifying a view that a custom op
    returned, so ``y += b`` -- what nn.Linear's output allows and timm's attention does to its qkv --
    would raise."""
    if not y.is_contiguous():
        raise RuntimeError("a launcher's Y must be contiguous to take x's leading dims in place")
    return y.resize_(*lead, y.shape[-1])


def _assemble_torch(orth_a, orth_b, frozen_a, frozen_b, res_a, res_b, basis, *, d, n, dtype, device,
                    r_orth=0, r_frozen=0, r_res=0, write_a=True, zero=None):
    """:func:`.adapter_prep.assemble` in torch ops."""
    if zero is not None:
        zero.zero_()
    if not write_a:
        bt = torch.cat([b.t() for b in (orth_b, frozen_b, res_b) if b is not None and b.shape[1]], 0)
        return None, bt.to(dtype).contiguous(), r_orth, r_res
    a, b, r_orth, r_res = adapter_matrices(orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, basis)
    return a.to(dtype).contiguous(), b.t().to(dtype).contiguous(), r_orth, r_res


def _fresh(t: Tensor, dtype: torch.dtype) -> Tensor:
    # A tensor of its own (a registered op's outputs may not alias each other or its inputs).
    return t.to(dtype, memory_format=torch.contiguous_format, copy=True)


def _project_grads_torch(da, dbt, dbias, basis, *, r_orth, r_res0, need, dtypes):
    """:func:`.adapter_prep.project_grads` in torch ops."""
    need_oa, need_ra, need_ob, need_rb, need_bias = need
    return (
        _fresh(project_out(da[:r_orth], basis), dtypes[0]) if need_oa else None,
        _fresh(project_onto(da[r_res0:], basis), dtypes[1]) if need_ra else None,
        _fresh(dbt[:r_orth].t(), dtypes[2]) if need_ob else None,
        _fresh(dbt[r_res0:].t(), dtypes[3]) if need_rb else None,
        _fresh(dbias, dtypes[4]) if need_bias else None,
    )


def _scales(lay: Layout, gate: Tensor | None, rows: int, like: Tensor) -> Tensor:
    g = gate.reshape(rows, gate.shape[-1]) if lay.has_gate else None
    return column_scales(g, rows, lay.r_orth, lay.r - lay.r_orth, lay.orth_scale, lay.res_scale, like.dtype,
                         like.device)


def _torch_forward(x, weight, bias, a, bt, gate, lay: Layout, store_t: bool):
    d = weight.shape[1]
    x2 = x.reshape(-1, d)
    y = x2 @ weight.T if bias is None else torch.addmm(bias, x2, weight.T)
    t = None
    if a is not None:
        t = x2 @ a.T
        y = y + (t * _scales(lay, gate, x2.shape[0], t)) @ bt
    return rows_in_shape(y, x.shape[:-1]), (t if store_t else None)


def _torch_backward(dy, x, weight, a, bt, gate, t, lay: Layout, plan: GradPlan, grad: Tensor):
    n, d = weight.shape
    r = lay.r
    dy2 = dy.reshape(-1, n)
    dx = dy2 @ weight if plan.need_dx else None
    if a is not None:
        s = _scales(lay, gate, dy2.shape[0], dy2)
        u = (dy2 @ bt.T) * s
        if plan.need_dx:
            dx = dx + u @ a
        if plan.need_da:
            da = grad[: r * d].view(r, d)
            rows = u.T @ x.reshape(-1, d)
            da[: plan.da_orth_end] = rows[: plan.da_orth_end]
            da[plan.da_res_start:] = rows[plan.da_res_start:]
        if plan.need_db:
            dbt = grad[r * d: r * d + r * n].view(r, n)
            rows = (t * s).T @ dy2
            dbt[: plan.db_orth_end] = rows[: plan.db_orth_end]
            dbt[plan.db_res_start:] = rows[plan.db_res_start:]
    if plan.need_dbias:
        grad[r * d + r * n:] = dy2.sum(0, dtype=grad.dtype)
    return dx


#: The op in torch ops: any float dtype, any device.
TORCH = Launchers(_torch_forward, _torch_backward)


def stack(kernels: Launchers, x: Tensor, weight: Tensor, orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, gate,
          basis, orth_scale, res_scale) -> tuple[Tensor | None, Tensor | None, Layout]:
    """A (r, d) and B^T (r, n), contiguous in x's dtype, formed without autograd, and the call's layout."""
    if orth_a is None and res_a is None and (frozen_a is None or frozen_a.shape[0] == 0):
        return None, None, Layout(None, 0, 0, gate, orth_scale, res_scale)
    if frozen_a is not None and frozen_a.shape[0] == 0:
        frozen_a = frozen_b = None
    n, d = weight.shape
    assemble = kernels.assemble or _assemble_torch
    with torch.no_grad():
        a, bt, r_orth, r_train = assemble(orth_a, orth_b, frozen_a, frozen_b, res_a, res_b, basis,
                                          d=d, n=n, dtype=x.dtype, device=x.device)
    return a, bt, Layout(a, r_orth, r_train, gate, orth_scale, res_scale)


def rebuild_bt(kernels: Launchers, lay: Layout, orth_b, frozen_b, res_b, *, n: int, d: int, dtype: torch.dtype,
               device: torch.device, zero: Tensor | None) -> Tensor:
    """B^T (r, n) again, in backward, from the B factors; clears ``zero`` in the same launch."""
    assemble = kernels.assemble or _assemble_torch
    _, bt, _, _ = assemble(None, orth_b, None, frozen_b, None, res_b, None, d=d, n=n, dtype=dtype, device=device,
                           r_orth=lay.r_orth, r_frozen=lay.r_res0 - lay.r_orth, r_res=lay.r - lay.r_res0,
                           write_a=False, zero=zero)
    return bt


def project(kernels: Launchers):
    """The backend's gradient projection (:func:`.adapter_prep.project_grads` or torch's)."""
    return kernels.project_grads or _project_grads_torch
