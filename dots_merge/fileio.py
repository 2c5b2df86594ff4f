"""Writing files so that a crash never leaves half of one behind."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dots_merge.errors import DotsMergeError

_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_full_is_an_error(path: Path, doing: str) -> Iterator[None]:
    """Turn "no space left on device" inside the block into one `DotsMergeError` naming `path` and the work."""
    try:
        yield
    except OSError as error:
        if error.errno in _FULL:
            raise DotsMergeError(f"{path}: no space left on device while {doing}; free some space and retry") from None
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, flush it to disk, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with disk_full_is_an_error(path, "writing it"):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
