"""hif4fmt.atomic: one destination rule (check_outputs), sets written whole (atomic_set), leftovers of kills."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from disk_support import small_tmpfs
from hif4fmt.atomic import atomic_set, check_outputs, leftovers
from hif4fmt.errors import OutputPathError, OutputWriteError

ROOT = Path(__file__).resolve().parents[1]


def test_an_output_that_is_an_input_is_refused_even_with_force(tmp_path):
    source = tmp_path / "stats.safetensors"
    source.write_bytes(b"input")
    with pytest.raises(OutputPathError, match="--out .* is the same file as --stats"):
        check_outputs({"--out": source}, inputs={"--stats": source}, force=True)
    link = tmp_path / "link.hif4"
    link.symlink_to(source)
    with pytest.raises(OutputPathError, match="same file as --stats"):  # symlinks followed
        check_outputs({"--out": link}, inputs={"--stats": source}, force=True)
    hard = tmp_path / "hard.hif4"
    os.link(source, hard)
    with pytest.raises(OutputPathError, match="same file as --stats"):  # hard links too
        check_outputs({"--out": hard}, inputs={"--stats": source}, force=True)
    assert source.read_bytes() == b"input"


def test_an_output_inside_an_input_folder_or_two_equal_outputs_are_refused(tmp_path):
    base = tmp_path / "base"
    (base / "transformer").mkdir(parents=True)
    with pytest.raises(OutputPathError, match="lies inside --base"):
        check_outputs({"--out": base / "transformer" / "weights.safetensors"}, input_folders={"--base": base})
    outside = tmp_path / "s.hif4"
    with pytest.raises(OutputPathError, match="--out .* and --report .* are the same file"):
        check_outputs({"--out": outside, "--report": tmp_path / "." / "s.hif4"})


def test_missing_folder_folder_target_existing_file_and_unwritable_folder_are_refused(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist; create it first"):
        check_outputs({"--out": tmp_path / "absent" / "s.hif4"})
    with pytest.raises(OutputPathError, match="is a folder; give a file path"):
        check_outputs({"--out": tmp_path})
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OutputPathError, match="does not exist"):
        check_outputs({"--out": blocker / "s.hif4"})
    with pytest.raises(OutputPathError, match="already exists; pass --force"):
        check_outputs({"--out": blocker})
    assert check_outputs({"--out": blocker}, force=True) == []
    with small_tmpfs(tmp_path / "ro", size="64k", read_only=True) as read_only:
        with pytest.raises(OutputPathError, match="cannot write in .*Read-only"):
            check_outputs({"--out": read_only / "s.hif4"})


def test_leftover_temp_files_are_removed_and_backups_reported(tmp_path):
    target = tmp_path / "stats.safetensors"
    temp = tmp_path / ".stats.safetensors.k2j4h5g6.tmp"
    temp.write_bytes(b"x" * 1000)
    backup = tmp_path / ".stats.safetensors.0a1b2c3d.old"
    backup.write_bytes(b"previous")
    unrelated = tmp_path / ".other.safetensors.k2j4h5g6.tmp"
    unrelated.write_bytes(b"")
    notes = check_outputs({"--out": target})
    assert not temp.exists() and backup.exists() and unrelated.exists()
    assert any(str(temp) in note and "1000 bytes" in note and "removed" in note for note in notes)
    assert any(str(backup) in note and "move it back" in note for note in notes)


def test_a_set_whose_second_member_fails_replaces_nothing(tmp_path):
    first, second = tmp_path / "s.hif4", tmp_path / "report.json"
    first.write_bytes(b"old state")
    second.write_bytes(b"old report")
    with pytest.raises(OutputWriteError, match=r"No space left.*not written: .*s\.hif4, .*report\.json"):
        with atomic_set([first, second]) as temps:
            temps[0].write_bytes(b"new state")
            raise OSError(28, "No space left on device")
    assert first.read_bytes() == b"old state" and second.read_bytes() == b"old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "s.hif4"]


def test_a_rename_failing_between_members_puts_the_previous_set_back(tmp_path, monkeypatch):
    import hif4fmt.atomic as atomic

    first, second = tmp_path / "v.mp4", tmp_path / "v.gif"
    first.write_bytes(b"old mp4")
    second.write_bytes(b"old gif")
    real_replace = os.replace
    calls = []

    def replace(source, target):  # the 4th rename (new GIF into place) fails
        calls.append(target)
        if len(calls) == 4:
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OutputWriteError, match="renaming into place failed.*previous files are back in place"):
        with atomic_set([first, second]) as temps:
            temps[0].write_bytes(b"new mp4")
            temps[1].write_bytes(b"new gif")
    monkeypatch.undo()
    assert first.read_bytes() == b"old mp4" and second.read_bytes() == b"old gif"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif", "v.mp4"]


KILL_SCRIPT = """
import os, sys
from hif4fmt import atomic
real, calls = os.replace, []
def replace(source, target):
    calls.append(target)
    if len(calls) == int(sys.argv[3]):
        os._exit(9)  # killed between two renames of the set
    real(source, target)
atomic.os.replace = replace
with atomic.atomic_set([sys.argv[1], sys.argv[2]]) as temps:
    temps[0].write_bytes(b"new A")
    temps[1].write_bytes(b"new B")
"""


@pytest.mark.parametrize("killed_at", [1, 2, 3, 4])
def test_a_kill_between_renames_never_leaves_a_new_file_beside_an_old_one(tmp_path, killed_at):
    a, b = tmp_path / "s.hif4", tmp_path / "report.json"
    a.write_bytes(b"old A")
    b.write_bytes(b"old B")
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(a), str(b), str(killed_at)], cwd=ROOT)
    assert done.returncode == 9
    visible = {p.read_bytes() for p in (a, b) if p.exists()}
    assert visible <= {b"new A", b"new B"} or visible <= {b"old A", b"old B"}, visible  # never old beside new
    found = leftovers(a) + leftovers(b)
    assert found  # the interrupted write is visible...
    notes = check_outputs({"--out": a, "--report": b}, force=True)
    assert len(notes) == len(found)  # ...and reported by the next write to the same destination
    assert all(mark == "old" for _, mark in leftovers(a) + leftovers(b))  # unfinished temps removed


def test_a_full_disk_while_writing_a_set_leaves_the_previous_files(tmp_path):
    with small_tmpfs(tmp_path / "disk", size="64k") as disk:
        first, second = disk / "s.hif4", disk / "report.json"
        first.write_bytes(b"old state")
        second.write_bytes(b"old report")
        with pytest.raises(OutputWriteError, match="No space left on device.*not written"):
            with atomic_set([first, second]) as temps:
                temps[0].write_bytes(b"n" * 16_000)
                temps[1].write_bytes(b"r" * 200_000)
        assert first.read_bytes() == b"old state" and second.read_bytes() == b"old report"
        assert sorted(p.name for p in disk.iterdir()) == ["report.json", "s.hif4"]
