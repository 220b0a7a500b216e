"""The tail-aware smoothing mask of one linear: ``m_i = w_i**alpha / (a_i + eps)**(1 - alpha)``, with guards.

Why this module exists: the mask formula and its edge cases are the heart of the method and must be
defined once, in plain float64 numpy, apart from any I/O, so ``build``, the fidelity report and the
tests compute bit-identical masks. Rules (spec/stats-v1.md section 6.3):

  * ``w_i = max_o |W[o, i]|`` (float64 of the stored weights) and ``a_i`` the chosen statistic of
    |x| for input channel i (the p-th percentile, or the exact max);
  * computed in float64, rounded once to float32 (round to nearest even);
  * ``w_i = 0``: the channel is dead (W[:, i] = 0 contributes nothing), ``m_i = 1``;
  * ``a_i = 0``: allowed, ``eps`` keeps the denominator positive;
  * non-finite ``a_i`` (the channel saw inf/NaN activations) or ``w_i``: ``BuildError`` naming the layer
    and channel; a float32 mask that is 0 or not finite (extreme alpha/eps): ``BuildError`` too.
"""

from __future__ import annotations

import numpy as np

from hif4fmt.errors import BuildError

DEAD_CHANNEL_MASK = 1.0  # m_i for w_i = 0: W[:, i] is all zero, any mask gives the same output


def weight_channel_absmax(weight: np.ndarray) -> np.ndarray:
    """Return float64 (in_features,) ``w_i = max_o |W[o, i]|`` of a weight (out_features, in_features)."""
    if weight.ndim != 2:
        raise BuildError(f"weight of shape {weight.shape}: expected (out_features, in_features)")
    return np.abs(weight.astype(np.float64, copy=False)).max(axis=0)


def compute_mask(weight_absmax: np.ndarray, activation_stat: np.ndarray, alpha: float, eps: float,
                 where: str = "layer") -> np.ndarray:
    """Return float32 (C,) ``m = w**alpha / (a + eps)**(1 - alpha)`` (float64 math), guards in the docstring.

    ``weight_absmax`` and ``activation_stat`` are (C,) per input channel; ``where`` names the layer in
    errors. Deterministic: same inputs, same bits.
    """
    w = np.asarray(weight_absmax, dtype=np.float64)
    a = np.asarray(activation_stat, dtype=np.float64)
    if w.shape != a.shape or w.ndim != 1:
        raise BuildError(f"{where}: weight statistics {w.shape} and activation statistics {a.shape} must be "
                         f"the same (in_features,) shape")
    bad = np.flatnonzero(~np.isfinite(a) | (a < 0))
    if bad.size:
        channel = int(bad[0])
        raise BuildError(f"{where}: input channel {channel} has activation statistic {float(a[channel])!r} "
                         f"({bad.size} channels are not finite or negative): calibration saw inf/NaN "
                         f"activations; fix the model or the calibration run, then recalibrate")
    bad = np.flatnonzero(~np.isfinite(w))
    if bad.size:
        channel = int(bad[0])
        raise BuildError(f"{where}: input channel {channel} has max |W| {float(w[channel])!r}: the base weights hold "
                         f"non-finite values; the checkpoint is damaged")
    with np.errstate(over="ignore", divide="ignore", invalid="ignore", under="ignore"):
        mask64 = np.power(w, alpha) / np.power(a + eps, 1.0 - alpha)
        mask64 = np.where(w == 0.0, DEAD_CHANNEL_MASK, mask64)
        mask = mask64.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(mask) | (mask <= 0))
    if bad.size:
        channel = int(bad[0])
        raise BuildError(f"{where}: mask of input channel {channel} is {float(mask[channel])!r} in float32 "
                         f"(w = {float(w[channel])!r}, a = {float(a[channel])!r}, alpha = {alpha}, eps = {eps}); choose a larger "
                         f"--eps or an --alpha closer to 0.5")
    return mask
