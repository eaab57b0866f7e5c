"""The CUDA C++ backend (``backend="cuda"``): the kernels in csrc/, loaded on first use.

A prebuilt extension (``duallora_kernels._C``, built by setup.py when CUDA is present) is used
if it imports; otherwise csrc/ is compiled once with ``torch.utils.cpp_extension.load`` (JIT,
cached under ``TORCH_EXTENSIONS_DIR``; needs nvcc, and links the CUDA runtime that
:mod:`.cuda_build` finds: the toolkit's, or the versioned one of pip's CUDA wheels). Without a
CUDA device every entry point raises a RuntimeError that says so; with neither a prebuilt
extension nor nvcc, a one-line RuntimeError says what to install.

* :func:`cuda_launchers`: the fused forward/backward of csrc/fused_forward.cu and
  csrc/fused_backward.cu behind the same registered op and autograd formula as the Triton op
  (:mod:`.registered`), so the two share gradient bookkeeping and the memory projections.
  Tensor cores: ``mma.sync`` m16n8k16 through inline PTX (csrc/mma_sm80.cuh says why not
  CUTLASS/CuTe or WMMA), 128 x 128 x 32 tiles, 3-stage ``cp.async`` pipelines (2 at padded rank
  128), 16-byte loads, within 99 KB of shared memory so that they run on sm_86/sm_89 as on sm_80
  and sm_90; float32 accumulation, T stored in x's dtype. bfloat16 and float16 only, total rank
  r <= 128. Other calls run :data:`.launchers.TORCH` (cuBLAS): float32 (so that TF32 is used
  exactly when torch's float32 matmul precision allows it, which is what the Triton path does
  with ``tl.dot``; a float32 CUDA kernel on SIMT FMA would be slower than cuBLAS, and an
  mma.sync TF32 variant is not written yet), float64, and r > 128 (a stacked rank that a long task
  stream reaches: the first such call logs one line, :func:`_kernel_takes`).
* :func:`gram_cuda`: cuBLAS (one GEMM; bf16/fp16 on tensor cores with a float32 result).
* :func:`task_scores_cuda`: csrc/memory_ops.cu, one SIMT launch for all tasks (float32 / float64
  accumulation): (b x T x d x u) multiply-adds, off the training step's path, where cuBLAS would
  take a batched GEMM plus three elementwise launches.

Inputs are made contiguous before the launch (a copy only for strided inputs), unlike the Triton
kernels, which read strided rows in place.

Which backend ``"auto"`` picks is :func:`duallora_kernels.ops.resolve_backend`'s: Triton on every
GPU (its wgmma path is Hopper's state of the art); this backend is chosen by name until a
measurement on sm_8x says it is faster there. Status: compile-checked for sm_80/86/89/90
(tests/test_cuda_compile.py, bench/results/cuda-compile-*.json); the kernels' code executed on the
CPU with their warp instructions emulated, against float64 (tests/test_cuda_emulation.py); not yet
run on a GPU (tests/test_fused_linear.py's ``cuda_backend`` tests are what a GPU runs).
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from . import cuda_build
from .launchers import TORCH, Launchers, rows_in_shape
from .reference import TINY_NORM, task_scores_reference

__all__ = ["cuda_launchers", "gram_cuda", "task_scores_cuda", "load_extension", "extension_unavailable",
           "build_extension", "CSRC"]


def _csrc() -> Path:
    """The CUDA sources: the copy a built package carries (setup.py copies the repository's csrc/ into
    duallora_kernels/csrc/ when it builds a wheel), else a checkout's own csrc/ (editable installs, tests)."""
    shipped = Path(__file__).resolve().parents[1] / "csrc"
    return shipped if shipped.is_dir() else Path(__file__).resolve().parents[2] / "csrc"


CSRC = _csrc()
SOURCES = ("bindings.cpp", "memory_ops.cu", "fused_forward.cu", "fused_backward.cu")
#: What the fused kernels take; other calls run the torch launchers (cuBLAS), see the module doc.
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
MAX_RANK = 128
# csrc/memory_ops.cu divides by max(||z||^2, eps): with eps = float32's smallest normal it scores
# like the reference down to that norm (below it the reference gives 0 and the kernel 0 / eps = 0
# for an all-zero z).
EPS = TINY_NORM
_SMEM_ROW_LIMIT = 48 * 1024  # task_scores stages one z row in (static-limit) shared memory

_ext = None
_lock = threading.Lock()
_logger = logging.getLogger(__name__)
_told_rank: list[int] = []  # the stacked rank the fallback notice named (said once per process)


def _missing_sources() -> str | None:
    missing = [s for s in SOURCES if not (CSRC / s).is_file()]
    if not missing:
        return None
    return (f"backend='cuda': the CUDA sources {missing} are not in {CSRC}; reinstall the package from its wheel or "
            "sdist, or with DUALLORA_BUILD_CUDA=1 so that the prebuilt extension duallora_kernels._C exists")


def build_extension(verbose: bool = False):
    """Compile csrc/ (JIT) and return the module. Needs nvcc, not a GPU: it also serves as the
    compile check on machines without one (set TORCH_CUDA_ARCH_LIST, e.g. "9.0", there)."""
    missing = _missing_sources()
    if missing:
        raise RuntimeError(missing)
    from torch.utils.cpp_extension import CUDA_HOME, load

    return load(
        name="duallora_kernels_cuda",
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cuda_cflags=["-O3"],
        extra_include_paths=cuda_build.wheel_include_dirs(),
        extra_ldflags=link_flags(CUDA_HOME),
        verbose=verbose,
    )


def link_flags(cuda_home: str | None) -> list[str]:
    """Linker flags for the CUDA runtime (:mod:`.cuda_build`); a one-line error without nvcc."""
    nvcc = cuda_build.nvcc_path(cuda_home)
    if nvcc is None:
        raise RuntimeError(cuda_build.missing_toolchain_message(CSRC))
    lib = cuda_build.find_cudart([*cuda_build.toolkit_dirs(cuda_home, nvcc), *cuda_build.wheel_lib_dirs()])
    if lib is None:
        return []  # torch's own -L$CUDA_HOME/lib64 -lcudart is then the only hope; its error names it
    return cuda_build.cudart_link_flags(lib, Path(tempfile.gettempdir()) / f"duallora-cudart-{os.getuid()}")


def _prebuilt():
    """The extension setup.py built (``DUALLORA_BUILD_CUDA=1``), or None."""
    try:
        from .. import _C
    except ImportError:
        return None
    return _C


def extension_unavailable() -> str | None:
    """Why the extension can be neither imported nor built here (None when it can): without the
    prebuilt one, building needs the sources and nvcc. Said before anything is built."""
    if _ext is not None or _prebuilt() is not None:
        return None
    from torch.utils.cpp_extension import CUDA_HOME

    if cuda_build.nvcc_path(CUDA_HOME) is None:
        return cuda_build.missing_toolchain_message(CSRC)
    return _missing_sources()


def load_extension():
    """The CUDA extension: prebuilt if present, else built from csrc/ on first use."""
    global _ext
    if _ext is not None:
        return _ext
    _require_device()
    with _lock:
        if _ext is None:
            ext = _prebuilt()
            if ext is None:
                why = extension_unavailable()
                if why:
                    raise RuntimeError(why)
                try:
                    ext = build_extension()
                except Exception as err:  # a compiler error is long; keep it, say what failed first
                    raise RuntimeError(f"backend='cuda': building the CUDA extension from {CSRC} failed: {err}") from err
            _ext = ext
    return _ext


def _require_device() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("backend='cuda' needs a CUDA device, and torch.cuda.is_available() is False here")


def _require_cuda(name: str, t: Tensor) -> None:
    if not t.is_cuda:
        raise RuntimeError(f"backend='cuda' needs CUDA tensors, got {name} on {t.device}")


def gram_cuda(x: Tensor) -> Tensor:
    """``x^T x`` (d, d) over all rows of x (..., d); float32 out (float64 for float64 input).

    cuBLAS, not a kernel of csrc/: one GEMM of (d x m) by (m x d), on tensor cores with float32
    accumulation and output for bfloat16/float16 (``torch.mm(..., out_dtype=torch.float32)``), in
    float32 (TF32 as torch's matmul precision allows) or float64 otherwise. It runs once per task
    over the task's inputs; a hand-written kernel would be a GEMM no better than cuBLAS's."""
    _require_device()
    _require_cuda("x", x)
    x2 = x.reshape(-1, x.shape[-1])
    g = torch.mm(x2.T, x2, out_dtype=torch.float32) if x2.dtype in KERNEL_DTYPES else x2.T @ x2
    return (g + g.T) * 0.5  # exactly symmetric, as gram_reference


def task_scores_cuda(z: Tensor, task_bases: Tensor) -> Tensor:
    """(b, T) scores ``||U_t^T z||^2 / ||z||^2``; float32 out (float64 for float64 z)."""
    ext = load_extension()
    _require_cuda("z", z)
    _require_cuda("task_bases", task_bases)
    wd = torch.promote_types(z.dtype, torch.float32)
    if z.shape[1] * torch.finfo(wd).bits // 8 > _SMEM_ROW_LIMIT:
        return task_scores_reference(z, task_bases)  # a z row does not fit the kernel's smem
    return ext.task_scores(z.to(wd).contiguous(), task_bases.to(wd).contiguous(), EPS)


def _gate_rows(gate, lay, d_rows: int):
    # The Triton kernels read the (broadcast) gate through its strides; these kernels want (m, G) float32.
    return gate.reshape(d_rows, gate.shape[-1]).to(torch.float32).contiguous() if lay.has_gate else None


def _kernel_takes(x: Tensor, lay) -> bool:
    if x.dtype in KERNEL_DTYPES and lay.r > MAX_RANK and not _told_rank:
        # host-side and once: the rank is a Python int of the layout, so this costs no device sync
        _told_rank.append(lay.r)
        _logger.warning("duallora_kernels backend='cuda': stacked rank %d is above the tensor-core kernels' limit "
                        "of %d; those layers run the torch launchers (cuBLAS) from now on", lay.r, MAX_RANK)
    return x.dtype in KERNEL_DTYPES and lay.r <= MAX_RANK


def _cuda_forward(x, weight, bias, a, bt, gate, lay, store_t):
    if not _kernel_takes(x, lay):
        return TORCH.forward(x, weight, bias, a, bt, gate, lay, store_t)
    d = weight.shape[1]
    g = _gate_rows(gate, lay, x.numel() // d)
    y, t = load_extension().dual_lora_forward(
        x.reshape(-1, d).contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), a, bt, g,
        lay.r_orth, lay.r_blk, lay.orth_scale, lay.res_scale, store_t,
    )
    # T comes out unscaled in x's dtype, as the graph keeps it (fused_linear's "What is saved").
    return rows_in_shape(y, x.shape[:-1]), t


def _cuda_backward(dy, x, weight, a, bt, gate, t, lay, plan, grad):
    if not _kernel_takes(dy, lay):
        return TORCH.backward(dy, x, weight, a, bt, gate, t, lay, plan, grad)
    n, d = weight.shape
    g = _gate_rows(gate, lay, dy.numel() // n)
    x2 = x.reshape(-1, d).contiguous() if plan.need_da else None
    dx, da, dbt, dbias = load_extension().dual_lora_backward(
        dy.reshape(-1, n).contiguous(), weight.contiguous(), a, bt, g, t, x2,
        lay.r_orth, lay.r_blk, lay.orth_scale, lay.res_scale,
        plan.da_orth_end, plan.da_res_start, plan.db_orth_end, plan.db_res_start, plan.need_dx, plan.need_dbias,
    )
    r = lay.r
    for sums, start, size in ((da, 0, r * d), (dbt, r * d, r * n), (dbias, r * d + r * n, n)):
        if sums is not None:
            grad[start:start + size].copy_(sums.reshape(-1))
    return dx


def cuda_launchers():
    """The CUDA C++ kernels as :class:`.launchers.Launchers` (the small-matrix steps in torch)."""
    load_extension()
    return Launchers(_cuda_forward, _cuda_backward)
