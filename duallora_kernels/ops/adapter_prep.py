"""The small matrices around the fused DualLoRA kernels, in three Triton launches instead of ~30 torch ops.

The fused forward and backward (:mod:`.fused_linear`) read one stacked low-rank path
``A = [A_o; A_frozen; A_r]`` (r, d) and ``B^T`` (r, n), where the op's memory projections are

    A_o = C_o (I - M M^T) = C_o - (C_o M) M^T        A_r = C_r M M^T = (C_r M) M^T

and their gradients leave the op projected the same way (the chain rule through those maps):

    d C_o = dA_o - (dA_o M) M^T                        d C_r = (dA_r M) M^T

Built with torch ops, forming A and B^T and projecting dA took 26 device operations per training
step (matmuls, casts to float32 and back, cats, transposes, memsets): 3-8 us each on a GPU, more
than the two fused kernels take at ViT-B shapes. Here it is three kernels, reused both ways:

* :func:`coefficients` -- ``P = [R_1; R_2] M`` (rows x k, float32) for up to two row blocks
  (C_o and C_r in forward; dA_o and dA_r in backward). The grid runs over column tiles of k, each
  program reducing over all of d: the r*d*k product spread over k/BLOCK_K programs, no atomics.
* :func:`assemble` (forward) -- one program per column tile of A (d) or of B^T (n): writes
  ``C_o - P_o M^T``, the frozen rows as stored and ``P_r M^T`` into A, and the three B factors
  transposed into B^T, in the dtype of x.
* :func:`project_grads` (backward) -- the same per-tile split: ``dA_o - Q_o M^T`` and
  ``Q_r M^T`` (Q = dA M from :func:`coefficients`) into the orthogonal / residual A gradients,
  dB^T transposed into the B gradients and dbias, each cast to its parameter's dtype.

Projections are computed in float32 (the basis may be any float dtype; it is read as float32):
on a GPU with ``tl.dot(..., input_precision="tf32x3")`` (three TF32 tensor-core products,
float32-level accuracy), in the interpreter with IEEE float32 dots. In bf16 the projection would
leave ``A_o M`` ~1e-2 from zero; the rounding to x's dtype happens once, on the final A, exactly
as the reference (:func:`.reference.project_out`) does.

Cost, ViT-B shapes, rank 16 (r*d*k multiply-adds per call, k <= d): with d = 768 and a basis of
k = 384 columns, P is 4.7 M multiply-adds over 12 programs, the assembly 16*384 per column --
about a microsecond each on an H100, and one launch each instead of ten to fifteen.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._kernel_utils import interpreting, launch, pow2_at_least

__all__ = ["coefficients", "assemble", "project_grads", "proj_dot_mode"]

#: Column tile of A / B^T (assemble, project_grads) and of k (coefficients); d-chunk of the reduction.
BLOCK_COLS = 64
BLOCK_RED = 32
#: Rows of a frozen block copied per step (the frozen blocks stack every earlier task's rows).
FROZEN_CHUNK = 16


def _cols(*ranks: int) -> int:
    # Column tile of A / B^T / k: a (rank x cols) float32 tile and the three TF32 products of a
    # tf32x3 dot live in registers; at rank 64, 64 columns spilled on sm_86 even with 8 warps.
    return BLOCK_COLS if max(ranks) <= 32 else BLOCK_COLS // 2


def _red(*ranks: int) -> int:
    # The reduction chunk of the projection products: at rank 64 a 32-wide chunk left the gradient
    # projection 16 B short of registers on sm_8x under Triton 3.6 (the oldest tested Triton).
    return BLOCK_RED if max(ranks) <= 32 else BLOCK_RED // 2


def _warps(*ranks: int) -> int:
    # 8 from rank 17 on: at rank 32 with 4 warps the coefficients spilled 16 B and the gradient
    # projection 8 B on sm_90 (Triton 3.8), with 64 columns as with 32.
    return 4 if max(ranks) <= 16 else 8


def proj_dot_mode() -> str:
    """``input_precision`` of the projection dots: float32-accurate on either path."""
    return "ieee" if interpreting() else "tf32x3"


@triton.jit
def _rows_times(src_ptr, stride_r, stride_c, row0, nrows, rhs_ptr, stride_red, stride_col, red, cols, col_ok,
                R_PAD: tl.constexpr, BLOCK_RED: tl.constexpr, PROJ: tl.constexpr):
    # src[row0 : row0 + nrows, :red] @ rhs[:red, cols] in float32. rhs is M itself (coefficients:
    # reduce over d) or M^T read through M's strides (reduce over k).
    ranks = tl.arange(0, R_PAD)
    acc = tl.zeros((R_PAD, cols.shape[0]), tl.float32)
    for e0 in range(0, red, BLOCK_RED):
        es = e0 + tl.arange(0, BLOCK_RED)
        e_ok = es < red
        lhs = tl.load(src_ptr + (row0 + ranks)[:, None] * stride_r + es[None, :] * stride_c,
                      mask=(ranks < nrows)[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
        rhs = tl.load(rhs_ptr + es[:, None] * stride_red + cols[None, :] * stride_col,
                      mask=e_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(lhs, rhs, acc, input_precision=PROJ)
    return acc


@triton.jit
def _coefficients_kernel(
    s1_ptr, s1_stride_r, s1_stride_c, r1, s2_ptr, s2_stride_r, s2_stride_c, r2,
    m_ptr, stride_md, stride_mk, p_ptr, d, k,
    HAS_1: tl.constexpr, HAS_2: tl.constexpr, R1_PAD: tl.constexpr, R2_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PROJ: tl.constexpr,
):
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < k
    if HAS_1:
        ranks = tl.arange(0, R1_PAD)
        p = _rows_times(s1_ptr, s1_stride_r, s1_stride_c, 0, r1, m_ptr, stride_md, stride_mk, d, ks, k_ok,
                        R1_PAD, BLOCK_D, PROJ)
        tl.store(p_ptr + ranks[:, None] * k + ks[None, :], p, mask=(ranks < r1)[:, None] & k_ok[None, :])
    if HAS_2:
        ranks = tl.arange(0, R2_PAD)
        p = _rows_times(s2_ptr, s2_stride_r, s2_stride_c, 0, r2, m_ptr, stride_md, stride_mk, d, ks, k_ok,
                        R2_PAD, BLOCK_D, PROJ)
        tl.store(p_ptr + (r1 + ranks)[:, None] * k + ks[None, :], p, mask=(ranks < r2)[:, None] & k_ok[None, :])


@triton.jit
def _coef_times_basis_t(p_ptr, p_row0, nrows, m_ptr, stride_md, stride_mk, k, cols, col_ok,
                        R_PAD: tl.constexpr, BLOCK_K: tl.constexpr, PROJ: tl.constexpr):
    # P[p_row0 : p_row0 + nrows] @ M[cols, :]^T in float32 (P is (rows, k) row-major).
    return _rows_times(p_ptr, k, 1, p_row0, nrows, m_ptr, stride_mk, stride_md, k, cols, col_ok, R_PAD, BLOCK_K, PROJ)


@triton.jit
def _store_rows(dst_ptr, stride_r, stride_c, row0, nrows, cols, col_ok, val, R_PAD: tl.constexpr):
    ranks = tl.arange(0, R_PAD)
    tl.store(dst_ptr + (row0 + ranks)[:, None] * stride_r + cols[None, :] * stride_c,
             val.to(dst_ptr.dtype.element_ty), mask=(ranks < nrows)[:, None] & col_ok[None, :])


@triton.jit
def _load_rows(src_ptr, stride_r, stride_c, row0, nrows, cols, col_ok, R_PAD: tl.constexpr):
    ranks = tl.arange(0, R_PAD)
    return tl.load(src_ptr + (row0 + ranks)[:, None] * stride_r + cols[None, :] * stride_c,
                   mask=(ranks < nrows)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _copy_rows(src_ptr, stride_r, stride_c, nrows, dst_ptr, dst_stride_r, dst_row0, cols, col_ok,
               CHUNK: tl.constexpr):
    # The frozen blocks: every earlier task's rows as stored, CHUNK rows at a time (their count grows).
    for f0 in range(0, nrows, CHUNK):
        rows = _load_rows(src_ptr, stride_r, stride_c, f0, nrows - f0, cols, col_ok, CHUNK)
        _store_rows(dst_ptr, dst_stride_r, 1, dst_row0 + f0, nrows - f0, cols, col_ok, rows, CHUNK)


@triton.jit
def _assemble_kernel(
    oa_ptr, oa_sr, oa_sc, fa_ptr, fa_sr, fa_sc, ra_ptr, ra_sr, ra_sc,
    ob_ptr, ob_sn, ob_sr, fb_ptr, fb_sn, fb_sr, rb_ptr, rb_sn, rb_sr,
    p_ptr, m_ptr, stride_md, stride_mk, a_ptr, bt_ptr, zero_ptr, zero_numel, zero_per_program,
    r_orth, r_frozen, r_res, d, n, k, tiles_d,
    HAS_ORTH: tl.constexpr, HAS_FROZEN: tl.constexpr, HAS_RES: tl.constexpr, HAS_BASIS: tl.constexpr,
    ZERO: tl.constexpr, RO_PAD: tl.constexpr, RR_PAD: tl.constexpr, RF_CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PROJ: tl.constexpr,
):
    # Programs [0, tiles_d) write columns of A (r, d); the rest write columns of B^T (r, n) (in
    # backward, tiles_d = 0: only B^T). Row blocks of both: orthogonal [0, r_orth), frozen
    # [r_orth, r_orth + r_frozen), training residual after. With ZERO, each program also clears
    # its share of the backward's float32 gradient sums: that memset costs no launch of its own.
    pid = tl.program_id(0)
    r_res0 = r_orth + r_frozen
    if ZERO:
        start = pid * zero_per_program
        stop = tl.minimum(start + zero_per_program, zero_numel)
        for z0 in range(start, stop, 1024):
            zs = z0 + tl.arange(0, 1024)
            tl.store(zero_ptr + zs, tl.zeros((1024,), tl.float32), mask=zs < stop)
    if pid < tiles_d:
        cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < d
        if HAS_ORTH:
            a_o = _load_rows(oa_ptr, oa_sr, oa_sc, 0, r_orth, cols, col_ok, RO_PAD)
            if HAS_BASIS:
                a_o -= _coef_times_basis_t(p_ptr, 0, r_orth, m_ptr, stride_md, stride_mk, k, cols, col_ok,
                                           RO_PAD, BLOCK_K, PROJ)
            _store_rows(a_ptr, d, 1, 0, r_orth, cols, col_ok, a_o, RO_PAD)
        if HAS_FROZEN:
            _copy_rows(fa_ptr, fa_sr, fa_sc, r_frozen, a_ptr, d, r_orth, cols, col_ok, RF_CHUNK)
        if HAS_RES:
            a_r = _coef_times_basis_t(p_ptr, r_orth, r_res, m_ptr, stride_md, stride_mk, k, cols, col_ok,
                                      RR_PAD, BLOCK_K, PROJ)
            _store_rows(a_ptr, d, 1, r_res0, r_res, cols, col_ok, a_r, RR_PAD)
    else:
        cols = (pid - tiles_d) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < n
        # B (n, rank) read as its transpose: row index = rank, column index = output feature.
        if HAS_ORTH:
            b = _load_rows(ob_ptr, ob_sr, ob_sn, 0, r_orth, cols, col_ok, RO_PAD)
            _store_rows(bt_ptr, n, 1, 0, r_orth, cols, col_ok, b, RO_PAD)
        if HAS_FROZEN:
            _copy_rows(fb_ptr, fb_sr, fb_sn, r_frozen, bt_ptr, n, r_orth, cols, col_ok, RF_CHUNK)
        if HAS_RES:
            b = _load_rows(rb_ptr, rb_sr, rb_sn, 0, r_res, cols, col_ok, RR_PAD)
            _store_rows(bt_ptr, n, 1, r_res0, r_res, cols, col_ok, b, RR_PAD)


@triton.jit
def _project_grads_kernel(
    da_ptr, dbt_ptr, dbias_ptr, q_ptr, m_ptr, stride_md, stride_mk,
    g_oa_ptr, g_ra_ptr, g_ob_ptr, g_rb_ptr, g_bias_ptr,
    r_orth, r_res0, r_res, q_res0, d, n, k, tiles_d,
    NEED_OA: tl.constexpr, NEED_RA: tl.constexpr, NEED_OB: tl.constexpr, NEED_RB: tl.constexpr,
    NEED_BIAS: tl.constexpr, HAS_BASIS: tl.constexpr, RO_PAD: tl.constexpr, RR_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PROJ: tl.constexpr,
):
    # da (r, d), dbt (r, n), dbias (n,): the float32 sums of the fused backward. q (r_orth + r_res, k):
    # [dA_o; dA_r] M for the A gradients that are projected; its residual rows start at q_res0.
    pid = tl.program_id(0)
    if pid < tiles_d:
        cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < d
        if NEED_OA:
            g = _load_rows(da_ptr, d, 1, 0, r_orth, cols, col_ok, RO_PAD)
            if HAS_BASIS:
                g -= _coef_times_basis_t(q_ptr, 0, r_orth, m_ptr, stride_md, stride_mk, k, cols, col_ok,
                                         RO_PAD, BLOCK_K, PROJ)
            _store_rows(g_oa_ptr, d, 1, 0, r_orth, cols, col_ok, g, RO_PAD)
        if NEED_RA:
            g = _coef_times_basis_t(q_ptr, q_res0, r_res, m_ptr, stride_md, stride_mk, k, cols, col_ok,
                                    RR_PAD, BLOCK_K, PROJ)
            _store_rows(g_ra_ptr, d, 1, 0, r_res, cols, col_ok, g, RR_PAD)
    else:
        cols = (pid - tiles_d) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < n
        # dB = (dB^T)^T: row j of dbt is column j of the (n, rank) gradient.
        if NEED_OB:
            g = _load_rows(dbt_ptr, n, 1, 0, r_orth, cols, col_ok, RO_PAD)
            _store_rows(g_ob_ptr, 1, r_orth, 0, r_orth, cols, col_ok, g, RO_PAD)
        if NEED_RB:
            g = _load_rows(dbt_ptr, n, 1, r_res0, r_res, cols, col_ok, RR_PAD)
            _store_rows(g_rb_ptr, 1, r_res, 0, r_res, cols, col_ok, g, RR_PAD)
        if NEED_BIAS:
            g = tl.load(dbias_ptr + cols, mask=col_ok, other=0.0)
            tl.store(g_bias_ptr + cols, g.to(g_bias_ptr.dtype.element_ty), mask=col_ok)


def _strides(t: Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def coefficients(first: Tensor | None, second: Tensor | None, basis: Tensor) -> Tensor:
    """``[first; second] @ basis`` (float32, (r1 + r2, k)) in one launch; either block may be None
    (0 rows). ``first``/``second`` (r, d) of any float dtype and strides; ``basis`` (d, k)."""
    d, k = basis.shape
    r1 = 0 if first is None else first.shape[0]
    r2 = 0 if second is None else second.shape[0]
    p = torch.empty((r1 + r2, k), dtype=torch.float32, device=basis.device)
    if not (r1 + r2) or not k:
        return p
    s1 = basis if first is None else first
    s2 = basis if second is None else second
    launch(
        _coefficients_kernel, (triton.cdiv(k, _cols(r1, r2)),),
        s1, *_strides(first), r1, s2, *_strides(second), r2, basis, basis.stride(0), basis.stride(1), p, d, k,
        HAS_1=r1 > 0, HAS_2=r2 > 0, R1_PAD=pow2_at_least(r1), R2_PAD=pow2_at_least(r2), num_warps=_warps(r1, r2),
        BLOCK_K=_cols(r1, r2), BLOCK_D=BLOCK_RED, PROJ=proj_dot_mode(),
    )
    return p


def assemble(orth_a, orth_b, frozen_a, frozen_b, res_a, res_b, basis: Tensor | None, *, d: int, n: int,
             dtype: torch.dtype, device: torch.device, r_orth: int = 0, r_frozen: int = 0, r_res: int = 0,
             write_a: bool = True, zero: Tensor | None = None) -> tuple[Tensor | None, Tensor, int, int]:
    """The stacked ``A`` (r, d) and ``B^T`` (r, n) in ``dtype``, row blocks orthogonal / frozen /
    training residual, with the memory projections applied: two launches with a basis, one
    without. Returns ``(A, B^T, r_orth, r_res)``; every block may be None (frozen: or 0 rows).

    ``write_a=False`` (backward) builds only B^T, from the B factors alone (the ``*_a`` arguments
    may then be None; ``r_orth``/``r_frozen``/``r_res`` give the block sizes): one launch, which
    with ``zero`` also clears that float32 buffer."""
    if write_a:
        r_orth = 0 if orth_a is None else orth_a.shape[0]
        r_frozen = 0 if frozen_a is None else frozen_a.shape[0]
        r_res = 0 if res_a is None else res_a.shape[0]
    r = r_orth + r_frozen + r_res
    a = torch.empty((r, d), dtype=dtype, device=device) if write_a else None
    bt = torch.empty((r, n), dtype=dtype, device=device)
    has_basis = write_a and basis is not None and basis.shape[1] > 0 and bool(r_orth or r_res)
    k = basis.shape[1] if has_basis else 0
    p = coefficients(orth_a, res_a, basis) if has_basis else bt
    mb = basis if has_basis else bt
    cols = _cols(r_orth, r_res)
    tiles_d, tiles_n = (triton.cdiv(d, cols) if write_a else 0), triton.cdiv(n, cols)
    programs = tiles_d + tiles_n
    zero_numel = 0 if zero is None else zero.numel()
    dummy = bt  # stands in for absent blocks; their HAS_* flag is off, so it is never read
    launch(
        _assemble_kernel, (programs,),
        orth_a if orth_a is not None else dummy, *_strides(orth_a),
        frozen_a if frozen_a is not None else dummy, *_strides(frozen_a),
        res_a if res_a is not None else dummy, *_strides(res_a),
        orth_b if r_orth else dummy, *_strides(orth_b), frozen_b if r_frozen else dummy, *_strides(frozen_b),
        res_b if r_res else dummy, *_strides(res_b),
        p, mb, *_strides(mb), dummy if a is None else a, bt, dummy if zero is None else zero, zero_numel,
        triton.cdiv(zero_numel, programs), r_orth, r_frozen, r_res, d, n, k, tiles_d,
        HAS_ORTH=r_orth > 0, HAS_FROZEN=r_frozen > 0, HAS_RES=r_res > 0, HAS_BASIS=has_basis, ZERO=zero is not None,
        RO_PAD=pow2_at_least(r_orth), RR_PAD=pow2_at_least(r_res), RF_CHUNK=FROZEN_CHUNK,
        num_warps=_warps(r_orth, r_res),
        BLOCK_C=cols, BLOCK_K=BLOCK_RED, PROJ=proj_dot_mode(),
    )
    return a, bt, r_orth, r_res


def project_grads(da: Tensor | None, dbt: Tensor | None, dbias: Tensor | None, basis: Tensor | None, *,
                  r_orth: int, r_res0: int, need: tuple[bool, bool, bool, bool, bool],
                  dtypes: tuple[torch.dtype, ...]) -> tuple[Tensor | None, ...]:
    """The gradients of (orth_a, res_a, orth_b, res_b, bias) from the fused backward's float32 sums
    ``da`` (r, d), ``dbt`` (r, n), ``dbias`` (n,): A gradients projected through the memory (see the
    module docstring), B gradients transposed to (n, rank), each cast to ``dtypes[i]``; None where
    ``need[i]`` is False. One launch, two when an A gradient is projected onto a non-empty basis."""
    need_oa, need_ra, need_ob, need_rb, need_bias = need
    ref = next(t for t in (da, dbt, dbias) if t is not None)
    dev = ref.device
    r = (da if da is not None else dbt).shape[0] if (da is not None or dbt is not None) else 0
    d = da.shape[1] if da is not None else 0
    n = dbt.shape[1] if dbt is not None else (dbias.shape[0] if dbias is not None else 0)
    r_res = r - r_res0
    out = [
        torch.empty((r_orth, d), dtype=dtypes[0], device=dev) if need_oa else None,
        torch.empty((r_res, d), dtype=dtypes[1], device=dev) if need_ra else None,
        torch.empty((n, r_orth), dtype=dtypes[2], device=dev) if need_ob else None,
        torch.empty((n, r_res), dtype=dtypes[3], device=dev) if need_rb else None,
        torch.empty((n,), dtype=dtypes[4], device=dev) if need_bias else None,
    ]
    has_basis = basis is not None and basis.shape[1] > 0 and (need_oa or need_ra)
    k = basis.shape[1] if has_basis else 0
    # Q = [dA_o; dA_r] M, only the blocks that train: its residual rows follow the orthogonal ones.
    q = coefficients(da[:r_orth] if need_oa else None, da[r_res0:] if need_ra else None, basis) if has_basis else ref
    q_res0 = r_orth if need_oa else 0
    mb = basis if has_basis else ref
    cols = _cols(r_orth, r_res)
    tiles_d = triton.cdiv(d, cols) if (need_oa or need_ra) else 0
    tiles_n = triton.cdiv(n, cols) if (need_ob or need_rb or need_bias) else 0
    if tiles_d + tiles_n == 0:
        return tuple(out)
    launch(
        _project_grads_kernel, (tiles_d + tiles_n,),
        ref if da is None else da, ref if dbt is None else dbt, ref if dbias is None else dbias, q, mb,
        *_strides(mb), *(ref if t is None else t for t in out),
        r_orth, r_res0, r_res, q_res0, d, n, k, tiles_d,
        NEED_OA=need_oa, NEED_RA=need_ra, NEED_OB=need_ob, NEED_RB=need_rb, NEED_BIAS=need_bias,
        HAS_BASIS=bool(has_basis), RO_PAD=pow2_at_least(r_orth), RR_PAD=pow2_at_least(r_res),
        num_warps=_warps(r_orth, r_res),
        BLOCK_C=cols, BLOCK_K=_red(r_orth, r_res), PROJ=proj_dot_mode(),
    )
    return tuple(out)
