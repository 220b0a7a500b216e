"""The per-channel |x| sketch: percentiles within the documented bound of torch.quantile, exact merges."""

from __future__ import annotations

import math

import pytest
import torch

from hif4fmt.calibration.hooks import HoldoutSample, row_ids, splitmix64
from hif4fmt.calibration.sketch import ChannelSketch, SketchGrid, estimate_percentile
from hif4fmt.errors import CalibrationError

PERCENTILES = [0.0, 0.1, 1.0, 25.0, 50.0, 90.0, 99.0, 99.5, 99.9, 99.99, 100.0]


def _activations(seed: int, rows: int = 3000, channels: int = 24, dtype=torch.bfloat16,
                 grid: SketchGrid = SketchGrid()) -> torch.Tensor:
    """Heavy-tailed rows (|x| up to ~250 x scale) with per-channel scales from below the grid's underflow
    edge to just under its overflow edge, exact zeros in one channel and one constant channel."""
    g = torch.Generator().manual_seed(seed)
    heavy = torch.randn(rows, channels, generator=g) / torch.rand(rows, channels, generator=g).clamp_min(0.02)
    low, high = grid.exponent_min - 3, grid.exponent_max - 9  # 2**high * 250 < 2**exponent_max
    scales = torch.logspace(low, high, channels, base=2.0, dtype=torch.float64).float()
    x = heavy * scales
    x[: rows // 10, 1] = 0.0
    x[:, 2] = -3.25
    return x.to(dtype)


def _check_bound(grid: SketchGrid, x: torch.Tensor, sketch: ChannelSketch) -> None:
    reference_data = x.to(torch.float64).abs()
    for percentile in PERCENTILES:
        estimate = sketch.percentile(percentile)
        reference = torch.quantile(reference_data, percentile / 100.0, dim=0)  # 'linear' rank rule
        bound = grid.relative_error_bound * reference + grid.absolute_error_bound
        error = (estimate.values - reference).abs()
        assert bool(estimate.bounded.all())
        worst = int(torch.argmax(error - bound))
        assert bool((error <= bound * (1 + 1e-12)).all()), (
            f"p{percentile} channel {worst}: estimate {estimate.values[worst]} vs exact {reference[worst]}, "
            f"bound {bound[worst]}")


@pytest.mark.parametrize("grid", [SketchGrid(), SketchGrid(2, -20, 20), SketchGrid(5, -12, 8)])
def test_percentile_matches_torch_quantile_within_documented_bound(grid):
    x = _activations(seed=grid.mantissa_bits, grid=grid)
    sketch = ChannelSketch(grid, x.shape[1])
    sketch.update(x)
    _check_bound(grid, x, sketch)


def test_percentile_bound_holds_for_float32_activations_and_few_tokens():
    grid = SketchGrid()
    for rows in (1, 2, 3, 17):
        x = _activations(seed=rows, rows=rows, dtype=torch.float32)
        sketch = ChannelSketch(grid, x.shape[1])
        sketch.update(x)
        _check_bound(grid, x, sketch)


def test_relative_error_bound_is_attained_closely_by_bin_edges():
    # the bound is tight: a value at a bin's lower edge is off by ~(hi - lo) / (hi + lo)
    grid = SketchGrid()
    x = torch.tensor([[1.0], [1.0], [1.0]])
    sketch = ChannelSketch(grid, 1)
    sketch.update(torch.cat([x, torch.tensor([[0.5]]), torch.tensor([[2.0]])]))
    estimate = float(sketch.percentile(50.0).values[0])  # the median 1.0 is a lower bin edge
    assert abs(estimate - 1.0) / 1.0 == pytest.approx(1 / 17, rel=1e-12)
    assert abs(estimate - 1.0) <= grid.relative_error_bound * 1.0 * (1 + 1e-12)


def test_percentile_0_and_100_are_exact_min_and_max():
    x = _activations(seed=5)
    sketch = ChannelSketch(SketchGrid(), x.shape[1])
    sketch.update(x)
    exact = x.float().abs()
    assert torch.equal(sketch.percentile(100.0).values, exact.amax(0).double())
    assert torch.equal(sketch.percentile(0.0).values, exact.amin(0).double())
    assert torch.equal(sketch.absmax, exact.amax(0))
    assert torch.equal(sketch.absmin, exact.amin(0))


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_merged_sketches_equal_one_sketch_exactly(parts):
    grid = SketchGrid()
    x = _activations(seed=11, rows=2000)
    whole = ChannelSketch(grid, x.shape[1])
    whole.update(x)
    g = torch.Generator().manual_seed(parts)
    cuts = sorted(torch.randperm(x.shape[0] - 1, generator=g)[: parts - 1].add(1).tolist())
    pieces = torch.tensor_split(x[torch.randperm(x.shape[0], generator=g)], cuts)
    merged = ChannelSketch(grid, x.shape[1])
    for piece in reversed(pieces):  # any order
        partial = ChannelSketch(grid, x.shape[1])
        partial.update(piece)
        merged.merge_(partial)
    assert torch.equal(merged.counts, whole.counts)
    assert torch.equal(merged.absmax, whole.absmax) and torch.equal(merged.absmin, whole.absmin)
    assert merged.tokens == whole.tokens == 2000
    for percentile in (50.0, 99.9):
        assert torch.equal(merged.percentile(percentile).values, whole.percentile(percentile).values)


def test_bin_indices_put_every_value_between_its_bin_edges():
    grid = SketchGrid(3, -4, 4)
    lower, upper = grid.bin_edges()
    values = torch.tensor([0.0, 1e-30, 2.0 ** -4 * 0.999, 2.0 ** -4, 0.3, 1.0, 1.0624, 1.125, 15.99, 16.0, 1e30,
                           math.inf, math.nan], dtype=torch.float32)
    bits = values.view(torch.int32) & 0x7FFFFFFF
    index = grid.bin_indices(bits)
    assert index[0] == 0 and index[1] == 0 and index[2] == 0  # zero and tiny values: underflow
    assert index[3] == 1  # 2**emin opens the first log-spaced bin
    assert index[-4] == grid.bins - 1 and index[-3] == grid.bins - 1  # >= 2**emax: overflow
    assert index[-2] == grid.bins - 1 and index[-1] == grid.bins - 1  # inf and NaN: overflow
    for value, bin_index in zip(values[:-1].double(), index[:-1]):
        assert lower[bin_index] <= value < upper[bin_index] or (bin_index == grid.bins - 1 and value >= lower[-1])


def test_grid_sizes_and_bounds_are_as_documented():
    grid = SketchGrid()
    assert grid.bins == 258 and grid.bytes_per_channel == 2064
    assert grid.relative_error_bound == 1 / 17
    assert grid.absolute_error_bound == 2.0 ** -17
    a14b_channels = 40 * 2 * (9 * 5120 + 13824)  # 800 quantized linears' input channels
    assert a14b_channels == 4_792_320
    assert a14b_channels * grid.bytes_per_channel == 9_891_348_480  # ~9.9 GB, spec 3.4


def test_non_finite_activations_are_counted_and_make_max_infinite():
    sketch = ChannelSketch(SketchGrid(), 3)
    sketch.update(torch.tensor([[1.0, math.nan, 2.0], [-math.inf, 1.0, 3.0], [0.5, 0.5, 0.5]]))
    assert sketch.nonfinite.tolist() == [1, 1, 0]
    assert sketch.absmax.tolist() == [math.inf, math.inf, 3.0]
    assert sketch.counts.sum(1).tolist() == [3, 3, 3]


def test_percentile_in_overflow_bin_is_flagged_unbounded():
    grid = SketchGrid(3, -4, 4)
    x = torch.tensor([[1.0], [100.0], [200.0], [300.0]])
    sketch = ChannelSketch(grid, 1)
    sketch.update(x)
    assert not bool(sketch.percentile(50.0).bounded[0])  # ranks 1 and 2 lie past 2**4 = 16
    assert bool(sketch.percentile(100.0).bounded[0])  # the exact max


@pytest.mark.parametrize("grid", [SketchGrid(11, -16, 16), SketchGrid(3, -127, 16), SketchGrid(3, 4, 4),
                                  SketchGrid(3, 0, 129), SketchGrid(3.0, -16, 16)])
def test_invalid_grid_raises_calibration_error(grid):
    with pytest.raises(CalibrationError):
        grid.validate()


def test_estimate_percentile_refuses_inconsistent_histograms():
    grid = SketchGrid()
    counts = torch.zeros((2, grid.bins), dtype=torch.int64)
    counts[0, 5], counts[1, 5] = 3, 4
    with pytest.raises(CalibrationError, match="expected one positive total"):
        estimate_percentile(grid, counts, torch.zeros(2), torch.ones(2), 50.0)
    with pytest.raises(CalibrationError, match="percentile"):
        estimate_percentile(grid, counts[:1], torch.zeros(1), torch.ones(1), 100.5)


def _splitmix64_reference(value: int) -> int:
    mask = (1 << 64) - 1
    z = (value + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_splitmix64_matches_python_reference():
    ids = [0, 1, 2, 12345, (1 << 62) + 17, (1 << 63) - 1, 17592186044418]
    got = splitmix64(torch.tensor(ids, dtype=torch.int64)).tolist()
    expected = [_splitmix64_reference(i) for i in ids]
    assert [g & ((1 << 64) - 1) for g in got] == expected
    assert _splitmix64_reference(0) == 0xE220A8397B1DCDAF  # published first output of splitmix64(seed 0)


def test_holdout_sample_does_not_depend_on_how_records_are_split():
    g = torch.Generator().manual_seed(3)
    calls = [(record, call, torch.randn(37, 8, generator=g).to(torch.bfloat16)) for record in range(4)
             for call in range(3)]
    whole = HoldoutSample(10, 8)
    for record, call, x in calls:
        whole.offer(x, record, call)
    even, odd = HoldoutSample(10, 8), HoldoutSample(10, 8)
    for record, call, x in calls:
        (even if record % 2 == 0 else odd).offer(x, record, call)
    merged = HoldoutSample(10, 8).merge_(odd.rows, odd.ids).merge_(even.rows, even.ids)
    assert torch.equal(merged.ids, whole.ids)
    assert torch.equal(merged.rows, whole.rows) and merged.rows.dtype == torch.bfloat16
    assert bool((whole.keys[1:] > whole.keys[:-1]).all())


def test_row_ids_past_their_bit_fields_raise_calibration_error():
    assert row_ids(1, 2, 3).tolist() == [(1 << 44) | (2 << 24) | t for t in range(3)]
    with pytest.raises(CalibrationError, match="record"):
        row_ids(1 << 19, 0, 1)
    with pytest.raises(CalibrationError, match="token row"):
        row_ids(0, 0, (1 << 24) + 1)
