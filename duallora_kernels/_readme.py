"""Generated sections of README.md: text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
is written by a script from committed result files, never by hand."""
from __future__ import annotations

import sys
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def splice(text: str, block: str, name: str) -> str:
    """``text`` with everything between the ``name`` markers replaced by ``block``."""
    start, end = markers(name)
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"the README has no {start} ... {end} markers (in that order)")
    return text[: i + len(start)] + "\n" + block.rstrip("\n") + "\n" + text[j:]


def update(readme: Path, block: str, name: str, *, check: bool, script: str) -> int:
    """Write ``block`` into ``readme``'s ``name`` section; with ``check`` only report staleness (exit 1)."""
    old = readme.read_text()
    new = splice(old, block, name)
    if check:
        if new != old:
            print(f"{readme} is out of date: run python {script}", file=sys.stderr)
            return 1
        return 0
    if new != old:
        readme.write_text(new)
        print(f"updated {readme}")
    return 0
