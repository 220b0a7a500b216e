"""The integer HiF4 matrix product as a Triton kernel (GPU): int8 ``tl.dot`` per unit, float32 rescale.

Why this module exists: on a GPU the W4A4 layer's product is an int8 tensor-core GEMM with one float32
rescale per 64-element unit of K (spec/hifloat4.md 8). Each program computes a BLOCK_M x BLOCK_N tile:
for every unit u in order, the exact int32 dot products of the element values (``tl.dot`` of int8
into int32), times the exact product of the two unit scales, added to a float32 accumulator that starts
at +0; then the bias; then one store. Those are the spec's operations in the spec's order, so the
result has the bits of the CPU kernel and of ``integer.product_torch`` (a fused multiply-add there
rounds once, like the add, because the unit term is exact).

Triton is optional (``available()``); without it CUDA tensors take the torch path. The test suite runs
this kernel on the CPU under ``TRITON_INTERPRET=1`` (tests/triton_interpreted.py) against the C kernel.
``benchmarks/gemm_speed.py`` times it against BF16 cuBLAS when a GPU is there.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # not installed (the [gpu] extra) or no wheel for this platform
    triton = None
    tl = None

UNIT = 64  # elements per HiF4 unit: one tl.dot of K = 64 per unit (hif4fmt.codec.format.HIF4.unit)


def available() -> bool:
    """Return whether Triton is importable (the kernel still needs a CUDA device, or the interpreter)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _integer_gemm(a_q, a_scale, b_q, b_scale, bias, out, m, n, padded, units,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNIT_K: tl.constexpr):
        # int64 offsets: M * P and M * N pass 2^31 at Wan's token counts (75,600 x 13,824)
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        columns = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        ks = tl.arange(0, UNIT_K)
        row_ok = rows < m
        column_ok = columns < n
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for u in range(0, units):
            a = tl.load(a_q + rows[:, None] * padded + u * UNIT_K + ks[None, :], mask=row_ok[:, None], other=0)
            b = tl.load(b_q + columns[None, :] * padded + u * UNIT_K + ks[:, None], mask=column_ok[None, :], other=0)
            dots = tl.dot(a, b, out_dtype=tl.int32)  # exact: |sum| <= 64 * 28 * 28
            scale_a = tl.load(a_scale + rows * units + u, mask=row_ok, other=0.0)
            scale_b = tl.load(b_scale + columns * units + u, mask=column_ok, other=0.0)
            acc = acc + dots.to(tl.float32) * (scale_a[:, None] * scale_b[None, :])
        if HAS_BIAS:
            acc = acc + tl.load(bias + columns, mask=column_ok, other=0.0)[None, :]
        tl.store(out + rows[:, None] * n + columns[None, :], acc, mask=row_ok[:, None] & column_ok[None, :])


def block_sizes(m: int, device: torch.device) -> tuple[int, int, int]:
    """Return (BLOCK_M, BLOCK_N, num_warps) for ``m`` rows: tensor-core tiles on a GPU, small ones interpreted."""
    if device.type != "cuda":
        return 16, 32, 1  # the interpreter: tl.dot needs dimensions >= 16
    return (64 if m <= 64 else 128), 128, 8


def product(a, b, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Return the integer product of operands ``a`` (M rows) and ``b`` (N rows) as float32 (M, N), plus ``bias``.

    ``a``, ``b``: ``hif4fmt.codec.integer.IntegerOperand`` on one device (CUDA, or CPU under
    ``TRITON_INTERPRET=1``), same P; ``bias``: None or float32 (N,).
    """
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (the integer product takes the torch path)")
    m, n, padded = a.q.shape[0], b.q.shape[0], a.q.shape[1]
    units = padded // UNIT
    out = torch.empty((m, n), dtype=torch.float32, device=a.q.device)
    if m == 0:
        return out
    block_m, block_n, warps = block_sizes(m, a.q.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _integer_gemm[grid](a.q, a.scale, b.q, b.scale, out if bias is None else bias, out, m, n, padded, units,
                        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, UNIT_K=UNIT, num_warps=warps)
    return out
