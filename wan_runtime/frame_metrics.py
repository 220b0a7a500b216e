"""Per-frame PSNR and SSIM between two videos, in numpy (no scikit-image, no torch).

Why this module exists: ``wan-runtime generate --compare`` and benchmarks/runtime_fidelity.py report how
far the W4A4 video is from the BF16 one, frame by frame, with one definition of each metric:

- PSNR (dB) over all pixels and the three RGB channels of 8-bit frames, peak 255:
  10 * log10(255^2 / MSE). Identical frames have no finite PSNR; they are reported as ``None``.
- SSIM (Wang, Bovik, Sheikh, Simoncelli 2004) on the BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B of
  the 8-bit frames, with an 11 x 11 Gaussian window of sigma 1.5 (separable, 'valid' positions only,
  no padding), K1 = 0.01, K2 = 0.03, L = 255; the frame's SSIM is the mean of the SSIM map. Frames
  smaller than 11 pixels use the largest odd window that fits. Computed in float64.
"""

from __future__ import annotations

import math

import numpy as np

PIXEL_PEAK = 255.0  # 8-bit frames
SSIM_WINDOW = 11  # Gaussian window side (pixels), as in Wang et al. 2004
SSIM_SIGMA = 1.5  # Gaussian window standard deviation (pixels)
SSIM_K1 = 0.01  # C1 = (K1 * L)^2 stabilises the luminance term
SSIM_K2 = 0.03  # C2 = (K2 * L)^2 stabilises the contrast-structure term
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 R, G, B weights of Y


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected two (T, H, W, 3) videos of one shape, found {a.shape} and {b.shape}")
    return a, b


def psnr_per_frame(a: np.ndarray, b: np.ndarray) -> list[float | None]:
    """Return the PSNR in dB of each frame of uint8 (T, H, W, 3) ``a`` vs ``b`` (None where identical)."""
    a, b = _check_pair(a, b)
    values: list[float | None] = []
    for frame_a, frame_b in zip(a.astype(np.float64), b.astype(np.float64)):
        mse = float(np.mean((frame_a - frame_b) ** 2))
        values.append(None if mse == 0.0 else 10.0 * math.log10(PIXEL_PEAK**2 / mse))
    return values


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    """Return the normalised 1-D Gaussian kernel (size,) float64."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    kernel = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def _filter_valid(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Return ``image`` (H, W) filtered by the separable ``kernel`` at the 'valid' positions (H-k+1, W-k+1)."""
    size = kernel.shape[0]
    rows = np.lib.stride_tricks.sliding_window_view(image, size, axis=0) @ kernel  # (H-k+1, W)
    return np.lib.stride_tricks.sliding_window_view(rows, size, axis=1) @ kernel


def ssim_frame(a: np.ndarray, b: np.ndarray) -> float:
    """Return the mean SSIM of two uint8 (H, W, 3) frames (luma, 11x11 Gaussian sigma 1.5), in [-1, 1]."""
    luma_a = np.asarray(a, dtype=np.float64) @ LUMA_WEIGHTS
    luma_b = np.asarray(b, dtype=np.float64) @ LUMA_WEIGHTS
    size = min(SSIM_WINDOW, *luma_a.shape)
    size -= 1 - size % 2  # largest odd window that fits
    kernel = _gaussian_window(size, SSIM_SIGMA)
    c1 = (SSIM_K1 * PIXEL_PEAK) ** 2
    c2 = (SSIM_K2 * PIXEL_PEAK) ** 2
    mu_a = _filter_valid(luma_a, kernel)
    mu_b = _filter_valid(luma_b, kernel)
    var_a = _filter_valid(luma_a * luma_a, kernel) - mu_a**2
    var_b = _filter_valid(luma_b * luma_b, kernel) - mu_b**2
    cov = _filter_valid(luma_a * luma_b, kernel) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim_per_frame(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Return the SSIM of each frame of uint8 (T, H, W, 3) ``a`` vs ``b``."""
    a, b = _check_pair(a, b)
    return [ssim_frame(frame_a, frame_b) for frame_a, frame_b in zip(a, b)]


def compare_videos(reference: np.ndarray, test: np.ndarray) -> dict:
    """Return {"psnr_db": [...], "ssim": [...], "mean_psnr_db", "min_psnr_db", "mean_ssim", "min_ssim"}.

    Means and minima skip identical frames for PSNR (None when every frame is identical).
    """
    psnr = psnr_per_frame(reference, test)
    ssim = ssim_per_frame(reference, test)
    finite = [value for value in psnr if value is not None]
    return {
        "psnr_db": psnr,
        "ssim": ssim,
        "mean_psnr_db": float(np.mean(finite)) if finite else None,
        "min_psnr_db": float(min(finite)) if finite else None,
        "mean_ssim": float(np.mean(ssim)),
        "min_ssim": float(min(ssim)),
    }
