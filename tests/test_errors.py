"""Bad input is refused with an error that names the argument and what was expected."""
import pytest
import torch
from torch import nn

from duallora_kernels import dual_lora_linear, gram, memory, task_scores
from duallora_kernels.nn import DualLoRALinear, inject
from helpers import orthonormal_basis


@pytest.fixture
def args(gen):
    x = torch.randn(4, 8, generator=gen)
    w = torch.randn(6, 8, generator=gen)
    kw = dict(orth_a=torch.randn(2, 8, generator=gen), orth_b=torch.randn(6, 2, generator=gen))
    return x, w, kw


def _call(x, w, **kw):
    return dual_lora_linear(x, w, backend="torch", **kw)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda x, w, kw: (x[:, :5], w, kw), ValueError, "last dimension must equal weight's in_features 8"),
        (lambda x, w, kw: (x.int(), w, kw), TypeError, "x must have a floating dtype"),
        (lambda x, w, kw: (x, w.double(), kw), TypeError, "weight has dtype torch.float64 but x has torch.float32"),
        (lambda x, w, kw: (x, w.to("meta"), kw), ValueError, "weight is on meta but x is on cpu"),
        (lambda x, w, kw: (x, w, {**kw, "orth_b": kw["orth_b"][:, :1]}), ValueError, r"orth_b must have shape \(6, 2\)"),
        (lambda x, w, kw: (x, w, {"orth_a": kw["orth_a"]}), ValueError, "orth_a and orth_b must be given together"),
        (lambda x, w, kw: (x, w, {"orth_a": kw["orth_a"][:0], "orth_b": kw["orth_b"][:, :0]}), ValueError, r"rank >= 1"),
        (lambda x, w, kw: (x, w, {**kw, "basis": torch.randn(8, 3)}), RuntimeError, "basis must have orthonormal columns"),
        (lambda x, w, kw: (x, w, {**kw, "basis": torch.eye(7)[:, :2]}), ValueError, r"basis must have shape \(8, \*\)"),
        (lambda x, w, kw: (x, w, {"res_a": kw["orth_a"], "res_b": kw["orth_b"]}), ValueError, "needs a non-empty basis"),
        (lambda x, w, kw: (x, w, {**kw, "orth_scale": float("nan")}), ValueError, "orth_scale must be a finite number"),
        (lambda x, w, kw: (x, w, {"frozen_a": torch.randn(4, 8), "frozen_b": torch.randn(6, 4), "gate": torch.rand(4, 3)}),
         ValueError, "gate has 3 columns"),
        (lambda x, w, kw: (x, w, {"frozen_a": torch.randn(4, 8), "frozen_b": torch.randn(6, 4), "gate": torch.rand(3, 2)}),
         ValueError, "does not broadcast"),
        (lambda x, w, kw: (x, w, {"frozen_a": torch.randn(4, 8, requires_grad=True), "frozen_b": torch.randn(6, 4)}),
         ValueError, "must not require grad"),
    ],
)
def test_dual_lora_linear_rejects(args, change, exc, match):
    x, w, kw = change(*args)
    with pytest.raises(exc, match=match):
        _call(x, w, **kw)


def test_bad_backend_and_bias(args):
    x, w, kw = args
    with pytest.raises(ValueError, match="backend must be one of"):
        dual_lora_linear(x, w, backend="tpu")
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        dual_lora_linear(x, w, torch.zeros(5), backend="torch")
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        dual_lora_linear(x, w, backend="cuda")


def test_memory_ops_reject(gen):
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        gram(torch.ones(3, 4, dtype=torch.int64), backend="torch")
    with pytest.raises(ValueError, match=r"task_bases must have shape \(T, d, u\) with d=5"):
        task_scores(torch.randn(2, 5), torch.randn(3, 4, 2), backend="torch")
    with pytest.raises(ValueError, match="task_bases is on meta"):
        task_scores(torch.randn(2, 5), torch.randn(3, 5, 2, device="meta"), backend="torch")
    g = torch.eye(6, dtype=torch.float64)
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\]"):
            memory.extend_basis(None, g, bad)
    with pytest.raises(ValueError, match="basis must have orthonormal columns"):
        memory.extend_basis(torch.ones(6, 2, dtype=torch.float64), g, 0.9)
    with pytest.raises(ValueError, match="gram must be square"):
        memory.extend_basis(None, torch.ones(6, 5), 0.9)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        memory.principal_directions(g, 0)
    with pytest.raises(ValueError, match="rank must be <= d=6"):
        memory.principal_directions(g, 7)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        memory.task_gates(torch.rand(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="start must be a number in"):
        memory.threshold_schedule(3, start=1.2)
    with pytest.raises(ValueError, match="x's last dimension must be 6"):
        memory.GramAccumulator(6).update(torch.randn(2, 5))
    with pytest.raises(ValueError, match="summary must be one of"):
        memory.GramAccumulator(6, summary="max")


def test_layer_rejects(gen):
    with pytest.raises(ValueError, match="rank_orth must be >= 1"):
        DualLoRALinear(8, 4, rank_orth=0)
    with pytest.raises(TypeError, match="rank_res must be an int >= 1"):
        DualLoRALinear(8, 4, rank_res=2.5)
    with pytest.raises(ValueError, match=r"thresholds\[1\] must be a number in \(0, 1\]"):
        DualLoRALinear(8, 4, thresholds=[0.9, 1.1])
    with pytest.raises(ValueError, match="gate_mode must be one of"):
        DualLoRALinear(8, 4, gate_mode="max")
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        DualLoRALinear.from_linear(nn.Conv1d(3, 3, 1))
    layer = DualLoRALinear(8, 4, rank_orth=2, rank_res=2)
    with pytest.raises(ValueError, match="gate must have 0 columns"):
        layer.set_gate(torch.ones(3))
    with pytest.raises(RuntimeError, match="end_task\\(\\) without begin_task\\(\\)"):
        layer.end_task(memory.InputStats(8))
    with pytest.raises(ValueError, match="stats hold no rows"):
        layer.begin_task(memory.InputStats(8))
    with pytest.raises(ValueError, match="stats are for d=5"):
        layer.begin_task(memory.InputStats(5))
    with pytest.raises(TypeError, match="targets must be a non-empty sequence"):
        inject(nn.Linear(3, 3), targets="qkv")
