"""Streaming Gram accumulation ``x^T x`` (d, d) over all rows of x (..., d), in Triton.

Used to collect a layer's input statistics for its bases in the same pass that runs the model
over a task's data. One launch; each program owns one (BLOCK_D x BLOCK_D) output tile on or
above the diagonal and streams a chunk of rows through it, accumulating in float32. Only the
upper triangle is computed: an off-diagonal tile is stored twice (as itself and transposed),
halving the flops of a plain ``x.T @ x``. The result is exactly symmetric by construction (the
eigendecomposition downstream assumes it): a diagonal tile is symmetrised as ``(G + G^T) / 2``
before it is stored, and when row chunks are summed with atomics only the upper triangle is
summed and then mirrored.

Passes: x is read once in the GEMM sense (each row block is loaded by the ~(d/BLOCK_D)^2/2
programs of the tiles it feeds, which run side by side and share it through L2); the (d, d)
result is written once. When m is
large relative to the tile count the rows are split over several programs per tile, which then
add their partial tiles with float32 atomics (run-dependent summation order at float32
rounding); with one chunk per tile the result is stored directly and is deterministic.

Dtypes: float32, bfloat16, float16 in, float32 out (fp32 operands use TF32 only where torch's
matmuls may). float64 input runs the PyTorch reference (float64 out): a float64 ``tl.dot`` has
no tensor-core path on Hopper and is not validated here. Non-contiguous x is read through its
strides when its leading dimensions collapse into one row index, else copied once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._kernel_utils import (autotune_limit, capturing, current_arch, dot_mode, first_configs, interpreting, launch,
                            new_output, rows_view, size_bucket, smem_limit)
from ._triton_functions import mma, row_offsets
from .reference import gram_reference

__all__ = ["gram_triton"]

#: Row chunks per tile are multiples of this (any BLOCK_M of the configs divides it), so no
#: program but the last one of a tile runs a masked-off partial row block.
_CHUNK_QUANTUM = 256


#: (BLOCK_D, BLOCK_M, num_warps, num_stages) in order of preference. IEEE float32 dots run on FMA
#: units with their operands in registers: (64, 32) with 4 warps spilled 888 bytes on sm_80, with 8
#: warps it takes 76 registers (ahead-of-time compiles, tests/test_aot_compile.py).
LOWP_SHAPES = [(128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 4), (64, 128, 4, 3), (64, 32, 8, 2)]
FP32_SHAPES = [(64, 32, 8, 2), (32, 16, 4, 2)]
FIXED_SHAPE = (64, 32, 8, 2)


def _configs() -> list[triton.Config]:
    """Every config either dtype may use (:func:`_prune` picks per dtype and arch); one small tile
    under the interpreter; with ``DUALLORA_AUTOTUNE=0`` (:data:`._kernel_utils.AUTOTUNE_ENV`)
    :data:`FIXED_SHAPE`."""
    if interpreting():
        return [triton.Config({"BLOCK_D": 32, "BLOCK_M": 32}, num_warps=4, num_stages=1)]
    shapes = [FIXED_SHAPE] if autotune_limit() == 0 else list(dict.fromkeys(LOWP_SHAPES + FP32_SHAPES))
    return [triton.Config({"BLOCK_D": bd, "BLOCK_M": bm}, num_warps=w, num_stages=s) for bd, bm, w, s in shapes]


def plan_resources(shape: tuple[int, int, int, int], elsize: int) -> tuple[int, int]:
    """(shared memory bytes, float32 accumulator registers per thread) of a config: two pipelined
    (BLOCK_D x BLOCK_M) operand tiles per stage; one (BLOCK_D x BLOCK_D) accumulator."""
    bd, bm, warps, stages = shape
    return 2 * bd * bm * elsize * stages, bd * bd // (32 * warps)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    if len(configs) <= 1:
        return configs
    x = named_args["x_ptr"]
    wanted = FP32_SHAPES if x.dtype == torch.float32 else LOWP_SHAPES
    limit = smem_limit(current_arch())

    def shape(c: triton.Config) -> tuple[int, int, int, int]:
        return c.kwargs["BLOCK_D"], c.kwargs["BLOCK_M"], c.num_warps, c.num_stages

    keep = sorted((c for c in configs if shape(c) in wanted), key=lambda c: wanted.index(shape(c)))
    keep = [c for c in keep if plan_resources(shape(c), x.element_size())[0] <= limit] or keep[-1:]
    return first_configs(keep)


@triton.autotune(configs=_configs(), key=["d", "chunk_bucket", "USE_ATOMIC"], reset_to_zero=["g_ptr"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _gram_kernel(
    x_ptr, g_ptr, m, d, chunk, rows_per_batch, stride_xb, stride_xm, stride_xk, chunk_bucket,
    USE_ATOMIC: tl.constexpr, DOT_MODE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if tj < ti:
        return  # lower tiles are the transposes of upper ones, stored by those
    ci = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    cj = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    ci_ok = ci < d
    cj_ok = cj < d
    start = tl.program_id(2) * chunk
    stop = tl.minimum(start + chunk, m)
    acc = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
    for m0 in range(start, stop, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < stop
        offs = row_offsets(rows, rows_per_batch, stride_xb, stride_xm)
        xi_t = tl.load(x_ptr + offs[None, :] + ci[:, None] * stride_xk, mask=ci_ok[:, None] & row_ok[None, :], other=0.0)
        xj = tl.load(x_ptr + offs[:, None] + cj[None, :] * stride_xk, mask=row_ok[:, None] & cj_ok[None, :], other=0.0)
        acc = mma(xi_t, xj, acc, DOT_MODE)
    mask = ci_ok[:, None] & cj_ok[None, :]
    upper = g_ptr + ci[:, None] * d + cj[None, :]
    if USE_ATOMIC:
        # Only the upper tiles are summed; the launcher mirrors them once all chunks are in, so
        # (i, j) and (j, i) are one float, not two sums whose atomics arrived in different orders.
        tl.atomic_add(upper, acc, mask=mask, sem="relaxed")
    else:
        if ti == tj:
            # X_i^T X_i from tensor cores (or any BLAS) is not bitwise symmetric; a + b == b + a is.
            acc = (acc + tl.trans(acc)) * 0.5
        tl.store(upper, acc, mask=mask)
        if ti != tj:
            tl.store(g_ptr + cj[None, :] * d + ci[:, None], acc, mask=mask)


def _row_chunk(m: int, d: int, device: torch.device) -> int:
    """Rows per program: all of them under the interpreter or when the tiles alone fill the GPU,
    else enough chunks that about four waves of programs run."""
    if capturing():  # the ahead-of-time compile check: plan as on an H100 (132 SMs), atomics included
        sms = 132
    elif interpreting() or device.type != "cuda":
        return max(m, 1)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(d, 64)
    programs = tiles * (tiles + 1) // 2
    target = 4 * sms
    splits = max(1, min(triton.cdiv(target, programs), triton.cdiv(m, _CHUNK_QUANTUM)))
    return triton.cdiv(triton.cdiv(m, splits), _CHUNK_QUANTUM) * _CHUNK_QUANTUM


def gram_triton(x: Tensor) -> Tensor:
    """``x^T x`` (d, d) over all rows of x (..., d); see :func:`.reference.gram_reference`."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return gram_reference(x)
    d = x.shape[-1]
    xr = rows_view(x)
    m = xr.m
    if m == 0 or d == 0:
        return torch.zeros((d, d), dtype=torch.float32, device=x.device)
    chunk = _row_chunk(m, d, x.device)
    splits = triton.cdiv(m, chunk)
    use_atomic = splits > 1
    g = torch.zeros((d, d), dtype=torch.float32, device=x.device) if use_atomic else new_output((d, d), torch.float32, x.device)
    grid = lambda meta: (triton.cdiv(d, meta["BLOCK_D"]), triton.cdiv(d, meta["BLOCK_D"]), splits)  # noqa: E731
    launch(
        _gram_kernel, grid, xr.t, g, m, d, chunk, *xr.addressing, size_bucket(chunk),
        USE_ATOMIC=use_atomic, DOT_MODE=dot_mode(x.dtype),
    )
    if use_atomic:
        g = g.triu() + g.triu(1).T  # mirror the summed upper triangle: exactly symmetric
    return g
