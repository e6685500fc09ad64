"""Atomic file writes: a temporary file in the same folder, fsynced, then renamed into place.
A reader (or a later run after a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
"""Errors that mean the output folder takes no more writes (full, over quota, read-only): they
stop a batch, where any other error fails one slide or one optional output."""

_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_file(path: Path):
    """Binary file object to write; renamed to ``path`` only if the block finishes."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are for others to read
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: Path, obj) -> None:
    """``torch.save`` that a kill mid-write cannot leave half-written (checkpoints, resume states)."""
    import torch

    with atomic_file(path) as f:
        torch.save(obj, f)
