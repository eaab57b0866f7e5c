"""The split design (:mod:`.fused_linear_split`) with Hopper's tensor-copy engine: its two GEMMs
load their operand tiles through tensor descriptors (TMA, ``cp.async.bulk.tensor``; UTMALDG in
the SASS) and run on a persistent grid (one program per SM, each walking the output tiles in the
grouped order), as Hopper's fastest matrix products do. The skinny low-rank passes, the adapter
assembly and the gradient projection are the split design's.

TMA needs what a descriptor can describe: a row-major 2-D tensor whose base and row stride are
16-byte aligned. So this path runs when x (and dY) are such row-major matrices (a contiguous
(..., d) tensor is), d, n and the stacked rank r are multiples of 8 (16 bytes of bf16/fp16; S, U,
A and B^T are the op's own contiguous buffers), the dtype is bfloat16 or float16, and the device
is sm_90 or newer (or the interpreter, where the CPU test suite runs it). Any other call runs the
split design's pointer-addressed GEMMs: same numbers, same launches.

Tiles out of bounds (the last row block, the K-extension's last r % BLOCK_K columns) read as
zeros from the descriptors, so the main loops need no masks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import adapter_prep
from ._kernel_utils import RowsView, current_arch, dot_mode, interpreting, launch, size_bucket
from ._triton_functions import mma
from .fused_linear_parts import tile_ids
from .fused_linear_split import _gemm_backward, _gemm_forward, _split_backward_with, _split_forward_with, \
    backward_epilogue
from .fused_linear_tiles import configs, pruner, rank_chunk
from .launchers import GradPlan, Launchers, Layout

__all__ = ["TRITON_TMA", "tma_eligible"]

#: Programs of the persistent grid when the device cannot be asked (the interpreter, a capture).
_DEFAULT_PROGRAMS = 132


def _blocks(nargs: dict, pairs: tuple[tuple[str, str, str], ...]) -> None:
    for desc, rows, cols in pairs:
        if nargs.get(desc) is not None and hasattr(nargs[desc], "block_shape"):
            nargs[desc].block_shape = [nargs[rows], nargs[cols]]


def _forward_blocks(nargs: dict) -> None:
    # A descriptor's block is the config's tile: set per config, before each launch (autotune pre_hook).
    _blocks(nargs, (("x_desc", "BLOCK_M", "BLOCK_K"), ("w_desc", "BLOCK_N", "BLOCK_K"), ("s_desc", "BLOCK_M", "BLOCK_K"),
                    ("bt_desc", "BLOCK_K", "BLOCK_N"), ("y_desc", "BLOCK_M", "BLOCK_N")))


def _backward_blocks(nargs: dict) -> None:
    _blocks(nargs, (("dy_desc", "BLOCK_M", "BLOCK_K"), ("w_desc", "BLOCK_K", "BLOCK_D"),
                    ("u_desc", "BLOCK_M", "BLOCK_K"), ("a_desc", "BLOCK_K", "BLOCK_D"),
                    ("dx_desc", "BLOCK_M", "BLOCK_D")))


@triton.autotune(configs=configs("gemm_forward_tma", _forward_blocks), key=["m_bucket", "n", "d", "R_PAD"],
                 prune_configs_by={"early_config_prune": pruner("gemm_forward_tma")})
@triton.jit
def _gemm_forward_tma_kernel(
    x_desc, w_desc, s_desc, bt_desc, y_desc, bias_ptr,
    m, n, d, r, programs, m_bucket,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Y = [X | S] [W0 | B]^T + b over a persistent grid: W0 (n, d) is loaded as (BLOCK_N, BLOCK_K)
    # and transposed in the dot (wgmma reads either layout from shared memory).
    tiles = tl.cdiv(m, BLOCK_M) * tl.cdiv(n, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, programs):
        pid_m, pid_n = tile_ids(tile, m, n, BLOCK_M, BLOCK_N, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, d, BLOCK_K):
            acc = mma(x_desc.load([row0, k0]), tl.trans(w_desc.load([col0, k0])), acc, DOT_MODE)
        if HAS_LORA:
            for k0 in range(0, r, BLOCK_K):
                acc = mma(s_desc.load([row0, k0]), bt_desc.load([k0, col0]), acc, DOT_MODE)
        if HAS_BIAS:
            cols = col0 + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
        y_desc.store([row0, col0], acc.to(y_desc.dtype))


@triton.autotune(configs=configs("gemm_backward_tma", _backward_blocks), key=["m_bucket", "n", "d", "R_PAD"],
                 prune_configs_by={"early_config_prune": pruner("gemm_backward_tma")}, reset_to_zero=["grad_ptr"])
@triton.jit
def _gemm_backward_tma_kernel(
    dy_desc, w_desc, u_desc, a_desc, dx_desc, dy_ptr, x_ptr, u_ptr, s_ptr, grad_ptr,
    m, n, d, r, programs, da_orth_end, da_res_start, db_orth_end, db_res_start,
    stride_dym, x_rows_per_batch, stride_xb, stride_xm, stride_xk, m_bucket,
    HAS_LORA: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, NEED_DBIAS: tl.constexpr,
    R_PAD: tl.constexpr, RANK_CHUNK: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # dX = [dY | U] [W0 ; A] over a persistent grid (runs only when dX is wanted); then each tile's
    # epilogue reductions (dA, dB, dbias) exactly as the pointer design's, through plain pointers.
    tiles_d = tl.cdiv(d, BLOCK_D)
    tiles = tl.cdiv(m, BLOCK_M) * tiles_d
    for tile in tl.range(tl.program_id(0), tiles, programs):
        pid_m, pid_d = tile_ids(tile, m, d, BLOCK_M, BLOCK_D, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_d * BLOCK_D
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for n0 in range(0, n, BLOCK_K):
            acc = mma(dy_desc.load([row0, n0]), w_desc.load([n0, col0]), acc, DOT_MODE)
        if HAS_LORA:
            for k0 in range(0, r, BLOCK_K):
                acc = mma(u_desc.load([row0, k0]), a_desc.load([k0, col0]), acc, DOT_MODE)
        dx_desc.store([row0, col0], acc.to(dx_desc.dtype))
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = col0 + tl.arange(0, BLOCK_D)
        dy_rows = dy_ptr + rows.to(tl.int64) * stride_dym
        backward_epilogue(dy_rows, 1, x_ptr, x_rows_per_batch, stride_xb, stride_xm, stride_xk, u_ptr, s_ptr, grad_ptr,
                          rows, cols, pid_d, tiles_d, m, n, d, r, da_orth_end, da_res_start, db_orth_end,
                          db_res_start, NEED_DA, NEED_DB, NEED_DBIAS, R_PAD, RANK_CHUNK, DOT_MODE, BLOCK_K)


# ---------------------------------------------------------------------------------- launchers
def _matrix(t: Tensor) -> bool:
    """A row-major 2-D tensor a descriptor can describe: unit column stride, 16-byte aligned base and rows."""
    size = t.element_size()
    return t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0 \
        and t.shape[0] > 0 and t.shape[1] > 0


def _plain(rv: RowsView) -> Tensor | None:
    """The (m, d) matrix of a :class:`RowsView` when its rows are one strided run (no batch stride)."""
    return rv.t if rv.rows_per_batch >= rv.m and rv.t.dim() == 2 else None


def tma_eligible(*matrices: Tensor | None, r: int, cap: int | None = None) -> bool:
    """Whether this call can run the TMA GEMMs (see the module docstring)."""
    if not (interpreting() or (cap if cap is not None else current_arch()) >= 90):
        return False
    if any(t is None for t in matrices) or r % 8:
        return False
    return all(t.dtype in (torch.bfloat16, torch.float16) and _matrix(t) for t in matrices)


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_PROGRAMS


def _desc(t: Tensor):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, [16] * t.dim())  # block shape: set per config by the pre_hook


def _tma_gemm_forward(xr: RowsView, weight, bias, s, bt, y2, lay: Layout) -> None:
    x2 = _plain(xr)
    lora = s is not None
    if not tma_eligible(x2, weight, y2, *((s, bt) if lora else ()), r=lay.r if lora else 0):
        return _gemm_forward(xr, weight, bias, s, bt, y2, lay)
    m, (n, d) = xr.m, weight.shape
    programs = _programs(y2.device)
    s_desc, bt_desc = (_desc(s), _desc(bt)) if lora else (None, None)
    grid = lambda meta: (min(programs, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)  # noqa: E731
    launch(
        _gemm_forward_tma_kernel, grid,
        _desc(x2), _desc(weight), s_desc, bt_desc, _desc(y2), y2 if bias is None else bias,
        m, n, d, lay.r, programs, size_bucket(m),
        HAS_BIAS=bias is not None, HAS_LORA=lora, R_PAD=lay.r_pad, DOT_MODE=dot_mode(x2.dtype),
    )


def _tma_gemm_backward(dyr: RowsView, xr: RowsView, weight, a, u, s, dx, grad, lay: Layout, plan: GradPlan) -> None:
    dy2 = _plain(dyr)
    lora = u is not None
    if not (plan.need_dx and tma_eligible(dy2, weight, dx, *((u, a) if lora else ()), r=lay.r if lora else 0)):
        return _gemm_backward(dyr, xr, weight, a, u, s, dx, grad, lay, plan)
    m, (n, d) = dyr.m, weight.shape
    programs = _programs(dx.device)
    u_desc, a_desc = (_desc(u), _desc(a)) if lora else (None, None)
    grid = lambda meta: (min(programs, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_D"])),)  # noqa: E731
    launch(
        _gemm_backward_tma_kernel, grid,
        _desc(dy2), _desc(weight), u_desc, a_desc, _desc(dx), dy2, xr.t, grad if u is None else u,
        grad if s is None else s, grad,
        m, n, d, lay.r, programs, plan.da_orth_end, plan.da_res_start, plan.db_orth_end, plan.db_res_start,
        dy2.stride(0), *xr.addressing, size_bucket(m),
        HAS_LORA=lora, NEED_DA=plan.need_da, NEED_DB=plan.need_db, NEED_DBIAS=plan.need_dbias, R_PAD=lay.r_pad,
        RANK_CHUNK=rank_chunk(lay.r_pad), DOT_MODE=dot_mode(dy2.dtype),
    )


#: The split design with TMA loads and a persistent grid for its GEMMs where the call allows
#: (:func:`tma_eligible`), the pointer GEMMs elsewhere.
TRITON_TMA = Launchers(_split_forward_with(_tma_gemm_forward), _split_backward_with(_tma_gemm_backward),
                       adapter_prep.assemble, adapter_prep.project_grads, keeps_bt=True)
