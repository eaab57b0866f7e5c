"""The fused Triton DualLoRA linear (forward and backward) against the float64 reference.

Runs the kernels through Triton's CPU interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), or compiled on CUDA tensors under DUALLORA_TEST_DEVICE=cuda
(bench/run_gpu_tests.sh); helpers.TEST_DEVICE is where the inputs are built. Every output buffer
is NaN-poisoned before each launch (DUALLORA_POISON_OUTPUTS=1), so an element no program writes
fails the comparison; rel_err turns any NaN/inf into inf.
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duallora_kernels.ops import _kernel_utils, dual_lora_linear
from duallora_kernels.ops.reference import (adapter_matrices, column_scales, dual_lora_linear_reference, project_onto,
                                            project_out)
import helpers
from helpers import TEST_DEVICE, rel_err

# float32: IEEE tl.dot (conftest keeps torch's float32 matmul precision at "highest" on a GPU too)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
dual_lora_problem = functools.partial(helpers.dual_lora_problem, device=TEST_DEVICE)
orthonormal_basis = functools.partial(helpers.orthonormal_basis, device=TEST_DEVICE)
randn = functools.partial(helpers.randn, device=TEST_DEVICE)
GRAD_NAMES = ("x", "weight", "bias", "orth_a", "orth_b", "res_a", "res_b")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setenv(_kernel_utils.POISON_ENV, "1")


def _leaves(x, w, b, kw):
    found = {"x": x, "weight": w, "bias": b, **{k: kw.get(k) for k in GRAD_NAMES[3:]}}
    return {k: v for k, v in found.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def _to64(t):
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def _kw64(kw):
    # The basis stays as given (any float dtype is allowed; the reference projects in float64):
    # rounding an fp32 basis to float64 would fail float64's tighter orthonormality check.
    return {k: v if k == "basis" else _to64(v) for k, v in kw.items()}


def _adapter_grad_error_scales(x64, kw64, dy64) -> dict[str, float]:
    """Adapter gradient scales: the norms of |terms| products, with the *unprojected* A rows (C_o, C_r as stored).

    Rounding error in a gradient that passes through a memory projection scales with these
    norms, not with the projected gradient's, which can be far smaller (a basis that nearly
    spans the gradient, or k = d, where A_o is pure rounding noise): they are the honest
    denominators for orth_a, res_a and, through T, for orth_b and res_b.

    Each product is taken of absolute values (|dY| |B|, |x| |A|^T, ...): a float32 sum's rounding
    error is bounded by its terms' magnitudes, not by the sum, which cancellation can make
    arbitrarily small (m = 1, n = 16: dY B is one short dot; about 1% of seeds failed there).
    """
    names = ("orth_a", "orth_b", "res_a", "res_b", "frozen_a", "frozen_b")
    a, b, r_orth, r_train = adapter_matrices(*(kw64.get(k) for k in names), kw64.get("basis"))
    if a is None:
        return {}
    raw_a = torch.cat([kw64[k] for k in ("orth_a", "frozen_a", "res_a") if kw64.get(k) is not None and len(kw64[k])])
    d, r = x64.shape[-1], a.shape[0]
    x2, dy2 = x64.detach().reshape(-1, d), dy64.reshape(-1, b.shape[0])
    gate = kw64.get("gate")
    if gate is not None:
        gate = gate.expand(*x64.shape[:-1], gate.shape[-1]).reshape(x2.shape[0], gate.shape[-1])
    s = column_scales(gate, x2.shape[0], r_orth, r - r_orth, kw64.get("orth_scale", 1.0),
                      kw64.get("res_scale", 1.0), torch.float64, x2.device)
    x2, dy2, s = x2.abs(), dy2.abs(), s.abs()
    da = ((dy2 @ b.detach().abs()) * s).T @ x2
    dbt = ((x2 @ raw_a.detach().abs().T) * s).T @ dy2
    rows = {"orth": slice(0, r_orth), "res": slice(r - r_train, r)}
    return {f"{blk}_{ab}": g[sl].norm().item() for blk, sl in rows.items() for ab, g in (("a", da), ("b", dbt))}


#: The Triton designs (ops/fused_linear.py): every kernel body of each is checked here.
DESIGNS = ("single", "split", "tma")


def check_against_reference(x, w, b, kw, *, sum_loss=False, backend="triton", design="auto"):
    """Run ``backend`` (with ``design``) and the float64 reference on the same values; compare Y and every grad."""
    dtype = x.dtype
    y = dual_lora_linear(x, w, b, backend=backend, design=design, **kw)
    x64, w64, b64 = _to64(x), _to64(w), _to64(b)
    kw64 = _kw64(kw)
    # the spec: plain differentiable PyTorch in float64, not the registered op
    y64 = dual_lora_linear_reference(x64, w64, b64, **kw64)
    assert y.dtype == dtype and y.shape == y64.shape
    assert rel_err(y, y64) <= TOL[dtype], f"Y: rel err {rel_err(y, y64):.3g}"
    got, ref = _leaves(x, w, b, kw), _leaves(x64, w64, b64, kw64)
    if not got:
        return
    # sum_loss: dY = ones expanded with stride 0, a non-contiguous gradient
    dy = torch.ones_like(y) if sum_loss else torch.randn(y.shape, dtype=torch.float64).to(device=y.device, dtype=dtype)
    grads = torch.autograd.grad(y.sum() if sum_loss else y, list(got.values()), None if sum_loss else dy)
    refs = torch.autograd.grad(y64, list(ref.values()), dy.double())
    scale = _adapter_grad_error_scales(x64, kw64, dy.double())
    for name, g, r in zip(got, grads, refs):
        assert g is not None and g.dtype == dtype and g.shape == r.shape, name
        assert torch.isfinite(g).all(), f"d{name} is not finite"
        # a zero reference (silenced gates, no rows) must come back exactly zero
        denom = max(r.double().norm().item(), scale.get(name, 0.0))
        err = (g.double() - r).norm().item() / denom if denom > 0 else g.double().norm().item()
        assert err <= TOL[dtype], f"d{name}: rel err {err:.3g}"


def _strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x (..., m, d) laid out non-contiguously."""
    x = x.detach()
    if layout == "transposed":  # (L, B, d) storage seen as (B, L, d): rows don't collapse
        out = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "col_stride":  # every other column of a wider tensor
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        out = wide[..., ::2]
    elif layout == "permuted4d":  # no 2-D or 3-D view exists: the launcher copies once
        out = x.permute(2, 1, 0, 3).contiguous().permute(2, 1, 0, 3)
    else:
        raise ValueError(layout)
    assert not out.is_contiguous() and torch.equal(out, x)
    return out.requires_grad_()


# (lead, m, d, n, r_o, r_r, frozen_blocks, k, dtype, layout): together these cover every value of
# m in {1, 7, 197, 394}, d and n in {16, 48, 100, 192}, r in {1, 3, 8, 17}, 2-D/3-D/4-D x, strided x.
CASES = [
    ((), 1, 16, 16, 1, 0, 0, 0, torch.float32, None),
    ((), 7, 48, 100, 3, 3, 2, 5, torch.float32, None),
    ((1,), 197, 100, 48, 8, 8, 1, 12, torch.float32, "col_stride"),
    ((2,), 197, 192, 192, 17, 17, 2, 40, torch.float32, "transposed"),
    ((), 394, 16, 192, 3, 1, 3, 4, torch.float32, None),
    ((2, 3), 7, 48, 16, 8, 3, 1, 6, torch.float32, "permuted4d"),
    ((3,), 7, 100, 48, 8, 8, 1, 12, torch.bfloat16, "transposed"),
    ((), 394, 192, 100, 17, 3, 2, 30, torch.bfloat16, None),
    ((), 197, 48, 192, 1, 8, 1, 9, torch.float16, "col_stride"),
    ((), 7, 16, 48, 3, 1, 0, 2, torch.float16, None),
]


# The pointer-addressed designs on every case (the tma design runs the split one's pointer GEMMs on
# these: strided x, dims or ranks not multiples of 8, float32; its TMA kernels: test_tma_path_*).
@pytest.mark.parametrize("design", ["single", "split"])
@pytest.mark.parametrize("lead, m, d, n, r_o, r_r, frozen, k, dtype, layout", CASES)
def test_matches_reference(lead, m, d, n, r_o, r_r, frozen, k, dtype, layout, design, gen):
    x, w, b, kw = dual_lora_problem(m, d, n, r_o, r_r, frozen, k, gen, dtype=dtype, lead=lead)
    if layout:
        x = _strided(x, layout)
    check_against_reference(x, w, b, kw, design=design)


def _kernels_of_a_step(fn) -> set[str]:
    launched: list = []
    with _kernel_utils.observe_launches(lambda k, g, a, kw: launched.append(_kernel_utils.kernel_name(k))):
        fn()
    return set(launched)


# (lead, m, d, n, r_o, r_r, frozen, k, dtype): calls the TMA GEMMs take -- row-major x, d, n and the
# stacked rank multiples of 8, bf16/fp16 -- with tail tiles in m, n, d and the K-extension.
TMA_CASES = [
    ((2,), 70, 48, 40, 8, 8, 2, 12, torch.bfloat16),
    ((), 197, 104, 56, 4, 4, 0, 20, torch.float16),
    ((), 33, 16, 24, 8, 0, 0, 0, torch.bfloat16),
]


@pytest.mark.parametrize("lead, m, d, n, r_o, r_r, frozen, k, dtype", TMA_CASES)
def test_tma_path_matches_reference(lead, m, d, n, r_o, r_r, frozen, k, dtype, gen):
    x, w, b, kw = dual_lora_problem(m, d, n, r_o, r_r, frozen, k, gen, dtype=dtype, lead=lead)
    ran = _kernels_of_a_step(lambda: check_against_reference(x, w, b, kw, design="tma"))
    assert {"_gemm_forward_tma_kernel", "_gemm_backward_tma_kernel"} <= ran, ran
    assert not {"_gemm_forward_kernel", "_gemm_backward_kernel"} & ran, ran


def test_tma_design_falls_back_to_pointer_gemms_where_a_descriptor_cannot_describe_the_call(gen):
    # rank 3 + 3 (not a multiple of 8), and a transposed x: the split design's pointer GEMMs run
    for r_o, layout in ((3, None), (8, "transposed")):
        x, w, b, kw = dual_lora_problem(20, 48, 40, r_o, 3 if r_o == 3 else 8, 1, 6, gen, dtype=torch.bfloat16,
                                        lead=(2,))
        if layout:
            x = _strided(x, layout)
        ran = _kernels_of_a_step(lambda: check_against_reference(x, w, b, kw, design="tma"))
        assert "_gemm_forward_kernel" in ran and "_gemm_forward_tma_kernel" not in ran, ran


def test_one_dimensional_input_and_no_bias(gen):
    x, w, _, kw = dual_lora_problem(1, 48, 16, 3, 0, 0, 0, gen, dtype=torch.float32)
    check_against_reference(x[0].detach().requires_grad_(), w, None, kw)


@pytest.mark.parametrize("design", DESIGNS)
def test_empty_memory_task_one(design, gen):
    # Task 1: no basis at all, or a basis with zero columns; orthogonal adapter only.
    x, w, b, kw = dual_lora_problem(197, 96, 48, 8, 0, 0, 0, gen, dtype=torch.bfloat16)
    check_against_reference(x, w, b, kw, design=design)
    check_against_reference(x, w, b, {**kw, "basis": torch.zeros(96, 0, device=TEST_DEVICE, dtype=torch.float32)},
                            design=design)


@pytest.mark.parametrize("design", DESIGNS)
def test_gates_all_zero_with_several_frozen_blocks(design, gen):
    x, w, b, kw = dual_lora_problem(197, 48, 96, 4, 4, 3, 8, gen, dtype=torch.float32)
    kw["gate"] = torch.zeros_like(kw["gate"])
    check_against_reference(x, w, b, kw, design=design)
    # residual blocks silenced: their gradients are exactly zero, the orthogonal path still trains
    y = dual_lora_linear(x, w, b, backend="triton", design=design, **kw)
    ga, gb, goa = torch.autograd.grad(y.square().sum(), [kw["res_a"], kw["res_b"], kw["orth_a"]])
    assert torch.equal(ga, torch.zeros_like(ga)) and torch.equal(gb, torch.zeros_like(gb))
    assert goa.abs().max() > 0


@pytest.mark.parametrize("design", DESIGNS)
def test_broadcast_gate_and_expanded_output_grad(design, gen):
    # One gate row for the whole batch (stride 0) and dY from y.sum() (also stride 0).
    x, w, b, kw = dual_lora_problem(7, 48, 16, 4, 4, 2, 6, gen, dtype=torch.bfloat16, lead=(2,))
    kw["gate"] = torch.tensor([0.2, 0.0, 0.9], device=TEST_DEVICE)
    check_against_reference(x, w, b, kw, sum_loss=True, design=design)


@pytest.mark.parametrize("design", DESIGNS)
def test_frozen_only_residual_and_no_adapters(design, gen):
    # Inference-style: frozen blocks with gates but nothing trainable in the adapter.
    x, w, b, kw = dual_lora_problem(197, 48, 48, 0, 8, 2, 16, gen, dtype=torch.bfloat16)
    for name in ("res_a", "res_b"):
        kw.pop(name)
    kw["gate"] = kw["gate"][:, :2]
    check_against_reference(x, w, b, kw, design=design)
    check_against_reference(x, w, b, {}, design=design)  # the plain linear layer


@pytest.mark.parametrize("design", DESIGNS)
def test_gradient_subsets(design, gen):
    # Only some tensors require grad: the others must come back None and cost nothing.
    x, w, b, kw = dual_lora_problem(7, 48, 16, 4, 4, 1, 6, gen, dtype=torch.float32)
    x.requires_grad_(False)
    b.requires_grad_(False)
    kw["orth_a"].requires_grad_(False)
    kw["res_b"].requires_grad_(False)
    w.requires_grad_(True)  # a trainable W0 gets dY^T X
    check_against_reference(x, w, b, kw, design=design)
    kw["orth_b"].requires_grad_(False)
    check_against_reference(x, w.detach(), b, kw, design=design)  # dA of the residual block alone
    # each of dX, dB and dbias alone, in bf16 (the tma design's TMA GEMMs)
    x, w, b, kw = dual_lora_problem(40, 48, 24, 4, 4, 1, 6, gen, dtype=torch.bfloat16)
    for name in ("orth_a", "res_a", "res_b"):
        kw[name].requires_grad_(False)
    check_against_reference(x.detach(), w, b.detach().requires_grad_(False), kw, design=design)  # dB alone
    kw["orth_b"].requires_grad_(False)
    check_against_reference(x, w, b.detach(), kw, design=design)  # dX alone
    check_against_reference(x.detach(), w, b, kw, design=design)  # dbias alone


@pytest.mark.parametrize("design", DESIGNS)
def test_empty_batch(design, gen):
    x, w, b, kw = dual_lora_problem(0, 48, 16, 3, 3, 1, 6, gen, dtype=torch.float32, lead=(2,))
    check_against_reference(x, w, b, kw, design=design)


def test_float64_runs_the_reference(gen):
    x, w, b, kw = dual_lora_problem(7, 16, 16, 3, 3, 1, 4, gen, dtype=torch.float64)
    check_against_reference(x, w, b, kw)


def test_no_grad_call_matches_and_keeps_nothing(gen):
    x, w, b, kw = dual_lora_problem(7, 48, 16, 3, 3, 1, 6, gen, dtype=torch.float32)
    with torch.no_grad():
        y = dual_lora_linear(x, w, b, backend="triton", **kw)
    assert y.grad_fn is None
    ref = dual_lora_linear_reference(_to64(x), _to64(w), _to64(b), **_kw64(kw))
    assert rel_err(y, ref) <= TOL[torch.float32]


def test_residual_gradient_lies_in_span_of_memory(gen):
    x, w, b, kw = dual_lora_problem(197, 48, 16, 3, 8, 1, 10, gen, dtype=torch.float32)
    y = dual_lora_linear(x, w, b, backend="triton", **kw)
    g_res, g_orth = torch.autograd.grad(y.square().sum(), [kw["res_a"], kw["orth_a"]])
    m = kw["basis"]
    assert (g_res - project_onto(g_res, m)).norm() <= 1e-5 * g_res.norm()
    assert (g_orth @ m).norm() <= 1e-5 * g_orth.norm()


def test_adamw_on_orthogonal_adapter_keeps_old_outputs(gen):
    """DESIGN §4 with backend='triton' in float32: 50 AdamW steps (weight decay on) of the
    orthogonal adapter on new inputs leave outputs on inputs in span(M) unchanged."""
    d, n, r, dt = 32, 16, 4, torch.float32
    old_dirs = orthonormal_basis(d, 5, gen)
    basis = torch.linalg.svd(old_dirs @ randn(5, 300, gen=gen), full_matrices=False)[0][:, :5].to(dt)
    w, b = randn(n, d, gen=gen, dtype=dt, scale=d**-0.5), randn(n, gen=gen, dtype=dt)
    orth_a = randn(r, d, gen=gen, dtype=dt, requires_grad=True)
    orth_b = torch.zeros(n, r, dtype=dt, device=TEST_DEVICE, requires_grad=True)
    probe = (randn(40, 5, gen=gen) @ old_dirs.T).to(dt)

    def layer(x):
        return dual_lora_linear(x, w, b, orth_a=orth_a, orth_b=orth_b, basis=basis, backend="triton")

    before = layer(probe).detach()
    opt = torch.optim.AdamW([orth_a, orth_b], lr=3e-2, weight_decay=0.1)
    new_x, target = randn(32, d, gen=gen, dtype=dt), randn(32, n, gen=gen, dtype=dt)
    first = None
    for _ in range(50):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(new_x), target)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * first and orth_b.detach().abs().max() > 0.05  # it really trained
    assert rel_err(layer(probe).detach(), before) <= 1e-5
    a_o = project_out(orth_a.detach(), basis)
    assert (a_o @ basis).abs().max() <= 1e-5 * a_o.abs().max()


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 300), d=st.integers(1, 130), n=st.integers(1, 130), r_o=st.integers(0, 20),
    r_r=st.integers(0, 9), frozen=st.integers(0, 3), k=st.integers(0, 12), three_d=st.booleans(),
    bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1), design=st.sampled_from(DESIGNS),
)
def test_fuzz_shapes(m, d, n, r_o, r_r, frozen, k, three_d, bias, dtype, seed, design):
    gen = torch.Generator().manual_seed(seed)
    k = min(k, d)
    lead = (2,) if three_d else ()
    x, w, b, kw = dual_lora_problem(m, d, n, r_o, r_r, frozen, k, gen, dtype=dtype, lead=lead)
    check_against_reference(x, w, b if bias else None, kw, design=design)


def test_bad_input_is_refused_before_any_launch(gen):
    def no_launch(kernel, grid, args, kwargs):
        raise AssertionError(f"{_kernel_utils.kernel_name(kernel)} was launched for invalid input")

    x, w, b, kw = dual_lora_problem(7, 16, 8, 2, 2, 1, 3, gen, dtype=torch.float32)
    bad = [
        (dict(weight=w.to("meta")), ValueError, f"weight is on meta but x is on {x.device}"),
        (dict(orth_b=kw["orth_b"].detach().to("meta")), ValueError, "orth_b is on meta"),
        (dict(basis=kw["basis"].to("meta")), ValueError, "basis is on meta"),
        (dict(gate=kw["gate"].to("meta")), ValueError, "gate is on meta"),
        (dict(x=x.detach().to(torch.int32)), TypeError, "x must have a floating dtype"),
        (dict(weight=w.to(torch.int64)), TypeError, "weight must have a floating dtype"),
        (dict(weight=w[:, :-1]), ValueError, "in_features"),
        (dict(orth_a=kw["orth_a"].detach()[:, :-1]), ValueError, r"orth_a must have shape"),
        (dict(res_b=kw["res_b"].detach()[:-1]), ValueError, r"res_b must have shape"),
        (dict(gate=kw["gate"][:, :1]), ValueError, "gate has 1 columns"),
        (dict(bias=b.detach()[:-1]), ValueError, r"bias must have shape"),
        (dict(design="fastest"), ValueError, "design must be one of"),
    ]
    for change, exc, match in bad:
        args = {"x": x, "weight": w, "bias": b, **kw, **change}
        with pytest.raises(exc, match=match), _kernel_utils.observe_launches(no_launch):
            dual_lora_linear(args.pop("x"), args.pop("weight"), args.pop("bias"), backend="triton", **args)


def _on(device, *tensors):
    return [t if not isinstance(t, torch.Tensor) else t.detach().to(device).requires_grad_(t.requires_grad)
            for t in tensors]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no CUDA device")
def test_cuda_backend_says_when_there_is_no_device():
    from duallora_kernels.ops import cuda

    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        cuda.cuda_launchers()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_backends_match_reference(backend, dtype, gen):
    # CUDA tensors. By default conftest pins TRITON_INTERPRET=1, so "triton" runs in the interpreter
    # here too; under DUALLORA_TEST_DEVICE=cuda it runs compiled, like every test of this file.
    x, w, b, kw = dual_lora_problem(197, 100, 48, 8, 8, 2, 12, gen, dtype=dtype, lead=(2,))
    x, w, b = _on("cuda", x, w, b)
    kw = dict(zip(kw, _on("cuda", *kw.values())))
    check_against_reference(x, w, b, kw, backend=backend)
    check_against_reference(x[:, :7], w, None, {k: (v[:, :7] if k == "gate" else v) for k, v in kw.items()},
                            backend=backend, sum_loss=True)


# backend="cuda" on CUDA tensors: every shape of CASES in every dtype (bf16/fp16 run csrc/'s
# tensor-core kernels, float32 the torch launchers), plus shapes that cross the kernels' 128-row /
# 128-column tiles and 32-wide pipeline stages, rows that are not 16-byte aligned (d, n not
# multiples of 8: the element-wise load path, odd n: no paired stores) and every padded rank
# (R = 16, 64, 128; r = r_o + r_r * (1 + frozen)).
CUDA_SHAPES = [c[:8] + c[9:] for c in CASES] + [
    ((), 300, 520, 272, 16, 16, 1, 64, None),
    ((), 129, 130, 131, 40, 20, 3, 16, None),
    ((2,), 197, 768, 64, 8, 8, 0, 32, "transposed"),
    ((), 5, 8, 8, 1, 1, 0, 1, None),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead, m, d, n, r_o, r_r, frozen, k, layout", CUDA_SHAPES)
def test_cuda_backend_matches_reference(lead, m, d, n, r_o, r_r, frozen, k, layout, dtype, gen):
    x, w, b, kw = dual_lora_problem(m, d, n, r_o, r_r, frozen, k, gen, dtype=dtype, lead=lead, device="cuda")
    if layout:
        x = _strided(x, layout)
    check_against_reference(x, w, b, kw, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_backend_gradient_subsets_and_plain_layer(dtype, gen):
    # Each of dX, dA, dB, dbias alone (the kernel's runtime flags), and no adapter at all.
    x, w, b, kw = dual_lora_problem(300, 136, 200, 8, 8, 1, 12, gen, dtype=dtype, device="cuda")
    x.requires_grad_(False)
    b.requires_grad_(False)
    kw["orth_a"].requires_grad_(False)
    kw["res_b"].requires_grad_(False)
    check_against_reference(x, w, b, kw, backend="cuda")  # dA (residual), dB (orthogonal)
    kw["orth_b"].requires_grad_(False)
    check_against_reference(x, w, b, kw, backend="cuda")  # dA alone
    x.requires_grad_(True)
    kw["res_a"].requires_grad_(False)
    check_against_reference(x, w, b.requires_grad_(True), kw, backend="cuda")  # dX and dbias
    check_against_reference(x, w, b, {}, backend="cuda")  # the plain linear layer


def test_poisoned_outputs_are_nan(monkeypatch):
    out = _kernel_utils.new_output((3, 5), torch.bfloat16, TEST_DEVICE)
    assert torch.isnan(out).all() and out.device.type == TEST_DEVICE.type
    monkeypatch.delenv(_kernel_utils.POISON_ENV)
    assert _kernel_utils.new_output((3, 5), torch.float32, TEST_DEVICE).shape == (3, 5)


@pytest.mark.parametrize("lead, m, d, n, r_o, r_r, frozen, k, dtype, layout", CASES)
def test_torch_backend_matches_reference(lead, m, d, n, r_o, r_r, frozen, k, dtype, layout, gen):
    # backend="torch" runs the registered op with the torch launchers (the CPU path, and every
    # backend's float64), checked against the plain-autograd spec like the kernels are
    x, w, b, kw = dual_lora_problem(m, d, n, r_o, r_r, frozen, k, gen, dtype=dtype, lead=lead)
    if layout:
        x = _strided(x, layout)
    check_against_reference(x, w, b, kw, backend="torch")
