"""Write generated frames as MP4 (H.264) and GIF files, atomically, and read them back.

Why this module exists: the CLI, the demo and the fidelity benchmark all turn (T, H, W, 3) frames into
files people can play. Every file of a set (an MP4 and its GIF; the three pairs of --compare) is
written to a temporary file in the target folder, confirmed complete (ffmpeg's exit status), fsynced,
and only then are all of them renamed over their targets (``hif4fmt.atomic.atomic_set``), so an
interrupted run or a full disk never leaves a half-written video or a new MP4 beside an old GIF. MP4 uses
libx264 with yuv420p (plays everywhere) and ffmpeg's bitexact flags (no encoder version or time stamps
in the file), so the same frames give byte-identical files with the same ffmpeg build.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np

from hif4fmt.atomic import atomic_set
from hif4fmt.errors import VideoWriteError

MP4_CODEC = "libx264"
MP4_PIXEL_FORMAT = "yuv420p"  # 4:2:0 chroma: what browsers and players accept; needs even H and W
MP4_CRF = "18"  # x264 constant rate factor: 18 is visually near-lossless
MP4_DETERMINISM_FLAGS = ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1"]
GIF_LOOP_FOREVER = 0
MS_PER_SECOND = 1000.0


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """Return uint8 (T, H, W, 3) frames from float frames in [0, 1] (rounded, clipped) or uint8 frames."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoWriteError(f"frames: expected shape (T, H, W, 3), found {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise VideoWriteError(f"frames: expected uint8 or float in [0, 1], found {frames.dtype}")
    return np.round(np.clip(frames.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_fps(path: Path, fps: float) -> None:
    if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise VideoWriteError(f"{path}: fps {fps!r}: expected a finite number > 0")


def ffmpeg_executable() -> str:
    """Return the path of the ffmpeg binary imageio-ffmpeg ships (or the one it is configured to use)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _mp4_command(path: str, height: int, width: int, fps: float) -> list[str]:
    """Return the ffmpeg command that reads raw RGB24 frames on stdin and writes the MP4 ``path``."""
    return [ffmpeg_executable(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
            "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-", "-an", "-vcodec", MP4_CODEC, "-pix_fmt",
            MP4_PIXEL_FORMAT, "-v", "error", "-crf", MP4_CRF, *MP4_DETERMINISM_FLAGS, path]


def _encode_mp4(path: Path, temp: str, frames: np.ndarray, fps: float) -> None:
    """Encode uint8 (T, H, W, 3) ``frames`` into ``temp``; raise ``VideoWriteError`` unless ffmpeg exits 0.

    The file is confirmed complete only by ffmpeg's exit status (a full disk makes ffmpeg fail while
    writing, and the file it leaves cannot be played), so nothing is renamed before that.
    """
    command = _mp4_command(temp, frames.shape[1], frames.shape[2], fps)
    try:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as exc:
        raise VideoWriteError(f"{path}: cannot start ffmpeg ({exc}); reinstall imageio-ffmpeg") from None
    pipe_error: OSError | None = None
    try:
        try:
            for frame in frames:
                process.stdin.write(np.ascontiguousarray(frame).tobytes())
        except OSError as exc:  # ffmpeg exited early (it says why on stderr)
            pipe_error = exc
        finally:
            with contextlib.suppress(OSError):
                process.stdin.close()
        stderr = process.stderr.read().decode("utf-8", "replace")
        code = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        process.stderr.close()
    if code != 0 or pipe_error is not None:
        detail = " ".join(stderr.split())[-300:] or (str(pipe_error) if pipe_error else "no message")
        raise VideoWriteError(f"{path}: ffmpeg failed (exit status {code}): {detail}")
    if os.path.getsize(temp) == 0:
        raise VideoWriteError(f"{path}: ffmpeg exited 0 but wrote an empty file")


def _encode_gif(path: Path, temp: str, frames: np.ndarray, fps: float) -> None:
    """Write uint8 (T, H, W, 3) ``frames`` into ``temp`` as a looping GIF (palette per frame)."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    try:
        images[0].save(temp, format="GIF", save_all=True, append_images=images[1:],
                       duration=round(MS_PER_SECOND / fps), loop=GIF_LOOP_FOREVER)
    except (OSError, ValueError) as exc:
        raise VideoWriteError(f"{path}: GIF encoder failed: {exc}") from None


MEDIA_WRITERS = {"MP4": _encode_mp4, "GIF": _encode_gif}  # kind -> encoder


def _prepared(path: Path, kind: str, frames: np.ndarray, fps: float) -> np.ndarray:
    """Return ``frames`` as uint8 after checking ``fps`` and (MP4) even sizes for ``path``."""
    _check_fps(path, fps)
    frames = frames_to_uint8(frames)
    if frames.shape[0] == 0:
        raise VideoWriteError(f"{path}: no frames to write")
    if kind == "MP4" and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise VideoWriteError(f"{path}: H.264 yuv420p needs even height and width, found {frames.shape[1:3]}")
    return frames


def _write_set(videos: Sequence[tuple[Path, str, np.ndarray]], fps: float) -> list[Path]:
    paths = [path for path, _, _ in videos]
    prepared = [_prepared(path, kind, frames, fps) for path, kind, frames in videos]
    what = ", ".join(f"{kind} {path}" for path, kind, _ in videos)
    with atomic_set(paths, VideoWriteError, what=what, keep_suffix=True) as temps:
        for (path, kind, _), temp, frames in zip(videos, temps, prepared):
            MEDIA_WRITERS[kind](path, str(temp), frames, fps)
    return paths


def write_video_set(videos: Sequence[tuple[str | os.PathLike, str, np.ndarray]], fps: float) -> list[Path]:
    """Write every (path, kind "MP4" or "GIF", frames) as one set; return the paths.

    Every file is encoded into a temporary file first; only when all of them are complete are they
    renamed into place (``hif4fmt.atomic.atomic_set``), so a failure (a full disk, ffmpeg exiting
    non-zero) never replaces an earlier video or leaves a new MP4 next to an old GIF. Raises
    ``VideoWriteError`` saying which files were not written.
    """
    unknown = [kind for _, kind, _ in videos if kind not in MEDIA_WRITERS]
    if unknown:
        raise VideoWriteError(f"video kind {unknown[0]!r}: expected one of {', '.join(MEDIA_WRITERS)}")
    return _write_set([(Path(path), kind, frames) for path, kind, frames in videos], fps)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float) -> Path:
    """Write ``frames`` (uint8 or [0, 1] float, (T, H, W, 3), H and W even) as an H.264 MP4; return the path."""
    return _write_set([(Path(path), "MP4", frames)], fps)[0]


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: float) -> Path:
    """Write ``frames`` as a looping GIF (256-colour palette per frame); return the path."""
    return _write_set([(Path(path), "GIF", frames)], fps)[0]


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Return the frames of the video at ``path`` as uint8 (T, H, W, 3)."""
    import imageio.v2 as imageio

    return np.stack([np.asarray(frame)[..., :3] for frame in imageio.mimread(path, memtest=False)])


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Return uint8 (T, H, 2W, 3): ``left`` frames next to ``right`` frames (same shapes required)."""
    left, right = frames_to_uint8(left), frames_to_uint8(right)
    if left.shape != right.shape:
        raise VideoWriteError(f"side by side: frame shapes differ, {left.shape} vs {right.shape}")
    return np.concatenate([left, right], axis=2)
