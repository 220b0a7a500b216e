"""Video files (MP4/GIF, atomic, deterministic) and the per-frame PSNR/SSIM definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hif4fmt.errors import VideoWriteError
from wan_runtime.frame_metrics import compare_videos, psnr_per_frame, ssim_frame, ssim_per_frame
from wan_runtime.placeholder import placeholder_image
from wan_runtime.video import frames_to_uint8, read_video, side_by_side, write_gif, write_mp4


def _video(seed: int = 0, frames: int = 4, height: int = 32, width: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = np.linspace(0, 200, width)[None, None, :, None] + np.zeros((frames, height, 1, 3))
    return np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)


def test_mp4_round_trips_frame_count_and_size_and_is_byte_deterministic(tmp_path):
    video = _video()
    first = write_mp4(tmp_path / "a.mp4", video, fps=8).read_bytes()
    second = write_mp4(tmp_path / "b.mp4", video, fps=8).read_bytes()
    assert first == second
    decoded = read_video(tmp_path / "a.mp4")
    assert decoded.shape == video.shape
    assert psnr_per_frame(video, decoded)[0] > 30.0  # CRF 18: close to the input


def test_gif_round_trips_frames(tmp_path):
    video = _video(frames=3)
    decoded = read_video(write_gif(tmp_path / "a.gif", video, fps=4))
    assert decoded.shape == video.shape


def test_odd_sizes_are_refused_and_leave_no_file(tmp_path):
    with pytest.raises(VideoWriteError, match="even height and width"):
        write_mp4(tmp_path / "odd.mp4", _video(height=31), fps=8)
    assert list(tmp_path.iterdir()) == []


def test_float_frames_are_rounded_and_clipped_to_uint8():
    frames = np.array([-0.5, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 5, 1).repeat(3, axis=-1)
    assert frames_to_uint8(frames)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(VideoWriteError, match=r"expected shape \(T, H, W, 3\)"):
        frames_to_uint8(np.zeros((2, 2, 2)))


def test_side_by_side_puts_left_then_right():
    left, right = _video(1), _video(2)
    both = side_by_side(left, right)
    assert both.shape == (4, 32, 96, 3)
    assert np.array_equal(both[:, :, :48], left) and np.array_equal(both[:, :, 48:], right)


def test_psnr_is_none_for_identical_frames_and_matches_mse_definition():
    a = _video()
    b = a.copy()
    b[1, 0, 0, 0] ^= 0x10  # one channel of one pixel off by 16 levels
    mse = 16.0**2 / (32 * 48 * 3)
    assert psnr_per_frame(a, b) == [None, pytest.approx(10 * math.log10(255.0**2 / mse)), None, None]


def test_ssim_of_identical_frames_is_one_and_symmetric():
    a, b = _video(1), _video(2)
    assert ssim_frame(a[0], a[0]) == pytest.approx(1.0)
    assert ssim_frame(a[0], b[0]) == pytest.approx(ssim_frame(b[0], a[0]))
    assert ssim_frame(a[0], b[0]) < 1.0


def test_ssim_of_flat_frames_reduces_to_the_luminance_term():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = np.full((16, 16, 3), 140, np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 140 + c1) / (100**2 + 140**2 + c1)  # no variance: contrast term is 1
    assert ssim_frame(a, b) == pytest.approx(expected, rel=1e-12)


def test_ssim_uses_a_smaller_window_on_tiny_frames():
    a, b = _video(1, height=6, width=6), _video(2, height=6, width=6)
    assert -1.0 <= ssim_per_frame(a, b)[0] <= 1.0


def test_compare_summary_skips_identical_frames_in_psnr_means():
    a = _video()
    b = a.copy()
    b[2] = 255 - b[2]
    summary = compare_videos(a, b)
    assert summary["psnr_db"][0] is None and summary["mean_psnr_db"] == summary["min_psnr_db"]
    assert summary["ssim"][0] == pytest.approx(1.0) and summary["min_ssim"] < 0.5


def test_placeholder_image_is_blank_and_sized():
    image = placeholder_image(48, 32)
    assert image.size == (48, 32) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.zeros((32, 48, 3), np.uint8))
    assert np.asarray(placeholder_image(2, 2, fill=200)).tolist() == [[[200] * 3] * 2] * 2


def test_ssim_matches_scikit_image_golden_value():
    # Golden value from skimage.metrics.structural_similarity(luma_a, luma_b, gaussian_weights=True,
    # sigma=1.5, use_sample_covariance=False, data_range=255) on the same luma (scikit-image 0.26.0).
    rng = np.random.default_rng(0)
    a = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    assert ssim_frame(a, b) == pytest.approx(0.9668525654525958, abs=1e-12)


def test_written_videos_get_the_usual_file_permissions_not_mkstemps_0600(tmp_path):
    import os
    import stat

    from hif4fmt.atomic import default_file_mode
    from wan_runtime.video import write_gif, write_mp4

    frames = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    for path, write in ((tmp_path / "v.mp4", write_mp4), (tmp_path / "v.gif", write_gif)):
        write(path, frames, 8.0)
        assert stat.S_IMODE(os.stat(path).st_mode) == default_file_mode()


def test_unwritable_destination_raises_video_write_error_and_leaves_no_temp_file(tmp_path):
    from hif4fmt.errors import VideoWriteError
    from wan_runtime.video import write_gif, write_mp4

    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    frames = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    for write, kind in ((write_mp4, "MP4"), (write_gif, "GIF")):
        with pytest.raises(VideoWriteError, match=f"cannot write {kind}"):
            write(blocker / f"v.{kind.lower()}", frames, 8.0)
    for write in (write_mp4, write_gif):
        with pytest.raises(VideoWriteError, match="fps 0.0"):
            write(tmp_path / "bad.out", frames, 0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]
