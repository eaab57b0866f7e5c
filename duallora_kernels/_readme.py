"""Generated sections of README.md: text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
is written by a script from committed result files, never by hand (all of them at once:
``python -m duallora_kernels.readme``)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def splice(text: str, block: str, name: str) -> str:
    """``text`` with everything between the ``name`` markers replaced by ``block``."""
    start, end = markers(name)
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"the README has no {start} ... {end} markers (in that order)")
    return text[: i + len(start)] + "\n" + block.rstrip("\n") + "\n" + text[j:]


def update_sections(readme: Path, blocks: Mapping[str, str], *, check: bool, command: str) -> int:
    """Write each ``blocks[name]`` into ``readme``'s ``name`` section; with ``check`` only report
    the stale sections (exit 1) and say ``command`` to fix them."""
    old = readme.read_text()
    new = old
    stale = []
    for name, block in blocks.items():
        spliced = splice(new, block, name)
        if spliced != new:
            stale.append(name)
        new = spliced
    if check:
        if stale:
            print(f"{readme} is out of date ({', '.join(stale)}): run {command}", file=sys.stderr)
            return 1
        return 0
    if new != old:
        readme.write_text(new)
        print(f"updated {readme} ({', '.join(stale)})")
    return 0


def update(readme: Path, block: str, name: str, *, check: bool, script: str) -> int:
    """One section, for a script of its own (``script``: the path to run it by)."""
    return update_sections(readme, {name: block}, check=check, command=f"python {script}")
