"""Atomic writes: a failure part-way leaves no new file and the previous file intact."""

from __future__ import annotations

import os
import stat

import pytest

from hif4fmt.atomic import atomic_write
from hif4fmt.errors import StateWriteError
from hif4fmt.state import encode_state, read_state, write_state
from state_support import tiny_state


def test_exception_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write(b"partial new")
            raise RuntimeError("simulated crash")
    assert target.read_bytes() == b"old content"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_exception_mid_write_without_old_file_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "new.bin") as handle:
            handle.write(b"x" * 1000)
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_successful_write_replaces_content_with_normal_permissions(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_write(target) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new"
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode & stat.S_IRGRP or os.umask(0o022) & stat.S_IRGRP  # not mkstemp's 0600 under a normal umask
    assert os.listdir(tmp_path) == ["out.bin"]


def test_write_state_failing_during_fsync_keeps_the_previous_state(tmp_path, monkeypatch):
    target = tmp_path / "s.hif4"
    write_state(target, tiny_state())
    before = target.read_bytes()

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StateWriteError, match="No space left.*nothing was written"):
        write_state(target, tiny_state(layers=3))
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["s.hif4"]
    assert read_state(target) == tiny_state()


def test_invalid_state_writes_no_file(tmp_path):
    import dataclasses

    state = tiny_state()
    bad = dataclasses.replace(state.layers[0], mask=state.layers[0].mask * 0)
    with pytest.raises(StateWriteError):
        write_state(tmp_path / "s.hif4", dataclasses.replace(state, layers=(bad,)))
    assert os.listdir(tmp_path) == []


def test_write_state_into_a_missing_folder_raises_state_write_error(tmp_path):
    with pytest.raises(StateWriteError, match="cannot write"):
        write_state(tmp_path / "no" / "such" / "s.hif4", tiny_state())


def test_written_file_equals_encode_state(tmp_path):
    write_state(tmp_path / "s.hif4", tiny_state())
    assert (tmp_path / "s.hif4").read_bytes() == encode_state(tiny_state())


def test_a_writer_killed_mid_write_leaves_the_previous_file_and_no_truncated_one(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    target = tmp_path / "s.hif4"
    write_state(target, tiny_state())
    before = target.read_bytes()
    script = (
        "import sys, time\n"
        "from hif4fmt.atomic import atomic_write\n"
        "with atomic_write(sys.argv[1]) as handle:\n"
        "    handle.write(b'\\x89HIF4' + bytes(1 << 20))\n"
        "    handle.flush()\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[1])
    try:
        assert process.stdout.readline().strip() == "writing"
        temp_files = [p for p in os.listdir(tmp_path) if p != "s.hif4"]
        assert len(temp_files) == 1 and os.path.getsize(tmp_path / temp_files[0]) > len(before)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert target.read_bytes() == before  # the target was never opened for writing
    assert read_state(target) == tiny_state()
    leftovers = [p for p in os.listdir(tmp_path) if p != "s.hif4"]
    assert all(p.startswith(".s.hif4.") and p.endswith(".tmp") for p in leftovers)  # hidden, never *.hif4
