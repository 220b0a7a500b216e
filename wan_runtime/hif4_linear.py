"""``HiF4Linear``: a drop-in ``nn.Linear`` replacement computing HiF4(x * m) @ HiF4(W / m).T + b.

Why this module exists: it is the one place where the W4A4 arithmetic of a quantized layer is defined.
The weight side HiF4(W / m) is computed once, when the layer is built, and kept packed (``HiF4Tensor``:
4 bits per element + 32 bits per 64-element unit = 4.5 bits per weight, 0.28x of BF16). Two
arithmetics compute the product (``ARITHMETICS``; docs/runtime.md, "Numerics"):

- ``"integer"`` (the default where a compiled product exists for the device: the CPU kernel, or
  Triton on CUDA): HiF4(x * m) is encoded straight to int8 element values and unit scales and
  multiplied with the packed weight as an int8 GEMM with one float32 rescale per 64-element unit
  (``hif4fmt.hifloat4.linear``, spec/hifloat4.md 8): exact inside every unit, float32 across units,
  the bias added in float32, one rounding to the compute dtype. No dequantized weight or activation
  is ever made (on GPUs the weight's int8 element values are kept next to the packed bytes for the
  Triton kernel: about 1.06 B per weight more).
- ``"simulated"``: the challenge toolkit's ``QLinear`` bit for bit: ``F.linear(HiF4(x * m),
  HiF4(W / m), b)`` in the compute dtype (the weight dequantized at every forward, the bias fused
  into the one rounding of the BF16 matmul).

Optional rotation (``rotation="hadamard-64"``, a state layer's ``rotation``; docs/runtime.md,
"Numerics"): R = blockdiag(H64 / 8) along in_features is applied to both masked operands before HiF4,
``HiF4(R(x * m)) @ HiF4(R(W / m)).T + b`` (exactly ``x W^T + b`` before quantization, R R^T = I). The
masked operand (x * m and W / m in the compute dtype, as without rotation) is rotated in float32 by
``hif4fmt.codec.rotation.rotate_torch`` (a fixed butterfly order: the same bits on every device), then
HiF4 rounds it to BF16 and encodes it; in both arithmetics, so they stay as close as without rotation.

Both share: compute dtype = the dtype of the Linear being replaced (BF16 for Wan2.2 block linears);
the mask m is rounded to it once; W / m and x * m are computed in it (torch computes in float32 and
rounds once to the dtype), and both sides use the same rounded m, so x * m and W / m cancel exactly up
to that rounding. HiF4 rounds its input to BF16 first anyway (spec/hifloat4.md 3.1).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hif4fmt.codec import integer
from hif4fmt.codec.rotation import ROTATION_SIZE, rotate_torch
from hif4fmt.constants import ROTATION_HADAMARD64
from hif4fmt.errors import CodecError, RuntimeLoadError
from hif4fmt import hifloat4
from hif4fmt.hifloat4 import HiF4Tensor, dequantize, fake_quantize, fake_quantize_scaled, quantize, quantize_divided

ARITHMETICS = ("integer", "simulated")  # how HiF4Linear computes its product (module docstring)


def check_rotation(rotation: str | None, in_features: int, name: str = "") -> str | None:
    """Return ``rotation`` checked: None (identity) or ROTATION_HADAMARD64 with whole 64-element units.

    Raises ``RuntimeLoadError`` naming the layer ``name`` for another value or in_features not a
    multiple of 64 (the rotation acts inside whole HiF4 units).
    """
    if rotation is None:
        return None
    if rotation != ROTATION_HADAMARD64:
        raise RuntimeLoadError(f"layer {name}: rotation {rotation!r} is not known to this runtime "
                               f"(expected {ROTATION_HADAMARD64!r} or none); upgrade the runtime or rebuild the state")
    if in_features % ROTATION_SIZE:
        raise RuntimeLoadError(f"layer {name}: rotation {rotation!r} needs in_features a multiple of "
                               f"{ROTATION_SIZE}, the layer has {in_features}; rebuild the state without rotation")
    return rotation


def rotated(values: torch.Tensor) -> torch.Tensor:
    """Return ``values`` (..., K) rotated by R = blockdiag(H64 / 8) along K, in float32 (fixed butterfly order)."""
    return rotate_torch(values.to(torch.float32))


def default_arithmetic(device: torch.device | str) -> str:
    """Return "integer" where a compiled integer product exists for ``device`` (CPU kernel, Triton), else "simulated"."""
    return "integer" if integer.has_fast_product(device) else "simulated"


def resolve_arithmetic(arithmetic: str | None, device: torch.device | str) -> str:
    """Return ``arithmetic`` checked (one of ARITHMETICS), or the device's default for None or "auto"."""
    if arithmetic is None or arithmetic == "auto":
        return default_arithmetic(device)
    if arithmetic not in ARITHMETICS:
        raise RuntimeLoadError(f"arithmetic {arithmetic!r}: expected one of {', '.join(ARITHMETICS)} (or auto)")
    return arithmetic


class HiF4Linear(nn.Module):
    """A linear layer with packed HiF4 weights and HiF4 activations; forward returns (..., out_features).

    Buffers (not saved in state dicts; they are rebuilt from the base and the .hif4 state):
      weight_codes  uint8 (out_features, Kpad // 2)       two 4-bit element codes per byte
      weight_meta   uint8 (out_features, Kpad // 64 * 4)  one 32-bit scale word per 64-element unit
      mask          compute dtype (in_features,)           the per-input-channel mask m, rounded
    ``bias`` is the replaced layer's bias Parameter (unchanged), or None. ``arithmetic``: one of
    ARITHMETICS (default: the device's, ``default_arithmetic``); it may be changed later. ``rotation``:
    None, or ROTATION_HADAMARD64 when ``packed_weight`` holds HiF4(R(W / m)) (``pack_weight(...,
    rotation=)``); forward then rotates x * m the same way.
    """

    def __init__(self, packed_weight: HiF4Tensor, mask: torch.Tensor, bias: torch.Tensor | None, name: str = "",
                 arithmetic: str | None = None, rotation: str | None = None):
        super().__init__()
        self.arithmetic = resolve_arithmetic(arithmetic, packed_weight.device)
        self.rotation = check_rotation(rotation, packed_weight.shape[-1], name)
        self._weight_operand = None  # the weight's int8 form, kept for the GPU paths (made on first use)
        out_features, in_features = packed_weight.shape
        self.in_features = in_features
        self.out_features = out_features
        self.encoder = packed_weight.encoder
        self.weight_pad = packed_weight.pad
        self.layer_name = name
        self.register_buffer("weight_codes", packed_weight.codes, persistent=False)
        self.register_buffer("weight_meta", packed_weight.meta, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        if bias is None:
            self.bias = None
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: np.ndarray, encoder: str = "toolkit", name: str = "", *,
                    arithmetic: str | None = None, rotation: str | None = None) -> "HiF4Linear":
        """Return a HiF4Linear holding HiF4(W / m) packed (HiF4(R(W / m)) with ``rotation``), from ``linear``.

        The compute dtype is ``linear.weight.dtype``; the packed weight lives on ``linear.weight.device``.
        ``arithmetic``: "integer" or "simulated" (module docstring); None: "integer" where a compiled
        integer product exists for that device, else "simulated".
        Raises ``RuntimeLoadError`` naming ``name`` if the mask is not finite and positive in that dtype,
        the weight cannot be quantized (NaN), ``arithmetic`` is unknown or ``rotation`` does not apply
        (``check_rotation``). ``mask``: float32 (in_features,).
        """
        arithmetic = resolve_arithmetic(arithmetic, linear.weight.device)
        packed, mask_tensor = pack_weight(linear.weight, mask, encoder, name, rotation=rotation)
        return cls(packed, mask_tensor, linear.bias, name, arithmetic, rotation)

    @property
    def packed_weight(self) -> HiF4Tensor:
        """Return the packed HiF4(W / m) as a HiF4Tensor of shape (out_features, in_features)."""
        return HiF4Tensor(self.weight_codes, self.weight_meta, (self.out_features, self.in_features),
                          self.weight_pad, self.encoder)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Return the dtype the layer computes in (that of the replaced nn.Linear)."""
        return self.mask.dtype

    @property
    def weight_nbytes(self) -> int:
        """Return the bytes held by the packed weight (codes + metadata)."""
        return self.weight_codes.numel() + self.weight_meta.numel()

    def dequantized_weight(self) -> torch.Tensor:
        """Return HiF4(W / m) (HiF4(R(W / m)) when rotated) as a (out_features, in_features) compute-dtype tensor."""
        return dequantize(self.packed_weight, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return HiF4(x * m) @ HiF4(W / m).T + b (R(.) inside HiF4 when rotated), (..., out_features), compute dtype."""
        if self.rotation is not None:
            x_r = rotated(x * self.mask)  # R(x * m): x * m in the compute dtype (as unrotated), rotated in float32
            if self.arithmetic == "integer":
                return hifloat4.linear(x_r, self.packed_weight, self.bias, out_dtype=self.compute_dtype,
                                       weight_operand=self._integer_weight())
            x_q = fake_quantize(x_r, encoder=self.encoder).to(self.compute_dtype)  # HiF4 values are exact in BF16
            return F.linear(x_q, self.dequantized_weight(), self.bias)
        if self.arithmetic == "integer":
            return hifloat4.linear(x, self.packed_weight, self.bias, multiplier=self.mask,
                                   out_dtype=self.compute_dtype, weight_operand=self._integer_weight())
        x_q = fake_quantize_scaled(x, self.mask, encoder=self.encoder)  # HiF4(x * m)
        return F.linear(x_q, self.dequantized_weight(), self.bias)  # the toolkit's QLinear: bias in the one rounding

    def _integer_weight(self):
        """Return the weight's int8 operand on GPU-like devices (kept, remade after a move), None on the CPU kernel."""
        if integer.product_path(self.weight_codes.device) == "kernel":
            return None  # the CPU kernel decodes the packed weight block by block itself
        operand = self._weight_operand
        if operand is None or operand.q.device != self.weight_codes.device:
            operand = self._weight_operand = integer.expand(self.packed_weight)
        return operand

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"encoder={self.encoder}, dtype={self.compute_dtype}, arithmetic={self.arithmetic}, "
                f"rotation={self.rotation}, "
                f"packed_bytes={self.weight_nbytes}")


def pack_weight(weight: torch.Tensor, mask: np.ndarray, encoder: str = "toolkit", name: str = "",
                device: torch.device | str | None = None, rotation: str | None = None
                ) -> tuple[HiF4Tensor, torch.Tensor]:
    """Return (HiF4(W / m) packed, m rounded to the compute dtype) for a linear ``weight`` (out, in).

    With ``rotation`` (ROTATION_HADAMARD64) the packed weight is HiF4(R(W / m)): W / m in the compute
    dtype (as unrotated), rotated in float32 along in_features, then HiF4 (which rounds it to BF16).

    Tensors only, no module is made or changed (the loader packs before it swaps). The compute dtype is ``weight.dtype``; both results live on ``device``
    (default: the weight's). Raises ``RuntimeLoadError`` naming ``name`` for a mask of the wrong shape,
    a mask that is not finite and positive in the compute dtype, or a weight that cannot be quantized (NaN).
    """
    weight = weight.detach().to(device) if device is not None else weight.detach()
    mask_tensor = rounded_mask(mask, weight.shape[-1], weight.dtype, weight.device, name)
    rotation = check_rotation(rotation, weight.shape[-1], name)
    try:
        if rotation is not None:
            packed = quantize(rotated(weight / mask_tensor), encoder=encoder)  # HiF4(R(W / m))
        else:
            packed = quantize_divided(weight, mask_tensor, encoder=encoder)  # HiF4(W / m), columns / m_i
    except CodecError as exc:
        raise RuntimeLoadError(f"layer {name}: cannot quantize W / m: {exc}") from None
    return packed, mask_tensor


def rounded_mask(mask: np.ndarray, in_features: int, dtype: torch.dtype, device: torch.device | str, name: str = ""
                 ) -> torch.Tensor:
    """Return float32 ``mask`` as a ``dtype`` tensor on ``device``, checked: shape (in_features,), finite, > 0.

    Raises ``RuntimeLoadError`` naming the layer ``name`` and the first bad channel otherwise.
    """
    mask_values = np.asarray(mask)
    if mask_values.shape != (in_features,):
        raise RuntimeLoadError(f"layer {name}: mask shape {mask_values.shape} does not match in_features "
                               f"({in_features},); the state was built for another model")
    mask_tensor = torch.from_numpy(np.ascontiguousarray(mask_values, dtype=np.float32)).to(device, dtype)
    bad = ~(torch.isfinite(mask_tensor) & (mask_tensor > 0))
    if bool(bad.any()):
        channel = int(bad.nonzero()[0])
        raise RuntimeLoadError(
            f"layer {name}: mask[{channel}] = {float(mask_values[channel])!r} is not a finite positive {dtype} "
            "value; rebuild the state (a mask must be > 0 and representable in the model dtype)")
    return mask_tensor
