"""qklib.core.files.atomic_write: the file it leaves has the mode a plain write would give (issue 28 item 6),
so that collaborators on shared storage can read a colleague's results."""

from __future__ import annotations

import os
import stat

import pytest

from qklib.core.files import atomic_write


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_a_new_file_gets_the_mode_of_a_plain_write(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.bin", "wb") as stream:
        stream.write(b"x")
    with atomic_write(tmp_path / "atomic.bin") as stream:
        stream.write(b"x")
    assert mode(tmp_path / "atomic.bin") == mode(tmp_path / "plain.bin") == 0o666 & ~mask


def test_replacing_a_file_keeps_its_mode(tmp_path, umask):
    """A plain write into an existing file keeps that file's mode; so does the atomic replacement."""
    umask(0o022)
    target = tmp_path / "shared.json"
    target.write_text("old")
    target.chmod(0o664)
    with atomic_write(target, "w") as stream:
        stream.write("new")
    assert target.read_text() == "new" and mode(target) == 0o664


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "result.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as stream:
        stream.write(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["result.bin"]
