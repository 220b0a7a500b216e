"""The integer HiF4 matrix product: HiF4 operands as int8 element values and float32 unit scales.

Why this module exists: inside one 64-element unit every decoded HiF4 element is ``q * s`` with ``q``
an integer in [-28, 28] and ``s = value(Ea) / 4`` (spec/hifloat4.md section 8), so the product of two
HiF4 operands is an int8 matrix product with one float32 rescale per unit of K: exact inside every
unit, float32 only across units, in a fixed order. This module holds the operand form that product
needs (``IntegerOperand``), makes it from packed tensors or straight from activations (HiF4(x * m),
never materialising a dequantized activation), and runs the product on the best implementation:

- ``kernel``: the compiled CPU GEMM (``hif4fmt.codec.kernel.gemm``; AVX-512 VNNI, AVX2 and portable
  copies, identical bits), which decodes the packed weight block by block (no decoded weight copy);
- ``triton``: the GPU kernel (``hif4fmt.codec.triton_gemm``), int8 ``tl.dot`` per unit;
- ``torch``: the same arithmetic in plain torch on any device (float32 matmuls of small integers are
  exact: every partial sum is an integer below 2^24), unit by unit in the spec's order; the reference
  the other two are tested against, and the fallback without them.

Layers: format -> encoders -> packing -> this module -> ``hif4fmt.hifloat4`` (the public API).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from hif4fmt.codec import kernel, swar
from hif4fmt.codec.encoders import ENCODERS
from hif4fmt.codec.format import HIF4
from hif4fmt.codec.packing import unpack_metadata, unpack_nibbles
from hif4fmt.errors import CodecError

MAX_ELEMENT_VALUE = 28  # |q| <= 1.75 * 4 * 2^2: the largest element value in units of value(Ea) / 4   # spec 8.1
WEIGHT_OFFSET = 32  # the x86 copies store q_w + 32 (unsigned bytes) and correct by -32 * sum(q_a)      # spec 8.3
GEMM_PATHS = ("kernel", "triton", "torch")  # implementations of the integer product, fastest first; same bits
CHUNK_ELEMENTS = 1 << 22  # activation elements per chunk of the torch encoder (its temporaries: ~40 B each)
TRITON_MIN_CAPABILITY = (8, 0)  # int8 tensor-core tl.dot (Ampere and later); older GPUs take the torch path
TRITON_ENV = "HIF4FMT_TRITON"  # "0" turns the Triton path off (then CUDA takes the torch path)


@dataclass(frozen=True)
class IntegerOperand:
    """A HiF4 tensor as the integer product reads it: rows (R, P) of element values and unit scales.

    q:     int8 (R, P): element values q = (-1)^s * c * 2^(Eb + Ec), in [-28, 28]; padding 0.
    scale: float32 (R, U): value(Ea) / 4 per unit (the decoded element is q * scale); NaN for an
           activation unit that held a NaN (its q are 0), so every output it touches is NaN.
    sums:  int32 (R, U): the sum of each unit's q (the x86 copies use it, spec 8.3).
    shape: the original shape (..., K); ``pad`` zeros complete K to P = K + pad.
    """

    q: torch.Tensor
    scale: torch.Tensor
    sums: torch.Tensor
    shape: tuple[int, ...]
    pad: int

    @property
    def rows(self) -> int:
        return self.q.shape[0]

    @property
    def k(self) -> int:
        return self.shape[-1]


def _empty_operand(rows: int, k: int, shape: tuple[int, ...], device: torch.device) -> IntegerOperand:
    padded = k + (-k) % HIF4.unit
    units = padded // HIF4.unit
    return IntegerOperand(torch.empty((rows, padded), dtype=torch.int8, device=device),
                          torch.empty((rows, units), dtype=torch.float32, device=device),
                          torch.empty((rows, units), dtype=torch.int32, device=device), tuple(shape), padded - k)


def _element_values(magnitude: torch.Tensor, negative: torch.Tensor, eb: torch.Tensor, ec: torch.Tensor) -> torch.Tensor:
    """Return int8 q (R, G*64) from magnitude codes (R, G, 16, 4), sign flags, Eb (R, G, 8) and Ec (R, G, 16)."""
    shift = eb.to(torch.int32).repeat_interleave(HIF4.ec_per_eb, dim=-1) + ec.to(torch.int32)  # (R, G, 16)
    values = magnitude.to(torch.int32) << shift.unsqueeze(-1)
    values = torch.where(negative, -values, values)
    return values.to(torch.int8).flatten(1)


def expand(packed) -> IntegerOperand:
    """Return the ``IntegerOperand`` of a packed ``HiF4Tensor`` (rows = its leading axes flattened).

    Raises ``CodecError`` on the reserved Ea code 0xFF.
    """
    shape, k = packed.shape, packed.shape[-1]
    padded = k + packed.pad
    units = padded // HIF4.unit
    rows = math.prod(shape[:-1])
    codes = packed.codes.reshape(rows, padded // 2).contiguous()
    meta = packed.meta.reshape(rows, units * HIF4.meta_bytes_per_unit).contiguous()
    operand = _empty_operand(rows, k, shape, codes.device)
    if not rows or not k:
        return operand
    if codes.device.type == "cpu" and kernel.enabled():
        found = kernel.expand_q_rows(codes, meta, operand.q, operand.scale, operand.sums, k)
        if found >= 0:
            row, unit = divmod(found, units)
            raise CodecError(f"reserved Ea code 0xFF at row {row}, unit {unit}")
        return operand
    check_reserved_codes(meta)
    ea_code, eb, ec = unpack_metadata(meta)
    nibbles = unpack_nibbles(codes).view(rows, units, HIF4.ec_per_unit, HIF4.ec_group)
    q = _element_values(nibbles & HIF4.magnitude_mask, (nibbles & HIF4.sign_mask) != 0, eb, ec)
    operand.q.copy_(q)
    operand.scale.copy_(swar.ea_values(ea_code) * HIF4.magnitude_step)
    operand.sums.copy_(q.view(rows, units, HIF4.unit).sum(-1, dtype=torch.int32))
    return operand


def quantize_activation(x: torch.Tensor, multiplier: torch.Tensor | None = None, encoder: str = "toolkit"
                        ) -> IntegerOperand:
    """Return HiF4(bf16(x * multiplier)) as an ``IntegerOperand``, never dequantized.

    ``x`` (..., K), ``multiplier`` None or (K,) on ``x``'s device; the product is torch's, in their
    dtype, then rounded to BF16 as HiF4 does: exactly the input ``fake_quantize_scaled`` encodes.
    The element values and scales are those ``quantize(..., encoder)`` stores (a NaN unit: scale NaN,
    q 0); the compiled kernel runs the toolkit encoder, the torch path any of ``ENCODERS``.
    """
    shape, k = tuple(x.shape), x.shape[-1]
    rows = math.prod(shape[:-1])
    flat = x.reshape(rows, k)
    if multiplier is not None and not x.dtype == multiplier.dtype == torch.bfloat16:
        flat, multiplier = flat * multiplier, None  # torch's product in its dtype (as fake_quantize_scaled), then HiF4
    flat = flat.to(torch.bfloat16)
    operand = _empty_operand(rows, k, shape, x.device)
    if not rows or not k:
        return operand
    if encoder == "toolkit" and x.device.type == "cpu" and kernel.enabled():
        kernel.quantize_q_rows(flat.contiguous(), None if multiplier is None else multiplier.contiguous(), operand.q,
                               operand.scale, operand.sums)
        return operand
    if multiplier is not None:
        flat = flat * multiplier  # torch's BF16 product, as the kernel computes it
    units_count = operand.scale.shape[1]
    step = max(1, CHUNK_ELEMENTS // max(units_count * HIF4.unit, 1))  # rows per chunk: bounded temporaries
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        values = torch.nn.functional.pad(flat[start:stop], (0, operand.pad)).to(torch.float32)
        units = values.view(stop - start, units_count, HIF4.ec_per_unit, HIF4.ec_group)
        nan_unit = torch.isnan(units).flatten(2).any(-1)  # (r, U)
        units = torch.where(nan_unit[..., None, None], 0.0, units)
        encoded = ENCODERS[encoder](units)
        q = _element_values(encoded.magnitude, torch.signbit(units), encoded.eb, encoded.ec)
        operand.q[start:stop] = q
        operand.scale[start:stop] = torch.where(nan_unit, float("nan"),
                                                swar.ea_values(encoded.ea_code) * HIF4.magnitude_step)
        operand.sums[start:stop] = q.view(stop - start, units_count, HIF4.unit).sum(-1, dtype=torch.int32)
    return operand


def product_torch(a: IntegerOperand, b: IntegerOperand, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Return the integer product of ``a`` (M rows) and ``b`` (N rows) as float32 (M, N), spec 8.2 literally.

    Unit by unit in order u = 0, 1, ..: the integer dot products (float32 matmuls of integers, exact),
    times the exact scale product, added to a float32 accumulator that starts at +0; then ``+ bias``
    (float32 (N,)) when given. Any device.
    """
    m, n = a.rows, b.rows
    acc = torch.zeros((m, n), dtype=torch.float32, device=a.q.device)
    for u in range(a.scale.shape[1]):
        columns = slice(u * HIF4.unit, (u + 1) * HIF4.unit)
        dots = a.q[:, columns].to(torch.float32) @ b.q[:, columns].to(torch.float32).T  # exact integers
        acc = acc + dots * (a.scale[:, u, None] * b.scale[None, :, u])  # exact product, one rounding
    if bias is not None:
        acc = acc + bias
    return acc


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get(TRITON_ENV, "").strip().lower() in kernel.OFF_VALUES:
        return False
    from hif4fmt.codec import triton_gemm

    return triton_gemm.available() and torch.cuda.get_device_capability(device) >= TRITON_MIN_CAPABILITY


def product_path(device: torch.device) -> str:
    """Return which implementation the integer product runs on ``device`` (one of GEMM_PATHS)."""
    if device.type == "cpu" and kernel.enabled():
        return "kernel"
    if _triton_usable(device):
        return "triton"
    return "torch"


def has_fast_product(device: torch.device | str) -> bool:
    """Return whether a compiled integer product (CPU kernel or Triton) exists for ``device``."""
    return product_path(torch.device(device)) != "torch"


def product(a: IntegerOperand, weight, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
            weight_operand: IntegerOperand | None = None, copy: str | None = None) -> torch.Tensor:
    """Return ``a @ weight.T (+ bias)`` the integer way as ``out_dtype`` (M, N): one rounding to it at the end.

    ``a``: the activation operand (M rows); ``weight``: the packed ``HiF4Tensor`` (N, K), same K and pad;
    ``weight_operand``: its ``expand``ed form when the caller keeps one (the Triton and torch paths need
    it; made here otherwise); ``bias``: None or (N,), added in float32 after the unit sum;
    ``out_dtype``: float32, bfloat16 or float16; ``copy``: the CPU kernel's instruction-set copy.
    """
    n = weight.shape[0]
    path = product_path(a.q.device)
    bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
    if n == 0 or a.rows == 0 or a.scale.shape[1] == 0:  # an empty product: the sums are +0
        out = torch.zeros((a.rows, n), dtype=torch.float32, device=a.q.device)
        return (out if bias32 is None else out + bias32).to(out_dtype)
    if path == "kernel":
        codes, meta = weight.codes.reshape(n, -1).contiguous(), weight.meta.reshape(n, -1).contiguous()
        check_reserved_codes(meta)  # the kernel decodes without looking (spec 2.4: decoders reject 0xFF)
        out = torch.empty((a.rows, n), dtype=out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32)
        kernel.gemm(a.q, a.scale, a.sums, codes, meta, bias32, out, a.k, copy)
        return out.to(out_dtype)  # float16: one rounding of the float32 result
    if weight_operand is None:
        weight_operand = expand(weight)
    if path == "triton":
        from hif4fmt.codec import triton_gemm

        return triton_gemm.product(a, weight_operand, bias32).to(out_dtype)
    return product_torch(a, weight_operand, bias32).to(out_dtype)


def check_reserved_codes(meta: torch.Tensor) -> None:
    """Raise ``CodecError`` naming the row and unit of the first reserved Ea code 0xFF in metadata (R, U*4)."""
    reserved = meta.reshape(meta.shape[0], -1, HIF4.meta_bytes_per_unit)[..., 0] == HIF4.ea_reserved_code
    if bool(reserved.any()):
        row, unit = divmod(int(reserved.flatten().nonzero()[0]), reserved.shape[1])
        raise CodecError(f"reserved Ea code 0xFF at row {row}, unit {unit}: not a valid HiF4 tensor")
