"""The source checkout the package runs from, if it runs from one, and git in it.

Results files record the commit of the code that made them. Only a checkout of this repository
has one: an installed copy lives in a site-packages directory, and git run there answers for
whatever repository happens to contain that directory (a user's project with its venv inside),
whose commit says nothing about this code.
"""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path

__all__ = ["PACKAGE_PARENT", "checkout_root", "git"]

#: The directory holding the package: the repository root when it runs from a checkout.
PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def _run_git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def checkout_root() -> Path | None:
    """The git work tree whose top level holds the package, or None (installed, or no git)."""
    top = _run_git(PACKAGE_PARENT, "rev-parse", "--show-toplevel")
    return PACKAGE_PARENT if top is not None and Path(top).resolve() == PACKAGE_PARENT else None


def git(*args: str) -> str | None:
    """``git args`` in the package's checkout: its stripped output, None when not run from a checkout
    or when git fails."""
    root = checkout_root()
    return None if root is None else _run_git(root, *args)
