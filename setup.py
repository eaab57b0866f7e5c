"""Build script: metadata lives in pyproject.toml; this file adds the CUDA sources to the package and
the optional CUDA extension.

csrc/ (the CUDA C++ kernels) stays at the repository's top level, the source of truth; a built
package carries a copy as duallora_kernels/csrc/ (:class:`BuildPyWithCsrc`), which is where an
installed duallora_kernels/ops/cuda.py finds the sources to compile on first use.

``duallora_kernels._C`` is compiled from csrc/ when CUDA is there -- torch importable in the
build environment, a CUDA toolkit (nvcc) found and a GPU visible -- or always when
``DUALLORA_BUILD_CUDA=1`` (then torch and nvcc must be present: install with
``pip install --no-build-isolation``). Otherwise the package is pure Python, and
``backend="cuda"`` compiles csrc/ on first use instead (duallora_kernels/ops/cuda.py).
The CUDA runtime is linked from the toolkit, or from pip's CUDA wheels when the toolkit has no
``libcudart.so`` (duallora_kernels/ops/cuda_build.py, loaded by path: the package itself is not
importable before it is built).
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithCsrc(build_py):
    """build_py, then csrc/'s files copied into the built package as duallora_kernels/csrc/ (not for an
    editable install, which reads the checkout's csrc/ itself)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "duallora_kernels" / "csrc"
        for source in sorted((ROOT / "csrc").iterdir()):
            if source.is_file():
                self.mkpath(str(target))
                self.copy_file(str(source), str(target / source.name))


def _cuda_build():
    path = ROOT / "duallora_kernels" / "ops" / "cuda_build.py"
    spec = importlib.util.spec_from_file_location("duallora_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_extension():
    force = os.environ.get("DUALLORA_BUILD_CUDA") == "1"
    plain = {"cmdclass": {"build_py": BuildPyWithCsrc}}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if force:
            sys.exit("DUALLORA_BUILD_CUDA=1 needs torch in the build environment: pip install --no-build-isolation ...")
        return plain
    if not force and not (CUDA_HOME and torch.cuda.is_available()):
        return plain
    if CUDA_HOME is None:
        sys.exit("DUALLORA_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
    build = _cuda_build()
    nvcc = build.nvcc_path(CUDA_HOME)
    if nvcc is None:
        sys.exit("DUALLORA_BUILD_CUDA=1 but nvcc was not found (PATH or CUDA_HOME/bin)")
    cudart = build.find_cudart([*build.toolkit_dirs(CUDA_HOME, nvcc), *build.wheel_lib_dirs()])
    link = build.cudart_link_flags(cudart, Path("build") / "cudart") if cudart else []
    ext = CUDAExtension(
        "duallora_kernels._C",
        sources=["csrc/bindings.cpp", "csrc/memory_ops.cu", "csrc/fused_forward.cu", "csrc/fused_backward.cu"],
        include_dirs=build.wheel_include_dirs(),
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        extra_link_args=link,
    )
    return {"ext_modules": [ext], "cmdclass": {"build_py": BuildPyWithCsrc, "build_ext": BuildExtension}}


setup(**_cuda_extension())
