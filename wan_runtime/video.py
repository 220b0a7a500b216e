"""Write generated frames as MP4 (H.264) and GIF files, atomically, and read them back.

Why this module exists: the CLI, the demo and the fidelity benchmark all turn (T, H, W, 3) frames into
files people can play. Writing goes to a temporary file in the target folder that is flushed, fsynced
and renamed over the target, so an interrupted run never leaves a half-written video. MP4 uses
libx264 with yuv420p (plays everywhere) and ffmpeg's bitexact flags (no encoder version or time stamps
in the file), so the same frames give byte-identical files with the same ffmpeg build.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from hif4fmt.atomic import default_file_mode
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


@contextlib.contextmanager
def _atomic_media_file(path: Path, kind: str, errors: tuple[type[Exception], ...]) -> Iterator[str]:
    """Yield a temporary path beside ``path`` for a library to write; fsync and rename it on success.

    The temporary file keeps ``path``'s suffix (the writers pick the format from it) and gets the usual
    file mode (mkstemp makes 0600). ``errors`` raised inside become ``VideoWriteError`` naming ``path``
    and ``kind``; the temporary file never survives a failure.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
        os.close(handle)
    except OSError as exc:
        raise VideoWriteError(f"{path}: cannot write {kind}: {exc}") from None
    try:
        os.chmod(temp, default_file_mode())
        yield temp
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except errors as exc:
        raise VideoWriteError(f"{path}: cannot write {kind}: {exc}") from None
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def _check_fps(path: Path, fps: float) -> None:
    if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise VideoWriteError(f"{path}: fps {fps!r}: expected a finite number > 0")


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float) -> Path:
    """Write ``frames`` (uint8 or [0, 1] float, (T, H, W, 3), H and W even) as an H.264 MP4; return the path."""
    import imageio.v2 as imageio

    path = Path(path)
    _check_fps(path, fps)
    frames = frames_to_uint8(frames)
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise VideoWriteError(f"{path}: H.264 yuv420p needs even height and width, found {frames.shape[1:3]}")
    with _atomic_media_file(path, "MP4", (OSError, RuntimeError)) as temp:
        with imageio.get_writer(temp, format="FFMPEG", mode="I", fps=fps, codec=MP4_CODEC,
                                pixelformat=MP4_PIXEL_FORMAT, macro_block_size=1,
                                ffmpeg_params=["-crf", MP4_CRF, *MP4_DETERMINISM_FLAGS],
                                ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(frame)
    return path


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: float) -> Path:
    """Write ``frames`` as a looping GIF (256-colour palette per frame); return the path."""
    from PIL import Image

    path = Path(path)
    _check_fps(path, fps)
    images = [Image.fromarray(frame) for frame in frames_to_uint8(frames)]
    with _atomic_media_file(path, "GIF", (OSError, ValueError)) as temp:
        images[0].save(temp, format="GIF", save_all=True, append_images=images[1:],
                       duration=round(MS_PER_SECOND / fps), loop=GIF_LOOP_FOREVER)
    return path


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
