"""Building the CUDA extension where users build: find nvcc and a CUDA runtime library to link.

torch's extension builder links ``-L$CUDA_HOME/lib64 -lcudart``. That needs an unversioned
``libcudart.so`` in the toolkit, which pip-installed CUDA (the ``nvidia-cuda-runtime`` wheels that
torch depends on: ``site-packages/nvidia/cu13/lib`` or ``nvidia/cuda_runtime/lib``) does not ship,
and which a toolkit whose nvcc is on PATH outside ``CUDA_HOME`` may keep elsewhere. So:

* :func:`find_cudart` looks in the toolkit (``CUDA_HOME``, and the directory nvcc really lives in)
  and then in the pip wheels, for ``libcudart.so`` or else the highest ``libcudart.so.<major>``;
* :func:`cudart_link_flags` turns that into linker flags; for a versioned-only library it makes a
  private directory with a ``libcudart.so`` symlink, so torch's own ``-lcudart`` resolves too, and
  adds an rpath to the library's directory;
* :func:`nvcc_path` and :func:`missing_toolchain_message`: the one-line error when there is
  neither a prebuilt extension nor a compiler.

Used by :mod:`.cuda` (the JIT build) and by setup.py (``DUALLORA_BUILD_CUDA=1``), which loads this
file by path: it imports nothing from the package and only the standard library at import time.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["find_cudart", "cudart_link_flags", "nvcc_path", "toolkit_dirs", "wheel_lib_dirs",
           "wheel_include_dirs", "missing_toolchain_message"]

_VERSIONED = re.compile(r"^libcudart\.so\.(\d+)(?:\.\d+)*$")


def nvcc_path(cuda_home: str | None = None) -> Path | None:
    """nvcc in ``$CUDA_HOME/bin`` (or ``cuda_home``), else on PATH; None when there is none."""
    home = cuda_home if cuda_home is not None else os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def toolkit_dirs(cuda_home: str | None, nvcc: Path | None) -> list[Path]:
    """Library directories of the CUDA toolkit: under ``cuda_home`` and beside the real nvcc
    (``/usr/local/bin/nvcc`` may be a link into ``/usr/local/cuda-13.0/bin``)."""
    roots = [Path(cuda_home)] if cuda_home else []
    if nvcc is not None:
        roots.append(Path(os.path.realpath(nvcc)).parent.parent)
    dirs: list[Path] = []
    for root in roots:
        dirs += [root / "lib64", root / "lib", *sorted(root.glob("targets/*/lib"))]
    return dirs


def _nvidia_roots(site_dirs: Iterable[str] | None) -> list[Path]:
    """The ``nvidia`` namespace folders of pip's CUDA wheels in ``site_dirs`` (default: sys.path)."""
    roots = [Path(site) / "nvidia" for site in (site_dirs if site_dirs is not None else sys.path)]
    return [root for root in roots if root.is_dir()]


def wheel_lib_dirs(site_dirs: Iterable[str] | None = None) -> list[Path]:
    """``nvidia/<pkg>/lib`` of pip's CUDA wheels (``cu13``-style or ``cuda_runtime``)."""
    return [p for root in _nvidia_roots(site_dirs)
            for p in (*sorted(root.glob("cu[0-9]*/lib")), root / "cuda_runtime" / "lib") if p.is_dir()]


def wheel_include_dirs(site_dirs: Iterable[str] | None = None) -> list[str]:
    """``nvidia/<pkg>/include`` of pip's CUDA wheels: torch's CUDA headers include cusparse.h,
    cublas_v2.h, ..., which live there when there is no full toolkit."""
    return [str(p) for root in _nvidia_roots(site_dirs) for p in sorted(root.glob("*/include"))]


def _cudart_in(directory: Path) -> Path | None:
    if (directory / "libcudart.so").exists():
        return directory / "libcudart.so"
    versioned = [(int(m.group(1)), p) for p in directory.glob("libcudart.so.*") if (m := _VERSIONED.match(p.name))]
    return max(versioned)[1] if versioned else None


def find_cudart(search: Sequence[Path]) -> Path | None:
    """The first ``libcudart.so`` (else highest ``libcudart.so.<major>``) in the directories, in order."""
    for directory in search:
        if directory.is_dir() and (lib := _cudart_in(directory)) is not None:
            return lib
    return None


def cudart_link_flags(lib: Path, link_dir: Path) -> list[str]:
    """Linker flags for ``lib``: ``-L`` its directory, or for a versioned-only library a ``link_dir``
    holding a ``libcudart.so`` symlink to it; and an rpath to the library's own directory."""
    directory = lib.parent
    if lib.name != "libcudart.so":
        link_dir.mkdir(parents=True, exist_ok=True)
        staged = link_dir / f".libcudart.so.{os.getpid()}"  # made aside, then renamed over: concurrent builds agree
        if staged.is_symlink():
            staged.unlink()
        staged.symlink_to(lib.resolve())
        os.replace(staged, link_dir / "libcudart.so")
        directory = link_dir
    return [f"-L{directory}", f"-Wl,-rpath,{lib.parent}"]


def missing_toolchain_message(csrc: Path) -> str:
    return (f"backend='cuda': no prebuilt extension (duallora_kernels._C) and no nvcc to build {csrc}: install a CUDA "
            "toolkit (nvcc on PATH or CUDA_HOME) or reinstall with DUALLORA_BUILD_CUDA=1, or use backend='triton'")
