"""Fused Triton forward and backward of the DualLoRA linear layer (DESIGN §2).

The op is ``Y = X W0^T + b + ((X A^T) .* S) B^T`` with ``A = [A_o; A_frozen; A_r]`` (r, d),
``B`` (n, r) and the per-row, per-column scale ``S`` (orth_scale on the orthogonal columns,
``res_scale * gate[row, block]`` on the residual ones). ``A`` and ``B`` are stacked in torch
(:func:`.reference.adapter_matrices`: r*d*k flops, negligible), in forward and again in backward
(they are not saved, see "What is saved"), and the gate is read inside the kernels, so ``S``
never exists in memory.

Forward, one kernel: each program owns a (BLOCK_M, BLOCK_N) tile of Y. Its K-loop streams the
X and W0 tiles and, from the same X tile, also accumulates ``T = X A^T`` for its rows; after the
loop it scales T by S, adds ``(T .* S) B^T`` and the bias, and stores Y. T (m, r, unscaled,
accumulated in float32 and stored in x's dtype) is stored by the n-tile-0 programs only, and
only when dB will be needed.

Backward, one kernel: each program owns a (BLOCK_M, BLOCK_D) tile of dX. Its N-loop streams the
dY tiles and accumulates ``dY W0`` and ``dY B`` together; then ``U = (dY B) .* S`` and
``dX = dY W0 + U A``. From the data it already holds it also accumulates, with float32 atomics:
``dA += U^T X_tile`` (the program loads the X tile at the same (rows, d-cols) as its dX tile),
and, in the programs of d-tile 0 only (so each dY tile is counted once), ``dB += dY^T (T .* S)``
and ``dbias += colsum(dY)``. Only the rows/columns of trainable blocks are accumulated: frozen
blocks take part in dX (they must) but get no gradient, and cost no extra read of X or dY.
The memory projection is applied to dA in torch before the gradient leaves the op:
``d orth_a = dA_o (I - M M^T)`` and ``d res_a = dA_r M M^T`` -- the chain rule through the maps
``A_o = C_o (I - M M^T)`` and ``A_r = C_r M M^T`` that the forward uses.

Passes over the large tensors (m x d, m x n, n x d). "Read once" means one streaming pass, as
in any tiled GEMM: a tile of X is loaded by each of the n/BLOCK_N programs of its row block (the
grouped launch order keeps those loads in L2), exactly as cuBLAS's ``X W0^T`` loads it; the
low-rank path adds no load of its own. The small tensors (A, B, gate, bias: r*(d+n) + m*G + n)
are not counted, nor is the torch-side stacking of A and B, which reads C_o, C_r, the frozen
blocks, the B factors and the basis M (d x k) once in forward and once more in backward.

    =========  =============================  =====================================================
    tensor     forward                        backward
    =========  =============================  =====================================================
    X          read 1                         read 1 if orth_a/res_a need grad, else 0
                                              (+1 in torch if W0 requires grad: dW0 = dY^T X)
    W0         read 1                         read 1 if x needs grad, else 0
    Y          written 1 (never read)         --
    dY         --                             read 1 (dX, dA, dB, dbias all come from it)
                                              (+1 in torch if W0 requires grad)
    dX         --                             written 1 if x needs grad, else 0
    T (m x r,  written 1 if B needs grad      read 1 (by the d-tile-0 programs) if B needs grad
    x's dtype)
    =========  =============================  =====================================================

X whose leading dimensions cannot be merged into one strided row index (e.g. a permuted 4-D
view) is copied once before the launch (and once more in backward when dA is needed); 2-D views,
column-strided views and (B, L, d) views with any strides are read in place.

Why T is stored, not recomputed: recomputing ``X A^T`` in backward would need a pass over X,
which the backward only makes when dA is wanted; storing T costs m*r bytes per element of x's
dtype (r << n: a few percent of Y, r/d of x) and saves that pass whenever only the B factors
train. (Not measured on a GPU yet.)

What is saved for backward: the only tensor the op allocates and keeps is T (m x r, x's dtype;
only when dB is needed). Everything else is saved as the caller's own tensor, never as a copy:
x (only when dA or dW0 is needed), W0, the gate as passed (m x G) and C_o, B_o, C_r, B_r, the
frozen blocks and the basis (parameters and buffers in a layer). The stacked A (r x d) and
B^T (r x n) are not saved: backward rebuilds them by the same function of the same tensors, so
they are bit-identical to the forward's and the gradients are exactly those of saving them
(a parameter changed in place in between makes autograd's version check raise, instead of the
backward silently using stale copies). The activation bytes are thus x + T + the gate, i.e. full
fine-tuning's x plus m*(r + G) elements, and less than the unfused PyTorch composition's, which
also keeps its projected A copies and its (x A^T) products.

Design decisions:

* float64 inputs run the PyTorch reference (same function, same gradients): a float64
  ``tl.dot`` has no tensor-core path on Hopper and is not validated across Triton versions, and
  float64 exists here for checking. The kernels cover float32, bfloat16 and float16, always
  accumulating in float32.
* float32 operands use TF32 in ``tl.dot`` only when torch's matmuls may
  (``torch.get_float32_matmul_precision() != "highest"``).
* The rank r is padded to a power of two >= 16 inside the kernels with masks (``tl.dot`` needs
  K >= 16); nothing is padded in memory.
* T is stored in x's dtype (bfloat16/float16 for those inputs, float32 for float32): half the
  bytes of a float32 T, the one saved activation the op allocates. It is rounded once more than
  a float32 T: on store, and then ``T .* S`` is rounded to dY's dtype for the dB ``tl.dot``, as
  it was before. (The CUDA kernel writes a float32 T; its launcher casts it to x's dtype for
  the graph and back for the backward kernel, so both backends keep the same T.) Measured in
  the interpreter against the float64 reference (3 seeds, 5 shapes up to d = 768, k = 192), the
  relative dB error went from <= 3.9e-3 to <= 6.1e-3 in bfloat16 (the torch bf16 reference:
  <= 3.5e-3) and from <= 3.3e-4 to <= 3.8e-4 in float16, against a tolerance of 2e-2; X, dX,
  dA and Y are bit-identical to a float32 T's. A float16 T overflows where |x A^T| > 65504, as
  the unfused composition's float16 ``x A^T`` would.
* The atomics make dA/dB/dbias's float32 summation order run-dependent (differences at float32
  rounding); X, dX, Y and T are deterministic.
* The op is once-differentiable (no double backward); the gate and the basis get no gradient.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._kernel_utils import (autotuning, dot_mode, interpreting, launch, mma, new_output, pow2_at_least, row_offsets,
                            rows_view, size_bucket)
from .reference import adapter_matrices, dual_lora_linear_reference, project_onto, project_out

__all__ = ["dual_lora_linear_triton", "fused_dual_lora_linear", "Launchers", "Layout", "GradPlan", "TRITON"]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _configs(tile_n: str) -> list[triton.Config]:
    """Hopper-sized tiles (BLOCK_M x tile_n x BLOCK_K); one small tile under the interpreter, where
    benchmarking configs would only burn CPU time. With ``DUALLORA_AUTOTUNE=0``
    (:data:`._kernel_utils.AUTOTUNE_ENV`, the compiled tests) one fixed config, 64 x 64 x 32 with
    4 warps and 3 stages: small enough that its pipelined X, W0 and A tiles fit in shared memory
    at every rank the tests use (R_PAD up to 128 in float32: 64 KiB forward, 104 KiB backward,
    compiled for sm_90 by Triton 3.8), which the autotuner would otherwise ensure by dropping the
    configs that do not fit."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, tile_n: 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    if not autotuning():
        return [triton.Config({"BLOCK_M": 64, tile_n: 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3)]
    shapes = [  # (BLOCK_M, tile_n, BLOCK_K, num_warps, num_stages)
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 4, 5),
    ]
    return [
        triton.Config({"BLOCK_M": bm, tile_n: bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


@triton.jit
def _tile_ids(pid, m, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Row blocks are visited GROUP_M at a time, column tiles inner: the programs that share an
    # X (or dY) row block then run close together and find it in L2.
    tiles_n = tl.cdiv(n, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tl.cdiv(m, BLOCK_M) - first_m, GROUP_M)
    in_group = pid % per_group
    return first_m + in_group % group_rows, in_group // group_rows


@triton.jit
def _scales(gate_ptr, stride_gm, stride_gg, rows, ranks, m, r, r_orth, r_blk, orth_scale, res_scale,
            HAS_GATE: tl.constexpr):
    # S for (rows x padded ranks), float32. Padding columns get 0 so they contribute nothing
    # even if a padded operand were not masked.
    is_orth = ranks < r_orth
    is_res = (ranks >= r_orth) & (ranks < r)
    if HAS_GATE:
        block = tl.maximum(ranks - r_orth, 0) // r_blk
        g_ptrs = gate_ptr + rows.to(tl.int64)[:, None] * stride_gm + block[None, :] * stride_gg
        res = res_scale * tl.load(g_ptrs, mask=(rows < m)[:, None] & is_res[None, :], other=0.0).to(tl.float32)
    else:
        res = tl.zeros((rows.shape[0], ranks.shape[0]), tl.float32) + res_scale
    return tl.where(is_orth[None, :], orth_scale, tl.where(is_res[None, :], res, 0.0))


@triton.autotune(configs=_configs("BLOCK_N"), key=["m_bucket", "n", "d", "R_PAD"])
@triton.jit
def _fused_forward_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, bt_ptr, gate_ptr, y_ptr, t_ptr,
    m, n, d, r, r_orth, r_blk, orth_scale, res_scale,
    x_rows_per_batch, stride_xb, stride_xm, stride_xk,
    stride_wn, stride_wk, stride_gm, stride_gg, m_bucket,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_GATE: tl.constexpr, STORE_T: tl.constexpr,
    R_PAD: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # a: A (r, d) row-major; bt: B^T (r, n) row-major, so both are read along their long side
    # (contiguous, vectorised, and pipelined by the compiler).
    pid_m, pid_n = _tile_ids(tl.program_id(0), m, n, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    row_ok = rows < m
    col_ok = cols < n
    rank_ok = ranks < r
    x_rows = x_ptr + row_offsets(rows, x_rows_per_batch, stride_xb, stride_xm)

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    t = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < d
        x = tl.load(x_rows[:, None] + ks[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                      mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = mma(x, w_t, acc, DOT_MODE)
        if HAS_LORA:
            # The same X tile feeds the low-rank path: this is what saves a second pass over X.
            a_t = tl.load(a_ptr + ranks[None, :] * d + ks[:, None], mask=rank_ok[None, :] & k_ok[:, None], other=0.0)
            t = mma(x, a_t, t, DOT_MODE)

    if HAS_LORA:
        if STORE_T:
            if pid_n == 0:
                t_ptrs = t_ptr + rows.to(tl.int64)[:, None] * r + ranks[None, :]
                tl.store(t_ptrs, t.to(t_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])
        ts = t * _scales(gate_ptr, stride_gm, stride_gg, rows, ranks, m, r, r_orth, r_blk, orth_scale, res_scale,
                         HAS_GATE)
        b_t = tl.load(bt_ptr + ranks[:, None] * n + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(ts.to(b_t.dtype), b_t, acc, DOT_MODE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * n + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_configs("BLOCK_D"), key=["m_bucket", "n", "d", "R_PAD"],
                 reset_to_zero=["da_ptr", "dbt_ptr", "dbias_ptr"])
@triton.jit
def _fused_backward_kernel(
    dy_ptr, w_ptr, a_ptr, bt_ptr, gate_ptr, t_ptr, x_ptr,
    dx_ptr, da_ptr, dbt_ptr, dbias_ptr,
    m, n, d, r, r_orth, r_blk, orth_scale, res_scale,
    da_orth_end, da_res_start, db_orth_end, db_res_start,
    dy_rows_per_batch, stride_dyb, stride_dym, stride_dyn,
    x_rows_per_batch, stride_xb, stride_xm, stride_xk,
    stride_wn, stride_wk, stride_gm, stride_gg, m_bucket,
    HAS_LORA: tl.constexpr, HAS_GATE: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr,
    NEED_DB: tl.constexpr, NEED_DBIAS: tl.constexpr,
    R_PAD: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # BLOCK_K is the N-loop's step (the reduction dimension of dY W0 and dY B). dA (r, d) and
    # dB^T (r, n) are float32 buffers that the programs add into.
    pid_m, pid_d = _tile_ids(tl.program_id(0), m, d, BLOCK_M, BLOCK_D, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ranks = tl.arange(0, R_PAD)
    row_ok = rows < m
    col_ok = cols < d
    rank_ok = ranks < r
    dy_rows = dy_ptr + row_offsets(rows, dy_rows_per_batch, stride_dyb, stride_dym)
    # Only d-tile 0 adds into dB and dbias, so every dY tile is counted exactly once.
    owns_db = pid_d == 0

    if HAS_LORA:
        s = _scales(gate_ptr, stride_gm, stride_gg, rows, ranks, m, r, r_orth, r_blk, orth_scale, res_scale, HAS_GATE)
    if NEED_DB:
        db_ranks = (ranks < db_orth_end) | ((ranks >= db_res_start) & rank_ok)
        # Only the d-tile-0 programs use T; the others' masked-off load touches no memory.
        t_mask = row_ok[:, None] & rank_ok[None, :] & owns_db
        t = tl.load(t_ptr + rows.to(tl.int64)[:, None] * r + ranks[None, :], mask=t_mask, other=0.0)
        ts = t.to(tl.float32) * s

    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    u = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    for n0 in range(0, n, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        n_ok = ns < n
        dy = tl.load(dy_rows[:, None] + ns[None, :] * stride_dyn, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        if NEED_DX:
            w = tl.load(w_ptr + ns[:, None] * stride_wn + cols[None, :] * stride_wk,
                        mask=n_ok[:, None] & col_ok[None, :], other=0.0)
            acc = mma(dy, w, acc, DOT_MODE)
        if HAS_LORA:
            b = tl.load(bt_ptr + ranks[None, :] * n + ns[:, None], mask=rank_ok[None, :] & n_ok[:, None], other=0.0)
            u = mma(dy, b, u, DOT_MODE)
        if owns_db:
            if NEED_DB:
                dbt = mma(tl.trans(ts.to(dy.dtype)), dy, tl.zeros((R_PAD, BLOCK_K), tl.float32), DOT_MODE)
                tl.atomic_add(dbt_ptr + ranks[:, None] * n + ns[None, :], dbt, mask=db_ranks[:, None] & n_ok[None, :])
            if NEED_DBIAS:
                tl.atomic_add(dbias_ptr + ns, tl.sum(dy.to(tl.float32), axis=0), mask=n_ok)

    if HAS_LORA:
        u = u * s
        if NEED_DX:
            a = tl.load(a_ptr + ranks[:, None] * d + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            acc = mma(u.to(a.dtype), a, acc, DOT_MODE)
        if NEED_DA:
            # The X tile at this program's (rows, cols) gives U^T X for these d-columns: dA comes
            # out of the backward pass without a pass of its own over dY.
            x_rows = x_ptr + row_offsets(rows, x_rows_per_batch, stride_xb, stride_xm)
            x = tl.load(x_rows[:, None] + cols[None, :] * stride_xk, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            da = mma(tl.trans(u.to(x.dtype)), x, tl.zeros((R_PAD, BLOCK_D), tl.float32), DOT_MODE)
            da_ranks = (ranks < da_orth_end) | ((ranks >= da_res_start) & rank_ok)
            tl.atomic_add(da_ptr + ranks[:, None] * d + cols[None, :], da, mask=da_ranks[:, None] & col_ok[None, :])
    if NEED_DX:
        dx_ptrs = dx_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :]
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


class Layout:
    """Sizes of one call: the stacked adapter (rows: orth, frozen, training residual) and its gate."""

    def __init__(self, a: Tensor | None, r_orth: int, r_train: int, gate: Tensor | None,
                 orth_scale: float, res_scale: float):
        self.r = 0 if a is None else a.shape[0]
        self.r_orth = r_orth
        self.r_res0 = self.r - r_train  # the training residual block is rows r_res0..r
        r_resid = self.r - r_orth
        self.has_gate = gate is not None and r_resid > 0
        self.r_blk = r_resid // gate.shape[1] if self.has_gate else 1
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
    """A kernel implementation of the op (Triton here, CUDA in :mod:`.cuda`), for :class:`_DualLoRALinear`.

    ``forward(x, weight, bias, a, bt, gate, lay, store_t) -> (Y (..., n), T (m, r) in x's dtype or None)``;
    ``backward(dy, x, weight, a, bt, gate, t, lay, plan) -> (dX (m, d) | None, dA (r, d) | None,
    dB^T (r, n) | None, dbias (n,) | None)``, the last three float32 and filled only in the
    plan's rows. backward is called only when the plan needs dX, dA or dB, and m > 0.
    """

    forward: Callable
    backward: Callable


def _triton_forward(x, weight, bias, a, bt, gate, lay: Layout, store_t: bool):
    n, d = weight.shape
    xr = rows_view(x)
    m = xr.m
    y = new_output((m, n), x.dtype, x.device)
    has_lora = a is not None
    t = new_output((m, lay.r), x.dtype, x.device) if has_lora and store_t else None
    if m and n:
        g, sgm, sgg = _gate_args(lay, gate, x)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        launch(
            _fused_forward_kernel, grid,
            xr.t, weight, x if bias is None else bias, a if has_lora else x, bt if has_lora else x, g, y,
            y if t is None else t,
            m, n, d, lay.r, lay.r_orth, lay.r_blk, lay.orth_scale, lay.res_scale,
            *xr.addressing, weight.stride(0), weight.stride(1), sgm, sgg, size_bucket(m),
            HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_GATE=lay.has_gate, STORE_T=t is not None,
            R_PAD=lay.r_pad, DOT_MODE=dot_mode(x.dtype),
        )
    return y.view(*x.shape[:-1], n), t


def _triton_backward(dy, x, weight, a, bt, gate, t, lay: Layout, plan: GradPlan):
    n, d = weight.shape
    dyr = rows_view(dy)
    m, dev = dyr.m, dy.device
    dx = new_output((m, d), dy.dtype, dev) if plan.need_dx else None
    da = torch.zeros((lay.r, d), dtype=torch.float32, device=dev) if plan.need_da else None
    dbt = torch.zeros((lay.r, n), dtype=torch.float32, device=dev) if plan.need_db else None
    dbias = torch.zeros((n,), dtype=torch.float32, device=dev) if plan.need_dbias else None
    has_lora = a is not None
    xr = rows_view(x) if plan.need_da else dyr  # dyr: a stand-in that NEED_DA=False never reads
    g, sgm, sgg = _gate_args(lay, gate, dy)
    unused = torch.zeros(1, dtype=torch.float32, device=dev)  # for the buffers a flag turns off
    # Without dX or dA there is nothing per d-tile: one column of programs does dB/dbias.
    d_span = d if (plan.need_dx or plan.need_da) else 1
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(d_span, meta["BLOCK_D"]),)  # noqa: E731
    launch(
        _fused_backward_kernel, grid,
        dyr.t, weight, a if has_lora else unused, bt if has_lora else unused, g, unused if t is None else t, xr.t,
        *(unused if buf is None else buf for buf in (dx, da, dbt, dbias)),
        m, n, d, lay.r, lay.r_orth, lay.r_blk, lay.orth_scale, lay.res_scale,
        plan.da_orth_end, plan.da_res_start, plan.db_orth_end, plan.db_res_start,
        *dyr.addressing, *xr.addressing, weight.stride(0), weight.stride(1), sgm, sgg, size_bucket(m),
        HAS_LORA=has_lora, HAS_GATE=lay.has_gate, NEED_DX=plan.need_dx, NEED_DA=plan.need_da,
        NEED_DB=plan.need_db, NEED_DBIAS=plan.need_dbias, R_PAD=lay.r_pad, DOT_MODE=dot_mode(dy.dtype),
    )
    return dx, da, dbt, dbias


def _gate_args(lay: Layout, gate: Tensor | None, like: Tensor) -> tuple[Tensor, int, int]:
    if lay.has_gate:
        return gate, gate.stride(0), gate.stride(1)
    return like, 0, 0  # never read: HAS_GATE is off


TRITON = Launchers(_triton_forward, _triton_backward)


def _stack(orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, gate, basis, orth_scale, res_scale):
    """A (r, d) and B^T (r, n), contiguous, formed without autograd, and the call's layout."""
    with torch.no_grad():
        a, b, r_orth, r_train = adapter_matrices(orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, basis)
        bt = None
        if a is not None:
            a, bt = a.contiguous(), b.t().contiguous()
    return a, bt, Layout(a, r_orth, r_train, gate, orth_scale, res_scale)


class _DualLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels: Launchers, x, weight, bias, orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, gate,
                basis, orth_scale, res_scale):
        adapters = (orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, gate, basis)
        a, bt, lay = _stack(*adapters, orth_scale, res_scale)
        need = ctx.needs_input_grad  # offset by one: kernels comes first
        need_a = a is not None and (need[4] or need[6])
        need_b = a is not None and (need[5] or need[7])
        y, t = kernels.forward(x, weight, bias, a, bt, gate, lay, store_t=need_b)
        ctx.kernels, ctx.lay, ctx.x_shape, ctx.has_bias = kernels, lay, x.shape, bias is not None
        ctx.scales = orth_scale, res_scale
        # Not a and bt: they are fresh (r, d) + (r, n) copies, rebuilt in backward from the tensors
        # the caller holds anyway (parameters, buffers; the gate as passed), so that the graph keeps
        # only x and T alive (see "What is saved" in the module docstring).
        ctx.save_for_backward(x if need_a or need[2] else None, weight, t, *adapters)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, t, *adapters = ctx.saved_tensors
        gate, basis = adapters[-2:]
        lay: Layout = ctx.lay
        _, nx, nw, nbias, noa, nob, nra, nrb = ctx.needs_input_grad[:8]
        n, d = weight.shape
        lora = lay.r > 0
        r = lay.r
        plan = GradPlan(
            need_dx=nx,
            da_orth_end=lay.r_orth if lora and noa else 0, da_res_start=lay.r_res0 if lora and nra else r,
            db_orth_end=lay.r_orth if lora and nob else 0, db_res_start=lay.r_res0 if lora and nrb else r,
            need_dbias=ctx.has_bias and nbias, r=r,
        )
        m = dy.numel() // n if n else 0
        dx = da = dbt = dbias = None
        if (plan.need_dx or plan.need_da or plan.need_db) and m:
            # The same function of the same tensors as in forward: bit-identical A and B^T.
            a, bt, _ = _stack(*adapters, *ctx.scales)
            dx, da, dbt, dbias = ctx.kernels.backward(dy, x, weight, a, bt, gate, t, lay, plan)
        elif plan.need_dbias:
            dbias = dy.reshape(-1, n).sum(0, dtype=torch.float32)
        if m == 0:  # no rows, no launch: the gradients are zeros
            f32 = dict(dtype=torch.float32, device=dy.device)
            dx = dy.new_zeros((0, d)) if plan.need_dx else None
            da = torch.zeros((r, d), **f32) if plan.need_da else None
            dbt = torch.zeros((r, n), **f32) if plan.need_db else None

        dtype = dy.dtype
        g_x = dx.view(ctx.x_shape) if plan.need_dx else None
        g_w = (dy.reshape(-1, n).T @ x.reshape(-1, d)).to(dtype) if nw else None
        g_bias = dbias.to(dtype) if plan.need_dbias else None
        # The chain rule through A_o = C_o (I - M M^T) and A_r = C_r M M^T: project dA.
        g_oa = project_out(da[: lay.r_orth], basis).to(dtype) if plan.da_orth_end else None
        g_ra = project_onto(da[lay.r_res0:], basis).to(dtype) if plan.da_res_start < r else None
        g_ob = dbt[: lay.r_orth].t().to(dtype).contiguous() if plan.db_orth_end else None
        g_rb = dbt[lay.r_res0:].t().to(dtype).contiguous() if plan.db_res_start < r else None
        return None, g_x, g_w, g_bias, g_oa, g_ob, g_ra, g_rb, None, None, None, None, None, None


def fused_dual_lora_linear(kernels: Launchers, x: Tensor, weight: Tensor, bias: Tensor | None, **adapters) -> Tensor:
    """Run the op with ``kernels`` (the keyword arguments of :func:`dual_lora_linear_triton`);
    float64 and other non-kernel dtypes run the reference."""
    if x.dtype not in KERNEL_DTYPES:
        return dual_lora_linear_reference(x, weight, bias, **adapters)
    a_kw = {k: adapters.get(k) for k in ("orth_a", "orth_b", "res_a", "res_b", "frozen_a", "frozen_b", "gate", "basis")}
    orth_scale, res_scale = float(adapters.get("orth_scale", 1.0)), float(adapters.get("res_scale", 1.0))
    params = (x, weight, bias, a_kw["orth_a"], a_kw["orth_b"], a_kw["res_a"], a_kw["res_b"])
    if not (torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)):
        # Inference: no autograd node, and no T kept for a backward that will not come.
        a, bt, lay = _stack(*a_kw.values(), orth_scale, res_scale)
        return kernels.forward(x, weight, bias, a, bt, a_kw["gate"], lay, store_t=False)[0]
    return _DualLoRALinear.apply(kernels, x, weight, bias, *a_kw.values(), orth_scale, res_scale)


def dual_lora_linear_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    orth_a: Tensor | None = None,
    orth_b: Tensor | None = None,
    res_a: Tensor | None = None,
    res_b: Tensor | None = None,
    frozen_a: Tensor | None = None,
    frozen_b: Tensor | None = None,
    gate: Tensor | None = None,
    basis: Tensor | None = None,
    orth_scale: float = 1.0,
    res_scale: float = 1.0,
) -> Tensor:
    """The fused Triton implementation of :func:`.reference.dual_lora_linear_reference`.

    Same arguments and result (validated by :func:`duallora_kernels.ops.dual_lora_linear`;
    ``gate`` is (m, G) or None). float64 inputs run the reference (see the module docstring).
    """
    return fused_dual_lora_linear(
        TRITON, x, weight, bias, orth_a=orth_a, orth_b=orth_b, res_a=res_a, res_b=res_b, frozen_a=frozen_a,
        frozen_b=frozen_b, gate=gate, basis=basis, orth_scale=orth_scale, res_scale=res_scale,
    )
