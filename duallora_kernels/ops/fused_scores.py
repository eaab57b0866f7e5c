"""Batched task scores ``||U_t^T z||^2 / ||z||^2`` for every task in one Triton launch.

The grid is (row blocks of z) x (tasks): each program projects its BLOCK_B summaries onto one
task's orthonormal basis U_t (d, u), in chunks of BLOCK_U basis vectors, and reduces the squared
projections to one energy per row. Work is tiny (b*T*d*u), so the kernel computes in float32
with IEEE ``tl.dot`` whatever the input dtype: the scores feed a softmax/argmax over tasks and
TF32 rounding there would buy nothing.

Passes: z (b, d) is read once per task program column (plus once for its norm) and the bases
(T, d, u) once per row block; the (b, T) result is written once. Output dtype follows
:func:`.reference.task_scores_reference`: float32, or float64 for float64 z, which runs the
reference (a float64 ``tl.dot`` has no tensor-core path on Hopper and is not validated here).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._kernel_utils import (autotune_limit, current_arch, first_configs, interpreting, launch, new_output,
                            pow2_at_least, size_bucket, smem_limit)
from .reference import TINY_NORM, task_scores_reference

__all__ = ["task_scores_triton"]



def _configs() -> list[triton.Config]:
    """(BLOCK_B, BLOCK_D, num_warps, num_stages) for a GPU, in order of preference; one small tile
    under the interpreter; with ``DUALLORA_AUTOTUNE=0`` (:data:`._kernel_utils.AUTOTUNE_ENV`)
    (32, 32, 4, 2), with N the first N that :func:`_prune` keeps for the arch."""
    if interpreting():
        return [triton.Config({"BLOCK_B": 16, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
    # Short d-steps: the IEEE float32 dot runs on FMA units with its operands in registers, and a
    # 64-wide step spilled 3.6 KB per thread on sm_90 (32 x 32 takes 72-196 registers).
    shapes = [(32, 32, 4, 2), (16, 16, 4, 2), (32, 16, 4, 2), (16, 32, 4, 2)]
    if autotune_limit() == 0:
        shapes = [(32, 32, 4, 2)]
    return [triton.Config({"BLOCK_B": bb, "BLOCK_D": bd}, num_warps=w, num_stages=s) for bb, bd, w, s in shapes]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    # Pipelined z (BLOCK_B x BLOCK_D) and basis (BLOCK_D x BLOCK_U) tiles per stage must fit the arch.
    if len(configs) <= 1:
        return configs
    z, u = named_args["z_ptr"], named_args["u_ptr"]
    limit = smem_limit(current_arch())
    keep = [c for c in configs
            if c.num_stages * c.kwargs["BLOCK_D"] * (c.kwargs["BLOCK_B"] * z.element_size()
                                                     + kwargs["BLOCK_U"] * u.element_size()) <= limit] or configs[:1]
    return first_configs(keep)


@triton.autotune(configs=_configs(), key=["b_bucket", "d", "u", "BLOCK_U"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _task_scores_kernel(
    z_ptr, u_ptr, out_ptr, b, d, u, tiny,
    stride_zb, stride_zd, stride_ut, stride_ud, stride_uu, stride_ob, stride_ot, b_bucket,
    BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    task = tl.program_id(1).to(tl.int64)
    row_ok = rows < b
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_zb
    basis = u_ptr + task * stride_ut

    norm = tl.zeros((BLOCK_B,), tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        z = tl.load(z_rows + ds[None, :] * stride_zd, mask=row_ok[:, None] & (ds < d)[None, :], other=0.0).to(tl.float32)
        norm += tl.sum(z * z, axis=1)

    energy = tl.zeros((BLOCK_B,), tl.float32)
    for u0 in range(0, u, BLOCK_U):
        us = u0 + tl.arange(0, BLOCK_U)
        proj = tl.zeros((BLOCK_B, BLOCK_U), tl.float32)
        for d0 in range(0, d, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < d
            z = tl.load(z_rows + ds[None, :] * stride_zd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            ub = tl.load(basis + ds[:, None] * stride_ud + us[None, :] * stride_uu,
                         mask=d_ok[:, None] & (us < u)[None, :], other=0.0)
            proj = tl.dot(z.to(tl.float32), ub.to(tl.float32), proj, input_precision="ieee")
        energy += tl.sum(proj * proj, axis=1)

    # Scale-invariant down to float32's smallest normal ||z||^2; below it (an all-zero z) the score is 0.
    ok = norm >= tiny
    score = tl.where(ok, energy / tl.where(ok, norm, 1.0), 0.0)
    tl.store(out_ptr + rows.to(tl.int64) * stride_ob + task * stride_ot, score, mask=row_ok)


def task_scores_triton(z: Tensor, task_bases: Tensor) -> Tensor:
    """(b, T) scores of summaries z (b, d) against bases (T, d, u); see
    :func:`.reference.task_scores_reference` (same dtype rule and small-norm rule)."""
    if z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return task_scores_reference(z, task_bases)
    b, d = z.shape
    n_tasks, _, u = task_bases.shape
    out = new_output((b, n_tasks), torch.float32, z.device)
    if b == 0 or n_tasks == 0:
        return out
    block_u = min(pow2_at_least(u), 64)
    grid = lambda meta: (triton.cdiv(b, meta["BLOCK_B"]), n_tasks)  # noqa: E731
    launch(
        _task_scores_kernel, grid, z, task_bases, out, b, d, u, TINY_NORM,
        z.stride(0), z.stride(1), *task_bases.stride(), out.stride(0), out.stride(1), size_bucket(b),
        BLOCK_U=block_u,
    )
    return out
