"""Every command checks its outputs before the work and writes its files whole (issue 15, items 1-6).

build, calibrate, card and wan-runtime generate share one rule (``hif4fmt.atomic.check_outputs``):
an output that is an input or lies inside the base folder, two outputs that are one file, a missing or
unwritable folder and an existing file without --force are refused with exit 2 before any work. Sets
(state + report, card folder, MP4 + GIF) are replaced as a whole; an MP4 is renamed into place only
after ffmpeg exited 0.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from disk_support import small_tmpfs  # noqa: E402
from hif4fmt.calibration.protocol import CalibrationProtocol  # noqa: E402
from hif4fmt.calibration.runner import run_calibration  # noqa: E402
from hif4fmt.cli import main  # noqa: E402
from hif4fmt.errors import VideoWriteError  # noqa: E402
from wan_runtime.video import read_video, write_mp4, write_video_set  # noqa: E402

TINY = CalibrationProtocol(num_prompts=2, height=32, width=32, frames=5, steps=3, max_sequence_length=32)
CALIBRATE = ["--num-prompts", "2", "--height", "32", "--width", "32", "--frames", "5", "--steps", "3",
             "--max-sequence-length", "32", "--holdout-rows", "8", "--device", "cpu", "--no-progress"]
GENERATE = ["--height", "32", "--width", "48", "--frames", "5", "--steps", "2", "--max-sequence-length", "16",
            "--no-progress"]


def run(capsys, monkeypatch, *args: str, program=main, name="hif4fmt") -> tuple[int, str, str]:
    """Run a console script in this process; return (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    with pytest.raises(SystemExit) as exit_info:
        program()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def generate(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    from wan_runtime.cli import main as runtime_main

    return run(capsys, monkeypatch, "generate", *GENERATE, *args, program=runtime_main, name="wan-runtime")


def _no_work(monkeypatch, module: str, attribute: str) -> None:
    """Make the expensive step fail loudly: a refusal must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"{module}.{attribute} ran although the destination was refused")

    monkeypatch.setattr(f"{module}.{attribute}", refuse)


@pytest.fixture(scope="module")
def calibrated(tiny_wan_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs_stats")
    (folder / "prompts.json").write_text(json.dumps(["a cat walks on the beach", "a red car drives fast"]))
    run_calibration(tiny_wan_dir, folder / "prompts.json", folder / "tiny.safetensors", TINY, holdout_rows=8,
                    device="cpu", progress=False)
    return folder


@pytest.fixture
def work(calibrated, tmp_path):
    """A private copy of the statistics and prompts (a failing test must not damage the shared ones)."""
    for name in ("tiny.safetensors", "prompts.json"):
        shutil.copy(calibrated / name, tmp_path / name)
    return tmp_path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- item 2: an output that is an input, or inside the base folder, or two outputs one file --------------


@pytest.mark.parametrize("out, report", [("tiny.safetensors", None), ("s.hif4", "tiny.safetensors"),
                                         ("s.hif4", "s.hif4"), ("link.hif4", None)])
def test_build_refuses_outputs_that_are_its_inputs_before_any_work(capsys, monkeypatch, tiny_wan_dir, work, out,
                                                                   report):
    (work / "link.hif4").symlink_to(work / "tiny.safetensors")
    before = _sha(work / "tiny.safetensors")
    _no_work(monkeypatch, "hif4fmt.calibration.stats_file", "read_stats")
    args = ["build", "--base", str(tiny_wan_dir), "--stats", str(work / "tiny.safetensors"), "--out", str(work / out),
            "--force", "--no-progress"] + (["--report", str(work / report)] if report else [])
    code, _, err = run(capsys, monkeypatch, *args)
    assert code == 2 and err.startswith("error: --") and err.count("\n") == 1, err
    assert "same file" in err
    assert _sha(work / "tiny.safetensors") == before


def test_build_and_calibrate_refuse_an_output_inside_the_base_folder(capsys, monkeypatch, tiny_wan_dir, work):
    base = work / "base"
    shutil.copytree(tiny_wan_dir, base)
    weights = base / "transformer" / "diffusion_pytorch_model.safetensors"
    before = _sha(weights)
    _no_work(monkeypatch, "hif4fmt.calibration.stats_file", "read_stats")
    _no_work(monkeypatch, "hif4fmt.calibration.runner", "load_pipeline")
    code, _, err = run(capsys, monkeypatch, "build", "--base", str(base), "--stats", str(work / "tiny.safetensors"),
                       "--out", str(weights), "--force")
    assert code == 2 and "lies inside --base" in err
    code, _, err = run(capsys, monkeypatch, "calibrate", "--base", str(base), "--prompts", str(work / "prompts.json"),
                       "--out", str(weights), "--force", *CALIBRATE)
    assert code == 2 and "lies inside --base" in err
    code, _, err = run(capsys, monkeypatch, "calibrate", "--base", str(base), "--prompts", str(work / "prompts.json"),
                       "--out", str(work / "prompts.json"), "--force", *CALIBRATE)
    assert code == 2 and "same file as --prompts" in err
    assert _sha(weights) == before


def test_generate_refuses_an_mp4_and_gif_that_are_one_file_before_loading(capsys, monkeypatch, tiny_wan_dir,
                                                                        tmp_path):
    _no_work(monkeypatch, "wan_runtime.loader", "load_pipeline")
    code, _, err = generate(capsys, monkeypatch, "--base", str(tiny_wan_dir), "--out", str(tmp_path / "v.gif"))
    assert code == 2 and "are the same file" in err
    image = tmp_path / "first.gif"  # the first frame, where --out first.mp4 would put its GIF
    image.write_bytes(b"not read")
    code, _, err = generate(capsys, monkeypatch, "--base", str(tiny_wan_dir), "--image", str(image),
                            "--out", str(tmp_path / "first.mp4"), "--force")
    assert code == 2 and "same file as --image" in err, err
    assert image.read_bytes() == b"not read"


# --- items 4 and 5: bad destinations and existing outputs refused before the work -----------------------


def test_calibrate_refuses_a_folder_or_unwritable_out_before_loading_the_model(capsys, monkeypatch, tiny_wan_dir,
                                                                               work):
    _no_work(monkeypatch, "hif4fmt.calibration.runner", "load_pipeline")
    common = ["calibrate", "--base", str(tiny_wan_dir), "--prompts", str(work / "prompts.json"), *CALIBRATE]
    code, _, err = run(capsys, monkeypatch, *common, "--out", str(work))
    assert code == 2 and "is a folder" in err
    code, _, err = run(capsys, monkeypatch, *common, "--out", str(work / "tiny.safetensors"))
    assert code == 2 and "already exists; pass --force" in err
    with small_tmpfs(work / "ro", size="64k", read_only=True) as read_only:
        code, _, err = run(capsys, monkeypatch, *common, "--out", str(read_only / "s.safetensors"))
        assert code == 2 and "cannot write in" in err


def test_build_refuses_an_existing_state_without_force_and_replaces_it_with_force(capsys, monkeypatch, tiny_wan_dir,
                                                                                  work):
    out = work / "s.hif4"
    out.write_bytes(b"an earlier, expensive state")
    args = ["build", "--base", str(tiny_wan_dir), "--stats", str(work / "tiny.safetensors"), "--out", str(out),
            "--no-progress"]
    code, _, err = run(capsys, monkeypatch, *args)
    assert code == 2 and "already exists; pass --force" in err
    assert out.read_bytes() == b"an earlier, expensive state"
    code, _, err = run(capsys, monkeypatch, *args, "--force")
    assert code == 0, err
    assert out.read_bytes()[:5] == b"\x89HIF4"


def test_generate_refuses_a_missing_folder_or_an_existing_video_before_loading(capsys, monkeypatch, tiny_wan_dir,
                                                                             tmp_path):
    _no_work(monkeypatch, "wan_runtime.loader", "load_pipeline")
    code, _, err = generate(capsys, monkeypatch, "--base", str(tiny_wan_dir), "--out", str(tmp_path / "no" / "v.mp4"))
    assert code == 2 and "does not exist; create it first" in err
    (tmp_path / "v.gif").write_bytes(b"old gif")
    code, _, err = generate(capsys, monkeypatch, "--base", str(tiny_wan_dir), "--out", str(tmp_path / "v.mp4"))
    assert code == 2 and "v.gif already exists; pass --force" in err
    assert (tmp_path / "v.gif").read_bytes() == b"old gif"


# --- item 6: leftovers of a kill are cleared by the next write ------------------------------------------


def test_build_clears_a_temp_file_a_killed_build_left_and_says_so(capsys, monkeypatch, tiny_wan_dir, work):
    leftover = work / ".s.hif4.abcd1234.tmp"
    leftover.write_bytes(b"\0" * 4096)
    code, _, err = run(capsys, monkeypatch, "build", "--base", str(tiny_wan_dir), "--stats",
                       str(work / "tiny.safetensors"), "--out", str(work / "s.hif4"), "--no-progress")
    assert code == 0, err
    assert not leftover.exists()
    assert f"note: removed {leftover} (4096 bytes)" in err


# --- item 3: sets written whole -------------------------------------------------------------------------


def test_build_report_names_the_state_and_a_failing_report_replaces_neither(capsys, monkeypatch, tiny_wan_dir, work):
    out, report = work / "s.hif4", work / "report.json"
    args = ["build", "--base", str(tiny_wan_dir), "--stats", str(work / "tiny.safetensors"), "--out", str(out),
            "--report", str(report), "--no-progress", "--force"]
    assert run(capsys, monkeypatch, *args)[0] == 0
    written = json.loads(report.read_text())
    assert written["state"] == {"path": "s.hif4", "sha256": _sha(out), "bytes": out.stat().st_size}
    old_state, old_report = out.read_bytes(), report.read_bytes()

    def full_disk(report_dict):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hif4fmt.report.report_bytes", full_disk)
    code, _, err = run(capsys, monkeypatch, *args, "--alpha", "0.3")
    assert code == 2 and "No space left" in err and "not written" in err and "s.hif4" in err and "report.json" in err
    assert out.read_bytes() == old_state and report.read_bytes() == old_report  # no new state beside an old report


def test_card_force_replaces_the_folder_as_a_whole_and_the_readme_names_the_state(capsys, monkeypatch, tmp_path,
                                                                                 tiny_wan_state):
    import hif4fmt.atomic as atomic

    out = tmp_path / "hub"
    assert run(capsys, monkeypatch, "card", str(tiny_wan_state), "--out", str(out))[0] == 0
    assert f"sha256 of `tiny.hif4`: `{_sha(tiny_wan_state)}`" in (out / "README.md").read_text()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace, calls = atomic.os.replace, []

    def replace(source, target):  # fail the rename that would put the new folder in place
        calls.append(target)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", replace)
    code, _, err = run(capsys, monkeypatch, "card", str(tiny_wan_state), "--out", str(out), "--force",
                       "--base-model", "org/other")
    assert code == 2 and "not written" in err and "back in place" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]
    (out / "notes.txt").write_text("mine")
    monkeypatch.undo()
    code, _, err = run(capsys, monkeypatch, "card", str(tiny_wan_state), "--out", str(out), "--force")
    assert code == 2 and "not a model card" in err and (out / "notes.txt").exists()


def test_a_full_disk_while_writing_a_card_keeps_the_previous_card(capsys, monkeypatch, tmp_path, tiny_wan_state):
    state_bytes = tiny_wan_state.stat().st_size
    with small_tmpfs(tmp_path / "disk", size=f"{state_bytes + state_bytes // 2 + 8192}") as disk:  # one card fits
        out = disk / "hub"
        assert run(capsys, monkeypatch, "card", str(tiny_wan_state), "--out", str(out))[0] == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        code, _, err = run(capsys, monkeypatch, "card", str(tiny_wan_state), "--out", str(out), "--force")
        assert code == 2 and "No space left" in err and "not written" in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert sorted(p.name for p in disk.iterdir()) == ["hub"]


# --- item 1: an MP4 is renamed only after ffmpeg exited 0 ----------------------------------------------


def _frames(count: int = 4, height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def test_an_mp4_ffmpeg_fails_on_never_replaces_the_previous_video(tmp_path, monkeypatch):
    target = write_mp4(tmp_path / "v.mp4", _frames(), fps=8)
    before = target.read_bytes()
    fake = tmp_path / "ffmpeg-full-disk"
    fake.write_text("#!/bin/sh\ncat > /dev/null\nfor last; do :; done\nprintf 'truncated' > \"$last\"\n"
                    "echo 'Error writing trailer: No space left on device' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr("wan_runtime.video.ffmpeg_executable", lambda: str(fake))
    with pytest.raises(VideoWriteError, match=r"v\.mp4: ffmpeg failed \(exit status 1\).*No space left.*not written"):
        write_video_set([(tmp_path / "v.mp4", "MP4", _frames(seed=1)), (tmp_path / "v.gif", "GIF", _frames(seed=1))],
                        fps=8)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffmpeg-full-disk", "v.mp4"]


def test_a_full_disk_during_an_mp4_keeps_the_previous_mp4_and_gif(tmp_path):
    with small_tmpfs(tmp_path / "disk", size="160k") as disk:
        small = _frames(count=2, height=16, width=16)
        write_video_set([(disk / "v.mp4", "MP4", small), (disk / "v.gif", "GIF", small)], fps=8)
        before = {p.name: p.read_bytes() for p in disk.iterdir()}
        noisy = _frames(count=40, height=128, width=128, seed=2)  # noise does not compress: far over 160 KiB
        with pytest.raises(VideoWriteError, match=r"v\.mp4: ffmpeg failed .*not written"):
            write_mp4(disk / "v.mp4", noisy, fps=8)
        assert {p.name: p.read_bytes() for p in disk.iterdir()} == before
        with pytest.raises(VideoWriteError, match="No space left on device.*not written: .*v.mp4, .*v.gif"):
            write_video_set([(disk / "v.mp4", "MP4", noisy), (disk / "v.gif", "GIF", noisy)], fps=8)
        assert {p.name: p.read_bytes() for p in disk.iterdir()} == before
        assert read_video(disk / "v.mp4").shape == small.shape
