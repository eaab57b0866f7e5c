"""Every public op, under every backend name, on meta tensors: a meta result of the shape and dtype the
op gives on real tensors (the CPU reference's), or for a bad backend name the same one-line error as
on real tensors. Meta tensors hold no data, so no kernel may run on them (issue 24: gram's Triton
launcher failed inside torch's storage code)."""
from __future__ import annotations

import pytest
import torch

from duallora_kernels.ops import BACKENDS, dual_lora_linear, gram, task_scores
import helpers

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _meta(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to("meta")


def _same_result(meta_out: torch.Tensor, real_out: torch.Tensor) -> None:
    assert meta_out.device.type == "meta"
    assert (meta_out.shape, meta_out.dtype) == (real_out.shape, real_out.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_on_meta_tensors(backend, dtype, gen):
    x = torch.randn(3, 7, 20, generator=gen).to(dtype)
    _same_result(gram(_meta(x), backend=backend), gram(x, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_task_scores_on_meta_tensors(backend, dtype, gen):
    z = torch.randn(5, 24, generator=gen).to(dtype)
    bases = torch.stack([helpers.orthonormal_basis(24, 4, gen, torch.float32) for _ in range(3)]).to(dtype)
    _same_result(task_scores(_meta(z), _meta(bases), backend=backend), task_scores(z, bases, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dual_lora_linear_on_meta_tensors(backend, dtype, gen):
    x, w, b, kw = helpers.dual_lora_problem(6, 16, 12, r_o=2, r_r=2, frozen_blocks=1, k=5, gen=gen, dtype=dtype,
                                            lead=(2,))
    kw = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    kw["basis"] = helpers.orthonormal_basis(16, 5, gen, torch.float64)  # passes the real call's check in any dtype
    real = dual_lora_linear(x.detach(), w, b.detach(), backend="torch", **kw)
    meta = dual_lora_linear(_meta(x), _meta(w), _meta(b), backend=backend,
                            **{k: _meta(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    _same_result(meta, real)


def test_a_bad_backend_name_fails_on_meta_tensors_as_on_real_ones():
    x = torch.empty(4, 8, device="meta")
    for call in (lambda: gram(x, backend="gpu"), lambda: task_scores(x, torch.empty(2, 8, 3, device="meta"), backend="gpu"),
                 lambda: dual_lora_linear(x, torch.empty(5, 8, device="meta"), backend="gpu")):
        with pytest.raises(ValueError, match="backend must be one of 'auto', 'triton', 'torch', 'cuda', got 'gpu'"):
            call()
