"""The compiled sketch updates give the torch path's counts, max, min and non-finite counts on every input.

The C kernel (hif4fmt/calibration/_sketch_kernel.c) is what ``ChannelSketch.update`` runs for CPU
activations when it is built; the Triton kernel (hif4fmt/calibration/sketch_triton.py) what it runs
for CUDA ones, checked here under ``TRITON_INTERPRET=1`` on CPU tensors against the C kernel. Inputs:
every BF16 and every FP16 bit pattern (NaN included), random float32 bit patterns, every bin edge of
several grids with its float32 neighbours, and blocks of inf, NaN, signed zeros and subnormals, in the
dtypes the hooks see (bfloat16, float16, float32). CI sets HIF4FMT_REQUIRE_KERNEL=1 (tools/test.sh), so a
sketch kernel that failed to build fails here instead of being skipped.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from hif4fmt.calibration import sketch_kernel, sketch_triton  # noqa: E402
from hif4fmt.calibration.sketch import INT32_COUNT_LIMIT, ChannelSketch, SketchGrid  # noqa: E402
from hif4fmt.errors import CalibrationError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("HIF4FMT_REQUIRE_KERNEL") == "1"
needs_kernel = pytest.mark.skipif(not sketch_kernel.cpu_enabled() and not REQUIRED,
                                  reason=sketch_kernel.status())
GRIDS = [SketchGrid(), SketchGrid(0, -126, 128), SketchGrid(10, -20, 20), SketchGrid(1, -3, 2)]
FIELDS = ("counts", "absmax", "absmin", "nonfinite")


def every_pattern(dtype: torch.dtype) -> torch.Tensor:
    """Every 16-bit pattern of ``dtype`` (bfloat16 or float16) once, NaNs and infinities included, (65536,)."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


def edge_values(grid: SketchGrid) -> torch.Tensor:
    """Every bin edge of ``grid`` that float32 holds, each with its float32 neighbours below and above, both signs."""
    exponents = torch.arange(grid.exponent_min, grid.exponent_max + 1, dtype=torch.float64)
    steps = torch.arange(grid.bins_per_octave, dtype=torch.float64) / grid.bins_per_octave
    edges = (torch.ldexp(torch.ones_like(exponents), exponents)[:, None] * (1 + steps[None, :])).flatten()
    edges = edges[edges <= torch.finfo(torch.float32).max].float()  # 2**128 itself is inf (added below)
    bits = edges.view(torch.int32)
    around = torch.cat([bits - 1, bits, bits + 1]).view(torch.float32)
    return torch.cat([around, -around])


def special_values() -> torch.Tensor:
    """inf, -inf, NaNs of both signs and payloads, signed zeros, float32 subnormals and range ends (float32)."""
    patterns = [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF,
                0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x00400000, 0x00800000,
                0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0x477FE000, 0x33800000, 0x38800000, 0x387FC000]
    signed = [p - (1 << 32) if p >= 1 << 31 else p for p in patterns]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


def blocks_of(values: torch.Tensor, channels: int) -> torch.Tensor:
    """``values`` laid out as (rows, channels), zero padded at the end."""
    rows = -(-values.numel() // channels)
    block = torch.zeros(rows * channels, dtype=values.dtype)
    block[: values.numel()] = values.flatten()
    return block.view(rows, channels)


def torch_sketch(grid: SketchGrid, *blocks: torch.Tensor, count_dtype=torch.int64) -> ChannelSketch:
    """Return the sketch of ``blocks`` built by the torch path only."""
    sketch = ChannelSketch(grid, blocks[0].shape[-1], count_dtype=count_dtype)
    for block in blocks:
        sketch._update_torch(block.reshape(-1, block.shape[-1]))
    return sketch


def kernel_sketch(grid: SketchGrid, *blocks: torch.Tensor, count_dtype=torch.int64) -> ChannelSketch:
    """Return the sketch of ``blocks`` built by ``update``, failing if it fell back to the torch path."""
    sketch = ChannelSketch(grid, blocks[0].shape[-1], count_dtype=count_dtype)

    def refuse(rows):
        raise AssertionError(f"update fell back to the torch path: {sketch_kernel.status()}")

    sketch._update_torch = refuse
    for block in blocks:
        sketch.update(block)
    return sketch


def assert_same(got: ChannelSketch, want: ChannelSketch) -> None:
    assert got.tokens == want.tokens
    for field in FIELDS:
        a, b = getattr(got, field), getattr(want, field)
        if field == "counts":
            a, b = a.to(torch.int64), b.to(torch.int64)
        assert torch.equal(a, b), f"{field} differs at {(a != b).nonzero()[:5].tolist()}"


def test_sketch_kernel_is_built_and_used_when_ci_requires_it():
    if not REQUIRED:
        pytest.skip("HIF4FMT_REQUIRE_KERNEL is not 1 (tools/test.sh sets it)")
    assert sketch_kernel.cpu_enabled(), sketch_kernel.status()


@needs_kernel
@pytest.mark.parametrize("grid", GRIDS[:3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [64, 1000, 1])
def test_every_16_bit_pattern_gives_the_torch_path_counts(grid, dtype, channels):
    values = every_pattern(dtype)
    values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(channels))]
    block = blocks_of(values, channels)
    assert_same(kernel_sketch(grid, block), torch_sketch(grid, block))


@needs_kernel
@pytest.mark.parametrize("grid", GRIDS)
def test_every_bf16_value_widened_to_float32_and_random_float32_patterns_match(grid):
    widened = every_pattern(torch.bfloat16).float()
    g = torch.Generator().manual_seed(1)
    random_bits = torch.randint(-(1 << 31), 1 << 31, (1 << 18,), dtype=torch.int64, generator=g)
    random_values = random_bits.to(torch.int32).view(torch.float32)
    block = blocks_of(torch.cat([widened, random_values]), 200)
    assert_same(kernel_sketch(grid, block), torch_sketch(grid, block))


@needs_kernel
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bin_edges_and_special_values_match_in_every_hook_dtype(grid, dtype):
    values = torch.cat([edge_values(grid), special_values()]).to(dtype)
    for channels in (7, 64, 130):
        block = blocks_of(values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(channels))],
                          channels)
        assert_same(kernel_sketch(grid, block), torch_sketch(grid, block))


@needs_kernel
def test_bin_edges_fall_in_the_bins_the_spec_gives():
    grid = SketchGrid()
    lower, _ = grid.bin_edges()
    edges = lower[1:].float()  # the lower edge of every log-spaced bin and of the overflow bin (2**emax)
    sketch = kernel_sketch(grid, blocks_of(edges, 1))
    assert sketch.counts[0].tolist() == [0] + [1] * (grid.bins - 1)  # bin b holds its own lower edge
    below = (edges.view(torch.int32) - 1).view(torch.float32)  # one float32 step below each edge
    sketch = kernel_sketch(grid, blocks_of(below, 1))
    assert sketch.counts[0].tolist() == [1] * (grid.bins - 1) + [0]  # ... and the bin before it


@needs_kernel
def test_all_inf_nan_and_zero_channels_give_exact_max_min_and_nonfinite_counts():
    block = torch.tensor([[math.inf, math.nan, 0.0, -0.0], [-math.inf, -math.nan, -0.0, 0.0]]).to(torch.bfloat16)
    sketch = kernel_sketch(SketchGrid(), block)
    assert sketch.absmax.tolist() == [math.inf, math.inf, 0.0, 0.0]
    assert sketch.absmin.tolist() == [math.inf, math.inf, 0.0, 0.0]
    assert sketch.nonfinite.tolist() == [2, 2, 0, 0]
    assert sketch.counts[:, -1].tolist() == [2, 2, 0, 0] and sketch.counts[:, 0].tolist() == [0, 0, 2, 2]


@needs_kernel
def test_kernel_accumulates_over_calls_and_does_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(3)
    blocks = [(torch.randn(rows, 300, generator=g) * 100).to(torch.bfloat16) for rows in (1, 517, 2048)]
    want = torch_sketch(SketchGrid(), *blocks)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3, 8):
            torch.set_num_threads(threads)
            assert_same(kernel_sketch(SketchGrid(), *blocks), want)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_kernel_takes_non_contiguous_batched_and_float64_activations_like_the_torch_path():
    g = torch.Generator().manual_seed(4)
    batched = torch.randn(2, 50, 96, generator=g).to(torch.float16)
    transposed = torch.randn(96, 70, generator=g).to(torch.bfloat16).T  # (70, 96), not contiguous
    wide = torch.randn(33, 96, generator=g, dtype=torch.float64) * 1e30  # overflows float32 to inf
    assert_same(kernel_sketch(SketchGrid(), batched, transposed, wide),
                torch_sketch(SketchGrid(), batched, transposed.contiguous(), wide))


@needs_kernel
def test_int32_counts_equal_int64_counts_and_halve_the_memory():
    values = every_pattern(torch.bfloat16)
    block = blocks_of(values, 256)
    small = kernel_sketch(SketchGrid(), block, count_dtype=torch.int32)
    assert small.counts.dtype == torch.int32
    assert small.counts.element_size() * 2 == torch_sketch(SketchGrid(), block).counts.element_size()
    assert_same(small, torch_sketch(SketchGrid(), block))


@pytest.mark.parametrize("path", ["update", "_update_torch"])
def test_int32_counts_are_promoted_to_int64_before_they_could_wrap(path):
    sketch = ChannelSketch(SketchGrid(), 3, count_dtype=torch.int32)
    sketch.counts[:, 0] = INT32_COUNT_LIMIT - 1  # as if 2**31 - 2 zeros had been seen
    sketch.tokens = INT32_COUNT_LIMIT - 1
    block = torch.zeros(2, 3, dtype=torch.bfloat16)
    if path == "update":
        sketch.update(block)
    else:
        sketch._make_room(2)
        sketch._update_torch(block)
    assert sketch.counts.dtype == torch.int64
    assert sketch.counts[:, 0].tolist() == [INT32_COUNT_LIMIT + 1] * 3


def test_merging_int32_sketches_promotes_instead_of_wrapping():
    left = ChannelSketch(SketchGrid(), 2, count_dtype=torch.int32)
    right = ChannelSketch(SketchGrid(), 2, count_dtype=torch.int32)
    for sketch in (left, right):
        sketch.counts[:, 5] = 1 << 30
        sketch.tokens = 1 << 30
    left.merge_(right)
    assert left.counts.dtype == torch.int64 and left.counts[:, 5].tolist() == [1 << 31] * 2


def test_unknown_count_dtype_is_refused():
    with pytest.raises(CalibrationError, match="int64 or torch.int32"):
        ChannelSketch(SketchGrid(), 4, count_dtype=torch.int16)


def test_turning_the_kernels_off_runs_the_torch_path(monkeypatch):
    monkeypatch.setenv(sketch_kernel.DISABLE_ENV, "off")
    assert not sketch_kernel.cpu_enabled() and not sketch_triton.available()
    assert "turned off" in sketch_kernel.status()
    sketch = ChannelSketch(SketchGrid(), 8)
    used = []
    original = sketch._update_torch
    sketch._update_torch = lambda rows: (used.append(rows.shape), original(rows))
    sketch.update(torch.ones(5, 8))
    assert used == [(5, 8)] and sketch.tokens == 5 and int(sketch.counts[:, 129].sum()) == 40  # 1.0: bin 129


TRITON_CHECK = textwrap.dedent("""
    import math, torch
    from hif4fmt.calibration import sketch_kernel, sketch_triton
    from hif4fmt.calibration.sketch import ChannelSketch, SketchGrid
    import test_sketch_kernel as t

    def reference(grid, blocks, count_dtype):
        # the C kernel when it is built (tests above prove it equals the torch path), else the torch path
        sketch = ChannelSketch(grid, blocks[0].shape[1], count_dtype=count_dtype)
        for block in blocks:
            if sketch_kernel.cpu_enabled():
                sketch.update(block)
            else:
                sketch._update_torch(block)
        return sketch

    cases = 0
    for grid in (SketchGrid(), SketchGrid(0, -126, 128), SketchGrid(10, -20, 20)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            values = t.edge_values(grid)
            if dtype != torch.float32:
                values = torch.cat([values.to(dtype), t.every_pattern(dtype)])
            g = torch.Generator().manual_seed(cases)
            values = values[torch.randperm(values.numel(), generator=g)][:6000]  # a random share (interpreter)
            values = torch.cat([values.to(dtype), t.special_values().to(dtype)])
            values = values[torch.randperm(values.numel(), generator=g)]
            for channels, count_dtype in ((37, torch.int64), (16, torch.int32)):
                block = t.blocks_of(values, channels)
                blocks = [block[:100], block[100:]]  # accumulates onto earlier counts
                got = ChannelSketch(grid, channels, count_dtype=count_dtype)
                for part in blocks:
                    sketch_triton.update_gpu(part.contiguous(), got.counts, got.absmax, got.absmin, got.nonfinite,
                                             grid.shift, grid.first_code)
                    got.tokens += part.shape[0]
                t.assert_same(got, reference(grid, blocks, count_dtype))
                cases += 1
    print("triton cases", cases)
""")


def test_triton_kernel_matches_the_cpu_kernel_under_the_interpreter():
    if sketch_triton.triton is None:
        pytest.skip(f"triton is not installed here ({sketch_triton.status()}); pip install triton (Linux)")
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    environment.pop(sketch_kernel.DISABLE_ENV, None)
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=environment, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "triton cases 18" in done.stdout
