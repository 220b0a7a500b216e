"""The GPU sketch update: one Triton kernel pass, per-channel bins accumulated in on-chip memory.

Why this module exists: on a GPU the layer's matmul is ~1000x faster than on a CPU, while the torch
path's ``bincount`` over ``channel x bins + bin`` is memory- and atomic-bound. Here each program owns
``BLOCK_CHANNELS`` channels: it walks every row of the block once, ``BLOCK_ROWS`` at a time, computes the
bin of each element from its float32 bit pattern exactly as spec/stats-v1.md 3.1 defines (integer only:
the input is read as raw bits and widened to float32 bits by integer operations, so no flush-to-zero
mode can change a subnormal),
accumulates an int32 histogram of its channels with ``tl.histogram`` (on chip), and the exact max, min
and non-finite count; at the end it adds them to its channels' counts. No two programs touch the same
channel, so no global atomics are needed and the result does not depend on scheduling.

Tested under ``TRITON_INTERPRET=1`` against the C kernel (tests/test_sketch_kernel.py); not timed on
a GPU in this repository yet (docs/calibration.md). ``available()`` is False when triton does not import.
"""

from __future__ import annotations

import os

import torch

from hif4fmt.calibration.constants import FLOAT32_ABS_MASK, FLOAT32_INF_BITS

BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # as _abs_float32_bits numbers them

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # not installed (triton wheels exist for Linux x86_64 / aarch64 only)
    triton = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""

BLOCK_CHANNELS = 16  # channels per program: 16 BF16 = one 32-byte sector per row
BLOCK_ROWS = 64  # rows per step
MAX_ROWS = (1 << 31) - 1  # the on-chip int32 histogram of one call must not wrap
INTERPRET_ENV = "TRITON_INTERPRET"


def available() -> bool:
    """Return whether the Triton kernel can run (triton imports; not turned off by HIF4FMT_SKETCH_KERNEL)."""
    from hif4fmt.calibration.sketch_kernel import turned_off

    return triton is not None and not turned_off()


def interpreted() -> bool:
    """Return whether triton runs its CPU interpreter (``TRITON_INTERPRET=1``): any device's tensors work."""
    return os.environ.get(INTERPRET_ENV, "") == "1"


def status() -> str:
    """Return one line saying whether GPU sketch updates run the Triton kernel."""
    from hif4fmt.calibration.sketch_kernel import DISABLE_ENV, turned_off

    if triton is None:
        return f"triton not installed ({_IMPORT_ERROR}); GPU sketch updates use the torch path (same counts)"
    if turned_off():
        return f"triton {triton.__version__}, turned off by {DISABLE_ENV}; GPU sketch updates use the torch path"
    return f"Triton kernel in use on CUDA tensors (triton {triton.__version__})"


if triton is not None:
    @triton.jit
    def _abs_float32_bits(bits, DTYPE: tl.constexpr, ABS_MASK: tl.constexpr, INF_BITS: tl.constexpr):
        """|x| as float32 bits from the raw bits of x, with integer operations only (no flush-to-zero)."""
        if DTYPE == 0:  # float32
            a = bits & ABS_MASK
        elif DTYPE == 1:  # bfloat16: the top half of a float32
            a = (bits.to(tl.int32) & 0x7FFF) << 16
        else:  # float16
            half = bits.to(tl.int32) & 0x7FFF
            exponent = half >> 10
            mantissa = half & 0x3FF
            # a subnormal m x 2**-24 is a normal float32: the product is exact whatever the rounding mode
            subnormal = (mantissa.to(tl.float32) * 5.9604644775390625e-08).to(tl.int32, bitcast=True)
            a = tl.where(exponent == 0x1F, INF_BITS | (mantissa << 13),
                         tl.where(exponent == 0, subnormal, ((exponent + 112) << 23) | (mantissa << 13)))
        return a

    @triton.jit
    def _sketch_update(x_ptr, counts_ptr, absmax_ptr, absmin_ptr, nonfinite_ptr, rows, channels, shift,
                       first_code, DTYPE: tl.constexpr, BINS: tl.constexpr, BINS_P2: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ABS_MASK: tl.constexpr,
                       INF_BITS: tl.constexpr):
        columns = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        column_ok = columns < channels
        local = tl.arange(0, BLOCK_C) * BINS_P2  # this program's histogram: BLOCK_C x BINS_P2 int32 on chip
        histogram = tl.zeros((BLOCK_C * BINS_P2,), dtype=tl.int32)
        top = tl.zeros((BLOCK_C,), dtype=tl.int32)
        bottom = tl.full((BLOCK_C,), INF_BITS, dtype=tl.int32)
        bad = tl.zeros((BLOCK_C,), dtype=tl.int32)
        for start in range(0, rows, BLOCK_R):
            row = start + tl.arange(0, BLOCK_R)
            ok = (row < rows)[:, None] & column_ok[None, :]
            bits = tl.load(x_ptr + row[:, None].to(tl.int64) * channels + columns[None, :], mask=ok, other=0)
            a = _abs_float32_bits(bits, DTYPE, ABS_MASK, INF_BITS)  # spec 3.1: |x| bits, exact widening
            clamped = tl.minimum(a, INF_BITS)  # NaN counts as +inf
            top = tl.maximum(top, tl.max(tl.where(ok, clamped, 0), axis=0))
            bottom = tl.minimum(bottom, tl.min(tl.where(ok, clamped, INF_BITS), axis=0))
            bad += tl.sum((ok & (a >= INF_BITS)).to(tl.int32), axis=0)
            index = tl.minimum(tl.maximum((a >> shift) - first_code + 1, 0), BINS - 1)
            flat = tl.reshape(index + local[None, :], (BLOCK_R * BLOCK_C,))
            histogram += tl.histogram(flat, BLOCK_C * BINS_P2, mask=tl.reshape(ok, (BLOCK_R * BLOCK_C,)))
        bins = tl.arange(0, BINS_P2)
        where = columns[:, None].to(tl.int64) * BINS + bins[None, :]
        store = column_ok[:, None] & (bins < BINS)[None, :]
        old = tl.load(counts_ptr + where, mask=store, other=0)
        tile = tl.reshape(histogram, (BLOCK_C, BINS_P2))
        tl.store(counts_ptr + where, old + tile.to(old.dtype), mask=store)
        old_top = tl.load(absmax_ptr + columns, mask=column_ok, other=0)
        tl.store(absmax_ptr + columns, tl.maximum(old_top, top), mask=column_ok)
        old_bottom = tl.load(absmin_ptr + columns, mask=column_ok, other=INF_BITS)
        tl.store(absmin_ptr + columns, tl.minimum(old_bottom, bottom), mask=column_ok)
        old_bad = tl.load(nonfinite_ptr + columns, mask=column_ok, other=0)
        tl.store(nonfinite_ptr + columns, old_bad + bad.to(tl.int64), mask=column_ok)


def update_gpu(rows: torch.Tensor, counts: torch.Tensor, absmax: torch.Tensor, absmin: torch.Tensor,
               nonfinite: torch.Tensor, shift: int, first_code: int) -> None:
    """Add ``rows`` to the statistics in place with the Triton kernel (call only when ``available()``).

    All tensors contiguous on one device (CUDA, or any under ``TRITON_INTERPRET=1``): ``rows`` (R, C)
    float32, bfloat16 or float16 with R <= 2**31 - 1; ``counts`` (C, bins) int64 or int32 (the caller
    keeps int32 totals below 2**31); ``absmax``/``absmin`` float32 (C,); ``nonfinite`` int64 (C,).
    Launches asynchronously: nothing here waits for the device.
    """
    row_count, channels = rows.shape
    bins = counts.shape[1]
    grid = (triton.cdiv(channels, BLOCK_CHANNELS),)
    _sketch_update[grid](rows.view(BITS_VIEW[rows.dtype]), counts, absmax.view(torch.int32), absmin.view(torch.int32), nonfinite, row_count,
                         channels, shift, first_code, DTYPE=DTYPE_CODES[rows.dtype], BINS=bins, BINS_P2=triton.next_power_of_2(bins),
                         BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_CHANNELS, ABS_MASK=FLOAT32_ABS_MASK,
                         INF_BITS=FLOAT32_INF_BITS)
