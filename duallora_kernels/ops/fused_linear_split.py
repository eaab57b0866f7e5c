"""The "split" design of the fused DualLoRA linear (:mod:`.fused_linear`): the small products run in
skinny memory-bound passes first, so the big product's main loop is a plain GEMM whose only
addition is a K-extension.

Forward, two kernels (after the adapter assembly of :mod:`.adapter_prep`)::

    S = (X A^T) .* scale                     _lowrank_forward_kernel: one program per row block,
                                             a loop over d; S (m x r) in x's dtype
    Y = [X | S] [W0 | B]^T + b               _gemm_forward_kernel: the d-loop of X W0^T, then
                                             ceil(r / BLOCK_K) more steps that read S and B^T

Backward, two kernels::

    U = (dY B) .* scale                      _lowrank_backward_kernel: one program per row block,
                                             a loop over n; U (m x r) in dY's dtype. Its programs
                                             also clear the float32 gradient sums (no memset launch)
    dX = [dY | U] [W0 ; A]                   _gemm_backward_kernel: the n-loop of dY W0, then the
                                             K-extension that reads U and A; after dX is stored,
    dA += U_rows^T X[rows, cols]             the program's X tile gives dA for its columns, and
    dB^T += S_rows^T dY_rows, dbias          a loop over its share of the row block's dY (an L2 hit:
                                             the main loop just streamed it) gives dB and dbias

No accumulator lives beside the output tile: the main loops hold one (BLOCK_M x BLOCK_N) tile,
as a plain GEMM's do, so the tiles, K-steps and pipelines of the arch's fastest matrix products
fit (fused_linear_tiles.py). The price is one more read of X in forward and of dY in backward,
against the single design's recomputation of ``X A^T`` per n-tile and ``dY B`` per d-tile
(:mod:`.fused_linear` weighs the two). B^T is assembled once in forward and kept for backward.

S is saved for dB instead of the single design's unscaled T: ``dB^T = S^T dY`` needs exactly the
scaled product, rounded once to x's dtype. The frozen blocks take part in Y and dX; their rows of
dA and dB are never accumulated.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import adapter_prep
from ._kernel_utils import dot_mode, launch, new_output, rows_view, size_bucket
from ._triton_functions import mma, row_offsets
from .fused_linear_parts import gate_args, load_rows, load_w0, scales, tile_ids
from .fused_linear_tiles import configs, pruner, rank_chunk
from .launchers import GradPlan, Launchers, Layout

__all__ = ["TRITON_SPLIT", "split_forward", "split_backward", "lowrank_forward", "lowrank_backward"]


@triton.autotune(configs=configs("lowrank_forward"), key=["m_bucket", "d", "R_PAD"],
                 prune_configs_by={"early_config_prune": pruner("lowrank_forward")})
@triton.jit
def _lowrank_forward_kernel(
    x_ptr, a_ptr, gate_ptr, s_ptr,
    m, d, r, r_orth, r_blk, orth_scale, res_scale,
    x_rows_per_batch, stride_xb, stride_xm, stride_xk, g_rows_per_batch, stride_gb, stride_gm, stride_gg, m_bucket,
    HAS_GATE: tl.constexpr, R_PAD: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # S[rows] = (X[rows] A^T) .* scale: A (r, d) row-major is read along d, as X is.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    row_ok = rows < m
    rank_ok = ranks < r
    x_rows = x_ptr + row_offsets(rows, x_rows_per_batch, stride_xb, stride_xm)
    t = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < d
        x = load_rows(x_rows, ks, stride_xk, row_ok, k_ok)
        a_t = tl.load(a_ptr + ranks[None, :] * d + ks[:, None], mask=rank_ok[None, :] & k_ok[:, None], other=0.0)
        t = mma(x, a_t, t, DOT_MODE)
    s = t * scales(gate_ptr, g_rows_per_batch, stride_gb, stride_gm, stride_gg, rows, ranks, m, r, r_orth, r_blk,
                   orth_scale, res_scale, HAS_GATE)
    tl.store(s_ptr + rows.to(tl.int64)[:, None] * r + ranks[None, :], s.to(s_ptr.dtype.element_ty),
             mask=row_ok[:, None] & rank_ok[None, :])


@triton.autotune(configs=configs("gemm_forward"), key=["m_bucket", "n", "d", "R_PAD"],
                 prune_configs_by={"early_config_prune": pruner("gemm_forward")})
@triton.jit
def _gemm_forward_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, bt_ptr, y_ptr,
    m, n, d, r, x_rows_per_batch, stride_xb, stride_xm, stride_xk, stride_wn, stride_wk, m_bucket,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Y = [X | S] [W0 | B]^T + b: one accumulator; S (m, r) and B^T (r, n) are the K-extension.
    pid_m, pid_n = tile_ids(tl.program_id(0), m, n, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    x_rows = x_ptr + row_offsets(rows, x_rows_per_batch, stride_xb, stride_xm)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < d
        x = load_rows(x_rows, ks, stride_xk, row_ok, k_ok)
        w_t = load_w0(w_ptr, cols[None, :], ks[:, None], stride_wn, stride_wk, col_ok[None, :], k_ok[:, None])
        acc = mma(x, w_t, acc, DOT_MODE)
    if HAS_LORA:
        s_rows = s_ptr + rows.to(tl.int64) * r
        for k0 in range(0, r, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < r
            s = tl.load(s_rows[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b_t = tl.load(bt_ptr + ks[:, None] * n + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = mma(s, b_t, acc, DOT_MODE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * n + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=configs("lowrank_backward"), key=["m_bucket", "n", "R_PAD"],
                 prune_configs_by={"early_config_prune": pruner("lowrank_backward")})
@triton.jit
def _lowrank_backward_kernel(
    dy_ptr, bt_ptr, gate_ptr, u_ptr, zero_ptr, zero_numel,
    m, n, r, r_orth, r_blk, orth_scale, res_scale,
    dy_rows_per_batch, stride_dyb, stride_dym, stride_dyn, g_rows_per_batch, stride_gb, stride_gm, stride_gg,
    m_bucket,
    HAS_GATE: tl.constexpr, ZERO: tl.constexpr, R_PAD: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # U[rows] = (dY[rows] B) .* scale, B read as B^T (r, n) along n. With ZERO, the programs also
    # clear the float32 gradient sums that the next kernel adds into: that memset costs no launch.
    pid = tl.program_id(0)
    if ZERO:
        share = tl.cdiv(zero_numel, tl.num_programs(0))
        stop = tl.minimum((pid + 1) * share, zero_numel)
        for z0 in range(pid * share, stop, 1024):
            zs = z0 + tl.arange(0, 1024)
            tl.store(zero_ptr + zs, tl.zeros((1024,), tl.float32), mask=zs < stop)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    row_ok = rows < m
    rank_ok = ranks < r
    dy_rows = dy_ptr + row_offsets(rows, dy_rows_per_batch, stride_dyb, stride_dym)
    u = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    for n0 in range(0, n, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        n_ok = ns < n
        dy = load_rows(dy_rows, ns, stride_dyn, row_ok, n_ok)
        b = tl.load(bt_ptr + ranks[None, :] * n + ns[:, None], mask=rank_ok[None, :] & n_ok[:, None], other=0.0)
        u = mma(dy, b, u, DOT_MODE)
    u = u * scales(gate_ptr, g_rows_per_batch, stride_gb, stride_gm, stride_gg, rows, ranks, m, r, r_orth, r_blk,
                   orth_scale, res_scale, HAS_GATE)
    tl.store(u_ptr + rows.to(tl.int64)[:, None] * r + ranks[None, :], u.to(u_ptr.dtype.element_ty),
             mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def backward_epilogue(
    dy_rows, stride_dyn, x_ptr, x_rows_per_batch, stride_xb, stride_xm, stride_xk, u_ptr, s_ptr, grad_ptr,
    rows, cols, pid_d, tiles_d, m, n, d, r, da_orth_end, da_res_start, db_orth_end, db_res_start,
    NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, NEED_DBIAS: tl.constexpr,
    R_PAD: tl.constexpr, RANK_CHUNK: tl.constexpr, DOT_MODE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The reductions over rows that the dX programs also do, with float32 atomics into ``grad``
    (dA (r, d), then dB^T (r, n), then dbias (n,)), RANK_CHUNK ranks at a time (a (RANK_CHUNK x
    BLOCK) product instead of an (R_PAD x BLOCK) one beside the freed dX tile; a loop, not unrolled:
    unrolled, the chunks' loads were hoisted together and 128x128 tiles spilled at R_PAD 256 on sm_86):

    * dA[:, cols] += U[rows]^T X[rows, cols]: the X tile at the program's own (rows, cols);
    * dB^T += S[rows]^T dY[rows, chunk] and dbias += colsum(dY[rows, chunk]) for the n-chunks dealt
      to this program (chunk j to d-tile j mod tiles_d): each dY tile counted once, the work spread
      over the row block's programs, the dY rows an L2 hit after the main loop streamed them.

    Only the trainable rows (orthogonal [0, *_orth_end), training residual [*_res_start, r)) are
    accumulated. ``sem="relaxed"``: plain adds whose order does not matter, without acq_rel's fence.
    """
    row_ok = rows < m
    col_ok = cols < d
    rows64 = rows.to(tl.int64)
    if NEED_DA:
        x_rows = x_ptr + row_offsets(rows, x_rows_per_batch, stride_xb, stride_xm)
        x = load_rows(x_rows, cols, stride_xk, row_ok, col_ok)
        for c0 in range(0, R_PAD, RANK_CHUNK):
            cr = c0 + tl.arange(0, RANK_CHUNK)
            u = tl.load(u_ptr + rows64[:, None] * r + cr[None, :], mask=row_ok[:, None] & (cr < r)[None, :],
                        other=0.0)
            da = mma(tl.trans(u), x, tl.zeros((RANK_CHUNK, cols.shape[0]), tl.float32), DOT_MODE)
            keep = (cr < da_orth_end) | ((cr >= da_res_start) & (cr < r))
            tl.atomic_add(grad_ptr + cr[:, None] * d + cols[None, :], da, mask=keep[:, None] & col_ok[None, :],
                          sem="relaxed")
    if NEED_DB or NEED_DBIAS:
        dbt_ptr = grad_ptr + r * d
        dbias_ptr = grad_ptr + r * d + r * n
        for c0 in range(0, R_PAD, RANK_CHUNK):
            cr = c0 + tl.arange(0, RANK_CHUNK)
            keep = (cr < db_orth_end) | ((cr >= db_res_start) & (cr < r))
            if NEED_DB:
                s = tl.load(s_ptr + rows64[:, None] * r + cr[None, :], mask=row_ok[:, None] & (cr < r)[None, :],
                            other=0.0)
            for n0 in range(pid_d * BLOCK_K, n, tiles_d * BLOCK_K):
                ns = n0 + tl.arange(0, BLOCK_K)
                n_ok = ns < n
                dy = load_rows(dy_rows, ns, stride_dyn, row_ok, n_ok)
                if NEED_DB:
                    dbt = mma(tl.trans(s), dy, tl.zeros((RANK_CHUNK, BLOCK_K), tl.float32), DOT_MODE)
                    tl.atomic_add(dbt_ptr + cr[:, None] * n + ns[None, :], dbt, mask=keep[:, None] & n_ok[None, :],
                                  sem="relaxed")
                if NEED_DBIAS and c0 == 0:
                    tl.atomic_add(dbias_ptr + ns, tl.sum(dy.to(tl.float32), axis=0), mask=n_ok, sem="relaxed")


@triton.autotune(configs=configs("gemm_backward"), key=["m_bucket", "n", "d", "R_PAD"],
                 prune_configs_by={"early_config_prune": pruner("gemm_backward")}, reset_to_zero=["grad_ptr"])
@triton.jit
def _gemm_backward_kernel(
    dy_ptr, w_ptr, u_ptr, a_ptr, s_ptr, x_ptr, dx_ptr, grad_ptr,
    m, n, d, r, d_span, da_orth_end, da_res_start, db_orth_end, db_res_start,
    dy_rows_per_batch, stride_dyb, stride_dym, stride_dyn, x_rows_per_batch, stride_xb, stride_xm, stride_xk,
    stride_wn, stride_wk, m_bucket,
    HAS_LORA: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr,
    NEED_DBIAS: tl.constexpr, R_PAD: tl.constexpr, RANK_CHUNK: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # dX = [dY | U] [W0 ; A]: one accumulator; U (m, r) and A (r, d) are the K-extension. BLOCK_K
    # steps the n-loop. d_span: d, or 1 when neither dX nor dA is wanted (one column of programs
    # then does dB/dbias).
    pid_m, pid_d = tile_ids(tl.program_id(0), m, d_span, BLOCK_M, BLOCK_D, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < m
    col_ok = cols < d
    dy_rows = dy_ptr + row_offsets(rows, dy_rows_per_batch, stride_dyb, stride_dym)
    if NEED_DX:
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for n0 in range(0, n, BLOCK_K):
            ns = n0 + tl.arange(0, BLOCK_K)
            n_ok = ns < n
            dy = load_rows(dy_rows, ns, stride_dyn, row_ok, n_ok)
            w = load_w0(w_ptr, ns[:, None], cols[None, :], stride_wn, stride_wk, n_ok[:, None], col_ok[None, :])
            acc = mma(dy, w, acc, DOT_MODE)
        if HAS_LORA:
            u_rows = u_ptr + rows.to(tl.int64) * r
            for k0 in range(0, r, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < r
                u = tl.load(u_rows[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                a = tl.load(a_ptr + ks[:, None] * d + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = mma(u, a, acc, DOT_MODE)
        tl.store(dx_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
    backward_epilogue(dy_rows, stride_dyn, x_ptr, x_rows_per_batch, stride_xb, stride_xm, stride_xk, u_ptr, s_ptr,
                      grad_ptr, rows, cols, pid_d, tl.cdiv(d_span, BLOCK_D), m, n, d, r, da_orth_end, da_res_start,
                      db_orth_end, db_res_start, NEED_DA, NEED_DB, NEED_DBIAS, R_PAD, RANK_CHUNK, DOT_MODE, BLOCK_K)


# ---------------------------------------------------------------------------------- launchers
def lowrank_forward(x, a: Tensor, gate, lay: Layout) -> Tensor:
    """S = (x A^T) .* scale, (m, r) in x's dtype (one launch; m >= 1)."""
    xr = rows_view(x)
    s = new_output((xr.m, lay.r), x.dtype, x.device)
    g, *g_addr = gate_args(lay, gate, x)
    launch(
        _lowrank_forward_kernel, lambda meta: (triton.cdiv(xr.m, meta["BLOCK_M"]),),
        xr.t, a, g, s, xr.m, a.shape[1], lay.r, lay.r_orth, lay.r_blk, lay.orth_scale, lay.res_scale,
        *xr.addressing, *g_addr, size_bucket(xr.m),
        HAS_GATE=lay.has_gate, R_PAD=lay.r_pad, DOT_MODE=dot_mode(x.dtype),
    )
    return s


def lowrank_backward(dy, bt: Tensor, gate, lay: Layout, zero: Tensor | None) -> Tensor:
    """U = (dY B) .* scale, (m, r) in dY's dtype (one launch; m >= 1), clearing ``zero`` on the way."""
    dyr = rows_view(dy)
    u = new_output((dyr.m, lay.r), dy.dtype, dy.device)
    g, *g_addr = gate_args(lay, gate, dy)
    launch(
        _lowrank_backward_kernel, lambda meta: (triton.cdiv(dyr.m, meta["BLOCK_M"]),),
        dyr.t, bt, g, u, u if zero is None else zero, 0 if zero is None else zero.numel(),
        dyr.m, bt.shape[1], lay.r, lay.r_orth, lay.r_blk, lay.orth_scale, lay.res_scale,
        *dyr.addressing, *g_addr, size_bucket(dyr.m),
        HAS_GATE=lay.has_gate, ZERO=zero is not None, R_PAD=lay.r_pad, DOT_MODE=dot_mode(dy.dtype),
    )
    return u


def _split_forward_with(gemm):
    def forward(x, weight, bias, a, bt, gate, lay: Layout, store_t: bool):
        """Y (..., n) and S (m, r) (None unless ``store_t``)."""
        n, d = weight.shape
        xr = rows_view(x)
        y = new_output((*x.shape[:-1], n), x.dtype, x.device)
        s = lowrank_forward(x, a, gate, lay) if a is not None and xr.m else None
        if xr.m and n:
            gemm(xr, weight, bias, s, bt, y.view(xr.m, n), lay)
        return y, (s if store_t else None)

    return forward


def _gemm_forward(xr, weight, bias, s, bt, y2, lay: Layout) -> None:
    m, (n, d) = xr.m, weight.shape
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    launch(
        _gemm_forward_kernel, grid,
        xr.t, weight, y2 if bias is None else bias, y2 if s is None else s, y2 if bt is None else bt, y2,
        m, n, d, lay.r, *xr.addressing, weight.stride(0), weight.stride(1), size_bucket(m),
        HAS_BIAS=bias is not None, HAS_LORA=s is not None, R_PAD=lay.r_pad, DOT_MODE=dot_mode(xr.t.dtype),
    )


def _split_backward_with(gemm):
    def backward(dy, x, weight, a, bt, gate, s, lay: Layout, plan: GradPlan, grad: Tensor):
        """dX (m, d) or None; dA, dB^T, dbias added into ``grad``, which this clears first (the
        design keeps B^T from forward, so no launch of the registered op's clears it)."""
        n, d = weight.shape
        dyr = rows_view(dy)
        has_lora = a is not None
        sums = plan.need_da or plan.need_db or plan.need_dbias
        u = None
        if has_lora and (plan.need_dx or plan.need_da):
            u = lowrank_backward(dy, bt, gate, lay, grad if sums else None)
        elif sums:
            grad.zero_()
        dx = new_output((dyr.m, d), dy.dtype, dy.device) if plan.need_dx else None
        xr = rows_view(x) if plan.need_da else dyr  # dyr: a stand-in that NEED_DA=False never reads
        gemm(dyr, xr, weight, a, u, s, dx, grad, lay, plan)
        return dx

    return backward


def _gemm_backward(dyr, xr, weight, a, u, s, dx, grad, lay: Layout, plan: GradPlan) -> None:
    m, (n, d) = dyr.m, weight.shape
    d_span = d if (plan.need_dx or plan.need_da) else 1
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(d_span, meta["BLOCK_D"]),)  # noqa: E731
    launch(
        _gemm_backward_kernel, grid,
        dyr.t, weight, grad if u is None else u, grad if a is None else a, grad if s is None else s, xr.t,
        grad if dx is None else dx, grad,
        m, n, d, lay.r, d_span, plan.da_orth_end, plan.da_res_start, plan.db_orth_end, plan.db_res_start,
        *dyr.addressing, *xr.addressing, weight.stride(0), weight.stride(1), size_bucket(m),
        HAS_LORA=u is not None, NEED_DX=plan.need_dx, NEED_DA=plan.need_da, NEED_DB=plan.need_db,
        NEED_DBIAS=plan.need_dbias, R_PAD=lay.r_pad, RANK_CHUNK=rank_chunk(lay.r_pad),
        DOT_MODE=dot_mode(dyr.t.dtype),
    )


split_forward = _split_forward_with(_gemm_forward)
split_backward = _split_backward_with(_gemm_backward)

#: The split design with pointer-addressed loads (any strides, any arch).
TRITON_SPLIT = Launchers(split_forward, split_backward, adapter_prep.assemble, adapter_prep.project_grads,
                         keeps_bt=True)
