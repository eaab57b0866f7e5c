"""The drop-in on a GPU (issue 9): what the CPU tests of test_dropin.py and test_cost_contract.py
check with the torch backend, the Triton interpreter and ``aot_eager``, here with the compiled
Triton kernels on CUDA tensors: bf16 autocast against the float64 reference, torch.compile with
Inductor (fullgraph) against eager, and the device operations autocast adds, counted by
torch.profiler. Runs under ``DUALLORA_TEST_DEVICE=cuda`` (bench/run_gpu.sh's kernel-tests step);
on the CPU every test here is skipped with that reason (the CPU versions are in test_dropin.py)."""
from __future__ import annotations

import pytest
import torch

from duallora_kernels.harness.device_ops import count_step
from duallora_kernels.ops.reference import dual_lora_linear_reference
from helpers import TEST_DEVICE, rel_err
from test_dropin import _trained_layer

pytestmark = pytest.mark.skipif(TEST_DEVICE.type != "cuda",
                                reason="compiled kernels on a GPU: run with DUALLORA_TEST_DEVICE=cuda")


def _layer_on_gpu(seed=0):
    # built on the CPU with the torch backend (no interpreter in this mode), then run by the kernels
    layer, xs = _trained_layer(backend="torch", seed=seed)
    layer = layer.to(TEST_DEVICE)
    layer.backend = "triton"
    return layer, [x.to(TEST_DEVICE) for x in xs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cuda_matches_the_float64_reference(dtype):
    layer, xs = _layer_on_gpu()
    x = xs[-1].clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    low64 = lambda t: t.detach().to(dtype).double()  # noqa: E731
    own = [p.detach().double().requires_grad_(True) for p in (layer.orth_a, layer.orth_b, layer.res_a, layer.res_b)]
    ref = dual_lora_linear_reference(low64(x), low64(layer.weight), low64(layer.bias), orth_a=own[0], orth_b=own[1],
                                     res_a=own[2], res_b=own[3], basis=layer.basis.double(),
                                     orth_scale=layer.orth_scale, res_scale=layer.res_scale)
    assert rel_err(y, ref) <= 2e-2
    # a random dY: with y.sum() each row of dB is one column sum of T, which cancellation can shrink
    # below bf16's rounding of T (the CPU twin in test_dropin failed ~2% of seeds that way)
    dy = torch.randn(y.shape, dtype=torch.float64).to(y.device)
    y.float().backward(dy.float())
    ref.backward(dy)
    for p, r in zip((layer.orth_a, layer.orth_b, layer.res_a, layer.res_b), own):
        assert p.grad.dtype == torch.float32 and rel_err(p.grad, r.grad) <= 3e-2


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_inductor_fullgraph_matches_eager_on_cuda(amp):
    torch._dynamo.reset()
    layer, xs = _layer_on_gpu(seed=1)
    compiled = torch.compile(layer, fullgraph=True)  # Inductor; the registered op stays one node

    def run(f, x):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return f(x)

    xe, xc = xs[-1].clone().requires_grad_(True), xs[-1].clone().requires_grad_(True)
    ye, yc = run(layer, xe), run(compiled, xc)
    tol = dict(rtol=2e-2, atol=2e-2) if amp else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yc, ye, **tol)
    ye.float().square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    layer.zero_grad()
    yc.float().square().sum().backward()
    for g, p in zip(grads, [p for p in layer.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, g, **tol)


def test_autocast_adds_only_the_casts_nn_linear_pays_on_cuda():
    # x, W0 and b cast to bf16 forward and dX cast back: the 4 kernels autocast adds to F.linear
    # (W0 and b are frozen, so autocast's cast cache, kept for leaves that require grad, skips them);
    # the adapter factors cost none (assembled and projected in their own dtype).
    layer, xs = _layer_on_gpu(seed=2)
    x = xs[-1].clone().requires_grad_(True)
    dy = {False: torch.randn(*x.shape[:-1], layer.out_features, device=TEST_DEVICE)}
    dy[True] = dy[False].bfloat16()

    def step(amp):
        def run():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                y = layer(x)
            y.backward(dy[amp])
        return run

    plain, amp = (count_step(step(a), TEST_DEVICE, warmup=2) for a in (False, True))
    assert amp.total - plain.total == 4, (plain.kernels, amp.kernels)
