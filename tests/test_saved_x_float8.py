"""``saved_x="float8"`` (issue 20, item 5): the op keeps x for dA as float8 e4m3 codes with a float32 scale per
row. What the graph keeps is exactly that; Y, dX and dB are the exact reference's; dA is the reference's with x
replaced by its float8 round trip; the codec's error is e4m3's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import helpers
from duallora_kernels import dual_lora_linear
from duallora_kernels.harness.saved_bytes import count_saved
from duallora_kernels.nn import DualLoRALinear
from duallora_kernels.ops.reference import dual_lora_linear_reference
from duallora_kernels.ops.saved_input import E4M3_MAX, dequantize_rows, quantize_rows
from helpers import rel_err


def _problem(gen, dtype, m=30, d=48, n=40):
    x, w, b, kw = helpers.dual_lora_problem(m, d, n, r_o=4, r_r=3, frozen_blocks=0, k=10, gen=gen, dtype=dtype,
                                            lead=(2,))
    b.requires_grad_(False)
    kw.pop("gate")
    return x, w, b, kw


def test_codec_round_trip_has_e4m3s_error_and_a_scale_per_row(gen):
    x = torch.randn(50, 64, generator=gen, dtype=torch.float64) * torch.logspace(-6, 3, 50, dtype=torch.float64)[:, None]
    x[7] = 0.0
    codes, scale = quantize_rows(x.float())
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape and scale.shape == (50, 1)
    assert torch.equal(scale[:, 0], (x.float().abs().amax(1) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny))
    back = dequantize_rows(codes, scale, torch.float64)
    assert torch.equal(back[7], torch.zeros(64, dtype=torch.float64))
    # e4m3: 3 mantissa bits, so at most half a unit in the last place (2^-4 relative) for normal codes; the
    # smallest codes of a row are subnormal, at most 2^-10 * scale off
    err = (back - x).abs()
    bound = torch.maximum(x.abs() * 2.0**-4, scale.double() * 2.0**-10) * (1 + 1e-6)
    assert (err <= bound).all() and (err > 0).any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_graph_keeps_codes_and_row_scales_instead_of_x(backend, dtype, gen):
    x, w, b, kw = _problem(gen, dtype)
    params = [w, b, *(v for v in kw.values() if isinstance(v, torch.Tensor))]

    def saved(how):
        return count_saved(lambda: dual_lora_linear(x, w, b, backend=backend, check_basis=False, saved_x=how, **kw),
                           params).activation_bytes

    m, d = x.numel() // x.shape[-1], x.shape[-1]
    assert saved("float8") == saved("exact") - m * d * x.element_size() + m * d + m * 4
    w.requires_grad_(True)  # dW0 wants x exact: nothing is encoded
    assert saved("float8") == saved("exact")
    assert count_saved(lambda: F.linear(x, w, b), [w, b]).activation_bytes == m * d * x.element_size()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_only_the_gradient_of_a_sees_the_rounding(backend, gen):
    x, w, b, kw = _problem(gen, torch.float32)
    dy = torch.randn(*x.shape[:-1], w.shape[0], generator=gen)
    y = dual_lora_linear(x, w, b, backend=backend, check_basis=False, saved_x="float8", **kw)
    y.backward(dy)

    def reference(x_in):
        x64 = x_in.detach().double().requires_grad_(True)
        kw64 = {k: v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
                for k, v in kw.items()}
        out = dual_lora_linear_reference(x64, w.double(), b.double(), **kw64)
        out.backward(dy.double())
        return out, x64.grad, kw64

    exact_y, exact_dx, exact = reference(x)
    _, _, rounded = reference(dequantize_rows(*quantize_rows(x), torch.float32))
    assert rel_err(y, exact_y) <= 1e-5 and rel_err(x.grad, exact_dx) <= 1e-5
    for name in ("orth_b", "res_b"):
        assert rel_err(kw[name].grad, exact[name].grad) <= 1e-5, name
    for name in ("orth_a", "res_a"):
        assert rel_err(kw[name].grad, rounded[name].grad) <= 1e-5, name
        assert rel_err(kw[name].grad, exact[name].grad) > 1e-4, name  # the rounding is really there


def test_layer_option_and_bad_values():
    from duallora_kernels.harness.vit_models import load_training_state

    layers = {how: load_training_state(DualLoRALinear(16, 8, rank_orth=2, rank_res=2, saved_x=how), 4)
              for how in ("exact", "float8")}
    x = torch.randn(5, 16, requires_grad=True)
    kept = {how: count_saved(lambda: layer(x), [*layer.parameters(), *layer.buffers()]).activation_bytes
            for how, layer in layers.items()}
    assert kept["float8"] == kept["exact"] - 5 * 16 * 4 + 5 * 16 + 5 * 4
    assert "saved_x=float8" in repr(layers["float8"])
    with pytest.raises(ValueError, match="saved_x must be one of 'exact', 'float8'"):
        DualLoRALinear(16, 8, saved_x="fp8")
    with pytest.raises(ValueError, match="saved_x must be one of"):
        dual_lora_linear(torch.randn(3, 16), torch.randn(8, 16), saved_x="int8")
