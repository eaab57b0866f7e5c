"""The streaming Gram kernel against the float64 reference (Triton interpreter on the CPU, or
compiled on CUDA tensors under DUALLORA_TEST_DEVICE=cuda: see tests/conftest.py)."""
from __future__ import annotations

import functools
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duallora_kernels.ops import _kernel_utils, gram
from duallora_kernels.ops.reference import gram_reference
import helpers
from helpers import TEST_DEVICE, rel_err

# The kernel module shares the public function's name; reach it through sys.modules.
gram_module = importlib.import_module("duallora_kernels.ops.fused_gram")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
randn = functools.partial(helpers.randn, device=TEST_DEVICE)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv(_kernel_utils.POISON_ENV, "1")


def check(x: torch.Tensor, backend="triton"):
    got = gram(x, backend=backend)
    ref = gram_reference(x.to(torch.float64))
    want_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert got.dtype == want_dtype and got.shape == ref.shape
    assert rel_err(got, ref) <= TOL[x.dtype], rel_err(got, ref)
    assert torch.equal(got, got.T)  # mirrored tiles: exactly symmetric
    return got


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((1, 16), torch.float32),
        ((7, 48), torch.float32),
        ((1, 197, 100), torch.float32),
        ((2, 197, 192), torch.bfloat16),
        ((394, 48), torch.float16),
        ((5,), torch.float32),
        ((7, 16), torch.float64),
    ],
)
def test_matches_reference(shape, dtype, gen):
    check(randn(*shape, gen=gen, dtype=dtype))


@pytest.mark.parametrize("layout", ["transposed", "col_stride", "permuted4d"])
def test_strided_input(layout, gen):
    if layout == "transposed":
        x = randn(197, 2, 100, gen=gen, dtype=torch.float32).transpose(0, 1)
    elif layout == "col_stride":
        x = randn(7, 96, gen=gen, dtype=torch.bfloat16)[:, ::2]
    else:
        x = randn(3, 5, 2, 48, gen=gen, dtype=torch.float32).permute(2, 1, 0, 3)
    assert not x.is_contiguous()
    check(x)


def test_split_rows_accumulate_with_atomics(gen, monkeypatch):
    # On a GPU long inputs are split over several programs per tile; force that path (the
    # interpreter never splits; compiled, this forces chunks smaller than the GPU split's).
    monkeypatch.setattr(gram_module, "_row_chunk", lambda m, d, device: 64)
    check(randn(394, 48, gen=gen, dtype=torch.float32))
    check(randn(2, 197, 100, gen=gen, dtype=torch.float16))


def test_no_rows():
    got = gram(torch.zeros(0, 16, device=TEST_DEVICE), backend="triton")
    assert got.dtype == torch.float32 and torch.equal(got, torch.zeros(16, 16, device=TEST_DEVICE))


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 400), d=st.integers(1, 130), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_fuzz_shapes(m, d, seed, dtype):
    check(randn(m, d, gen=torch.Generator().manual_seed(seed), dtype=dtype))


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        gram(torch.ones(3, 4, dtype=torch.int32, device=TEST_DEVICE), backend="triton")
    with pytest.raises(ValueError, match="at least one dimension"):
        gram(torch.tensor(1.0, device=TEST_DEVICE), backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no CUDA device")
def test_cuda_backend_says_when_there_is_no_device():
    from duallora_kernels.ops import cuda

    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        cuda.gram_cuda(torch.randn(3, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_backend_matches_reference(dtype, gen):
    check(randn(2, 197, 100, gen=gen, dtype=dtype).cuda(), backend="cuda")
    check(randn(5000, 48, gen=gen, dtype=dtype).cuda()[:, ::2], backend="cuda")  # split rows, strided


def test_public_gram_stays_a_function_after_a_triton_call():
    import duallora_kernels.ops as ops

    ops.gram(torch.randn(3, 4, device=TEST_DEVICE), backend="triton")
    assert callable(ops.gram)
