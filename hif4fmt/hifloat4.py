"""HiFloat4 quantize / dequantize / fake-quantize: the public codec API (spec/hifloat4.md).

Why this module exists: it is the one numeric operator the toolkit stands on. It turns tensors of any
leading shape into HiF4 along the last axis (64-element units, zero padding to a multiple of 64,
stripped on the way back), either packed (``quantize`` -> ``HiF4Tensor``, 4.5 bits per value) or fused
(``fake_quantize``: the same bits as ``dequantize(quantize(x))`` without materialising the packing).
Work is done in row chunks so the peak extra memory stays a small multiple of one chunk, on whatever
device the input lives (CPU or CUDA). Three implementations give the same bits (``QUANTIZE_PATHS``):
- the compiled kernel (``hif4fmt.codec.kernel``, built at install when a C compiler is there): the
  toolkit encoder in one pass per unit, for ``quantize``, ``fake_quantize`` and the fused
  ``quantize_divided`` (HiF4(W / m): every weight at load), ``quantize_divided_many`` (a model's
  weights in one call), ``fake_quantize_scaled`` (HiF4(x * m): every activation) and ``dequantize``
  (every weight at each forward), CPU only;
- the BF16 bit-pattern path (``hif4fmt.codec.swar``, a few contiguous torch passes): toolkit
  ``quantize`` and ``dequantize`` without the kernel;
- the general float32 path (``hif4fmt.codec.encoders``): the Ascend encoder, CUDA ``fake_quantize``,
  inputs that need an autograd graph, units holding NaN, big-endian hosts.

The integer product (spec section 8): ``matmul(a, b)`` is ``dequantize(a) @ dequantize(b).T`` computed
as int8 dot products per 64-element unit (exact) with one float32 rescale per unit, summed over the
units in a fixed order (identical bits on every implementation: the CPU kernel's instruction-set
copies, the Triton GPU kernel, the torch reference); ``linear(x, w, bias, multiplier=m)`` is the
W4A4 layer HiF4(x * m) @ dequantize(w).T + bias the same way, quantizing ``x * m`` straight to element
values and unit scales (``hif4fmt.codec.integer``).

Edge cases (spec 5): -0 and negative values that round to zero keep their sign (code 0x8, decoded as
-0.0); +-inf saturates to +-1.75 * 4 * 49152 and its unit's other elements scale accordingly; NaN makes
``fake_quantize`` return NaN for the whole 64-unit (as the toolkit does), while ``quantize`` raises
``NonFiniteInputError`` because packed HiF4 has no NaN code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hif4fmt.codec import integer, kernel, swar
from hif4fmt.codec.encoders import ENCODERS, EncodedUnits
from hif4fmt.codec.format import HIF4, HIFLOAT4_SPEC_VERSION
from hif4fmt.codec.packing import pack_metadata, pack_nibbles, unpack_metadata, unpack_nibbles
from hif4fmt.errors import CodecError, NonFiniteInputError, UnknownEncoderError

__all__ = [
    "HiF4Tensor",
    "quantize",
    "quantize_divided",
    "quantize_divided_many",
    "dequantize",
    "fake_quantize_scaled",
    "fake_quantize",
    "matmul",
    "linear",
    "ENCODERS",
    "HIF4",
    "HIFLOAT4_SPEC_VERSION",
]

SUPPORTED_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CHUNK_ELEMENTS = 1 << 18  # elements per work chunk: bounds temporaries (~16 float32 bytes each)
BLOCK_ELEMENTS = 1 << 20  # elements per block of the fast path: its scale work and the decoder work in one go


@dataclass(frozen=True)
class HiF4Tensor:
    """A packed HiF4 tensor, quantized along the last axis of ``shape``.

    codes:   uint8 (..., (K + pad) // 2): element codes, two per byte, first element in the low nibble.
    meta:    uint8 (..., (K + pad) // 64 * 4): per unit Ea, Eb bits, Ec bits (LSB first).
    shape:   the original shape (..., K).
    pad:     zeros appended to the last axis to reach a multiple of 64 (stripped by ``dequantize``).
    encoder: name of the encoder that produced the codes ("toolkit" or "ascend").
    """

    codes: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, ...]
    pad: int
    encoder: str = "toolkit"

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        if not shape:
            raise CodecError("HiF4Tensor: shape must have at least one axis")
        padded = shape[-1] + self.pad
        if self.pad < 0 or padded % HIF4.unit or self.pad >= HIF4.unit:
            raise CodecError(f"HiF4Tensor: last axis {shape[-1]} + pad {self.pad} is not the next multiple of {HIF4.unit}")
        expected_codes = (*shape[:-1], padded // 2)
        expected_meta = (*shape[:-1], padded // HIF4.unit * HIF4.meta_bytes_per_unit)
        for name, tensor, expected in (("codes", self.codes, expected_codes), ("meta", self.meta, expected_meta)):
            if tensor.dtype != torch.uint8:
                raise CodecError(f"HiF4Tensor.{name}: expected dtype uint8, found {tensor.dtype}")
            if tuple(tensor.shape) != expected:
                raise CodecError(f"HiF4Tensor.{name}: expected shape {expected} for shape {shape}, found {tuple(tensor.shape)}")

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed codes and metadata (4.5 bits per padded element)."""
        return self.codes.numel() + self.meta.numel()

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device: torch.device | str) -> "HiF4Tensor":
        """Return a copy with codes and metadata on ``device``."""
        return HiF4Tensor(self.codes.to(device), self.meta.to(device), self.shape, self.pad, self.encoder)


def _encoder(name: str):
    try:
        return ENCODERS[name]
    except (KeyError, TypeError):
        raise UnknownEncoderError(f"encoder {name!r}: expected one of {', '.join(sorted(ENCODERS))}") from None


def _check_input(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"{what}: expected a torch.Tensor, found {type(x).__name__}")
    if x.dtype not in SUPPORTED_INPUT_DTYPES:
        raise CodecError(f"{what}: dtype {x.dtype} not supported; expected bfloat16, float16 or float32")
    if x.ndim == 0:
        raise CodecError(f"{what}: a 0-d tensor has no last axis to quantize along; reshape it to (1,)")


def _row_chunks(rows: int, padded: int, elements: int | None = None):
    """Yield (start, stop) row ranges of about ``elements`` (default CHUNK_ELEMENTS) elements each."""
    step = max(1, (elements or CHUNK_ELEMENTS) // max(padded, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _bf16_rows(rows: torch.Tensor, pad: int) -> torch.Tensor:
    """Return contiguous BF16 (R, K + pad) from (R, K) input rows: rounded to BF16 (spec 3.1), zero padded."""
    rows = rows.to(torch.bfloat16)
    if pad:
        rows = F.pad(rows, (0, pad))
    return rows.contiguous()


def _units(rows_bf16: torch.Tensor) -> torch.Tensor:
    """Return float32 units (R, G, 16, 4) of padded BF16 rows (R, P), for the general encoders."""
    return rows_bf16.to(torch.float32).view(rows_bf16.shape[0], -1, HIF4.ec_per_unit, HIF4.ec_group)


def _nan_error(row: int, col: int) -> NonFiniteInputError:
    return NonFiniteInputError(
        f"quantize: NaN at row {row}, element {col} (unit {col // HIF4.unit}); packed HiF4 has no NaN code; "
        "remove NaNs first (fake_quantize propagates them instead)")


QUANTIZE_PATHS = ("kernel", "swar", "general")  # implementations of quantize, fastest first; same bytes


def _quantize_path(encoder: str, device: torch.device) -> str:
    """Return which implementation ``quantize`` runs for ``encoder`` on ``device`` (one of QUANTIZE_PATHS).

    kernel: the compiled single-pass encoder (toolkit, CPU, built; ``hif4fmt.codec.kernel``);
    swar: the torch bit-pattern path (toolkit, little-endian host; ``hif4fmt.codec.swar``);
    general: the float32 encoders (``hif4fmt.codec.encoders``): the Ascend encoder, big-endian hosts.
    """
    if encoder == "toolkit" and device.type == "cpu" and kernel.enabled():
        return "kernel"
    if encoder == "toolkit" and swar.LITTLE_ENDIAN:
        return "swar"
    return "general"


def _quantize_kernel(flat: torch.Tensor, divisor: torch.Tensor | None, codes: torch.Tensor, meta: torch.Tensor
                     ) -> None:
    """Fill ``codes``/``meta`` from (R, K) ``flat`` (divided by BF16 ``divisor`` first) with the C kernel."""
    rows, k = flat.shape
    divisor = None if divisor is None else divisor.contiguous()
    found = kernel.quantize_rows(flat.to(torch.bfloat16).contiguous(), divisor, codes, meta)
    if found >= 0:
        raise _nan_error(*divmod(found, k))


def quantize(x: torch.Tensor, encoder: str = "toolkit") -> HiF4Tensor:
    """Return the packed HiF4 form of ``x`` (any leading shape; bf16/fp16/fp32) along its last axis."""
    _check_input(x, "quantize")
    return _quantize(x, None, encoder)


def quantize_divided(x: torch.Tensor, divisor: torch.Tensor, encoder: str = "toolkit", *,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None) -> HiF4Tensor:
    """Return ``quantize(x / divisor, encoder)``: HiF4 of ``x`` with each column i divided by ``divisor[i]``.

    Bit-identical to that expression (torch's division in ``x``'s dtype, then HiF4), without making
    the quotient tensor when the compiled kernel runs (BF16 ``x`` and ``divisor`` on the CPU, toolkit
    encoder): the runtime's HiF4(W / m). ``divisor``: shape (K,), on ``x``'s device; other dtypes
    than BF16 take torch's division (with its type promotion), then ``quantize``. ``out``: optional
    preallocated contiguous uint8 (codes, meta) of the packed shapes, on ``x``'s device, written and
    used by the result; when an error is raised (a NaN) they may be partly written.
    """
    _check_input(x, "quantize_divided")
    _check_column_scale(x, divisor, "quantize_divided", "divisor")
    return _quantize(x, divisor, encoder, out)


def _check_column_scale(x: torch.Tensor, scale: torch.Tensor, what: str, role: str) -> None:
    """Raise ``CodecError`` unless ``scale`` is a tensor of shape (K,) on ``x``'s device (K = x's last axis)."""
    _check_input(scale, f"{what} {role}")
    if tuple(scale.shape) != (x.shape[-1],) or scale.device != x.device:
        raise CodecError(f"{what}: {role} must have shape ({x.shape[-1]},) and device {x.device}; "
                         f"found {tuple(scale.shape)} on {scale.device}")


def _kernel_scales(x: torch.Tensor, scale: torch.Tensor, path: str) -> bool:
    """Return whether the kernel applies ``scale`` itself: BF16 both (else torch's product/quotient promotes)."""
    return path == "kernel" and x.dtype == scale.dtype == torch.bfloat16


def quantize_divided_many(pairs, encoder: str = "toolkit", names=None) -> list[HiF4Tensor]:
    """Return ``[quantize_divided(x, divisor, encoder) for x, divisor in pairs]``, the same bytes, faster.

    With the compiled kernel (all pairs BF16 on the CPU, toolkit encoder, 2-D ``x``) every tensor is
    encoded in one kernel call that spreads all their rows over the threads at once: the runtime
    quantizes an expert's linears this way. Otherwise each pair goes through ``quantize_divided``.
    ``names`` (optional, one per pair) name the tensors in errors, e.g. a ``NonFiniteInputError`` for
    a NaN, which is raised for the first pair (in order) holding one.
    """
    pairs = list(pairs)
    names = list(names) if names is not None else [f"tensor {index}" for index in range(len(pairs))]
    if len(names) != len(pairs):
        raise CodecError(f"quantize_divided_many: {len(names)} names for {len(pairs)} tensors")
    for (x, divisor), name in zip(pairs, names):
        _check_input(x, f"quantize_divided_many: {name}")
        _check_column_scale(x, divisor, f"quantize_divided_many: {name}", "divisor")
    fused = all(x.ndim == 2 and x.shape[-1] and _kernel_scales(x, divisor, _quantize_path(encoder, x.device))
                for x, divisor in pairs)
    if not fused:
        results = []
        for (x, divisor), name in zip(pairs, names):
            try:
                results.append(quantize_divided(x, divisor, encoder))
            except NonFiniteInputError as exc:
                raise NonFiniteInputError(f"{name}: {exc}") from None
        return results
    jobs, results = [], []
    for x, divisor in pairs:
        shape = tuple(x.shape)
        codes, meta = _output_buffers(shape, shape[0], x.device, None)
        jobs.append((x.contiguous(), divisor.contiguous(), codes, meta))
        results.append(HiF4Tensor(codes, meta, shape, (-shape[-1]) % HIF4.unit, encoder))
    for found, (x, _), name in zip(kernel.quantize_many(jobs), pairs, names):
        if found >= 0:
            row, col = divmod(found, x.shape[-1])
            raise NonFiniteInputError(f"{name}: {_nan_error(row, col)}")
    return results


def packed_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return the (codes, meta) uint8 shapes of the packed form of a tensor of ``shape`` (spec 4)."""
    k = shape[-1]
    padded = k + (-k) % HIF4.unit
    return (*shape[:-1], padded // 2), (*shape[:-1], padded // HIF4.unit * HIF4.meta_bytes_per_unit)


def _output_buffers(shape: tuple[int, ...], rows: int, device: torch.device, out) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (codes, meta) as (R, P/2), (R, P/16) uint8: new, or the caller's ``out`` checked."""
    codes_shape, meta_shape = packed_shapes(shape)
    if out is None:
        return (torch.empty((rows, codes_shape[-1]), dtype=torch.uint8, device=device),
                torch.empty((rows, meta_shape[-1]), dtype=torch.uint8, device=device))
    try:
        codes, meta = out
    except (TypeError, ValueError):
        raise CodecError("out: expected a (codes, meta) pair of uint8 tensors") from None
    for name, tensor, expected in (("codes", codes, codes_shape), ("meta", meta, meta_shape)):
        if (not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tuple(tensor.shape) != expected
                or tensor.device != device or not tensor.is_contiguous()):
            raise CodecError(f"out {name}: expected a contiguous uint8 tensor of shape {expected} on {device}")
    return codes.reshape(rows, codes_shape[-1]), meta.reshape(rows, meta_shape[-1])


def _quantize(x: torch.Tensor, divisor: torch.Tensor | None, encoder: str, out=None) -> HiF4Tensor:
    """Return the packed HiF4 form of ``x / divisor`` (of ``x`` when ``divisor`` is None)."""
    encode = _encoder(encoder)
    shape = tuple(x.shape)
    k = shape[-1]
    pad = (-k) % HIF4.unit
    padded = k + pad
    rows = x.numel() // k if k else 0
    flat = x.reshape(rows, k)
    codes, meta = _output_buffers(shape, rows, x.device, out)
    path = _quantize_path(encoder, x.device)
    if divisor is not None and not (rows and _kernel_scales(x, divisor, path)):
        flat, divisor = flat / divisor, None  # torch's division, then HiF4 of the quotient
    if rows and path == "kernel":
        _quantize_kernel(flat, divisor, codes, meta)
        return HiF4Tensor(codes.reshape(packed_shapes(shape)[0]), meta.reshape(packed_shapes(shape)[1]), shape, pad,
                          encoder)
    fast = path == "swar"
    for start, stop in _row_chunks(rows, padded, BLOCK_ELEMENTS if fast else None):
        rows_bf16 = _bf16_rows(flat[start:stop], pad)
        if fast and swar.quantize_toolkit(rows_bf16, codes[start:stop], meta[start:stop], CHUNK_ELEMENTS):
            continue
        units = _units(rows_bf16)  # general encoder (or a NaN in this block, reported below)
        if torch.isnan(units).any():
            row, col = divmod(int(torch.isnan(units).flatten().nonzero()[0]), padded)
            raise _nan_error(start + row, col)
        enc: EncodedUnits = encode(units)
        sign = torch.signbit(units).to(torch.uint8) << 3
        element_codes = enc.magnitude.to(torch.uint8) | sign
        codes[start:stop] = pack_nibbles(element_codes.flatten(1))
        meta[start:stop] = pack_metadata(enc.ea_code, enc.eb, enc.ec).flatten(1)
    return HiF4Tensor(
        codes.reshape(packed_shapes(shape)[0]),
        meta.reshape(packed_shapes(shape)[1]),
        shape,
        pad,
        encoder,
    )


def _dequantize_path(device: torch.device) -> str:
    """Return which implementation ``dequantize`` runs: "kernel" (CPU, built), "swar" (little-endian) or "general"."""
    if device.type == "cpu" and kernel.enabled():
        return "kernel"
    return "swar" if swar.LITTLE_ENDIAN else "general"


def dequantize(q: HiF4Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Return the values of packed ``q`` as a ``dtype`` tensor of ``q.shape`` (padding stripped).

    Decoded values are exact in float32 and bfloat16; float16 overflows to inf above 65504.
    Raises ``CodecError`` on the reserved Ea code 0xFF.
    """
    if not isinstance(q, HiF4Tensor):
        raise CodecError(f"dequantize: expected a HiF4Tensor, found {type(q).__name__}")
    shape = q.shape
    k = shape[-1]
    padded = k + q.pad
    rows = q.codes.numel() * 2 // padded if padded else 0
    codes = q.codes.reshape(rows, padded // 2)
    meta = q.meta.reshape(rows, padded // HIF4.unit * HIF4.meta_bytes_per_unit)
    path = _dequantize_path(q.codes.device)
    if rows and k and path == "kernel":
        values = torch.empty((rows, k), dtype=torch.bfloat16, device=q.codes.device)
        found = kernel.dequantize_rows(codes.contiguous(), meta.contiguous(), values)
        if found >= 0:
            row, unit = divmod(found, padded // HIF4.unit)
            raise CodecError(f"dequantize: reserved Ea code 0xFF at row {row}, unit {unit}")
        return values.reshape(shape).to(dtype)  # exact in BF16; float16 rounds as the torch paths do
    out = torch.empty((rows, k), dtype=dtype, device=q.codes.device)
    fast = path == "swar"
    for start, stop in _row_chunks(rows, padded, BLOCK_ELEMENTS if fast else None):
        if fast:
            ea_code = swar.dequantize_rows(codes[start:stop], meta[start:stop], out[start:stop])
        else:
            ea_code = _dequantize_general(codes[start:stop], meta[start:stop], out[start:stop])
        if ea_code is not None:
            row, unit = divmod(int((ea_code == HIF4.ea_reserved_code).flatten().nonzero()[0]), padded // HIF4.unit)
            raise CodecError(f"dequantize: reserved Ea code 0xFF at row {start + row}, unit {unit}")
    return out.reshape(shape)


def _dequantize_general(codes: torch.Tensor, meta: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """Write the values of code bytes (R, P/2) and metadata (R, G*4) into ``out`` (R, K), byte-order free.

    Returns None, or the int32 Ea codes (R, G) when one is the reserved 0xFF (nothing written then).
    """
    ea_code, eb, ec = unpack_metadata(meta)
    if (ea_code == HIF4.ea_reserved_code).any():
        return ea_code
    step = swar.ea_values(ea_code).unsqueeze(-1) * HIF4.magnitude_step  # (R,G,1)
    step = step * torch.where(eb, 2.0, 1.0).repeat_interleave(HIF4.ec_per_eb, dim=-1)
    step = step * torch.where(ec, 2.0, 1.0)  # (R,G,16)
    nibbles = unpack_nibbles(codes).view(codes.shape[0], -1, HIF4.ec_per_unit, HIF4.ec_group)
    magnitude = (nibbles & HIF4.magnitude_mask).to(torch.float32) * step.unsqueeze(-1)
    values = torch.where((nibbles & HIF4.sign_mask) != 0, -magnitude, magnitude)
    out.copy_(values.flatten(1)[:, : out.shape[1]])
    return None


def _fake_quantize_path(encoder: str, device: torch.device, needs_graph: bool = False) -> str:
    """Return which implementation ``fake_quantize`` runs: "kernel" (toolkit, CPU, built) or "general".

    ``needs_graph``: the input requires grad with autograd on; the general path then keeps the torch
    graph (its gradient is zero almost everywhere: wrap it in a straight-through estimator to train).
    """
    usable = encoder == "toolkit" and device.type == "cpu" and kernel.enabled() and not needs_graph
    return "kernel" if usable else "general"


def _needs_graph(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def fake_quantize(x: torch.Tensor, encoder: str = "toolkit") -> torch.Tensor:
    """Return HiF4 quantize-dequantize of ``x`` along its last axis, same dtype and shape as ``x``.

    Bit-identical to ``dequantize(quantize(x, encoder), x.dtype)`` for NaN-free input, without packing.
    """
    _check_input(x, "fake_quantize")
    return _fake_quantize(x, None, encoder)


def fake_quantize_scaled(x: torch.Tensor, multiplier: torch.Tensor, encoder: str = "toolkit") -> torch.Tensor:
    """Return ``fake_quantize(x * multiplier, encoder)``: each column i of ``x`` times ``multiplier[i]`` first.

    Bit-identical to that expression (torch's product in ``x``'s dtype, then HiF4), without making the
    product tensor when the compiled kernel runs (BF16 on the CPU, toolkit encoder): the runtime's
    activation side HiF4(x * m). ``multiplier``: shape (K,), on ``x``'s device; other dtypes than BF16
    take torch's product (with its type promotion), then ``fake_quantize``.
    """
    _check_input(x, "fake_quantize_scaled")
    _check_column_scale(x, multiplier, "fake_quantize_scaled", "multiplier")
    return _fake_quantize(x, multiplier, encoder)


def _fake_quantize(x: torch.Tensor, multiplier: torch.Tensor | None, encoder: str) -> torch.Tensor:
    """Return fake_quantize of ``x * multiplier`` (of ``x`` when ``multiplier`` is None), in its dtype."""
    encode = _encoder(encoder)
    shape = tuple(x.shape)
    k = shape[-1]
    pad = (-k) % HIF4.unit
    padded = k + pad
    rows = x.numel() // k if k else 0
    flat = x.reshape(rows, k)
    needs_graph = _needs_graph(x) or (multiplier is not None and _needs_graph(multiplier))
    path = _fake_quantize_path(encoder, x.device, needs_graph)
    if multiplier is not None and not (rows and _kernel_scales(x, multiplier, path)):
        flat, multiplier = flat * multiplier, None  # torch's product (its dtype), then HiF4 of it
    if rows and path == "kernel":
        out = torch.empty((rows, k), dtype=torch.bfloat16, device=x.device)
        kernel.fake_quantize_rows(flat.to(torch.bfloat16).contiguous(),
                                  None if multiplier is None else multiplier.contiguous(), out)
        return out.reshape(shape).to(flat.dtype)  # values are exact in BF16; float16 rounds as in the general path
    out = torch.empty((rows, k), dtype=flat.dtype, device=x.device)
    # The general float32 path: measured 5-20 % faster than the SWAR path for fake_quantize on
    # activation shapes (2-core CPU, no packing step to save there); the kernel, when built, beats both.
    for start, stop in _row_chunks(rows, padded):
        units = _units(_bf16_rows(flat[start:stop], pad))
        enc = encode(units)
        values = enc.magnitude.mul_(enc.step.unsqueeze(-1)).copysign_(units)
        out[start:stop] = values.view(stop - start, padded)[:, :k]
    return out.reshape(shape)


OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_weight_operand(b, k: int, pad: int, what: str) -> None:
    if not isinstance(b, HiF4Tensor):
        raise CodecError(f"{what}: b must be a HiF4Tensor, found {type(b).__name__}")
    if len(b.shape) != 2:
        raise CodecError(f"{what}: b must be 2-D (N, K), found shape {b.shape}")
    if b.shape[-1] != k or b.pad != pad:
        raise CodecError(f"{what}: K differs: a has K = {k} (pad {pad}), b has K = {b.shape[-1]} (pad {b.pad}); "
                         "both operands must be quantized along the same reduction axis")



def _check_out_dtype(out_dtype, what: str) -> None:
    if out_dtype not in OUT_DTYPES:
        raise CodecError(f"{what}: out_dtype {out_dtype} not supported; expected float32, bfloat16 or float16")


def matmul(a: HiF4Tensor, b: HiF4Tensor, *, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return ``dequantize(a) @ dequantize(b).T`` computed the integer way, shape (..., N), ``out_dtype``.

    ``a``: (..., K), ``b``: (N, K), both quantized along K with the same K and padding, on one device.
    Per 64-element unit the integer dot product of the element values is exact (int32) and is
    multiplied by the exact float32 product of the two unit scales; those unit terms are added in
    float32 in unit order starting from +0, then rounded once to ``out_dtype`` (spec/hifloat4.md 8).
    Raises ``CodecError`` for mismatched operands or the reserved Ea code 0xFF.
    """
    if not isinstance(a, HiF4Tensor):
        raise CodecError(f"matmul: a must be a HiF4Tensor, found {type(a).__name__}")
    _check_weight_operand(b, a.shape[-1], a.pad, "matmul")
    _check_out_dtype(out_dtype, "matmul")
    if a.device != b.device:
        raise CodecError(f"matmul: a is on {a.device}, b on {b.device}; move both to one device")
    left = integer.expand(a)
    out = integer.product(left, b, out_dtype=out_dtype)
    return out.reshape(*a.shape[:-1], b.shape[0])


def linear(x: torch.Tensor, weight: HiF4Tensor, bias: torch.Tensor | None = None, *,
           multiplier: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
           weight_operand: "integer.IntegerOperand | None" = None) -> torch.Tensor:
    """Return HiF4(x * multiplier) @ dequantize(weight).T + bias the integer way, shape (..., N).

    The W4A4 layer's arithmetic "integer": ``x`` (..., K) is multiplied by ``multiplier`` (K,) in BF16
    (as ``fake_quantize_scaled``), encoded with ``weight.encoder``'s encoder straight to element values
    and unit scales, and
    multiplied with the packed ``weight`` (N, K) as ``matmul`` does; ``bias`` (N,) is added in float32
    to the unit sum, then the result is rounded once to ``out_dtype`` (default ``x.dtype``). Neither
    operand is ever dequantized. A NaN in a unit of ``x * multiplier`` makes that row's outputs NaN.
    Inference only: the result carries no autograd graph (use ``fake_quantize`` to train).
    ``weight_operand``: ``integer.expand(weight)``, when the caller keeps it (GPU paths).
    """
    _check_input(x, "linear")
    _check_weight_operand(weight, x.shape[-1], (-x.shape[-1]) % HIF4.unit, "linear")
    if multiplier is not None:
        _check_column_scale(x, multiplier, "linear", "multiplier")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise CodecError(f"linear: bias must be a tensor of shape ({weight.shape[0]},)")
    for role, tensor in (("weight", weight.codes), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            raise CodecError(f"linear: x is on {x.device}, the {role} on {tensor.device}; move them to one device")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_out_dtype(out_dtype, "linear")
    _encoder(weight.encoder)
    left = integer.quantize_activation(x, multiplier, weight.encoder)
    out = integer.product(left, weight, bias, out_dtype=out_dtype, weight_operand=weight_operand)
    return out.reshape(*x.shape[:-1], weight.shape[0])
