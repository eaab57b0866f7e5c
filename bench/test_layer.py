"""One DualLoRA layer: forward, and forward+backward, per variant (see conftest.py for the matrix).

``extra_info`` of each benchmark carries m, d, n, rank, dtype, FLOPs and the bytes moved, so
the saved JSON (``--benchmark-json``) holds everything to compute TFLOP/s and GB/s.
"""
from __future__ import annotations

import pytest
import torch

from duallora_kernels.harness.timing import byte_count, flop_count
from duallora_kernels.harness.variants import make_step, variant_unavailable


def test_layer(benchmark, case, problem_for, bench_device):
    shape, rank, dtype, variant, pass_ = case
    reason = variant_unavailable(variant, bench_device, "time")
    if reason:
        pytest.skip(reason)
    problem = problem_for(shape, rank, dtype)
    step = make_step(variant, pass_, problem)
    if bench_device.type == "cuda":
        def fn() -> None:
            step()
            torch.cuda.synchronize(bench_device)
    else:
        fn = step
    m = problem.m
    benchmark.group = f"{dtype} {shape.name} {shape.key} r={rank} {pass_}"
    benchmark.extra_info.update(
        device=str(bench_device), layer=shape.name, m=m, d=shape.d, n=shape.n, rank=rank, dtype=dtype,
        variant=variant, **{"pass": pass_},
        flops=flop_count(m, shape.d, shape.n, rank, variant, pass_),
        bytes=byte_count(m, shape.d, shape.n, rank, variant, pass_, problem.dtype.itemsize),
    )
    fn()  # compile / autotune outside the measurement
    benchmark.pedantic(fn, rounds=10 if bench_device.type == "cuda" else 5, iterations=1, warmup_rounds=2)
