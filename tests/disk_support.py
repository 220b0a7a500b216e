"""Test helper: a small (or read-only) tmpfs mounted for one test, to provoke real ENOSPC / EROFS errors.

Mounting needs root and a kernel that allows it; where it cannot be mounted the test is skipped (the
same behaviours are also proved with injected errors that need no mount).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "256k", read_only: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``folder`` (created) for the block; skip the test if it cannot be mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount(folder: Path, options: str) -> None:
    """Remount the tmpfs at ``folder`` with ``options`` (e.g. "remount,ro")."""
    subprocess.run(["mount", "-o", options, str(folder)], check=True, capture_output=True)
