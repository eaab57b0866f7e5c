"""The op as registered with torch.library: torch.library.opcheck (schema, fake implementation,
autograd registration, AOT dispatch) on the CPU, meta tensors, and export."""
from __future__ import annotations

import pytest
import torch

from duallora_kernels import dual_lora_linear
from duallora_kernels.ops import registered  # noqa: F401  (registers duallora::fused_*)
import helpers


def _args(gen, dtype=torch.float64, grads=True, backend="torch"):
    x, w, b, kw = helpers.dual_lora_problem(6, 16, 12, r_o=2, r_r=2, frozen_blocks=1, k=5, gen=gen, dtype=dtype,
                                            lead=(2,))
    gate = kw["gate"].expand(*x.shape[:-1], kw["gate"].shape[-1])
    return (x, w, b, kw["orth_a"], kw["orth_b"], kw["res_a"], kw["res_b"], kw["frozen_a"], kw["frozen_b"], gate,
            kw["basis"], 0.7, 1.3, backend, grads, grads, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_forward(dtype, gen):
    torch.library.opcheck(torch.ops.duallora.fused_forward.default, _args(gen, dtype))


# The Triton designs' outputs (B^T kept by split/tma) must agree with the fake implementation too.
@pytest.mark.parametrize("backend", ["triton:single", "triton:split", "triton:tma"])
def test_opcheck_forward_of_each_triton_design(backend, gen):
    torch.library.opcheck(torch.ops.duallora.fused_forward.default, _args(gen, torch.float32, backend=backend),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", ["torch", "triton:split"])
def test_opcheck_backward(backend, gen):
    args = _args(gen, torch.float64 if backend == "torch" else torch.float32, backend=backend)
    y, t, a, bt = torch.ops.duallora.fused_forward(*args)
    (x, w, b, oa, ob, ra, rb, fa, fb, gate, basis, os_, rs, backend, _, _, _) = args
    dy = torch.randn_like(y)
    bwd_args = (dy, x.detach(), w, t, a, bt, gate, basis, oa.detach(), ob.detach(), ra.detach(), rb.detach(), fa, fb,
                b.detach(), os_, rs, backend, [True, False, True, True, True, True, True])
    torch.library.opcheck(torch.ops.duallora.fused_backward.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_meta_and_fake_tensors_give_shapes(gen):
    x, w, b, oa, ob, ra, rb, fa, fb, gate, basis, *_ = _args(gen, torch.float32, grads=False)
    meta = [t.detach().to("meta") for t in (x, w, b, oa, ob, ra, rb, fa, fb)]
    y = dual_lora_linear(*meta[:3], orth_a=meta[3], orth_b=meta[4], res_a=meta[5], res_b=meta[6], frozen_a=meta[7],
                         frozen_b=meta[8], gate=gate.to("meta"), basis=basis.to("meta"))
    assert y.device.type == "meta" and y.shape == (2, 6, 12)


def test_export_sees_one_registered_op(gen):
    x, w, b, oa, ob, ra, rb, fa, fb, gate, basis, *_ = (t.detach() if isinstance(t, torch.Tensor) else t
                                                         for t in _args(gen, torch.float32, grads=False))

    class Layer(torch.nn.Module):
        def forward(self, x):
            return dual_lora_linear(x, w, b, orth_a=oa, orth_b=ob, basis=basis, backend="torch", check_basis=False)

    exported = torch.export.export(Layer(), (x.detach(),))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert "duallora.fused_forward.default" in targets, targets
    torch.testing.assert_close(exported.module()(x.detach()), Layer()(x.detach()))


def test_every_entry_point_has_the_registered_argument_list():
    # The op's argument list is the registered schema; the public op, the spec and the driver
    # must name the same arguments in the same order (then their own extras).
    import inspect

    from duallora_kernels.ops.reference import dual_lora_linear_reference
    from duallora_kernels.ops.registered import dual_lora_linear_op

    schema = [a.name for a in torch.ops.duallora.fused_forward.default._schema.arguments]
    spec = list(inspect.signature(dual_lora_linear_reference).parameters)
    assert schema[: len(spec)] == spec and schema[len(spec):] == ["backend", "store_t", "keep_a", "x_float8"]
    assert list(inspect.signature(dual_lora_linear).parameters) == spec + ["backend", "check_basis", "design",
                                                                           "saved_x"]
    assert list(inspect.signature(dual_lora_linear_op).parameters) == spec + ["backend", "design", "saved_x"]


def test_the_basis_check_is_traced_into_every_compiled_call(gen):
    # Under torch.compile the check cannot be remembered per tensor (dynamo traces FakeTensors): it is
    # part of the graph, so a bad basis still fails a compiled call, with no graph break (fullgraph).
    args = _args(gen, torch.float32, grads=False)
    x, w, b, oa, ob, basis = (args[i].detach() for i in (0, 1, 2, 3, 4, 10))

    def fn(x, basis):
        return dual_lora_linear(x, w, b, orth_a=oa, orth_b=ob, basis=basis, backend="torch")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, basis), fn(x, basis))
    with pytest.raises(RuntimeError, match="basis must have orthonormal columns"):
        compiled(x, 2 * basis)
