"""Pieces every Triton design of the fused DualLoRA linear shares (:mod:`.fused_linear`): the
grouped tile order, the masked tile loads of the main loops, the per-row, per-rank scale S read
through the gate's strides, and the gate's launch arguments."""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._kernel_utils import rows_view
from .launchers import Layout

__all__ = ["tile_ids", "load_rows", "load_w0", "scales", "gate_args"]


@triton.jit
def tile_ids(pid, m, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Row blocks are visited GROUP_M at a time, column tiles inner: the programs that share an
    # X (or dY) row block then run close together and find it in L2.
    tiles_n = tl.cdiv(n, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tl.cdiv(m, BLOCK_M) - first_m, GROUP_M)
    in_group = pid % per_group
    return first_m + in_group % group_rows, in_group // group_rows


@triton.jit
def load_rows(row_ptrs, cols, stride_col, row_ok, col_ok):
    # A (rows x cols) tile of x or dY, whose rows are addressed one pointer each (row_offsets: a
    # strided 3-D input is read in place, never copied); zero outside the masks.
    return tl.load(row_ptrs[:, None] + cols[None, :] * stride_col, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def load_w0(w_ptr, n_idx, d_idx, stride_wn, stride_wk, n_ok, d_ok):
    # A tile of W0 (n, d) at broadcast indices: W0^T (BLOCK_K x BLOCK_N) in forward, n_idx along
    # the columns; W0 (BLOCK_K x BLOCK_D) in backward, n_idx along the rows. The n term comes
    # first either way: that order of the address sum compiles to fewer registers in forward.
    return tl.load(w_ptr + n_idx * stride_wn + d_idx * stride_wk, mask=n_ok & d_ok, other=0.0)


@triton.jit
def scales(gate_ptr, g_rows_per_batch, stride_gb, stride_gm, stride_gg, rows, ranks, m, r, r_orth, r_blk,
           orth_scale, res_scale, HAS_GATE: tl.constexpr):
    # S for (rows x padded ranks), float32. Padding columns get 0 so they contribute nothing
    # even if a padded operand were not masked. The gate is read through its own strides (a
    # per-sample gate broadcast over the tokens has a 0 token stride): it is never copied.
    is_orth = ranks < r_orth
    is_res = (ranks >= r_orth) & (ranks < r)
    if HAS_GATE:
        block = tl.maximum(ranks - r_orth, 0) // r_blk
        # int32 offsets (gate_args checks the gate's extent fits): 64-bit index math on a
        # (rows x ranks) tile cost ~36 registers per thread in the forward's epilogue.
        g_offs = (rows // g_rows_per_batch) * stride_gb + (rows % g_rows_per_batch) * stride_gm
        g_ptrs = gate_ptr + (g_offs[:, None] + block[None, :] * stride_gg)
        res = res_scale * tl.load(g_ptrs, mask=(rows < m)[:, None] & is_res[None, :], other=0.0).to(tl.float32)
    else:
        res = tl.zeros((rows.shape[0], ranks.shape[0]), tl.float32) + res_scale
    return tl.where(is_orth[None, :], orth_scale, tl.where(is_res[None, :], res, 0.0))


#: The largest element offset :func:`scales` may form in int32.
_INT32_MAX = 2**31 - 1


def gate_args(lay: Layout, gate: Tensor | None, like: Tensor) -> tuple:
    """(gate tensor, rows_per_batch, stride_batch, stride_row, stride_col) for :func:`scales`."""
    if lay.has_gate:
        gv = rows_view(gate)
        batches = -(-gv.m // gv.rows_per_batch) if gv.m else 0
        extent = max(batches - 1, 0) * abs(gv.stride_batch) + (gv.rows_per_batch - 1) * abs(gv.stride_row) \
            + (gate.shape[-1] - 1) * abs(gv.stride_col)
        if extent > _INT32_MAX:
            raise ValueError(f"gate spans {extent} elements; the kernels address it with int32 offsets "
                             f"(at most {_INT32_MAX}): pass a per-sample gate that broadcasts over the tokens")
        return (gv.t, gv.rows_per_batch, gv.stride_batch, gv.stride_row, gv.stride_col)
    return (like, 1, 0, 0, 0)  # never read: HAS_GATE is off
