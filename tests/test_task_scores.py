"""Batched task scores ||U_t^T z||^2 / ||z||^2 against the float64 reference (Triton interpreter
on the CPU, or compiled on CUDA tensors under DUALLORA_TEST_DEVICE=cuda: see tests/conftest.py)."""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duallora_kernels.ops import _kernel_utils, task_scores
from duallora_kernels.ops.reference import task_scores_reference
import helpers
from helpers import TEST_DEVICE, orthonormal_basis, rel_err

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
randn = functools.partial(helpers.randn, device=TEST_DEVICE)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv(_kernel_utils.POISON_ENV, "1")


def bases(n_tasks, d, u, gen, dtype):
    return torch.stack([orthonormal_basis(d, u, gen) for _ in range(n_tasks)]).to(device=TEST_DEVICE, dtype=dtype)


def check(z, u_bases, backend="triton"):
    got = task_scores(z, u_bases, backend=backend)
    ref = task_scores_reference(z.to(torch.float64), u_bases.to(torch.float64))
    want = torch.float64 if z.dtype == torch.float64 else torch.float32
    assert got.dtype == want and got.shape == (z.shape[0], u_bases.shape[0])
    assert rel_err(got, ref) <= TOL[z.dtype], rel_err(got, ref)
    # energies of orthonormal projections; a half-precision basis is only orthonormal to its rounding
    assert ((got >= 0) & (got <= 1 + TOL[z.dtype])).all()
    return got


@pytest.mark.parametrize(
    "b, n_tasks, d, u, dtype",
    [
        (1, 1, 16, 1, torch.float32),
        (7, 3, 48, 5, torch.float32),
        (37, 4, 100, 17, torch.bfloat16),
        (7, 2, 192, 70, torch.float32),  # u > 64: two chunks of basis vectors
        (197, 5, 192, 8, torch.float16),
        (3, 2, 16, 4, torch.float64),
    ],
)
def test_matches_reference(b, n_tasks, d, u, dtype, gen):
    check(randn(b, d, gen=gen, dtype=dtype), bases(n_tasks, d, u, gen, dtype))


def test_strided_inputs_and_mixed_dtypes(gen):
    z = randn(100, 9, gen=gen, dtype=torch.float32).T  # (9, 100) with column stride 9
    u = bases(3, 100, 6, gen, torch.float32).transpose(1, 2).contiguous().transpose(1, 2)
    assert not z.is_contiguous() and not u.is_contiguous()
    check(z, u)
    check(z.to(torch.bfloat16), u)  # bf16 summaries against float32 bases: float32 out


def test_zero_summary_is_clamped_not_nan(gen):
    z = randn(4, 48, gen=gen, dtype=torch.float32)
    z[1] = 0
    got = check(z, bases(2, 48, 3, gen, torch.float32))
    assert torch.equal(got[1], torch.zeros(2, device=TEST_DEVICE))


def test_full_basis_scores_one_and_empty_shapes(gen):
    z = randn(5, 32, gen=gen, dtype=torch.float32)
    full = check(z, bases(2, 32, 32, gen, torch.float32))
    assert (full - 1).abs().max() <= 1e-5
    assert task_scores(z, torch.zeros(0, 32, 4, device=TEST_DEVICE), backend="triton").shape == (5, 0)
    assert task_scores(z[:0], bases(2, 32, 3, gen, torch.float32), backend="triton").shape == (0, 2)


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 70), n_tasks=st.integers(1, 6), d=st.integers(1, 130), u=st.integers(1, 80),
       seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_fuzz_shapes(b, n_tasks, d, u, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    check(randn(b, d, gen=gen, dtype=dtype), bases(n_tasks, d, min(u, d), gen, dtype))


def test_bad_input_is_refused():
    z, u = torch.randn(2, 8, device=TEST_DEVICE), torch.randn(3, 8, 2, device=TEST_DEVICE)
    with pytest.raises(ValueError, match=f"task_bases is on meta but z is on {z.device}"):
        task_scores(z, u.to("meta"), backend="triton")
    with pytest.raises(TypeError, match="z must have a floating dtype"):
        task_scores(z.int(), u, backend="triton")
    with pytest.raises(ValueError, match=r"task_bases must have shape \(T, d, u\) with d=8"):
        task_scores(z, torch.randn(3, 7, 2, device=TEST_DEVICE), backend="triton")
    with pytest.raises(ValueError, match="z must be 2-D"):
        task_scores(z[0], u, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no CUDA device")
def test_cuda_backend_says_when_there_is_no_device():
    from duallora_kernels.ops import cuda

    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        cuda.task_scores_cuda(torch.randn(2, 8), torch.randn(3, 8, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_backend_matches_reference(dtype, gen):
    z = randn(37, 100, gen=gen, dtype=dtype).cuda()
    z[3] = 0
    check(z, bases(4, 100, 17, gen, dtype).cuda(), backend="cuda")


def test_public_task_scores_stays_a_function_after_a_triton_call():
    import duallora_kernels.ops as ops

    ops.task_scores(torch.randn(2, 8, device=TEST_DEVICE), torch.randn(3, 8, 2, device=TEST_DEVICE), backend="triton")
    assert callable(ops.task_scores)
