"""Write a file so that readers see either the old file or the complete new one, never a part.

Why this module exists: every output hif4fmt writes (states, stats, model cards) must survive a crash
or an exception half-way without leaving a truncated file behind. ``atomic_write`` writes into a
temporary file in the same folder (so ``os.replace`` is a rename on one file system), flushes and
fsyncs it, then renames it over the target; on any error the temporary file is removed and the old
target, if any, is untouched. Torch-free, no dependencies.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


def default_file_mode() -> int:
    """Return the mode a newly created file gets here: 0666 minus the process umask."""
    return 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it replaces ``path`` atomically, on error nothing changes.

    The temporary file is ``.<name>.<random>.tmp`` in the folder of ``path``; it is flushed and fsynced
    before ``os.replace`` and gets the usual permissions (0666 minus the umask), not mkstemp's 0600.
    Raises ``OSError`` if the folder does not exist or is not writable (callers wrap it in their
    typed error).
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, default_file_mode())
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable where the platform allows fsync on a directory (best effort)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
