"""Outputs written whole: destinations checked before the work, single files and sets replaced atomically.

Why this module exists: every output hif4fmt and wan-runtime write (states, statistics, reports, model
card folders, videos) must survive a crash, a full disk or Ctrl-C without leaving a truncated file, a
new file paired with an old one, or an overwritten input. Three tools, used by every command:

- ``check_outputs`` runs before any expensive work. It refuses (``OutputPathError``, exit 2) an output
  that resolves (symlinks followed) to an input or lies inside an input folder (the base checkpoint),
  two outputs that are the same file, a missing or unwritable parent folder, an output that is a folder,
  and an existing output unless ``force``. It removes the temporary files an interrupted earlier write
  to the same destination left behind (``.NAME.<random>.tmp``) and reports backups it left
  (``.NAME.<random>.old``), returning one note per file.
- ``atomic_write`` replaces one file: temp file in the same folder, flush, fsync, rename.
- ``atomic_set`` replaces several files (or one folder) as a set: every member is written and fsynced
  as a temp file first (a failure there changes nothing); then the previous members are renamed aside
  to ``.NAME.<random>.old``, the new ones renamed in, and the old ones removed. A failure while renaming
  puts the previous set back. A kill while renaming can leave part of the new set, never new members
  next to old ones; the next ``check_outputs`` on that destination reports the ``.old`` backups.

Torch-free, no dependencies.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, Sequence

from hif4fmt.errors import Hif4Error, OutputPathError, OutputWriteError

TEMP_MARK = "tmp"  # .NAME.<random>.tmp[.EXT]: a new file being written (incomplete until renamed)
BACKUP_MARK = "old"  # .NAME.<random>.old: the previous file, moved aside while a set is being replaced
_RANDOM = r"[A-Za-z0-9_]{6,16}"  # mkstemp's 8 characters, or secrets.token_hex(4)


def default_file_mode() -> int:
    """Return the mode a newly created file gets here: 0666 minus the process umask."""
    return 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


# --- leftovers of interrupted writes ------------------------------------------------------------------


def leftovers(target: str | os.PathLike) -> list[tuple[Path, str]]:
    """Return (path, mark) of the files an interrupted write to ``target`` left in its folder, sorted.

    ``mark`` is ``TEMP_MARK`` (an unfinished new file) or ``BACKUP_MARK`` (a previous file moved aside).
    """
    target = Path(target)
    folder = _folder(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{_RANDOM}\.({TEMP_MARK}|{BACKUP_MARK})(\.[A-Za-z0-9]+)?")
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    found = []
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            found.append((folder / name, match.group(1)))
    return found


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return path.lstat().st_size


def clear_leftovers(target: str | os.PathLike) -> list[str]:
    """Remove the unfinished temp files an interrupted write to ``target`` left; return one note per file.

    Backups of a previous set (``.old``) are not removed (they may be the only copy of the previous
    output): the note names them and says how to restore or drop them.
    """
    notes = []
    for path, mark in leftovers(target):
        try:
            size = _size(path)
            if mark == TEMP_MARK:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                notes.append(f"removed {path} ({size} bytes), an unfinished file left by an interrupted write")
            else:
                notes.append(f"{path} ({size} bytes) is the previous {Path(target).name} kept by an interrupted "
                             f"write; move it back to {target} or delete it")
        except OSError as exc:
            notes.append(f"{path}: left by an interrupted write and cannot be removed ({exc}); delete it by hand")
    return notes


# --- checks before the work ---------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    resolved, root = path.resolve(), folder.resolve()
    return resolved == root or root in resolved.parents


def _probe_writable(folder: Path) -> None:
    """Create and remove a temp file in ``folder`` (``os.access`` is wrong for root and some mounts)."""
    fd, name = tempfile.mkstemp(prefix=".hif4fmt-write-check.", dir=folder)
    os.close(fd)
    os.unlink(name)


def check_outputs(outputs: Mapping[str, str | os.PathLike], inputs: Mapping[str, str | os.PathLike] = {},
                  input_folders: Mapping[str, str | os.PathLike] = {}, force: bool = False,
                  folder_outputs: Sequence[str] = ()) -> list[str]:
    """Check every output before the work; return notes about leftovers of interrupted writes (cleared).

    ``outputs``/``inputs``/``input_folders`` map a label (the option, e.g. ``"--out"``) to a path. The one
    rule for every command: the output's folder must exist and be writable (it is not created); the
    output must not be a folder (unless its label is in ``folder_outputs``: then it may be a new or an
    existing folder, whose content the caller checks), a file must not exist unless ``force``, must not be (symlinks and hard links followed) any input or lie inside an input
    folder, and no two outputs may be the same file. Raises ``OutputPathError`` naming the option,
    the path and the fix.
    """
    paths = {label: Path(path) for label, path in outputs.items()}
    for label, path in paths.items():
        for in_label, source in inputs.items():
            if _same_file(path, Path(source)):
                raise OutputPathError(f"{label} {path} is the same file as {in_label} {source}; writing it would "
                                      f"destroy the input: choose another output path")
        for in_label, folder in input_folders.items():
            if _inside(path, Path(folder)):
                raise OutputPathError(f"{label} {path} lies inside {in_label} {folder}; writing there could replace "
                                      f"an input file: choose an output outside that folder")
    labels = list(paths)
    for index, label in enumerate(labels):
        for other in labels[index + 1:]:
            if _same_file(paths[label], paths[other]):
                raise OutputPathError(f"{label} {paths[label]} and {other} {paths[other]} are the same file; give "
                                      f"them different paths")
    notes: list[str] = []
    for label, path in paths.items():
        resolved = path.resolve()
        folder = resolved.parent
        if not folder.is_dir():
            raise OutputPathError(f"{label} {path}: folder {folder} does not exist; create it first")
        if label in folder_outputs:
            if resolved.exists() and not resolved.is_dir():
                raise OutputPathError(f"{label} {path} is a file, not a folder; choose a folder path")
        elif resolved.is_dir():
            raise OutputPathError(f"{label} {path} is a folder; give a file path")
        elif resolved.exists() and not force:
            raise OutputPathError(f"{label} {path} already exists; pass --force to replace it, or choose another "
                                  f"path")
        try:
            _probe_writable(folder)
        except OSError as exc:
            raise OutputPathError(f"{label} {path}: cannot write in {folder} ({exc.strerror or exc}); choose a "
                                  f"writable folder") from None
        notes += clear_leftovers(resolved)
    return notes


# --- one file -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it replaces ``path`` atomically, on error nothing changes.

    The temporary file is ``.<name>.<random>.tmp`` in the folder of ``path``; it is flushed and fsynced
    before ``os.replace`` and gets the usual permissions (0666 minus the umask), not mkstemp's 0600.
    Raises ``OSError`` if the folder does not exist or is not writable (callers wrap it in their
    typed error).
    """
    target = Path(path)
    folder = _folder(target)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".{TEMP_MARK}", dir=folder)
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


# --- a set of files -----------------------------------------------------------------------------------


def _new_temp(target: Path, keep_suffix: bool, folder_member: bool) -> Path:
    """Create and return an empty temp file (or folder) beside ``target``, named for ``leftovers``."""
    prefix, suffix = f".{target.name}.", f".{TEMP_MARK}" + (target.suffix if keep_suffix else "")
    if folder_member:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=_folder(target)))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=_folder(target))
    os.close(fd)
    return Path(name)


def _backup_name(target: Path) -> Path:
    while True:
        candidate = _folder(target) / f".{target.name}.{secrets.token_hex(4)}.{BACKUP_MARK}"
        if not os.path.lexists(candidate):
            return candidate


def _fsync_member(path: Path) -> None:
    """fsync a written temp file, or every file of a temp folder and the folder; give it the usual modes."""
    if path.is_dir():
        for item in sorted(path.rglob("*")):
            if item.is_file():
                with open(item, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.chmod(item, default_file_mode())
        os.chmod(path, 0o777 & ~_current_umask())
        _fsync_folder(path)
        return
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(path, default_file_mode())


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _names(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths) or "none"


def _replace_set(targets: list[Path], temps: list[Path], error: type[Hif4Error], what: str) -> None:
    """Rename the previous members aside, the new ones in, then drop the previous ones (see the module doc)."""
    backups: dict[int, Path] = {}
    placed: list[int] = []
    try:
        for index, target in enumerate(targets):
            if os.path.lexists(target):
                backups[index] = _backup_name(target)
                os.replace(target, backups[index])
        for index, (target, temp) in enumerate(zip(targets, temps)):
            os.replace(temp, target)
            placed.append(index)
    except OSError as exc:
        problems = []
        for index in placed:
            _remove(targets[index])
        for index, backup in backups.items():
            try:
                os.replace(backup, targets[index])
            except OSError as restore_exc:
                problems.append(f"{targets[index]} could not be restored from {backup} ({restore_exc})")
        for temp in temps:
            _remove(temp)
        restored = "; ".join(problems) or "the previous files are back in place"
        raise error(f"cannot write {what}: renaming into place failed ({exc}); not written: {_names(targets)}; "
                    f"{restored}") from None
    for backup in backups.values():
        _remove(backup)
    for folder in sorted({_folder(t) for t in targets}):
        _fsync_folder(folder)


@contextlib.contextmanager
def atomic_set(targets: Sequence[str | os.PathLike], error: type[Hif4Error] = OutputWriteError,
               what: str | None = None, keep_suffix: bool = False, folder: bool = False) -> Iterator[list[Path]]:
    """Yield one temp path per target (same folder); on clean exit the targets are replaced as a set.

    The caller writes each temp path (``folder=True``: each is an empty temp folder to fill). Temp names
    are ``.NAME.<random>.tmp`` (``keep_suffix``: ``.NAME.<random>.tmp.EXT``, for writers that pick the
    format from the suffix). ``what`` names the set in messages (default: the target paths). An exception while writing removes every temp and re-raises; an
    ``OSError`` or ``Hif4Error`` is re-raised as ``error`` saying that none of the targets was written
    and the previous files are unchanged. A failure while renaming restores the previous set and raises
    ``error`` naming what was and was not written. KeyboardInterrupt and other BaseExceptions are
    re-raised after the temps are removed.
    """
    paths = [Path(t) for t in targets]
    what = what or _names(paths)
    temps: list[Path] = []
    try:
        for target in paths:
            temps.append(_new_temp(target, keep_suffix, folder))
    except OSError as exc:
        for temp in temps:
            _remove(temp)
        raise error(f"cannot write {what}: cannot create a temporary file beside it ({exc}); nothing was "
                    f"written") from None
    try:
        yield list(temps)
        for temp in temps:
            _fsync_member(temp)
    except (OSError, Hif4Error) as exc:
        for temp in temps:
            _remove(temp)
        message = str(exc) if isinstance(exc, Hif4Error) else f"cannot write {what}: {exc}"
        raise error(f"{message}; not written: {_names(paths)} (any previous files there are unchanged)") from None
    except BaseException:
        for temp in temps:
            _remove(temp)
        raise
    _replace_set(paths, temps, error, what)


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
