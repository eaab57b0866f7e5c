"""The CUDA backend's tensor-core kernels executed on the CPU, against a float64 reference.

csrc/fused_forward.cu and csrc/fused_backward.cu are compiled for the host with their four warp
instructions (mma.sync, ldmatrix, ldmatrix.trans, cp.async) emulated lane by lane as the PTX ISA
defines their fragments (tests/cuda_emulation/warp_emulation.h), every CUDA thread a host thread
and __syncthreads a barrier (tests/cuda_emulation/harness.cpp). So the kernels' own index
arithmetic, fragment addressing, masks, pipeline stages, epilogues, gate / rank / gradient flags
and atomics run here on fresh random inputs, with each cp.async landing only when its thread
waits for it (the latest moment the PTX rules allow), so the pipeline's wait counts and stage reuse
are checked too; what the emulation cannot show is the hardware's timing and speed. Shared memory and the 16-bit outputs start as NaN,
so a read of something never written shows up. Skipped only where nvcc (for the CUDA headers and
the host compile) is absent.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from duallora_kernels.ops import cuda_build

ROOT = Path(__file__).resolve().parents[1]
NVCC = cuda_build.nvcc_path()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or CUDA_HOME): the host build of the "
                                "emulated kernels takes the CUDA headers from the toolkit")
#: Relative (Frobenius) error bounds: the kernels round T .* S, U and the outputs to the 16-bit dtype.
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("emulation") / "harness"
    emulation = ROOT / "tests" / "cuda_emulation"
    subprocess.run([str(NVCC), "-std=c++20", "-O1", "-x", "c++", f"-I{ROOT / 'csrc'}", f"-I{emulation}",
                    '-DDUALLORA_WARP_EMULATION="warp_emulation.h"', "-Xcompiler", "-pthread,-Wno-unknown-pragmas",
                    str(emulation / "harness.cpp"), "-o", str(exe)], check=True, capture_output=True)
    return exe


def _write(folder: Path, name: str, t: torch.Tensor) -> None:
    t = t.contiguous()
    (t.view(torch.int16) if t.dtype in TOL else t).numpy().tofile(folder / f"{name}.bin")


def _read(folder: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = np.fromfile(folder / f"{name}.bin", dtype=np.int16 if dtype in TOL else np.float32)
    t = torch.from_numpy(raw).reshape(shape)
    return t.view(dtype) if dtype in TOL else t


def _scales(m, r, r_orth, r_blk, gate, orth_scale, res_scale) -> torch.Tensor:
    s = torch.zeros(m, r, dtype=torch.float64)
    s[:, :r_orth] = orth_scale
    ranks = torch.arange(r_orth, r)
    s[:, r_orth:] = res_scale * (gate.double()[:, (ranks - r_orth) // r_blk] if gate is not None else 1.0)
    return s


def _problem(m, n, d, r, r_orth, groups, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    r_blk = (r - r_orth) // groups if groups else 1
    gate = torch.rand(m, groups, generator=g) if groups else None
    return dict(x=rnd(m, d), w=rnd(n, d, scale=d ** -0.5), bias=rnd(n), a=rnd(r, d, scale=d ** -0.5),
                bt=rnd(r, n, scale=0.3), gate=gate, dy=rnd(m, n), r_blk=r_blk)


def _run(harness: Path, folder: Path, params: dict, tensors: dict) -> None:
    folder.mkdir()
    for name, t in tensors.items():
        if t is not None:
            _write(folder, name, t)
    (folder / "params.txt").write_text("".join(f"{k} {float(v)!r}\n" for k, v in params.items()))
    subprocess.run([str(harness), str(folder)], check=True, timeout=600)


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "an output element was never written (NaN) or overflowed"
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _r_pad(r: int) -> int:
    return next(p for p in (16, 32, 64, 128) if r <= p)


# (m, n, d, r, r_orth, gate groups, dtype, bias, vec): row / column / k tails, 16-byte aligned and
# unaligned rows (d or n not a multiple of 8, or vec=0: the element-wise loads everywhere), every
# padded rank, with and without a gate, and no adapter at all.
FORWARD = [
    (130, 136, 72, 16, 8, 2, torch.bfloat16, True, 1),
    (130, 136, 72, 16, 8, 2, torch.float16, True, 0),
    (20, 40, 50, 40, 40, 0, torch.float16, False, 1),
    (17, 24, 40, 100, 8, 23, torch.bfloat16, True, 1),
    (33, 20, 24, 24, 8, 4, torch.bfloat16, False, 1),
    (9, 130, 16, 0, 0, 0, torch.bfloat16, True, 1),
]


@pytest.mark.parametrize("m, n, d, r, r_orth, groups, dtype, bias, vec", FORWARD)
def test_emulated_forward_matches_reference(harness, tmp_path, m, n, d, r, r_orth, groups, dtype, bias, vec):
    p = _problem(m, n, d, r, r_orth, groups, dtype, seed=m * 1000 + n + r)
    params = dict(mode=0, bf16=dtype == torch.bfloat16, m=m, n=n, d=d, r=r, r_pad=_r_pad(max(r, 1)), r_orth=r_orth,
                  r_blk=p["r_blk"], G=groups, orth_scale=0.7, res_scale=1.3, store_t=r > 0, has_bias=bias,
                  has_gate=groups > 0, vec=vec)
    _run(harness, tmp_path / "run", params, {k: p[k] for k in ("x", "w", "a", "bt", "gate")} | {
        "bias": p["bias"] if bias else None})
    x, w, a, bt = (p[k].double() for k in ("x", "w", "a", "bt"))
    ref = x @ w.T + (p["bias"].double() if bias else 0.0)
    if r:
        t_ref = x @ a.T
        ref = ref + (t_ref * _scales(m, r, r_orth, p["r_blk"], p["gate"], 0.7, 1.3)) @ bt
        assert _err(_read(tmp_path / "run", "t_out", dtype, (m, r)), t_ref) <= TOL[dtype]
    assert _err(_read(tmp_path / "run", "y", dtype, (m, n)), ref) <= TOL[dtype]


# (m, n, d, r, r_orth, groups, dtype, need_dx, dA rows (orth_end, res_start), dB rows, need_dbias, vec)
BACKWARD = [
    (130, 72, 136, 16, 8, 2, torch.bfloat16, True, (8, 8), (8, 8), True, 1),
    (130, 72, 136, 16, 8, 2, torch.float16, True, (0, 12), (8, 16), False, 0),
    (33, 50, 30, 40, 16, 6, torch.float16, False, (0, 24), (16, 40), False, 1),
    (20, 40, 24, 100, 8, 23, torch.bfloat16, True, (0, 100), (0, 100), True, 1),
    (70, 48, 40, 24, 8, 4, torch.bfloat16, False, (0, 24), (8, 16), True, 1),
    (9, 16, 130, 0, 0, 0, torch.bfloat16, True, (0, 0), (0, 0), True, 1),
]


@pytest.mark.parametrize("m, n, d, r, r_orth, groups, dtype, need_dx, da_rows, db_rows, need_dbias, vec", BACKWARD)
def test_emulated_backward_matches_reference(harness, tmp_path, m, n, d, r, r_orth, groups, dtype, need_dx, da_rows,
                                             db_rows, need_dbias, vec):
    p = _problem(m, n, d, r, r_orth, groups, dtype, seed=m * 1000 + d + r)
    g = torch.Generator().manual_seed(m + n + d)
    t = (torch.randn(m, r, generator=g, dtype=torch.float64)).to(dtype)  # T as the forward keeps it
    params = dict(mode=1, bf16=dtype == torch.bfloat16, m=m, n=n, d=d, r=r, r_pad=_r_pad(max(r, 1)), r_orth=r_orth,
                  r_blk=p["r_blk"], G=groups, orth_scale=0.7, res_scale=1.3, has_gate=groups > 0, need_dx=need_dx,
                  da_orth_end=da_rows[0], da_res_start=da_rows[1], db_orth_end=db_rows[0], db_res_start=db_rows[1],
                  need_dbias=need_dbias, vec=vec)
    _run(harness, tmp_path / "run", params, {k: p[k] for k in ("x", "w", "a", "bt", "gate", "dy")} | {"t": t})
    folder = tmp_path / "run"
    x, w, a, bt, dy = (p[k].double() for k in ("x", "w", "a", "bt", "dy"))
    s = _scales(m, r, r_orth, p["r_blk"], p["gate"], 0.7, 1.3)
    u = (dy @ bt.T) * s
    trains = lambda rows: [q < rows[0] or q >= rows[1] for q in range(r)]  # noqa: E731
    if need_dx:
        assert _err(_read(folder, "dx", dtype, (m, d)), dy @ w + u @ a) <= TOL[dtype]
    for name, rows, ref, width in (("da", da_rows, u.T @ x, d), ("dbt", db_rows, (t.double() * s).T @ dy, n)):
        mask = torch.tensor(trains(rows), dtype=torch.bool)
        if not mask.any():
            continue
        got = _read(folder, name, torch.float32, (r, width))
        assert torch.equal(got[~mask], torch.zeros_like(got[~mask])), f"{name}: a frozen row got a gradient"
        assert _err(got[mask], ref[mask]) <= TOL[dtype], name
    if need_dbias:
        assert _err(_read(folder, "dbias", torch.float32, (n,)), dy.sum(0)) <= 1e-5
