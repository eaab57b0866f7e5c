"""The "single" design of the fused DualLoRA linear (:mod:`.fused_linear` weighs it against the
split design): one Triton kernel per pass, the low-rank products accumulated beside the output tile.

The op is ``Y = X W0^T + b + ((X A^T) .* S) B^T`` with ``A = [A_o; A_frozen; A_r]`` (r, d),
``B`` (n, r) and the per-row, per-column scale ``S`` (orth_scale on the orthogonal columns,
``res_scale * gate[row, block]`` on the residual ones). ``A`` and ``B^T`` are assembled, with the
memory projections, by the small kernels of :mod:`.adapter_prep` (one launch, two with a basis),
and the gate is read inside the kernels through its own strides (a per-sample gate broadcast
over tokens is never copied), so ``S`` never exists in memory.

Device operations of one training step (the cost contract, counted by tests/test_cost_contract.py
with :mod:`duallora_kernels.opcount`; the frozen ``nn.Linear`` takes 2): forward = coefficients
``[C_o; C_r] M`` + assembly of A, B^T + the fused forward kernel; backward = one memset of the
float32 gradient sums + the fused backward kernel + coefficients ``[dA_o; dA_r] M`` + the
projection/cast of every adapter gradient. 7 with a basis, 5 without (task 1). Nothing reads a
device value on the host.

Forward, one kernel: each program owns a (BLOCK_M, BLOCK_N) tile of Y. Its K-loop streams the
X and W0 tiles and, from the same X tile, also accumulates ``T = X A^T`` for its rows; after the
loop it scales T by S, adds ``(T .* S) B^T`` and the bias, and stores Y. T (m, r, unscaled,
accumulated in float32 and stored in x's dtype) is stored by the n-tile-0 programs only, and
only when dB will be needed.

Backward, one kernel: each program owns a (BLOCK_M, BLOCK_D) tile of dX. Its N-loop streams the
dY tiles and accumulates ``dY W0`` and ``dY B`` together; then ``U = (dY B) .* S`` and
``dX = dY W0 + U A``. From the data it already holds it also accumulates, with float32 atomics:
``dA += U^T X_tile`` (the program loads the X tile at the same (rows, d-cols) as its dX tile),
and, after dX is stored, ``dB += dY^T (T .* S)`` and ``dbias += colsum(dY)`` for the N-chunks
dealt to it: chunk j of a row block goes to the program of d-tile ``j mod tiles_d``, so each dY
tile is counted once and that work (a dot and atomics per chunk) is spread over all d-tiles
instead of making the d-tile-0 programs the kernel's tail. That second loop re-reads 1/tiles_d of
the row block's dY, which the program's main loop has just streamed (an L2 hit, mostly): inside
the main loop the (R_PAD x BLOCK_K) product and its atomics' addresses stayed live beside the
two accumulators and spilled registers at rank 64 on every arch, and at rank 16 on sm_80/86. The atomics are ``sem="relaxed"``: plain float32 adds whose order
does not matter, without the ``acq_rel`` default's fence (``MEMBAR.ALL.GPU`` before every
atomic in the SASS). Only the rows/columns of trainable blocks are accumulated: frozen blocks
take part in dX (they must) but get no gradient, and cost no extra read of X or dY. The memory
projection is applied to dA before the gradient leaves the op (:func:`.adapter_prep.project_grads`):
``d orth_a = dA_o (I - M M^T)`` and ``d res_a = dA_r M M^T`` -- the chain rule through the maps
``A_o = C_o (I - M M^T)`` and ``A_r = C_r M M^T`` that the forward uses.

Low-rank work per tile. ``T = X A^T`` is recomputed by each of the n/BLOCK_N programs of a row
block in forward, and ``dY B`` by each of the d/BLOCK_D programs in backward: R_PAD/BLOCK_N
extra tensor-core work, and an (BLOCK_M x R_PAD) accumulator beside the output tile. The split
design (:mod:`.fused_linear_split`) runs those products in passes of their own instead; the
figures that weigh the two are :mod:`.fused_linear`'s.

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

What is saved for backward: the tensors the op allocates and keeps are T (m x r, x's dtype; only
when dB is needed) and the assembled A (r x d: rebuilding it in backward would cost two more
launches with a basis). Everything else is saved as the caller's own tensor, never as a copy: x
(only when dA or dW0 is needed), W0, the gate as passed (a broadcast view), the basis and the B
factors, from which the backward's first launch rebuilds B^T while it clears the gradient sums
(no launch of its own; a B factor changed in place in between makes autograd's version check
raise, instead of the backward silently using a stale copy). The activation bytes are thus
x + T + A (+ the gate), i.e. full fine-tuning's x plus m*r + r*d elements, no more than the
unfused PyTorch composition's, which keeps its projected A copies and its (x A^T) products.

Design decisions:

* float64 inputs run the torch launchers (:data:`.launchers.TORCH`, same contract): a float64
  ``tl.dot`` has no tensor-core path on Hopper and is not validated across Triton versions, and
  float64 exists here for checking.
* Autograd, FakeTensor/meta, torch.compile and export go through the registered op of
  :mod:`.registered` (``duallora::fused_forward`` / ``duallora::fused_backward``); this module
  holds the Triton kernels and their launchers (:data:`TRITON`). The kernels cover float32, bfloat16 and float16, always
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

import triton
import triton.language as tl
from torch import Tensor

from . import adapter_prep
from ._kernel_utils import dot_mode, launch, new_output, rows_view, size_bucket
from ._triton_functions import mma, row_offsets
from .fused_linear_parts import gate_args, load_rows, load_w0, scales, tile_ids
from .fused_linear_tiles import configs, pruner
from .launchers import GradPlan, Launchers, Layout

__all__ = ["TRITON_SINGLE"]


@triton.autotune(configs=configs("single_forward"), key=["m_bucket", "n", "d", "R_PAD"],
                 prune_configs_by={"early_config_prune": pruner("single_forward")})
@triton.jit
def _fused_forward_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, bt_ptr, gate_ptr, y_ptr, t_ptr,
    m, n, d, r, r_orth, r_blk, orth_scale, res_scale,
    x_rows_per_batch, stride_xb, stride_xm, stride_xk,
    stride_wn, stride_wk, g_rows_per_batch, stride_gb, stride_gm, stride_gg, m_bucket,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_GATE: tl.constexpr, STORE_T: tl.constexpr,
    R_PAD: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # a: A (r, d) row-major; bt: B^T (r, n) row-major, so both are read along their long side
    # (contiguous, vectorised, and pipelined by the compiler).
    pid_m, pid_n = tile_ids(tl.program_id(0), m, n, BLOCK_M, BLOCK_N, GROUP_M)
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
        x = load_rows(x_rows, ks, stride_xk, row_ok, k_ok)
        w_t = load_w0(w_ptr, cols[None, :], ks[:, None], stride_wn, stride_wk, col_ok[None, :], k_ok[:, None])
        acc = mma(x, w_t, acc, DOT_MODE)
        if HAS_LORA:
            # The same X tile feeds the low-rank path: this is what saves a second pass over X
            # (recomputed by every n-tile of the row block: see "Low-rank work per tile").
            a_t = tl.load(a_ptr + ranks[None, :] * d + ks[:, None], mask=rank_ok[None, :] & k_ok[:, None], other=0.0)
            t = mma(x, a_t, t, DOT_MODE)

    if HAS_LORA:
        if STORE_T:
            if pid_n == 0:
                t_ptrs = t_ptr + rows.to(tl.int64)[:, None] * r + ranks[None, :]
                tl.store(t_ptrs, t.to(t_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])
        ts = t * scales(gate_ptr, g_rows_per_batch, stride_gb, stride_gm, stride_gg, rows, ranks, m, r, r_orth,
                         r_blk, orth_scale, res_scale, HAS_GATE)
        b_t = tl.load(bt_ptr + ranks[:, None] * n + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(ts.to(b_t.dtype), b_t, acc, DOT_MODE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * n + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=configs("single_backward"), key=["m_bucket", "n", "d", "R_PAD"],
                 prune_configs_by={"early_config_prune": pruner("single_backward")},
                 reset_to_zero=["grad_ptr"])
@triton.jit
def _fused_backward_kernel(
    dy_ptr, w_ptr, a_ptr, bt_ptr, gate_ptr, t_ptr, x_ptr, dx_ptr, grad_ptr,
    m, n, d, r, r_orth, r_blk, orth_scale, res_scale, d_span,
    da_orth_end, da_res_start, db_orth_end, db_res_start,
    dy_rows_per_batch, stride_dyb, stride_dym, stride_dyn,
    x_rows_per_batch, stride_xb, stride_xm, stride_xk,
    stride_wn, stride_wk, g_rows_per_batch, stride_gb, stride_gm, stride_gg, m_bucket,
    HAS_LORA: tl.constexpr, HAS_GATE: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr,
    NEED_DB: tl.constexpr, NEED_DBIAS: tl.constexpr,
    R_PAD: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # BLOCK_K is the N-loop's step (the reduction dimension of dY W0 and dY B). grad is one
    # zeroed float32 buffer that the programs add into: dA (r, d), then dB^T (r, n), then dbias (n,).
    # d_span: d, or 1 when neither dX nor dA is wanted (one column of programs then does dB/dbias).
    pid_m, pid_d = tile_ids(tl.program_id(0), m, d_span, BLOCK_M, BLOCK_D, GROUP_M)
    tiles_d = tl.cdiv(d_span, BLOCK_D)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ranks = tl.arange(0, R_PAD)
    row_ok = rows < m
    col_ok = cols < d
    rank_ok = ranks < r
    dy_rows = dy_ptr + row_offsets(rows, dy_rows_per_batch, stride_dyb, stride_dym)
    da_ptr = grad_ptr
    dbt_ptr = grad_ptr + r * d
    dbias_ptr = grad_ptr + r * d + r * n

    if HAS_LORA:
        s = scales(gate_ptr, g_rows_per_batch, stride_gb, stride_gm, stride_gg, rows, ranks, m, r, r_orth, r_blk,
                    orth_scale, res_scale, HAS_GATE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    u = tl.zeros((BLOCK_M, R_PAD), tl.float32)
    for n0 in range(0, n, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        n_ok = ns < n
        dy = load_rows(dy_rows, ns, stride_dyn, row_ok, n_ok)
        if NEED_DX:
            w = load_w0(w_ptr, ns[:, None], cols[None, :], stride_wn, stride_wk, n_ok[:, None], col_ok[None, :])
            acc = mma(dy, w, acc, DOT_MODE)
        if HAS_LORA:
            b = tl.load(bt_ptr + ranks[None, :] * n + ns[:, None], mask=rank_ok[None, :] & n_ok[:, None], other=0.0)
            u = mma(dy, b, u, DOT_MODE)

    if HAS_LORA:
        u = u * s
        if NEED_DX:
            a = tl.load(a_ptr + ranks[:, None] * d + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            acc = mma(u.to(a.dtype), a, acc, DOT_MODE)
        if NEED_DA:
            # The X tile at this program's (rows, cols) gives U^T X for these d-columns: dA comes
            # out of the backward pass without a pass of its own over dY.
            x_rows = x_ptr + row_offsets(rows, x_rows_per_batch, stride_xb, stride_xm)
            x = load_rows(x_rows, cols, stride_xk, row_ok, col_ok)
            da = mma(tl.trans(u.to(x.dtype)), x, tl.zeros((R_PAD, BLOCK_D), tl.float32), DOT_MODE)
            da_ranks = (ranks < da_orth_end) | ((ranks >= da_res_start) & rank_ok)
            tl.atomic_add(da_ptr + ranks[:, None] * d + cols[None, :], da, mask=da_ranks[:, None] & col_ok[None, :],
                          sem="relaxed")
    if NEED_DX:
        dx_ptrs = dx_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :]
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    # dB and dbias need each dY tile of the row block once: its N-chunks are dealt round-robin to
    # the row block's d-tiles (chunk j to d-tile j mod tiles_d), so that work is spread over all of
    # them instead of making the programs of one d-tile the kernel's tail. It runs after dX is
    # stored, in a loop of its own over this program's chunks (1/tiles_d of the row block's dY,
    # which the main loop has just brought into L2): inside the main loop its (R_PAD x BLOCK_K)
    # product and atomics' addresses stayed live beside the accumulators and spilled at rank 64.
    if NEED_DB or NEED_DBIAS:
        if NEED_DB:
            db_ranks = (ranks < db_orth_end) | ((ranks >= db_res_start) & rank_ok)
            t = tl.load(t_ptr + rows.to(tl.int64)[:, None] * r + ranks[None, :],
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            ts = (t.to(tl.float32) * s).to(dy_ptr.dtype.element_ty)
        for n0 in range(pid_d * BLOCK_K, n, tiles_d * BLOCK_K):
            ns = n0 + tl.arange(0, BLOCK_K)
            n_ok = ns < n
            dy = load_rows(dy_rows, ns, stride_dyn, row_ok, n_ok)
            if NEED_DB:
                dbt = mma(tl.trans(ts), dy, tl.zeros((R_PAD, BLOCK_K), tl.float32), DOT_MODE)
                tl.atomic_add(dbt_ptr + ranks[:, None] * n + ns[None, :], dbt, mask=db_ranks[:, None] & n_ok[None, :],
                              sem="relaxed")
            if NEED_DBIAS:
                tl.atomic_add(dbias_ptr + ns, tl.sum(dy.to(tl.float32), axis=0), mask=n_ok, sem="relaxed")


def _triton_forward(x, weight, bias, a, bt, gate, lay: Layout, store_t: bool):
    n, d = weight.shape
    xr = rows_view(x)
    m = xr.m
    y = new_output((*x.shape[:-1], n), x.dtype, x.device)  # its final shape: the op's Y is no view
    has_lora = a is not None
    t = new_output((m, lay.r), x.dtype, x.device) if has_lora and store_t else None
    if m and n:
        g, *g_addr = gate_args(lay, gate, x)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        launch(
            _fused_forward_kernel, grid,
            xr.t, weight, x if bias is None else bias, a if has_lora else x, bt if has_lora else x, g, y.view(m, n),
            y if t is None else t,
            m, n, d, lay.r, lay.r_orth, lay.r_blk, lay.orth_scale, lay.res_scale,
            *xr.addressing, weight.stride(0), weight.stride(1), *g_addr, size_bucket(m),
            HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_GATE=lay.has_gate, STORE_T=t is not None,
            R_PAD=lay.r_pad, DOT_MODE=dot_mode(x.dtype),
        )
    return y, t


def _triton_backward(dy, x, weight, a, bt, gate, t, lay: Layout, plan: GradPlan, grad: Tensor):
    n, d = weight.shape
    dyr = rows_view(dy)
    m, dev = dyr.m, dy.device
    dx = new_output((m, d), dy.dtype, dev) if plan.need_dx else None
    has_lora = a is not None
    xr = rows_view(x) if plan.need_da else dyr  # dyr: a stand-in that NEED_DA=False never reads
    g, *g_addr = gate_args(lay, gate, dy)
    # Without dX or dA there is nothing per d-tile: one column of programs does dB/dbias.
    d_span = d if (plan.need_dx or plan.need_da) else 1
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(d_span, meta["BLOCK_D"]),)  # noqa: E731
    launch(
        _fused_backward_kernel, grid,
        dyr.t, weight, a if has_lora else grad, bt if has_lora else grad, g, grad if t is None else t, xr.t,
        grad if dx is None else dx, grad,
        m, n, d, lay.r, lay.r_orth, lay.r_blk, lay.orth_scale, lay.res_scale, d_span,
        plan.da_orth_end, plan.da_res_start, plan.db_orth_end, plan.db_res_start,
        *dyr.addressing, *xr.addressing, weight.stride(0), weight.stride(1), *g_addr, size_bucket(m),
        HAS_LORA=has_lora, HAS_GATE=lay.has_gate, NEED_DX=plan.need_dx, NEED_DA=plan.need_da,
        NEED_DB=plan.need_db, NEED_DBIAS=plan.need_dbias, R_PAD=lay.r_pad, DOT_MODE=dot_mode(dy.dtype),
    )
    return dx


#: The single design: one kernel per pass (plus the small-matrix steps of :mod:`.adapter_prep`).
TRITON_SINGLE = Launchers(_triton_forward, _triton_backward, adapter_prep.assemble, adapter_prep.project_grads)
