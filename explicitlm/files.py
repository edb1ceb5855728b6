"""Writing a file so that readers see the old one or the new one, never half of either."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` writes a temporary file beside `path` (one per writer), which is fsynced and
    renamed over `path`; on any error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_temp_files(path: str | Path) -> None:
    """Remove the temporary files that writers of `path` killed midway left (call it when no writer
    of `path` can be running)."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"\w+" + re.escape(TEMP_SUFFIX))
    for f in path.parent.iterdir():
        if pattern.fullmatch(f.name):
            f.unlink(missing_ok=True)
