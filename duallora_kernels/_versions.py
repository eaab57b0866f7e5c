"""The torch, Triton and numpy versions this package is tested with, and the checks against them.

Two CI lanes test it (``.ci/run``): the README's test command on the newest versions
(setup.sh's torch 2.14.1, the Triton it brings), and ``.ci/oldest`` on the oldest ones the package
declares (``pip install -e ".[dev,oldest]"``: torch 2.11, Triton 3.6, the GPU machine's stack).
:data:`TESTED` is that range; ``python -m duallora_kernels._versions`` prints one line of warning
when this machine's versions fall outside it (bench/run_gpu.sh's setup step), and
``--expect oldest|newest`` fails unless the installed versions are that end of it (the lanes).
tests/test_versions.py holds :data:`TESTED` to pyproject.toml and setup.sh.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys
from importlib import metadata

__all__ = ["TESTED", "installed", "outside_tested", "range_warning", "check_interpreter_numpy"]

#: (oldest, newest) major.minor each lane installs. numpy: what pip resolves in each lane (the
#: oldest lane caps it below 2.4, see :func:`check_interpreter_numpy`).
TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.11", "2.14"),
    "triton": ("3.6", "3.8"),
    "numpy": ("2.3", "2.4"),
}


def _minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '2.11.0+cu130' or '3.6.0'."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if not found:
        raise ValueError(f"not a version: {version!r}")
    return int(found[1]), int(found[2])


def installed() -> dict[str, str | None]:
    """The installed version of each package of :data:`TESTED` (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in TESTED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def outside_tested(versions: dict[str, str | None]) -> list[str]:
    """'name version (tested a-b)' for each package whose version lies outside :data:`TESTED`."""
    out = []
    for name, version in versions.items():
        if version is None or name not in TESTED:
            continue
        low, high = TESTED[name]
        if not _minor(low) <= _minor(version) <= _minor(high):
            out.append(f"{name} {version} (tested {low}-{high})")
    return out


def range_warning(versions: dict[str, str | None] | None = None) -> str | None:
    """One line that names what lies outside the tested range, or None when everything is inside."""
    outside = outside_tested(installed() if versions is None else versions)
    if not outside:
        return None
    return ("duallora_kernels: warning: outside the tested range: " + ", ".join(outside)
            + "; results may differ from CI's (README, 'Supported versions')")


def _interpreter_needs_old_numpy(triton_version: str, numpy_version: str) -> bool:
    # Triton 3.6's interpreter turns a scalar kernel argument (a 1-element array) into a Python
    # int with int(array), which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to
    # Python scalars"); Triton 3.7 squeezes the array first.
    return _minor(triton_version) <= (3, 6) and _minor(numpy_version) >= (2, 4)


@functools.cache
def check_interpreter_numpy() -> None:
    """Raise a one-line error when Triton's interpreter cannot run with this numpy (Triton <= 3.6
    with numpy >= 2.4) instead of letting every kernel fail at its first loop with a TypeError."""
    import numpy
    import triton

    if _interpreter_needs_old_numpy(triton.__version__, numpy.__version__):
        raise RuntimeError(
            f"TRITON_INTERPRET=1 with triton {triton.__version__} needs numpy < 2.4 (found numpy {numpy.__version__}): "
            "pip install 'numpy<2.4', or install the oldest tested stack with pip install -e '.[oldest]'"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m duallora_kernels._versions",
                                description="Compare this machine's torch/triton/numpy with the tested range.")
    p.add_argument("--expect", choices=("oldest", "newest"),
                   help="fail unless torch and triton are that end of the tested range (the CI lanes)")
    args = p.parse_args(argv)
    versions = installed()
    if args.expect:
        end = 0 if args.expect == "oldest" else 1
        wrong = [f"{name} {versions[name]} (expected {TESTED[name][end]})" for name in ("torch", "triton")
                 if versions[name] is None or _minor(versions[name]) != _minor(TESTED[name][end])]
        if wrong:
            print(f"not the {args.expect} tested versions: " + ", ".join(wrong), file=sys.stderr)
            return 1
        print(f"{args.expect} tested versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        return 0
    warning = range_warning(versions)
    if warning:
        print(warning)
    return 0


if __name__ == "__main__":
    sys.exit(main())
