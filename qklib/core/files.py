"""Writing result files so that an interrupted write leaves the old file or none, never half of one."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _new_temporary(path: Path) -> tuple[int, Path]:
    """Create ``.<name>.<random>.tmp`` beside ``path``, open for writing, with the mode a plain write gives.

    ``tempfile.mkstemp`` creates its file 0600 whatever the umask, and the rename then hands that mode to the
    result: collaborators on shared storage could not read it. Created with 0666 the umask applies, as for
    ``open(path, "w")``; replacing an existing file keeps that file's mode, as writing into it would.
    """
    for _ in range(100):
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            os.fchmod(handle, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        return handle, temporary
    raise FileExistsError(f"no free temporary name beside {str(path)!r}")


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator:
    """Open a temporary file in ``path``'s folder; on success fsync it and rename it onto ``path``.

    On an exception (or a kill) the temporary file is removed (or left as ``.<name>.*.tmp``) and ``path``
    keeps its old content. The file gets the mode a plain write would give: the umask's for a new file,
    the old file's for a replaced one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = _new_temporary(path)
    try:
        with os.fdopen(handle, mode) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass
