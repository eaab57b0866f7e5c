"""The CUDA backend without a GPU: its tensor-core kernels compile for an arch with HMMA in every
instantiation, no spills and shared memory within the arch's limit (nvcc, cuobjdump); the committed
table (bench/results/cuda-compile-*.json) covers the four archs and passes the same checks; the
CUDA runtime is found where pip's wheels keep it and the extension links; the errors say what is
missing. Compiles one arch (sm_86, the tightest shared memory, about 40 s on one core); the
command ``python -m duallora_kernels.compiled.cuda_aot`` compiles all four. Skipped only where nvcc is
absent (the reason says so)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from duallora_kernels.compiled import cuda_aot
from duallora_kernels.ops import cuda, cuda_build

ROOT = Path(__file__).resolve().parents[1]
NVCC = cuda_build.nvcc_path()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or CUDA_HOME): the CUDA compile check needs a toolkit")
CI_ARCH = 86
INSTANTIATIONS = {(k, dt, r) for k in ("fused_forward_kernel", "fused_backward_kernel")
                  for dt in ("bfloat16", "float16") for r in (16, 32, 64, 128)}


@needs_nvcc
def test_kernels_compile_on_tensor_cores_without_spills_within_shared_memory(tmp_path):
    rows, compiles = cuda_aot.compile_arch(CI_ARCH, tmp_path, str(NVCC))
    assert {(r["kernel"], r["dtype"], r["rank_pad"]) for r in rows} == INSTANTIATIONS
    assert [c["source"] for c in compiles] == list(cuda_aot.SOURCES)
    assert [p for r in rows for p in cuda_aot.row_problems(r)] == []
    for r in rows:  # the pipeline and ldmatrix are there too, and the backward's sums are atomics
        assert r["sass"]["HMMA_in_loops"] >= 32 + r["rank_pad"] // 4  # the warp tile's and the low-rank product's
        assert r["sass"]["LDGSTS"] > 0 and r["sass"]["LDSM"] > 0
        assert (r["sass"]["atomics"] > 0) == (r["kernel"] == "fused_backward_kernel")


def test_row_problems_flags_what_the_issue_forbids():
    good = {"kernel": "fused_forward_kernel", "dtype": "bfloat16", "rank_pad": 16, "arch": 86, "regs": 130,
            "stack_bytes": 0, "local_bytes": 0, "shared_bytes": 65280, "smem_limit": 99 * 1024,
            "sass": {"HMMA": 52, "HMMA_in_loops": 36, "HGMMA": 0, "STL": 0, "LDL": 0, "LDGSTS": 16}}
    assert cuda_aot.row_problems(good) == []
    simt = {**good, "sass": {**good["sass"], "HMMA": 16, "HMMA_in_loops": 0}}  # tensor cores in the epilogue only
    spilling = {**good, "local_bytes": 8, "sass": {**good["sass"], "STL": 2}}
    too_big = {**good, "shared_bytes": 99 * 1024 + 16}
    assert "tensor cores" in cuda_aot.row_problems(simt)[0]
    assert "spills" in cuda_aot.row_problems(spilling)[0]
    assert "shared memory" in cuda_aot.row_problems(too_big)[0]


def test_committed_table_covers_every_arch_and_passes():
    files = sorted((ROOT / "bench" / "results").glob("cuda-compile-*.json"))
    assert files, "no bench/results/cuda-compile-*.json: run python -m duallora_kernels.compiled.cuda_aot"
    doc = json.loads(files[-1].read_text())
    assert sorted(doc["archs"]) == [80, 86, 89, 90]
    for arch in doc["archs"]:
        mine = {(r["kernel"], r["dtype"], r["rank_pad"]) for r in doc["rows"] if r["arch"] == arch}
        assert mine == INSTANTIATIONS, arch
    assert [p for r in doc["rows"] for p in cuda_aot.row_problems(r)] == []


def _fake_lib(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF")
    return path


def test_cudart_found_in_the_toolkit_first_then_in_pip_wheels(tmp_path):
    site = tmp_path / "site"
    wheel = _fake_lib(site / "nvidia" / "cu13" / "lib" / "libcudart.so.13")
    _fake_lib(site / "nvidia" / "cu13" / "lib" / "libcudart.so.12")
    home = tmp_path / "cuda"
    (home / "lib64").mkdir(parents=True)
    search = [*cuda_build.toolkit_dirs(str(home), None), *cuda_build.wheel_lib_dirs([str(site)])]
    assert cuda_build.find_cudart(search) == wheel  # no toolkit library: the wheel's highest major
    toolkit = _fake_lib(home / "targets" / "x86_64-linux" / "lib" / "libcudart.so")
    search = [*cuda_build.toolkit_dirs(str(home), None), *cuda_build.wheel_lib_dirs([str(site)])]
    assert cuda_build.find_cudart(search) == toolkit
    assert cuda_build.find_cudart([tmp_path / "nowhere"]) is None


def test_toolkit_dirs_follow_the_real_nvcc(tmp_path):
    real = tmp_path / "cuda-13.0" / "bin" / "nvcc"
    real.parent.mkdir(parents=True)
    real.write_text("")
    link = tmp_path / "bin" / "nvcc"
    link.parent.mkdir()
    link.symlink_to(real)
    assert tmp_path / "cuda-13.0" / "lib64" in cuda_build.toolkit_dirs(None, link)


def test_versioned_cudart_gets_an_unversioned_link_and_an_rpath(tmp_path):
    lib = _fake_lib(tmp_path / "wheel" / "libcudart.so.13")
    flags = cuda_build.cudart_link_flags(lib, tmp_path / "link")
    assert flags == [f"-L{tmp_path / 'link'}", f"-Wl,-rpath,{lib.parent}"]
    assert (tmp_path / "link" / "libcudart.so").resolve() == lib.resolve()
    plain = _fake_lib(tmp_path / "toolkit" / "libcudart.so")
    assert cuda_build.cudart_link_flags(plain, tmp_path / "unused") == [f"-L{plain.parent}", f"-Wl,-rpath,{plain.parent}"]


def test_without_nvcc_the_build_says_what_to_install_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert cuda_build.nvcc_path(None) is None
    with pytest.raises(RuntimeError, match="no prebuilt extension .* and no nvcc") as err:
        cuda.link_flags(None)
    assert "\n" not in str(err.value)


@needs_nvcc
def test_jit_link_against_the_found_cudart(tmp_path, monkeypatch):
    # The link step of the JIT path, on a tiny CUDA source (a kernel and a cudart call): torch's
    # builder with the flags of cuda.link_flags, no GPU needed to link or to load the library.
    from torch.utils.cpp_extension import CUDA_HOME, load

    src = tmp_path / "tiny.cu"
    src.write_text("__global__ void k(float* p) { p[0] = 1.f; }\n"
                   "extern \"C\" int duallora_tiny() { int v = 0; cudaRuntimeGetVersion(&v); return v; }\n")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    load(name="duallora_tiny_link", sources=[str(src)], extra_ldflags=cuda.link_flags(CUDA_HOME),
         is_python_module=False, verbose=False)
    built = list((tmp_path / "ext").rglob("duallora_tiny_link.so"))
    assert len(built) == 1 and os.path.getsize(built[0]) > 0


def test_auto_takes_triton_on_every_gpu_until_a_measurement_names_one(monkeypatch):
    import duallora_kernels.ops as ops

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(ops, "_triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert ops.CUDA_FASTER_ON == frozenset()
    assert ops.resolve_backend("auto", gpu) == "triton"
    monkeypatch.setattr(ops, "CUDA_FASTER_ON", frozenset({(8, 6), (8, 9)}))
    assert ops.resolve_backend("auto", gpu) == "cuda"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert ops.resolve_backend("auto", gpu) == "triton"
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("dtype, r_o, r_r", [(torch.float32, 8, 8), (torch.float64, 8, 8), (torch.bfloat16, 64, 65)])
def test_what_the_kernels_do_not_take_runs_the_torch_launchers(dtype, r_o, r_r, gen, monkeypatch):
    # float32 (cuBLAS, TF32 as torch allows), float64 and r > 128 never reach the extension.
    from duallora_kernels.ops.launchers import TORCH, Layout

    monkeypatch.setattr(cuda, "load_extension", lambda: pytest.fail("the extension was called"))
    x = torch.randn(5, 24, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(12, 24, generator=gen, dtype=torch.float64).to(dtype)
    a = torch.randn(r_o + r_r, 24, generator=gen, dtype=torch.float64).to(dtype)
    bt = torch.randn(r_o + r_r, 12, generator=gen, dtype=torch.float64).to(dtype)
    lay = Layout(a, r_o, r_r, None, 0.5, 2.0)
    y, t = cuda._cuda_forward(x, w, None, a, bt, None, lay, True)
    y_ref, t_ref = TORCH.forward(x, w, None, a, bt, None, lay, True)
    assert torch.equal(y, y_ref) and torch.equal(t, t_ref)
