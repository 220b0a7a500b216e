"""HiF4 codec: golden vectors, every representable value, packing, edge cases, API contracts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from codec_support import every_bf16_value
from hif4fmt.codec import reference
from hif4fmt.codec.format import HIF4, MAGNITUDE_VALUES, ea_code_value
from hif4fmt.errors import CodecError, NonFiniteInputError, UnknownEncoderError
from hif4fmt.hifloat4 import HiF4Tensor, dequantize, fake_quantize, quantize

VECTORS_PATH = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "hifloat4-v1.json"
VECTORS = json.loads(VECTORS_PATH.read_text())
ENCODERS = ("toolkit", "ascend")
SATURATED = 1.75 * 4 * 49152  # largest magnitude: c = 7, Eb = Ec = 1, sf = 49152


def bf16_from_hex(words: list[str]) -> torch.Tensor:
    bits = torch.tensor([int(w, 16) for w in words], dtype=torch.int32) << 16
    return bits.view(torch.float32).to(torch.bfloat16)


def bits16(t: torch.Tensor) -> list[str]:
    return [f"{int(b) & 0xFFFF:04x}" for b in t.to(torch.bfloat16).view(torch.int16)]


def one_unit(element_codes: list[int], ea: int = 0xC0, eb: int = 0, ec: int = 0) -> HiF4Tensor:
    """A packed (1, 64) HiF4Tensor with the given element codes (rest 0) and metadata bytes."""
    nibbles = element_codes + [0] * (HIF4.unit - len(element_codes))
    codes = bytes(nibbles[i] | (nibbles[i + 1] << 4) for i in range(0, HIF4.unit, 2))
    meta = bytes([ea, eb, ec & 0xFF, ec >> 8])
    return HiF4Tensor(torch.tensor(list(codes), dtype=torch.uint8).view(1, 32),
                      torch.tensor(list(meta), dtype=torch.uint8).view(1, 4), (1, 64), 0)


# --- golden vectors --------------------------------------------------------------------------------

@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("case", VECTORS["cases"], ids=[c["name"] for c in VECTORS["cases"]])
def test_codec_reproduces_golden_vector_bytes_and_values(case, encoder):
    x = bf16_from_hex(case["input_bf16"]).view(1, -1)
    expected = case["expected"][encoder]
    q = quantize(x, encoder)
    assert q.codes.numpy().tobytes().hex() == expected["elements"]
    assert q.meta.numpy().tobytes().hex() == expected["meta"]
    assert bits16(dequantize(q).view(-1)) == expected["dequantized_bf16"]
    assert bits16(fake_quantize(x, encoder).view(-1)) == expected["dequantized_bf16"]


@pytest.mark.parametrize("case", VECTORS["cases"], ids=[c["name"] for c in VECTORS["cases"]])
def test_reference_decoder_reproduces_golden_values(case):
    for encoder in ENCODERS:
        expected = case["expected"][encoder]
        decoded = reference.dequantize_units(np.frombuffer(bytes.fromhex(expected["elements"]), np.uint8),
                                             np.frombuffer(bytes.fromhex(expected["meta"]), np.uint8))
        k = case["shape"][0]
        got = (decoded.reshape(-1)[:k].view(np.uint32) >> 16).astype(np.uint16)
        assert [f"{b:04x}" for b in got] == expected["dequantized_bf16"]


def test_golden_vectors_cover_every_element_code_for_both_encoders():
    for encoder in ENCODERS:
        seen = set()
        for case in VECTORS["cases"]:
            for byte in bytes.fromhex(case["expected"][encoder]["elements"]):
                seen.update((byte & 0xF, byte >> 4))
        assert seen == set(range(16)), encoder


def test_golden_vectors_include_units_where_encoders_differ():
    differ = [c for c in VECTORS["cases"] if c["expected"]["toolkit"] != c["expected"]["ascend"]]
    assert len(differ) >= 5  # ties, carry, and the searched N(0,1) units


# --- hand-worked values ------------------------------------------------------------------------------

@pytest.mark.parametrize("code", range(16))
def test_every_element_code_decodes_to_its_value(code):
    value = dequantize(one_unit([code]), torch.float32)[0, 0].item()
    magnitude = MAGNITUDE_VALUES[code & 7]
    assert abs(value) == magnitude
    assert math.copysign(1.0, value) == (-1.0 if code & 8 else 1.0)  # -0 (code 0x8) keeps its sign


@pytest.mark.parametrize("code", range(0xFF))
def test_every_ea_code_decodes_to_its_e6m2_value(code):
    # element code 4 (= 1.0) times the unit scale is the scale itself
    value = dequantize(one_unit([4], ea=code), torch.float32)[0, 0].item()
    exponent, mantissa = code >> 2, code & 3
    assert value == (1 + mantissa / 4) * 2.0 ** (exponent - 48) == ea_code_value(code)


def test_reserved_ea_code_0xff_is_rejected_on_decode():
    with pytest.raises(CodecError, match="reserved Ea code 0xFF at row 0, unit 0"):
        dequantize(one_unit([1], ea=0xFF))


def test_eb_and_ec_bits_scale_their_own_groups_lsb_first():
    # element 8 is in Eb group 1 and Ec group 2; element 60 in Eb group 7 and Ec group 15
    q = one_unit([0] * 8 + [4] + [0] * 51 + [4], ea=0xC0, eb=0b1000_0010, ec=(1 << 2) | (1 << 15))
    values = dequantize(q, torch.float32)[0]
    assert values[8].item() == 4.0 and values[60].item() == 4.0


def test_toolkit_rounds_ties_away_from_zero_and_ascend_to_even():
    # sf = 1 (max 7 in Eb/Ec group 0); element 8 = 0.125 is half a code step
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    x[0, 0], x[0, 8], x[0, 9] = 7.0, 0.125, 0.375
    toolkit, ascend = fake_quantize(x, "toolkit")[0], fake_quantize(x, "ascend")[0]
    assert (toolkit[8].item(), toolkit[9].item()) == (0.25, 0.5)
    assert (ascend[8].item(), ascend[9].item()) == (0.0, 0.5)


def test_negative_zero_and_tiny_negatives_keep_the_sign_bit():
    x = torch.tensor([[1.0, -0.0, -1e-4, 0.0] + [0.0] * 60], dtype=torch.float32)
    y = fake_quantize(x)
    assert torch.signbit(y[0, :4]).tolist() == [False, True, True, False]
    assert (y[0, 1:4] == 0).all()


def test_infinity_saturates_and_zeroes_the_rest_of_its_unit():
    x = torch.zeros(1, 64)
    x[0, :4] = torch.tensor([float("inf"), -float("inf"), 1.0, -5.0])
    y = fake_quantize(x, "toolkit")
    assert y[0, :2].tolist() == [SATURATED, -SATURATED]
    assert (y[0, 2:] == 0).all()


def test_nan_poisons_its_unit_in_fake_quantize_and_is_refused_by_quantize():
    x = torch.randn(2, 128)
    x[1, 70] = float("nan")
    y = fake_quantize(x)
    assert torch.isnan(y[1, 64:]).all() and not torch.isnan(y[1, :64]).any() and not torch.isnan(y[0]).any()
    with pytest.raises(NonFiniteInputError, match="row 1, element 70 \\(unit 1\\)"):
        quantize(x)


def test_all_zero_unit_decodes_to_zeros_on_the_smallest_scale():
    q = quantize(torch.zeros(3, 64))
    assert (q.codes == 0).all() and (q.meta.view(3, 4)[:, 0] == 0).all()
    assert (dequantize(q) == 0).all()


def test_tiny_unit_keeps_its_elements_on_the_2_pow_minus_48_scale():
    x = torch.zeros(1, 64)
    x[0, :2] = torch.tensor([3 * 2.0**-48, 2.0**-48])
    assert fake_quantize(x)[0, :2].tolist() == [3 * 2.0**-48, 2.0**-48]


# --- agreement with the spec-literal reference ----------------------------------------------------------

def _distributions(rows: int, cols: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    row_scale = torch.exp(torch.randn(rows, 1, generator=g) * 8)
    return {
        "gaussian": torch.randn(rows, cols, generator=g),
        "student_t3": torch.distributions.StudentT(3.0).sample((rows, cols)),
        "row_scaled_wide_range": torch.randn(rows, cols, generator=g) * row_scale,
        "sparse_with_outliers": torch.where(torch.rand(rows, cols, generator=g) < 0.9, 0.0,
                                            torch.randn(rows, cols, generator=g) * 50),
    }


@pytest.mark.parametrize("encoder", ENCODERS)
def test_fast_codec_matches_spec_literal_reference(encoder):
    for name, x in _distributions(96, 320).items():
        x = x.to(torch.bfloat16)
        q = quantize(x, encoder)
        elements, meta = reference.quantize_units(x.float().numpy(), encoder)
        assert np.array_equal(q.codes.numpy().reshape(-1, 32), elements), name
        assert np.array_equal(q.meta.numpy().reshape(-1, 4), meta), name


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fake_quantize_equals_dequantize_of_quantize_bit_for_bit(encoder, dtype):
    for name, x in _distributions(64, 200).items():
        x = x.clamp(-6e4, 6e4).to(dtype)
        fused = fake_quantize(x, encoder)
        packed = dequantize(quantize(x, encoder), dtype)
        assert fused.dtype == dtype and fused.shape == x.shape
        assert torch.equal(fused.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32),
                           packed.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32)), name


def test_input_is_rounded_to_bf16_first():
    x = torch.randn(8, 128, dtype=torch.float32)
    assert torch.equal(fake_quantize(x), fake_quantize(x.to(torch.bfloat16)).to(torch.float32))


# --- round trips and packing --------------------------------------------------------------------------------

@pytest.mark.parametrize("encoder", ENCODERS)
def test_requantizing_decoded_values_is_a_fixed_point_after_one_pass(encoder):
    # spec 5.6: a first re-encode may change a unit (r = bf16(1/sf) is not the exact reciprocal);
    # the bytes it yields then survive dequantize -> quantize unchanged.
    for name, x in _distributions(64, 256).items():
        settled = quantize(dequantize(quantize(x.to(torch.bfloat16), encoder)), encoder)
        again = quantize(dequantize(settled), encoder)
        assert torch.equal(again.codes, settled.codes) and torch.equal(again.meta, settled.meta), name


def test_packed_bytes_survive_decode_for_every_nibble_and_bit_pattern():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (50, 32), dtype=torch.uint8, generator=g)
    meta = torch.randint(0, 256, (50, 4), dtype=torch.uint8, generator=g)
    meta[:, 0] = torch.randint(0, 0xFF, (50,), dtype=torch.uint8, generator=g)  # not the reserved code
    q = HiF4Tensor(codes, meta, (50, 64), 0)
    got = dequantize(q, torch.float32).numpy()
    want = reference.dequantize_units(codes.numpy(), meta.numpy())
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("k", [1, 63, 64, 65, 100, 1000])
def test_padding_is_zero_and_stripped_for_any_last_dim(k):
    x = torch.randn(3, 2, k, dtype=torch.bfloat16)
    q = quantize(x)
    pad = (-k) % 64
    assert q.pad == pad and q.shape == (3, 2, k)
    assert q.codes.shape == (3, 2, (k + pad) // 2) and q.meta.shape == (3, 2, (k + pad) // 64 * 4)
    if pad:
        last_unit = q.codes.view(-1, (k + pad) // 2)[:, k // 2 + 1:]
        assert (last_unit == 0).all() if k % 2 == 0 else True
    assert dequantize(q).shape == x.shape
    assert torch.equal(dequantize(q), fake_quantize(x))


def test_packed_size_is_four_and_a_half_bits_per_value():
    q = quantize(torch.randn(128, 4096))
    assert q.nbytes * 8 / (128 * 4096) == HIF4.bits_per_value == 4.5


def test_chunked_work_gives_the_same_bits_as_one_chunk(monkeypatch):
    import hif4fmt.hifloat4 as api
    x = torch.randn(37, 640, dtype=torch.bfloat16)
    whole = api.fake_quantize(x)
    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 640 * 3)
    assert torch.equal(api.fake_quantize(x), whole)
    assert torch.equal(api.quantize(x).codes, quantize(x).codes)


# --- API contracts and bad input ---------------------------------------------------------------------------

def test_package_exports_codec_names_lazily():
    import hif4fmt
    assert hif4fmt.quantize is quantize and hif4fmt.fake_quantize is fake_quantize


def test_unknown_encoder_is_a_typed_error():
    with pytest.raises(UnknownEncoderError, match="'nvfp4'.*ascend, toolkit"):
        fake_quantize(torch.ones(64), encoder="nvfp4")


@pytest.mark.parametrize("bad", [torch.ones(64, dtype=torch.int32), torch.tensor(1.0), [1.0, 2.0]])
def test_bad_input_is_a_typed_codec_error(bad):
    with pytest.raises(CodecError):
        fake_quantize(bad)


def test_malformed_hif4tensor_is_rejected():
    with pytest.raises(CodecError, match="codes: expected shape"):
        HiF4Tensor(torch.zeros(1, 31, dtype=torch.uint8), torch.zeros(1, 4, dtype=torch.uint8), (1, 64), 0)
    with pytest.raises(CodecError, match="pad"):
        HiF4Tensor(torch.zeros(1, 32, dtype=torch.uint8), torch.zeros(1, 4, dtype=torch.uint8), (1, 60), 0)


def test_gaussian_mse_matches_the_published_figure():
    x = torch.randn(512, 2048, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).float()
    mse = ((fake_quantize(x) - x) ** 2).mean().item()
    assert 6.6e-3 < mse < 7.2e-3  # toolkit encoder on N(0,1): about 6.9e-3 (HIFLOAT4.md)


# --- the bit-pattern fast path (hif4fmt.codec.swar) must give the same bits as the general path ---------

@pytest.fixture(params=["kernel", "swar"])
def fast_path(request, monkeypatch) -> str:
    """Run quantize's toolkit encoder through one fast implementation: the compiled kernel or the SWAR path."""
    import hif4fmt.hifloat4 as api
    from hif4fmt.codec import kernel

    if request.param == "kernel" and not kernel.enabled():
        if os.environ.get("HIF4FMT_REQUIRE_KERNEL") == "1":
            pytest.fail(f"HIF4FMT_REQUIRE_KERNEL=1 but kernel: {kernel.status()}")
        pytest.skip(f"kernel: {kernel.status()}")
    monkeypatch.setattr(api, "_quantize_path",
                        lambda encoder, device: request.param if encoder == "toolkit" else "general")
    return request.param


def _use_general_path(monkeypatch) -> None:
    import hif4fmt.hifloat4 as api
    monkeypatch.setattr(api, "_quantize_path", lambda encoder, device: "general")


def _extreme_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    cases = {f"unit_scale_2^{e}": torch.randn(16, 256, generator=g) * 2.0**e
             for e in (-140, -133, -126, -60, -50, -48, -20, 0, 14, 15, 16, 18, 60, 120, 126, 127)}
    units = torch.randn(32, 512, generator=g)
    unit_exponents = torch.randint(-150, 128, (32, 8, 1), generator=g).float()
    cases["scale_per_unit"] = (units.view(32, 8, 64) * torch.exp2(unit_exponents)).view(32, 512)
    grid = torch.randint(0, 64, (32, 256), generator=g).float() / 8  # ties of every code step
    cases["ties"] = grid * torch.where(torch.rand(32, 256, generator=g) < 0.5, -1.0, 1.0)
    zeros = torch.randn(32, 256, generator=g)
    zeros[zeros.abs() < 0.7] = 0.0
    zeros[::3, ::5] = -0.0
    cases["zeros_and_negative_zeros"] = zeros
    infinite = torch.randn(8, 256, generator=g)
    infinite[1, 3], infinite[2, 70], infinite[5] = float("inf"), -float("inf"), float("inf")
    cases["infinities"] = infinite
    return cases


@pytest.mark.parametrize("shuffle_seed", [None, 0, 1])
def test_fast_toolkit_path_matches_spec_reference_on_every_bf16_value(shuffle_seed, fast_path):
    # sorted: each unit spans a narrow range, so every unit scale occurs, clamps and subnormals included;
    # shuffled: units mixing wide ranges (most elements far below their unit's maximum)
    x = every_bf16_value(shuffle_seed)
    q = quantize(x)
    elements, meta = reference.quantize_units(x.float().numpy(), "toolkit")
    assert np.array_equal(q.codes.numpy().reshape(-1, 32), elements)
    assert np.array_equal(q.meta.numpy().reshape(-1, 4), meta)
    assert torch.equal(fake_quantize(x).view(torch.int16), dequantize(q).view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fast_and_general_paths_agree_bit_for_bit_on_extreme_inputs(monkeypatch, dtype, fast_path):
    inputs = {name: x.clamp(-6e4, 6e4).to(dtype) if dtype == torch.float16 else x.to(dtype)
              for name, x in _extreme_inputs().items()}
    fast = {name: (quantize(x), fake_quantize(x)) for name, x in inputs.items()}
    _use_general_path(monkeypatch)
    int_view = torch.int32 if dtype == torch.float32 else torch.int16
    for name, x in inputs.items():
        packed, fused = quantize(x), fake_quantize(x)
        assert torch.equal(fast[name][0].codes, packed.codes) and torch.equal(fast[name][0].meta, packed.meta), name
        assert torch.equal(fast[name][1].view(int_view), fused.view(int_view)), name


def test_fast_path_blocks_and_chunks_give_the_same_bits_as_one_pass(monkeypatch):
    import hif4fmt.hifloat4 as api
    monkeypatch.setattr(api, "_quantize_path", lambda encoder, device: "swar")  # the path that works in blocks
    x = torch.randn(37, 640, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    whole_q, whole_f = api.quantize(x), api.fake_quantize(x)
    monkeypatch.setattr(api, "BLOCK_ELEMENTS", 640 * 5)  # 8 blocks, the last one partial
    monkeypatch.setattr(api, "CHUNK_ELEMENTS", 640 * 2)  # 3 chunks per block
    q = api.quantize(x)
    assert torch.equal(q.codes, whole_q.codes) and torch.equal(q.meta, whole_q.meta)
    assert torch.equal(api.fake_quantize(x), whole_f) and torch.equal(api.dequantize(q), whole_f)


def test_nan_in_one_block_uses_the_general_path_for_that_block_only(monkeypatch):
    import hif4fmt.hifloat4 as api
    monkeypatch.setattr(api, "_quantize_path", lambda encoder, device: "swar")  # the path that works in blocks
    monkeypatch.setattr(api, "BLOCK_ELEMENTS", 128 * 4)
    x = torch.randn(12, 128, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    clean = api.fake_quantize(x)
    x[9, 100] = float("nan")  # block 2 (rows 8-11), unit 1 of row 9
    y = api.fake_quantize(x)
    assert torch.isnan(y[9, 64:]).all() and torch.isnan(y).sum() == 64
    nan_unit = torch.zeros_like(x, dtype=torch.bool)
    nan_unit[9, 64:] = True
    assert torch.equal(y[~nan_unit], clean[~nan_unit])
    with pytest.raises(NonFiniteInputError, match="row 9, element 100 \\(unit 1\\)"):
        api.quantize(x)


def test_decode_table_gives_every_code_byte_its_two_signed_codes():
    from hif4fmt.codec.swar import CODE_PAIR_VALUES
    lanes = CODE_PAIR_VALUES.view(torch.bfloat16).view(256, 2).float()
    for byte in range(256):
        for lane, nibble in enumerate((byte & 0xF, byte >> 4)):
            value = lanes[byte, lane].item()
            assert abs(value) == nibble & 7
            assert math.copysign(1.0, value) == (-1.0 if nibble & 8 else 1.0), (byte, lane)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_to_half_types_rounds_the_exact_float32_values(dtype):
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(0, 256, (40, 96), dtype=torch.uint8, generator=g)
    meta = torch.randint(0, 256, (40, 12), dtype=torch.uint8, generator=g)
    meta.view(40, 3, 4)[..., 0] = torch.randint(0, 0xFF, (40, 3), dtype=torch.uint8, generator=g)  # not reserved
    q = HiF4Tensor(codes, meta, (40, 192), 0)
    exact = dequantize(q, torch.float32)
    assert torch.isinf(exact.to(torch.float16)).any() and (exact.abs() < 2.0**-24).logical_and(exact != 0).any()
    assert torch.equal(dequantize(q, dtype).view(torch.int16), exact.to(dtype).view(torch.int16))


def test_byte_order_free_decoder_gives_the_same_values_as_the_bit_pattern_decoder(monkeypatch):
    from hif4fmt.codec import swar
    g = torch.Generator().manual_seed(9)
    codes = torch.randint(0, 256, (30, 96), dtype=torch.uint8, generator=g)
    meta = torch.randint(0, 256, (30, 12), dtype=torch.uint8, generator=g)
    meta.view(30, 3, 4)[..., 0] = torch.randint(0, 0xFF, (30, 3), dtype=torch.uint8, generator=g)
    q = HiF4Tensor(codes, meta, (30, 190), 2)
    import hif4fmt.hifloat4 as api
    from hif4fmt.codec import kernel
    monkeypatch.setattr(kernel, "enabled", lambda: False)  # compare the two torch decoders
    fast = {dtype: dequantize(q, dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    assert api._dequantize_path(q.device) == "swar"
    monkeypatch.setattr(swar, "LITTLE_ENDIAN", False)  # what a big-endian host runs
    assert api._dequantize_path(q.device) == "general"
    for dtype, values in fast.items():
        int_view = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(dequantize(q, dtype).view(int_view), values.view(int_view)), dtype
    meta[7, 4] = 0xFF
    with pytest.raises(CodecError, match="reserved Ea code 0xFF at row 7, unit 1"):
        dequantize(q)


@pytest.mark.parametrize("shape", [(5, 0), (0, 64), (2, 0, 64), (0, 100)])
def test_empty_tensors_round_trip_with_their_shapes(shape):
    x = torch.zeros(shape, dtype=torch.bfloat16)
    q = quantize(x)
    padded = shape[-1] + (-shape[-1]) % 64
    assert tuple(q.codes.shape) == (*shape[:-1], padded // 2) and tuple(q.meta.shape) == (*shape[:-1], padded // 16)
    assert tuple(dequantize(q).shape) == shape and tuple(fake_quantize(x).shape) == shape


def test_quantize_divided_writes_into_caller_buffers_and_checks_them():
    from hif4fmt.hifloat4 import packed_shapes, quantize_divided

    x = torch.randn(6, 100, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    m = torch.rand(100, generator=torch.Generator().manual_seed(3)).add(0.5).to(torch.bfloat16)
    codes_shape, meta_shape = packed_shapes(tuple(x.shape))
    arena = torch.full((4096,), 0xAA, dtype=torch.uint8)
    codes = arena[64: 64 + 6 * 64].view(codes_shape)
    meta = arena[1024: 1024 + 6 * 8].view(meta_shape)
    q = quantize_divided(x, m, out=(codes, meta))
    expected = quantize(x / m)
    assert q.codes.data_ptr() == codes.data_ptr() and q.meta.data_ptr() == meta.data_ptr()
    assert torch.equal(q.codes, expected.codes) and torch.equal(q.meta, expected.meta)
    assert (arena[:64] == 0xAA).all() and (arena[64 + 6 * 64: 1024] == 0xAA).all()  # nothing outside written
    with pytest.raises(CodecError, match="out codes: expected a contiguous uint8 tensor of shape \\(6, 64\\)"):
        quantize_divided(x, m, out=(torch.empty(6, 63, dtype=torch.uint8), meta))
    with pytest.raises(CodecError, match="out: expected a \\(codes, meta\\) pair"):
        quantize_divided(x, m, out=codes)
