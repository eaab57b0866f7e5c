"""The cost contract that a CPU can check (README, "Cost contract"): device operations per training
step, no host synchronisation, the basis validated on the device, and the op's edge cases.

Device operations are counted by :mod:`duallora_kernels.opcount` (Triton launches plus torch ops
that do device work; views and allocations launch nothing). The fused op runs in Triton's
interpreter here; a compiled kernel is one launch, as the counter counts it.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from duallora_kernels.nn import DualLoRALinear
from duallora_kernels.ops import dual_lora_linear, task_scores
from duallora_kernels.ops.reference import dual_lora_linear_reference
from duallora_kernels.opcount import FROZEN_STEP, STEP_BUDGET, count_device_ops
import helpers
from helpers import rel_err

BF16 = torch.bfloat16


def _full_problem(gen, dtype=BF16, lead=(2,), m=24, d=48, n=40, k=12, r_r=3):
    """Basis, orthogonal adapter, training residual block, two frozen blocks and a gate."""
    x, w, b, kw = helpers.dual_lora_problem(m, d, n, r_o=4, r_r=r_r, frozen_blocks=2, k=k, gen=gen, dtype=dtype,
                                            lead=lead)
    b.requires_grad_(False)  # a frozen layer's bias, as in DualLoRALinear
    kw["basis"] = kw["basis"].float()
    return x, w, b, kw


def _step(fn, x, dy):
    x.grad = None
    y = fn()
    y.backward(dy)
    return y


#: Each Triton design's kernels in one training step (each launched once), and its device ops in all.
DESIGN_STEP = {
    "single": (("_fused_forward_kernel", "_fused_backward_kernel"), 7),
    "split": (("_lowrank_forward_kernel", "_gemm_forward_kernel", "_lowrank_backward_kernel", "_gemm_backward_kernel"),
              8),
    "tma": (("_lowrank_forward_kernel", "_gemm_forward_tma_kernel", "_lowrank_backward_kernel",
             "_gemm_backward_tma_kernel"), 8),
}


@pytest.mark.parametrize("design", sorted(DESIGN_STEP))
def test_training_step_of_the_fused_op_stays_within_the_device_op_budget(design, gen):
    # r_r = 4: a stacked rank of 4 + 4 + 2 * 4 = 16, a multiple of 8, so the tma design runs TMA
    x, w, b, kw = _full_problem(gen, r_r=4)
    dy = torch.randn(*x.shape[:-1], w.shape[0], generator=gen).to(BF16)
    fused = lambda: dual_lora_linear(x, w, b, backend="triton", check_basis=False, design=design, **kw)  # noqa: E731
    _step(fused, x, dy)  # first call: autotuning / compilation, not steady state
    for p in kw.values():
        if isinstance(p, torch.Tensor):
            p.grad = None
    with count_device_ops() as ops:
        _step(fused, x, dy)
    assert not ops.syncs, ops
    assert ops.total <= STEP_BUDGET, ops
    # What the budget buys: the design's big kernels and the small-matrix steps around them
    # (coefficients and assembly forward; coefficients and projection backward).
    kernels, total = DESIGN_STEP[design]
    assert all(ops.kernels[k] == 1 for k in kernels) and ops.total == total, ops
    assert ops.kernels["_coefficients_kernel"] == 2 and ops.kernels["_assemble_kernel"] == 1 + (design == "single"), ops

    linear = nn.Linear(w.shape[1], w.shape[0]).to(BF16).requires_grad_(False)
    with count_device_ops() as frozen:
        _step(lambda: linear(x), x, dy)
    assert frozen.total == FROZEN_STEP and not frozen.syncs, frozen


def test_training_step_of_a_layer_has_no_host_sync_and_fits_the_budget(gen):
    torch.manual_seed(0)
    d, n = 48, 40
    layer = DualLoRALinear.from_linear(nn.Linear(d, n), rank_orth=4, rank_res=3, backend="triton")
    for t in range(4):  # tasks 1 and 2 leave frozen residual blocks (task 0 has none: M was empty); task 3 trains
        x = torch.randn(2, 16, d) + 2 * torch.eye(d)[t]
        with torch.no_grad():
            layer.start_collecting(); layer(x); stats = layer.stop_collecting()
        layer.begin_task(stats)
        if t < 3:
            with torch.no_grad():
                layer.start_collecting(); layer(x); stats = layer.stop_collecting()
            layer.end_task(stats)
    assert layer.frozen_a.shape[0] == 2 * 3 and layer.basis_size > 0
    x = torch.randn(2, 16, d, requires_grad=True)
    dy = torch.randn(2, 16, n)
    _step(lambda: layer(x), x, dy)
    layer.zero_grad(set_to_none=True)
    with count_device_ops() as ops:
        _step(lambda: layer(x), x, dy)
    assert not ops.syncs, ops
    assert ops.total <= STEP_BUDGET, ops
    # the same with the gate fixed from outside (a global gate): frozen blocks and the gate join the op
    layer.set_gate(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    layer.zero_grad(set_to_none=True)
    with count_device_ops() as ops:
        _step(lambda: layer(x), x, dy)
    assert not ops.syncs and ops.total <= STEP_BUDGET, ops


def test_fixed_down_projections_add_no_device_op(gen):
    # B-only training (issue 20): the same launches as training A too, less the projection of dA onto the
    # basis ([dA_o; dA_r] M), which has nothing to project; the backward kernel runs without its dA product
    x, w, b, kw = _full_problem(gen)
    dy = torch.randn(*x.shape[:-1], w.shape[0], generator=gen).to(BF16)
    fused = lambda: dual_lora_linear(x, w, b, backend="triton", check_basis=False, **kw)  # noqa: E731
    trained = _counted_step(fused, x, dy, [p for p in kw.values() if isinstance(p, torch.Tensor)])
    kw["orth_a"].requires_grad_(False)
    kw["res_a"].requires_grad_(False)
    fixed = _counted_step(fused, x, dy, [kw["orth_b"], kw["res_b"]])
    assert not fixed.syncs and fixed.total == trained.total - 1, (trained, fixed)
    assert fixed.kernels["_coefficients_kernel"] == trained.kernels["_coefficients_kernel"] - 1, (trained, fixed)
    assert fixed.kernels["_fused_backward_kernel"] == 1 and not fixed.torch_ops, fixed


def _counted_step(fn, x, dy, params):
    _step(fn, x, dy)  # first call: autotuning / compilation, not steady state
    for p in params:
        p.grad = None
    with count_device_ops() as ops:
        _step(fn, x, dy)
    return ops


@pytest.mark.parametrize("design", sorted(DESIGN_STEP))
def test_autocast_adds_to_the_fused_step_only_the_casts_it_adds_to_nn_linear(design, gen):
    # float32 parameters and input under bf16 autocast, as mixed-precision training runs the layer:
    # the fused step pays what autocast makes nn.Linear pay (x, W0 and b cast forward, dX cast back)
    # and nothing for the adapters (assembled and projected in their own dtype, ops/__init__.py).
    x, w, b, kw = _full_problem(gen, dtype=torch.float32, r_r=4)
    dy = torch.randn(*x.shape[:-1], w.shape[0], generator=gen)
    params = [p for p in kw.values() if isinstance(p, torch.Tensor) and p.requires_grad]
    fused = lambda: dual_lora_linear(x, w, b, backend="triton", check_basis=False, design=design, **kw)  # noqa: E731
    linear = nn.Linear(w.shape[1], w.shape[0]).requires_grad_(False)
    plain = _counted_step(fused, x, dy, params)
    plain_linear = _counted_step(lambda: linear(x), x, dy, [])

    def autocast(fn):
        def run():
            with torch.autocast("cpu", dtype=BF16):
                return fn()
        return run

    amp = _counted_step(autocast(fused), x, dy.to(BF16), params)
    amp_linear = _counted_step(autocast(lambda: linear(x)), x, dy.to(BF16), [])
    casts = amp_linear.total - plain_linear.total
    assert casts == 4 and amp_linear.torch_ops["_to_copy"] == 4, amp_linear
    assert amp.total - plain.total == casts and amp.torch_ops.get("_to_copy") == casts, (plain, amp)
    # the same kernels (tma: its TMA GEMMs run on bf16 only, float32 takes the pointer ones)
    assert not amp.syncs and sum(amp.kernels.values()) == sum(plain.kernels.values())
    assert design == "tma" or amp.kernels == plain.kernels
    assert all(p.grad.dtype == torch.float32 for p in params)


def test_a_recycled_address_does_not_skip_the_basis_check(gen):
    # Finding 2 of issue 8: the old address-keyed cache accepted a bad basis that landed where a
    # checked one had been. Checks are remembered per tensor object (a weak reference) and version.
    d = 64
    x = torch.randn(5, d, generator=gen)
    w = torch.randn(8, d, generator=gen)
    a, b_ = torch.randn(2, d, generator=gen), torch.randn(8, 2, generator=gen)
    for _ in range(20):
        good = torch.linalg.qr(torch.randn(d, 16, generator=gen))[0]
        dual_lora_linear(x, w, orth_a=a, orth_b=b_, basis=good, backend="torch")
        del good
        with pytest.raises(RuntimeError, match="basis must have orthonormal columns"):
            dual_lora_linear(x, w, orth_a=a, orth_b=b_, basis=torch.randn(d, 16, generator=gen), backend="torch")
    basis = torch.linalg.qr(torch.randn(d, 16, generator=gen))[0]
    dual_lora_linear(x, w, orth_a=a, orth_b=b_, basis=basis, backend="torch")
    with torch.no_grad():
        basis[0, 0] += 1.0  # changed in place, outside autograd
    with pytest.raises(RuntimeError, match="basis must have orthonormal columns"):
        dual_lora_linear(x, w, orth_a=a, orth_b=b_, basis=basis, backend="torch")


def _call_with(basis, gen):
    d = basis.shape[0]
    x, w = torch.randn(5, d, generator=gen), torch.randn(8, d, generator=gen)
    a, b_ = torch.randn(2, d, generator=gen), torch.randn(8, 2, generator=gen)
    return lambda: dual_lora_linear(x, w, orth_a=a, orth_b=b_, basis=basis, backend="torch")


@pytest.mark.parametrize("change", ["in place", "through a view", "through detach", "parameter in place",
                                    "data swap", "same storage read another way"])
def test_every_change_of_a_checked_basis_its_version_or_storage_shows_is_checked_again(change, gen):
    d, k = 32, 8
    basis = torch.linalg.qr(torch.randn(d, k, generator=gen))[0].contiguous()
    if change == "parameter in place":
        basis = torch.nn.Parameter(basis, requires_grad=False)
    call = _call_with(basis, gen)
    call()
    with count_device_ops() as again:
        call()  # remembered: nothing changed
    assert "_assert_async" not in again.torch_ops, again
    with torch.no_grad():
        if change in ("in place", "parameter in place"):
            basis.mul_(2.0)
        elif change == "through a view":
            basis[:, 1:3].mul_(2.0)
        elif change == "through detach":
            basis.detach()[0].add_(1.0)
        elif change == "data swap":
            basis.data = torch.randn(d, k, generator=gen)
        else:  # the same memory as a (d, k) matrix of other strides: version and storage unchanged
            basis.data = basis.data.reshape(k, d).T
    with pytest.raises(RuntimeError, match="basis must have orthonormal columns"):
        call()


@pytest.mark.parametrize("design", sorted(DESIGN_STEP))
def test_the_functional_op_checks_an_unchanged_basis_once(design, gen):
    # check_basis=True (the default) pays its device ops when it first sees a basis; a training loop
    # that passes the same basis again runs the design's step, as the layer (check_basis=False) does.
    x, w, b, kw = _full_problem(gen, r_r=4)
    kw["basis"] = helpers.orthonormal_basis(*kw["basis"].shape, gen, torch.float32)  # bf16's is not, to 1e-4
    dy = torch.randn(*x.shape[:-1], w.shape[0], generator=gen).to(BF16)
    params = [p for p in kw.values() if isinstance(p, torch.Tensor) and p.requires_grad]
    checked = lambda: dual_lora_linear(x, w, b, backend="triton", design=design, **kw)  # noqa: E731
    unchecked = lambda: dual_lora_linear(x, w, b, backend="triton", design=design, check_basis=False, **kw)  # noqa: E731
    with count_device_ops() as first:
        _step(checked, x, dy)
    assert first.torch_ops["_assert_async"] == 1 and not first.syncs, first
    repeated = _counted_step(checked, x, dy, params)
    plain = _counted_step(unchecked, x, dy, params)
    assert repeated.total == plain.total == DESIGN_STEP[design][1], (repeated, plain)
    assert "_assert_async" not in repeated.torch_ops and not repeated.syncs, repeated
    kw["basis"] = kw["basis"].clone()  # a new tensor: checked again
    for p in params:
        p.grad = None
    with count_device_ops() as new:
        _step(checked, x, dy)
    assert new.torch_ops["_assert_async"] == 1 and new.total == first.total, (new, first)


def test_layer_validates_a_loaded_basis(gen):
    layer = DualLoRALinear(16, 8, rank_orth=2, rank_res=2)
    state = layer.state_dict()
    state["basis"] = torch.randn(16, 3, generator=gen)
    with pytest.raises(RuntimeError, match="basis must have orthonormal columns"):
        layer.load_state_dict(state)


def test_task_scores_are_scale_invariant_down_to_tiny_norms(gen):
    u = helpers.orthonormal_basis(32, 4, gen, torch.float32)
    z = torch.stack([1e-7 * u[:, 0], 1e-18 * u[:, 1], torch.zeros(32), u[:, 2] + u[:, 3]])
    other = helpers.orthonormal_basis(32, 4, gen, torch.float32)
    bases = torch.stack([u, other])
    for backend in ("torch", "triton"):
        s = task_scores(z, bases, backend=backend)
        assert torch.allclose(s[:3, 0], torch.tensor([1.0, 1.0, 0.0]), atol=1e-5), (backend, s)
        assert abs(s[3, 0].item() - 1.0) < 1e-5 and s[2, 1].item() == 0.0, (backend, s)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_basis_gets_no_gradient_in_any_backend(backend, gen):
    x, w, b, kw = _full_problem(gen, dtype=torch.float32)
    kw["basis"].requires_grad_(True)
    y = dual_lora_linear(x, w, b, backend=backend, **kw)
    y.sum().backward()
    assert kw["basis"].grad is None
    assert kw["orth_a"].grad is not None


def test_meta_tensors_give_a_meta_result(gen):
    x, w, b, kw = _full_problem(gen, dtype=torch.float32)
    meta = {k: (v.detach().to("meta") if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    y = dual_lora_linear(x.detach().to("meta"), w.to("meta"), b.to("meta"), **meta)
    assert y.device.type == "meta" and y.shape == (*x.shape[:-1], w.shape[0])


def test_gate_broadcast_per_sample_is_read_in_place(gen):
    # One gate per sample shared by its tokens: (B, 1, G) against x (B, L, d). The kernels read it
    # through a 0 token stride; the result must equal the reference with the gate materialised.
    x, w, b, kw = _full_problem(gen, dtype=torch.float32, lead=(3,), m=10)
    kw["gate"] = torch.rand(3, 1, 3, generator=gen)
    got = dual_lora_linear(x, w, b, backend="triton", **kw)
    full = {**kw, "gate": kw["gate"].expand(3, 10, 3).contiguous()}
    to64 = lambda t: t.detach().double() if isinstance(t, torch.Tensor) else t  # noqa: E731
    ref = dual_lora_linear_reference(to64(x), to64(w), to64(b), **{k: to64(v) for k, v in full.items()})
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("design", sorted(DESIGN_STEP))
def test_forward_on_cuda_tensors_never_reads_a_device_value(design, gen):
    # The CPU cannot show a .cpu() (a no-op there) or CUDA-only code paths. Fake CUDA tensors can:
    # under FakeTensorMode any read of a device value raises, a copy to the CPU is visible, and the
    # Triton launches are captured instead of run. (Forward only: autograd's engine needs a real
    # CUDA context for CUDA tensors.)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from duallora_kernels.ops._kernel_utils import observe_launches

    launched = []
    with FakeTensorMode(), observe_launches(lambda k, g, a, kw: launched.append(k) or True, capture=True):
        x, w, b, kw = _full_problem(gen, dtype=torch.float32)
        cuda = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        with count_device_ops() as ops:
            y = dual_lora_linear(x.to("cuda"), w.to("cuda"), b.to("cuda"), design=design, **cuda)  # check_basis on
        assert y.device.type == "cuda" and y.dtype == torch.float32
    assert not ops.syncs, ops
    # coefficients, assembly, then the forward kernel (single) or the low-rank pass and the GEMM (no
    # autograd node: nothing kept for a backward)
    assert len(launched) == (3 if design == "single" else 4), launched
