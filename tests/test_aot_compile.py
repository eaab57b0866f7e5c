"""Every Triton kernel compiles ahead of time for sm_90/89/86/80 within the cost contract
(DESIGN §2): no spills in bf16/fp16, shared memory within the arch's limit, wgmma for the
GEMM-shaped dots on Hopper, mma.sync elsewhere, no fenced atomics where relaxed ones are asked
for. No GPU needed: duallora_kernels.compiled.aot compiles with an explicit target.

The compile runs in a subprocess because the test suite runs under TRITON_INTERPRET=1, whose
kernels are interpreter objects with one tiny config. CI compiles a small subset (fixed config,
three (arch, dtype, rank)); the full table is ``python -m duallora_kernels.compiled.aot``, committed as
bench/results/compile-<triton version>.json and checked here row by row.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from duallora_kernels.compiled import aot, aot_table

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: The GEMM-shaped kernels whose main loops must run wgmma on Hopper (by kernel name).
GEMM_KERNELS = {"_fused_forward_kernel", "_fused_backward_kernel", "_gemm_forward_kernel", "_gemm_backward_kernel",
                "_gemm_forward_tma_kernel", "_gemm_backward_tma_kernel", "_gram_kernel"}
#: Kernels that run on sm_90 only (tensor descriptors): compiled for Hopper alone.
HOPPER_ONLY = {"_gemm_forward_tma_kernel", "_gemm_backward_tma_kernel"}


def _problems(doc: dict) -> list[str]:
    return [msg for row in doc["rows"] for msg in aot_table.row_problems(row)]


@pytest.fixture(scope="module")
def ci_table(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("aot") / "compile-ci.json"
    env = {k: v for k, v in os.environ.items() if k != aot.AUTOTUNE_ENV}
    env["TRITON_INTERPRET"] = "0"
    run = subprocess.run([sys.executable, "-m", "duallora_kernels.compiled.aot", "--subset", "ci", "--jobs", "1",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"exit {run.returncode}\n{run.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_ci_subset_compiles_within_the_contract(ci_table):
    assert aot_table.validate(ci_table) == []
    problems = _problems(ci_table)
    assert not problems, "\n".join(problems)


def test_ci_subset_covers_every_kernel_on_each_target(ci_table):
    rows = ci_table["rows"]
    kernels = {r["kernel"] for r in rows}
    assert GEMM_KERNELS <= kernels, kernels
    for arch, dtype, rank in aot.CI_SUBSET:
        seen = {r["kernel"] for r in rows if (r["arch"], r["dtype"], r["rank"]) == (arch, dtype, rank)}
        expected = kernels if arch >= 90 else kernels - HOPPER_ONLY
        assert seen == expected, (arch, dtype, rank, expected ^ seen)
    # The fixed config (DUALLORA_AUTOTUNE=0, what the GPU test script runs) of every autotuned kernel.
    assert all(r["fixed"] for r in rows if r["config"]), [r["config"] for r in rows if not r["fixed"]]
    # On Hopper the GEMM-shaped kernels' bf16 main loops run wgmma, not mma.sync.
    hopper = {r["kernel"]: r for r in rows if r["arch"] == 90 and r["dtype"] == "bfloat16"}
    for name in GEMM_KERNELS:
        assert hopper[name]["gemm_dots"] and hopper[name]["ptx"]["wgmma"] and hopper[name]["sass"]["HGMMA"], name
    # The TMA variant loads its tiles with the tensor-copy engine.
    for name in HOPPER_ONLY:
        assert hopper[name]["ptx"]["tma"] and hopper[name]["sass"]["TMA"], name


def _committed() -> list[pathlib.Path]:
    return sorted((ROOT / "bench" / "results").glob("compile-*.json"))


def test_a_full_table_is_committed():
    assert _committed(), "run: TRITON_INTERPRET=0 python -m duallora_kernels.compiled.aot (then commit the JSON)"


@pytest.mark.parametrize("path", _committed(), ids=lambda p: p.name)
def test_committed_table_holds_the_schema_and_the_contract(path):
    doc = json.loads(path.read_text())
    assert aot_table.validate(doc) == []
    assert doc["subset"] == "full" and set(doc["archs"]) == set(aot.ARCHS)
    assert {(r["dtype"], r["rank"]) for r in doc["rows"]} == set(map(tuple, aot.CASES))
    assert path.name == f"compile-{doc['triton']}.json"
    problems = _problems(doc) + aot_table.table_problems(doc)
    assert not problems, "\n".join(problems)
    # every padded-rank bucket of the linear kernels (fused_linear_tiles.BUCKETS) has rows
    assert {r["r_pad"] for r in doc["rows"] if r["kernel"] in GEMM_KERNELS - {"_gram_kernel"}} >= {32, 64, 128, 256}


def test_gemm_class_tiles_are_required_of_the_plain_gemm_kernels():
    row = {"kernel": "_gemm_forward_kernel", "dtype": "bfloat16", "rank": 16, "arch": 90, "kept": True,
           "config": "BLOCK_M=128 BLOCK_N=128 BLOCK_K=64 GROUP_M=8 num_warps=8", "compiled": True, "n_spills": 0,
           "stack_bytes": 0, "local_bytes": 0, "shared_bytes": 1024, "tensor_core_dots": 1, "gemm_dots": 1,
           "atomic_sems": [], "ptx": {"wgmma": 4, "mma_sync": 0}, "sass": {"HGMMA": 4, "HMMA": 0, "STL": 0, "LDL": 0,
                                                                            "fenced_atomics": 0, "TMA": 0}}
    assert aot_table.row_problems(row) == [] and aot_table.table_problems({"rows": [row]}) == []
    small = {**row, "config": "BLOCK_M=64 BLOCK_N=128 BLOCK_K=64 GROUP_M=8 num_warps=8"}
    assert aot_table.row_problems(small) and aot_table.table_problems({"rows": [small]})
    assert aot_table.row_problems({**small, "kernel": "_fused_forward_kernel"}) == []  # the single design may
    ampere = {**small, "arch": 86, "ptx": {"wgmma": 0, "mma_sync": 4}, "sass": {**row["sass"], "HGMMA": 0, "HMMA": 4}}
    assert aot_table.row_problems(ampere) == [] and aot_table.table_problems({"rows": [ampere]})
    tma = {**row, "kernel": "_gemm_forward_tma_kernel"}
    assert aot_table.row_problems(tma) and not aot_table.row_problems({**tma, "sass": {**tma["sass"], "TMA": 9}})


def test_row_problems_catch_each_breach():
    good = {"kernel": "k", "dtype": "bfloat16", "rank": 16, "arch": 90, "config": "", "compiled": True,
            "n_spills": 0, "stack_bytes": 0, "local_bytes": 0, "shared_bytes": 1024, "tensor_core_dots": 1,
            "gemm_dots": 1, "atomic_sems": ["relaxed"], "ptx": {"wgmma": 4, "mma_sync": 0},
            "sass": {"HGMMA": 4, "HMMA": 0, "STL": 0, "LDL": 0, "fenced_atomics": 0}}
    assert aot_table.row_problems(good) == []
    breaches = [
        {"compiled": False, "error": "boom"},
        {"n_spills": 4, "stack_bytes": 16, "sass": {**good["sass"], "STL": 2}},
        {"shared_bytes": aot.smem_limit(90) + 1},
        {"ptx": {"wgmma": 0, "mma_sync": 4}, "sass": {**good["sass"], "HGMMA": 0, "HMMA": 4}},
        {"sass": {**good["sass"], "fenced_atomics": 2}},
        {"arch": 86},  # wgmma on Ampere: the wrong target
    ]
    for change in breaches:
        assert aot_table.row_problems({**good, **change}), change
    # float32 may spill (IEEE dots run on FMA units); acq_rel atomics may be fenced.
    assert aot_table.row_problems({**good, "dtype": "float32", "n_spills": 4, "sass": {**good["sass"], "STL": 2}}) == []
    assert aot_table.row_problems({**good, "atomic_sems": ["acq_rel"], "sass": {**good["sass"], "fenced_atomics": 2}}) == []


_FENCE_PROBE = '''
import torch, triton, triton.language as tl
from duallora_kernels.compiled import aot

@triton.jit
def probe(p, v, SEM: tl.constexpr):
    i = tl.arange(0, 128)
    tl.atomic_add(p + i, tl.load(v + i), sem=SEM)

if __name__ == "__main__":
    for sem in ("acq_rel", "relaxed"):
        job = {"kernel": "probe", "module": "probe_kernel", "qualname": "probe", "arch": 90, "key": sem,
               **aot._bind(probe, (torch.empty(128), torch.empty(128)), {"SEM": sem}, 90)}
        row = aot.compile_job(job)
        print(sem, row["atomic_sems"], row["sass"]["atomics"], row["sass"]["fenced_atomics"])
'''


def test_fenced_atomics_are_told_from_relaxed_ones(tmp_path):
    """The detector behind the relaxed-atomics check: a default (acq_rel) tl.atomic_add is fenced
    by a GPU-scope MEMBAR in the SASS, a relaxed one is not."""
    (tmp_path / "probe_kernel.py").write_text(_FENCE_PROBE)
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    run = subprocess.run([sys.executable, "probe_kernel.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == ["acq_rel ['acq_rel'] 1 1", "relaxed ['relaxed'] 1 0"], run.stdout


def test_the_readme_renders_the_newest_table_in_full_and_older_ones_in_a_line(tmp_path):
    from duallora_kernels.compiled.compile_table import render_compile

    base = json.loads(_committed()[0].read_text())
    older, newer = {**base, "triton": "3.6.0"}, {**base, "triton": "3.10.0"}
    for doc in (older, newer):  # 3.10 after 3.6: numeric, not string, order
        (tmp_path / f"compile-{doc['triton']}.json").write_text(json.dumps(doc))
    text = render_compile(tmp_path)
    assert text.count("### Compiled kernels") == 1
    assert "by Triton 3.10.0 for" in text and "The same compiles by Triton 3.6.0 (" in text
    assert f"**{len(older['rows'])} compiles of" in text.split("The same compiles")[1]
