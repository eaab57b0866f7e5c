"""pytest-benchmark microbenchmarks of one DualLoRA layer (``pytest bench/ --benchmark-only``).

Parametrized over layer shapes x ranks x dtypes x variants x passes. Defaults: the full matrix
(six ViT-S/B/L shapes, ranks 4/16/64, float32 and bfloat16, batch 64) on a GPU; a small subset
on the CPU (batch 4, two shapes, rank 16, float32). Narrow or widen it with the options below.
On the CPU only the torch variants run; the fused Triton kernel (and peft when it is not
installed) is skipped with its reason. This file never sets TRITON_INTERPRET.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

try:
    import duallora_kernels  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duallora_kernels.harness.devices import device_info, resolve_device  # noqa: E402
from duallora_kernels.harness.problems import LayerProblem, LayerShape, TOKENS, make_problem, parse_dtypes, parse_list, parse_ranks, parse_shapes  # noqa: E402
from duallora_kernels.harness.timing import buffer_count  # noqa: E402
from duallora_kernels.harness.variants import PASSES, VARIANTS  # noqa: E402

CPU_DEFAULTS = {"shapes": "384x1152,768x768", "ranks": "16", "dtypes": "float32", "batch": 4}
GPU_DEFAULTS = {"shapes": "all", "ranks": "4,16,64", "dtypes": "float32,bfloat16", "batch": 64}


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("duallora bench")
    g.addoption("--bench-device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.addoption("--bench-shapes", default=None, help="layer names or DxN sizes, comma-separated, or 'all'")
    g.addoption("--bench-ranks", default=None, help="total adapter ranks, comma-separated")
    g.addoption("--bench-dtypes", default=None, help="float32, bfloat16, float16, comma-separated")
    g.addoption("--bench-batch", type=int, default=None, help="images per batch (m = batch x 197)")
    g.addoption("--bench-variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    g.addoption("--bench-threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("--bench-threads", None)
    if threads:
        torch.set_num_threads(threads)


def _device(config: pytest.Config) -> torch.device:
    return resolve_device(config.getoption("--bench-device"))


def _option(config: pytest.Config, name: str) -> str | int:
    value = config.getoption(f"--bench-{name}")
    if value is not None:
        return value
    return (GPU_DEFAULTS if _device(config).type == "cuda" else CPU_DEFAULTS)[name]


def pytest_report_header(config: pytest.Config) -> str:
    dev = _device(config)
    name = device_info(dev)["name"]
    return (f"duallora bench: {name} ({dev}); shapes={_option(config, 'shapes')} ranks={_option(config, 'ranks')} "
            f"dtypes={_option(config, 'dtypes')} batch={_option(config, 'batch')}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    shapes = parse_shapes(_option(cfg, "shapes"))
    ranks = parse_ranks(str(_option(cfg, "ranks")))
    dtypes = parse_dtypes(_option(cfg, "dtypes"))
    variants = parse_list(cfg.getoption("--bench-variants"))
    passes = getattr(metafunc.function, "passes", PASSES)
    cases, ids = [], []
    # grouped so that consecutive cases share one problem (built once, see `problem_for`)
    for dtype in dtypes:
        for shape in shapes:
            for rank in ranks:
                for variant in variants:
                    if variant == "frozen" and rank != ranks[0]:
                        continue  # the frozen layer does not depend on the rank
                    for pass_ in passes:
                        cases.append((shape, rank, dtype, variant, pass_))
                        r = "-" if variant == "frozen" else f"r{rank}"
                        ids.append(f"{dtype}-{shape.name}-{shape.key}-{r}-{variant}-{pass_}")
    metafunc.parametrize("case", cases, ids=ids)


@pytest.fixture(scope="session")
def bench_device(pytestconfig: pytest.Config) -> torch.device:
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def problem_for(pytestconfig: pytest.Config, bench_device: torch.device):
    """``problem_for(shape, rank, dtype)``: the case's tensors; the last one is kept and reused."""
    batch = int(_option(pytestconfig, "batch"))
    held: dict = {}

    def get(shape: LayerShape, rank: int, dtype: str) -> LayerProblem:
        key = (shape, dtype)
        if held.get("key") != key:
            held.clear()
            if bench_device.type == "cuda":
                torch.cuda.empty_cache()
            elsize = {"float32": 4, "float64": 8}.get(dtype, 2)
            nbuf = buffer_count(batch * TOKENS * (shape.d + shape.n) * elsize, bench_device)
            held.update(key=key, base=make_problem(shape, rank, dtype, bench_device, batch=batch, buffers=nbuf))
        base = held["base"]
        if base.rank != rank:
            if held.get("ranked") is None or held["ranked"].rank != rank:
                held["ranked"] = base.with_rank(rank)
            return held["ranked"]
        return base

    return get
