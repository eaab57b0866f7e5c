"""Atomic writes: whole files only, with the permissions any other new file would get."""
import os
import stat
from pathlib import Path

import pytest

from duallora_kernels._io import atomic_write, atomic_write_json, current_umask


@pytest.fixture
def umask():
    before = os.umask(0o022)
    os.umask(before)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expect", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o027, 0o640)])
def test_new_files_follow_the_umask(tmp_path, umask, mask, expect):
    umask(mask)
    assert current_umask() == mask
    atomic_write_json(tmp_path / "results.json", {"a": 1})
    atomic_write(tmp_path / "w.bin", lambda tmp: Path(tmp).write_bytes(b"xyz"))
    plain = tmp_path / "plain.txt"
    plain.write_text("made by open()")
    assert _mode(tmp_path / "results.json") == expect == _mode(plain)
    assert _mode(tmp_path / "w.bin") == expect
    assert (tmp_path / "w.bin").read_bytes() == b"xyz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt", "results.json", "w.bin"]


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "results.json"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_json(target, [1, 2])
    assert _mode(target) == 0o640 and target.read_text() == "[\n  1,\n  2\n]\n"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
