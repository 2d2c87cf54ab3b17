"""Replacing a file's content atomically: a reader sees the old bytes or the new, never a part.

The bytes go to a temporary file in the same directory, with the final mode, and a rename puts it
in place. `durable` adds an fsync before the rename, for files that must survive a power loss
whole (the CNI config and plugin on the node's disk: a truncated conflist would stop every pod
start). A file under the run directory (`/var/run`, a tmpfs on nodes) goes with the boot anyway
and is rewritten by the agent when it starts: there the fsync would only cost a disk flush.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(path: Path, data: bytes, *, mode: int, durable: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
