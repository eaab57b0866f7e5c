"""Build script: metadata lives in pyproject.toml; this file only adds the optional CUDA extension.

``duallora_kernels._C`` is compiled from csrc/ when CUDA is there -- torch importable in the
build environment, a CUDA toolkit (nvcc) found and a GPU visible -- or always when
``DUALLORA_BUILD_CUDA=1`` (then torch and nvcc must be present: install with
``pip install --no-build-isolation``). Otherwise the package is pure Python, and
``backend="cuda"`` compiles csrc/ on first use instead (duallora_kernels/ops/cuda.py).
"""
import os
import sys

from setuptools import setup


def _cuda_extension():
    force = os.environ.get("DUALLORA_BUILD_CUDA") == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if force:
            sys.exit("DUALLORA_BUILD_CUDA=1 needs torch in the build environment: pip install --no-build-isolation ...")
        return {}
    if not force and not (CUDA_HOME and torch.cuda.is_available()):
        return {}
    if CUDA_HOME is None:
        sys.exit("DUALLORA_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
    ext = CUDAExtension(
        "duallora_kernels._C",
        sources=["csrc/bindings.cpp", "csrc/memory_ops.cu", "csrc/fused_linear.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_cuda_extension())
