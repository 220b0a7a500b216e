"""A mergeable per-channel histogram of |x| whose percentiles are within a documented bound of the exact ones.

Why this module exists: the paper takes, per input channel, the p-th percentile of |x| over every token
of every calibration record. For Wan2.2-A14B that is ~10^8 tokens x 4.8 M channels: the samples cannot
be kept. This sketch keeps per channel a fixed histogram over the float32 bit pattern of |x| (spec 3):

  * bin of |x| = its exponent and top ``mantissa_bits`` fraction bits, i.e. ``bits(|x|) >> (23 - k)``
    shifted to start at 2**exponent_min; one underflow bin [0, 2**exponent_min) and one overflow bin
    [2**exponent_max, inf] (NaN included). Bin edges are the same for every channel, layer and process,
    so merging is exact integer addition of int64 counts: any split of the records across processes
    or runs gives bit-identical counts (spec 3.3);
  * the exact per-channel max and min of |x| and the count of non-finite values are kept beside it;
  * a percentile is read with the rank rule of ``torch.quantile`` (``linear``): h = q (N - 1),
    j = floor(h), a = x[j] + (h - j)(x[j+1] - x[j]). Each order statistic x[j] is estimated by the
    harmonic mean of its bin's edges clamped to [min, max] (exact for j = 0 and j = N - 1), so
    |a_hat - a| <= a / (2**(k+1) + 1) + 2**(exponent_min - 1) whenever x[j+1] < 2**exponent_max
    (spec 3.2; k = 3: 5.88 % + 7.6e-6). ``PercentileEstimate.bounded`` is False for channels where
    that does not hold (order statistics in the overflow bin, estimated by the exact max).

Memory: channels x bins x 8 bytes; the default grid (k = 3, exponents [-16, 16)) has 258 bins, 2,064
bytes per channel, 9.9 GB for the 4,792,320 input channels of Wan2.2-A14B's 800 quantized linears
(half with int32 counts, promoted to int64 before they could wrap). An update runs one compiled pass
when it can (``sketch_kernel``: C on CPU, Triton on CUDA); the torch path buckets with a bit mask, a
shift, a clamp and one ``bincount`` per chunk of rows with the offset trick (index = channel * bins +
bin). Both give the same statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from hif4fmt.calibration.constants import (
    COUNT_DTYPE,
    DEFAULT_EXPONENT_MAX,
    DEFAULT_EXPONENT_MIN,
    DEFAULT_MANTISSA_BITS,
    FLOAT32_ABS_MASK,
    FLOAT32_EXPONENT_BIAS,
    FLOAT32_INF_BITS,
    FLOAT32_MANTISSA_BITS,
    FLOAT32_MAX_EXPONENT,
    FLOAT32_MIN_NORMAL_EXPONENT,
    MAX_BINCOUNT_ELEMENTS,
    MAX_MANTISSA_BITS,
    OVERFLOW_BINS,
    RANK_RULE,
    SKETCH_KIND,
    UNDERFLOW_BINS,
)
from hif4fmt.calibration import sketch_kernel, sketch_triton
from hif4fmt.errors import CalibrationError, Hif4Error

COUNT_BYTES = 8  # int64 per bin (the file's counts, and the default in memory)
INT32_COUNT_LIMIT = (1 << 31) - 1  # int32 in-memory counts are promoted to int64 before tokens pass this
SKETCH_COUNT_DTYPES = {"int64": torch.int64, "int32": torch.int32}  # --sketch-counts: counts in memory


@dataclass(frozen=True)
class SketchGrid:
    """The bin edges shared by every channel: ``2**mantissa_bits`` bins per octave over [2**emin, 2**emax).

    ``validate`` raises ``CalibrationError`` (or the error class given) for parameters outside
    mantissa_bits in [0, 10], -126 <= exponent_min < exponent_max <= 128.
    """

    mantissa_bits: int = DEFAULT_MANTISSA_BITS
    exponent_min: int = DEFAULT_EXPONENT_MIN
    exponent_max: int = DEFAULT_EXPONENT_MAX

    def validate(self, error: type[Hif4Error] = CalibrationError, where: str = "sketch") -> "SketchGrid":
        for name, value in (("mantissa_bits", self.mantissa_bits), ("exponent_min", self.exponent_min),
                            ("exponent_max", self.exponent_max)):
            if type(value) is not int:
                raise error(f"{where}: {name} {value!r} must be an integer")
        if not 0 <= self.mantissa_bits <= MAX_MANTISSA_BITS:
            raise error(f"{where}: mantissa_bits {self.mantissa_bits} must be in [0, {MAX_MANTISSA_BITS}] "
                        f"(bins per octave = 2**mantissa_bits); the default is {DEFAULT_MANTISSA_BITS}")
        if not FLOAT32_MIN_NORMAL_EXPONENT <= self.exponent_min < self.exponent_max <= FLOAT32_MAX_EXPONENT:
            raise error(f"{where}: exponent range [{self.exponent_min}, {self.exponent_max}) must satisfy "
                        f"{FLOAT32_MIN_NORMAL_EXPONENT} <= min < max <= {FLOAT32_MAX_EXPONENT}; the default "
                        f"is [{DEFAULT_EXPONENT_MIN}, {DEFAULT_EXPONENT_MAX})")
        return self

    @property
    def bins_per_octave(self) -> int:
        return 1 << self.mantissa_bits

    @property
    def normal_bins(self) -> int:
        """Return the number of log-spaced bins between 2**exponent_min and 2**exponent_max."""
        return (self.exponent_max - self.exponent_min) * self.bins_per_octave

    @property
    def bins(self) -> int:
        """Return bins per channel: underflow + log-spaced + overflow."""
        return UNDERFLOW_BINS + self.normal_bins + OVERFLOW_BINS

    @property
    def shift(self) -> int:
        """Return the right shift that keeps exponent + top ``mantissa_bits`` of float32 bits."""
        return FLOAT32_MANTISSA_BITS - self.mantissa_bits

    @property
    def first_code(self) -> int:
        """Return the shifted bit code of 2**exponent_min: the first log-spaced bin (bin index 1)."""
        return (FLOAT32_EXPONENT_BIAS + self.exponent_min) << self.mantissa_bits

    @property
    def relative_error_bound(self) -> float:
        """Return the bound on |a_hat - a| / a for order statistics inside [2**emin, 2**emax) (spec 3.2)."""
        return 1.0 / ((1 << (self.mantissa_bits + 1)) + 1)

    @property
    def absolute_error_bound(self) -> float:
        """Return the extra absolute error for order statistics in the underflow bin: 2**(emin - 1)."""
        return math.ldexp(1.0, self.exponent_min - 1)

    @property
    def bytes_per_channel(self) -> int:
        return self.bins * COUNT_BYTES

    def to_dict(self) -> dict[str, Any]:
        """Return header["sketch"] (spec 5.2.2): parameters, derived sizes and the error bound."""
        return {
            "kind": SKETCH_KIND,
            "mantissa_bits": self.mantissa_bits,
            "exponent_min": self.exponent_min,
            "exponent_max": self.exponent_max,
            "bins": self.bins,
            "count_dtype": COUNT_DTYPE,
            "rank_rule": RANK_RULE,
            "relative_error_bound": self.relative_error_bound,
            "absolute_error_bound": self.absolute_error_bound,
        }

    def bin_indices(self, abs_bits: torch.Tensor) -> torch.Tensor:
        """Return the int64 bin index of each element of ``abs_bits`` (int32 bits of |x|, sign clear)."""
        codes = (abs_bits >> self.shift).to(torch.int64)
        return (codes - (self.first_code - UNDERFLOW_BINS)).clamp_(0, self.bins - 1)

    def bin_edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return float64 (lower, upper) edges of every bin; underflow [0, 2**emin), overflow [2**emax, inf)."""
        index = torch.arange(self.normal_bins, dtype=torch.int64)
        exponent = (index >> self.mantissa_bits) + self.exponent_min
        mantissa = (index & (self.bins_per_octave - 1)).to(torch.float64)
        octave = torch.ldexp(torch.ones(self.normal_bins, dtype=torch.float64), exponent.to(torch.float64))
        lower = octave * (1 + mantissa / self.bins_per_octave)
        upper = octave * (1 + (mantissa + 1) / self.bins_per_octave)
        low_edge = torch.tensor([0.0], dtype=torch.float64)
        floor = torch.tensor([math.ldexp(1.0, self.exponent_min)], dtype=torch.float64)
        ceiling = torch.tensor([math.ldexp(1.0, self.exponent_max)], dtype=torch.float64)
        inf = torch.tensor([math.inf], dtype=torch.float64)
        return torch.cat([low_edge, lower, ceiling]), torch.cat([floor, upper, inf])

    def representatives(self) -> torch.Tensor:
        """Return float64 (bins,) value standing for each bin (spec 3.2).

        Log-spaced bins: the harmonic mean 2 lo hi / (lo + hi), which minimises the worst relative
        error. Underflow: 2**(emin - 1). Overflow: +inf (callers clamp it to the exact max).
        """
        lower, upper = self.bin_edges()
        values = 2 * lower * upper / (lower + upper)
        values[0] = math.ldexp(1.0, self.exponent_min - 1)
        values[-1] = math.inf
        return values


@dataclass(frozen=True)
class PercentileEstimate:
    """Per-channel percentile estimates (float64, (C,)) and where the documented bound holds (bool, (C,))."""

    values: torch.Tensor
    bounded: torch.Tensor


def _order_statistic(grid: SketchGrid, cumulative: torch.Tensor, rank: torch.Tensor, tokens: int,
                     absmin: torch.Tensor, absmax: torch.Tensor, representatives: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (estimate float64 (C,), bounded bool (C,)) of the ``rank``-th smallest |x| per channel."""
    bins = torch.searchsorted(cumulative, rank.unsqueeze(1), right=True).squeeze(1)  # first bin with cum > rank
    bins = bins.clamp_(0, grid.bins - 1)
    estimate = torch.minimum(torch.maximum(representatives[bins], absmin), absmax)
    exact_low, exact_high = rank == 0, rank == tokens - 1
    estimate = torch.where(exact_low, absmin, torch.where(exact_high, absmax, estimate))
    bounded = (bins != grid.bins - 1) | exact_low | exact_high
    return estimate, bounded


def estimate_percentile(grid: SketchGrid, counts: torch.Tensor, absmin: torch.Tensor, absmax: torch.Tensor,
                        percentile: float) -> PercentileEstimate:
    """Return the ``percentile``-th percentile (0..100) of |x| per channel from a full-grid histogram.

    ``counts`` int64 (C, bins) with the same total N > 0 in every row; ``absmin``/``absmax`` (C,) exact.
    Rank rule: torch.quantile 'linear' (spec 3.2). Percentile 0 and 100 return the exact min and max.
    """
    if counts.ndim != 2 or counts.shape[1] != grid.bins:
        raise CalibrationError(f"counts of shape {tuple(counts.shape)}: expected (channels, {grid.bins})")
    if not 0.0 <= percentile <= 100.0:
        raise CalibrationError(f"percentile {percentile}: expected a number in [0, 100]")
    counts = counts.to(torch.int64).cpu()
    cumulative = counts.cumsum(1)
    totals = cumulative[:, -1]
    tokens = int(totals[0]) if totals.numel() else 0
    if tokens <= 0 or bool((totals != tokens).any()):
        raise CalibrationError(f"histogram rows hold {totals.unique().tolist()[:4]} samples; expected one "
                               f"positive total shared by every channel")
    absmin = absmin.to(torch.float64).cpu()
    absmax = absmax.to(torch.float64).cpu()
    position = (percentile / 100.0) * (tokens - 1)  # spec 3.2: h = q (N - 1), float64
    low_rank = min(int(math.floor(position)), tokens - 1)
    high_rank = min(low_rank + 1, tokens - 1)
    fraction = position - low_rank
    representatives = grid.representatives()
    channels = counts.shape[0]
    low, low_ok = _order_statistic(grid, cumulative, torch.full((channels,), low_rank, dtype=torch.int64),
                                   tokens, absmin, absmax, representatives)
    high, high_ok = _order_statistic(grid, cumulative, torch.full((channels,), high_rank, dtype=torch.int64),
                                     tokens, absmin, absmax, representatives)
    values = low if fraction == 0.0 else low + fraction * (high - low)
    return PercentileEstimate(values, low_ok & (high_ok | (fraction == 0.0)))


class ChannelSketch:
    """The running statistics of |x| for one linear's inputs: histogram, exact max/min, non-finite count.

    counts (C, bins) int64 (or int32 with ``count_dtype=torch.int32``: half the memory, promoted to
    int64 in place before any count could pass 2**31 - 1, so it never wraps; spec 3.4), absmax/absmin
    float32 (C,), nonfinite int64 (C,), tokens (rows seen, int). Lives on ``device`` (the activations may
    be elsewhere; partial counts are moved).
    """

    def __init__(self, grid: SketchGrid, channels: int, device: torch.device | str = "cpu",
                 count_dtype: torch.dtype = torch.int64):
        if count_dtype not in SKETCH_COUNT_DTYPES.values():
            raise CalibrationError(f"sketch count dtype {count_dtype}: expected torch.int64 or torch.int32")
        self.grid = grid
        self.channels = channels
        self.device = torch.device(device)
        self.counts = torch.zeros((channels, grid.bins), dtype=count_dtype, device=self.device)
        self.absmax = torch.zeros(channels, dtype=torch.float32, device=self.device)
        self.absmin = torch.full((channels,), math.inf, dtype=torch.float32, device=self.device)
        self.nonfinite = torch.zeros(channels, dtype=torch.int64, device=self.device)
        self.tokens = 0
        self._offsets: torch.Tensor | None = None

    def _make_room(self, tokens: int) -> None:
        """Promote int32 counts to int64 (exact) when ``tokens`` more rows could make a bin pass 2**31 - 1.

        Every channel's bins sum to ``self.tokens``, so no bin can exceed it: the guard is one integer
        comparison on the host, no device work or synchronisation.
        """
        if self.counts.dtype == torch.int32 and self.tokens + tokens > INT32_COUNT_LIMIT:
            self.counts = self.counts.to(torch.int64)

    def update(self, x: torch.Tensor) -> None:
        """Add every row of ``x`` (..., C), any float dtype, to the statistics.

        Runs the C kernel (CPU activations and sketch) or the Triton kernel (CUDA activations) when
        they are there (``hif4fmt.calibration.sketch_kernel``), else the torch path: same counts. No
        host-device synchronisation unless the sketch lives on another device than ``x``.
        """
        if x.shape[-1] != self.channels:
            raise CalibrationError(f"activation with {x.shape[-1]} channels offered to a sketch of "
                                   f"{self.channels} channels")
        rows = x.detach().reshape(-1, self.channels)
        if rows.shape[0] == 0:
            return
        self._make_room(int(rows.shape[0]))
        if rows.dtype not in sketch_kernel.DTYPE_CODES:  # float64 etc.: the torch path's own conversion
            rows = rows.to(torch.float32)
        if rows.device.type == "cpu" and self.device.type == "cpu" and sketch_kernel.cpu_enabled():
            sketch_kernel.update_cpu(rows.contiguous(), self.counts, self.absmax, self.absmin, self.nonfinite,
                                     self.grid.shift, self.grid.first_code)
        elif (rows.device.type == "cuda" or sketch_triton.interpreted()) and sketch_triton.available() \
                and rows.shape[0] <= sketch_triton.MAX_ROWS:
            self._update_triton(rows.contiguous())
        else:
            self._update_torch(rows)
            return
        self.tokens += int(rows.shape[0])

    def _update_triton(self, rows: torch.Tensor) -> None:
        """Add ``rows`` with the Triton kernel, into the sketch itself or, on another device, via a partial one."""
        if rows.device == self.device:
            sketch_triton.update_gpu(rows, self.counts, self.absmax, self.absmin, self.nonfinite,
                                     self.grid.shift, self.grid.first_code)
            return
        partial = ChannelSketch(self.grid, self.channels, rows.device, torch.int32)  # rows < 2**31: exact
        sketch_triton.update_gpu(rows, partial.counts, partial.absmax, partial.absmin, partial.nonfinite,
                                 self.grid.shift, self.grid.first_code)
        self.counts += partial.counts.to(self.device)  # copy to the sketch's device: waits for the kernel
        torch.maximum(self.absmax, partial.absmax.to(self.device), out=self.absmax)
        torch.minimum(self.absmin, partial.absmin.to(self.device), out=self.absmin)
        self.nonfinite += partial.nonfinite.to(self.device)

    def _update_torch(self, rows: torch.Tensor) -> None:
        """Add ``rows`` (R, C) with torch operations: a bit mask, a shift, a clamp, one bincount per chunk."""
        if self._offsets is None or self._offsets.device != rows.device:
            self._offsets = torch.arange(self.channels, device=rows.device, dtype=torch.int64) * self.grid.bins
        chunk_rows = max(1, MAX_BINCOUNT_ELEMENTS // self.channels)
        for chunk in rows.split(chunk_rows):
            bits = chunk.to(torch.float32).view(torch.int32) & FLOAT32_ABS_MASK  # spec 3.1: |x| bits
            top = bits.amax(0).clamp_max_(FLOAT32_INF_BITS).view(torch.float32)  # NaN counts as inf
            bottom = bits.amin(0).clamp_max_(FLOAT32_INF_BITS).view(torch.float32)
            bad = (bits >= FLOAT32_INF_BITS).sum(0, dtype=torch.int64)
            index = self.grid.bin_indices(bits).add_(self._offsets)
            partial = torch.bincount(index.view(-1), minlength=self.channels * self.grid.bins)
            self.counts += partial.view(self.channels, self.grid.bins).to(self.device)
            torch.maximum(self.absmax, top.to(self.device), out=self.absmax)
            torch.minimum(self.absmin, bottom.to(self.device), out=self.absmin)
            self.nonfinite += bad.to(self.device)
            self.tokens += int(chunk.shape[0])

    def merge_(self, other: "ChannelSketch") -> "ChannelSketch":
        """Add ``other`` (same grid and channels) into this sketch in place and return self (exact)."""
        if other.grid != self.grid or other.channels != self.channels:
            raise CalibrationError(f"cannot merge sketches of grids {other.grid} / {self.grid} and "
                                   f"{other.channels} / {self.channels} channels")
        self._make_room(other.tokens)
        if other.counts.dtype == torch.int64:
            self.counts = self.counts.to(torch.int64)  # int64 + int32 stays int64; never narrowed
        self.counts += other.counts.to(self.device)
        torch.maximum(self.absmax, other.absmax.to(self.device), out=self.absmax)
        torch.minimum(self.absmin, other.absmin.to(self.device), out=self.absmin)
        self.nonfinite += other.nonfinite.to(self.device)
        self.tokens += other.tokens
        return self

    def percentile(self, percentile: float) -> PercentileEstimate:
        """Return the per-channel percentile estimate (see ``estimate_percentile``)."""
        return estimate_percentile(self.grid, self.counts, self.absmin, self.absmax, percentile)
