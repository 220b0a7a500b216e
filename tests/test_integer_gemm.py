"""The integer HiF4 product (spec/hifloat4.md 8): exact per unit, identical bits on every implementation.

``matmul``/``linear`` compute dequantize(a) @ dequantize(b).T as int8 dot products per 64-element unit
with one float32 rescale per unit, summed in unit order. These tests check it against float64 of the
dequantized operands (exact where a single unit is involved, within the float32 summation bound
otherwise), check that the C kernel's instruction-set copies, the torch reference and the Triton
kernel (interpreted, on the CPU) give the same bits, and check the fused activation path against
``quantize``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hif4fmt.hifloat4 as api  # noqa: E402
from hif4fmt.codec import integer, kernel  # noqa: E402
from hif4fmt.errors import CodecError  # noqa: E402

REQUIRED = os.environ.get("HIF4FMT_REQUIRE_KERNEL") == "1"
needs_kernel = pytest.mark.skipif(not kernel.enabled() and not REQUIRED, reason=f"kernel: {kernel.status()}")
F32_UNIT_ROUNDOFF = 2.0**-24


def _dequantized64(q: api.HiF4Tensor) -> torch.Tensor:
    return api.dequantize(q, torch.float32).double()


def _summation_bound(a: api.HiF4Tensor, b: api.HiF4Tensor) -> torch.Tensor:
    """Return the float32 summation bound U * 2^-24 * (|A| @ |B|.T): every unit term is exact, U adds round."""
    units = (a.shape[-1] + a.pad) // 64
    return units * F32_UNIT_ROUNDOFF * (_dequantized64(a).abs() @ _dequantized64(b).abs().T)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t.contiguous().view(torch.int16)


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Return whether x and y are NaN at the same places and bit-identical elsewhere (NaN payloads may differ)."""
    nan = torch.isnan(x)
    return torch.equal(nan, torch.isnan(y)) and torch.equal(_bits(x)[~nan], _bits(y)[~nan])


def _heavy_tailed(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(torch.tensor(2.0)).sample(shape)  # df 2: outliers of 100x and more
    columns = torch.exp2(torch.randn(shape[-1], generator=g) * 4)  # channels across 2^-12 .. 2^12
    return (t * columns).to(torch.bfloat16)


def _packed_with_codes(codes: list[int], eb_ec: list[tuple[int, int]], ea: list[int]) -> api.HiF4Tensor:
    """Return a (R, 64) HiF4Tensor whose row r holds element code codes[r] at element 0 (others +0),
    Eb/Ec bits eb_ec[r] for that element's groups and the unit scale code ea[r]."""
    rows = len(codes)
    packed_codes = torch.zeros(rows, 32, dtype=torch.uint8)
    meta = torch.zeros(rows, 4, dtype=torch.uint8)
    for r in range(rows):
        packed_codes[r, 0] = codes[r]
        meta[r, 0] = ea[r]
        meta[r, 1] = eb_ec[r][0]  # Eb group 0: elements 0..7
        meta[r, 2] = eb_ec[r][1]  # Ec group 0: elements 0..3
    return api.HiF4Tensor(packed_codes, meta, (rows, 64), 0)


def test_every_element_code_pair_multiplies_exactly():
    # 16 element codes x the 4 Eb/Ec combinations on each side: every q value pair, each output one unit term
    combos = [(code, bits) for code in range(16) for bits in ((0, 0), (1, 0), (0, 1), (1, 1))]
    rng = np.random.default_rng(0)
    a = _packed_with_codes([c for c, _ in combos], [b for _, b in combos], rng.integers(0, 255, len(combos)).tolist())
    b = _packed_with_codes([c for c, _ in combos], [b for _, b in combos], rng.integers(0, 255, len(combos)).tolist())
    expected = _dequantized64(a) @ _dequantized64(b).T  # a single product: exact in float32
    out = api.matmul(a, b)
    assert out.dtype == torch.float32 and out.shape == (64, 64)
    assert torch.equal(out.double(), expected)
    values = {float(v) for v in (integer.expand(a).q[:, 0]).tolist()}
    assert values == {float(v) for v in (0, *range(1, 9), 10, 12, 14, 16, 20, 24, 28)} | {
        -float(v) for v in (*range(1, 9), 10, 12, 14, 16, 20, 24, 28)}


@pytest.mark.parametrize("m, k, n", [(1, 64, 1), (1, 100, 37), (9, 640, 64), (33, 1000, 129), (700, 192, 40),
                                     (3, 5120, 96)])
@pytest.mark.parametrize("data", ["gaussian", "heavy"])
def test_matmul_is_within_the_float32_summation_bound_of_float64(m, k, n, data):
    if data == "gaussian":
        g = torch.Generator().manual_seed(m + k + n)
        x, w = torch.randn(m, k, generator=g).to(torch.bfloat16), torch.randn(n, k, generator=g).to(torch.bfloat16)
    else:
        x, w = _heavy_tailed((m, k), 1), _heavy_tailed((n, k), 2)
    a, b = api.quantize(x), api.quantize(w)
    expected = _dequantized64(a) @ _dequantized64(b).T
    out = api.matmul(a, b)
    error = (out.double() - expected).abs()
    assert bool((error <= _summation_bound(a, b)).all()), float((error - _summation_bound(a, b)).max())
    if (k + a.pad) // 64 == 1:
        assert torch.equal(out.double(), expected)  # one unit: exact


def test_matmul_keeps_leading_axes_and_rounds_once_to_the_output_dtype():
    g = torch.Generator().manual_seed(3)
    a = api.quantize(torch.randn(2, 3, 200, generator=g))
    b = api.quantize(torch.randn(50, 200, generator=g))
    f32 = api.matmul(a, b)
    assert f32.shape == (2, 3, 50)
    for dtype in (torch.bfloat16, torch.float16):
        out = api.matmul(a, b, out_dtype=dtype)
        assert out.dtype == dtype and torch.equal(out, f32.to(dtype))


@needs_kernel
@pytest.mark.parametrize("copy", kernel.GEMM_COPIES)
def test_every_instruction_set_copy_gives_the_bits_of_the_torch_reference(copy):
    if copy not in kernel.gemm_instruction_sets():
        pytest.skip(f"this CPU does not run the {copy} copy (it runs {kernel.gemm_instruction_sets()}); "
                    "kernel.default_gemm_copy() checks such a copy at first use on a CPU that does")
    for seed, (m, k, n) in enumerate([(1, 64, 1), (7, 100, 33), (61, 2100, 200), (130, 640, 300), (5, 4096, 131)]):
        x = _heavy_tailed((m, k), seed)
        if m > 1:
            x[0, 0] = float("nan")  # a NaN unit (its row is NaN; the other rows are compared)
            x[1, 64:128] = 0.0  # a zero unit
        w = _heavy_tailed((n, k), seed + 50)
        a, b = integer.quantize_activation(x), api.quantize(w)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(seed))
        reference = integer.product_torch(a, integer.expand(b), bias)
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(m, n, dtype=dtype)
            assert kernel.gemm(a.q, a.scale, a.sums, b.codes, b.meta, bias, out, k, copy) == copy
            assert _same_bits(out, reference.to(dtype)), (copy, m, k, n, dtype)


@needs_kernel
def test_largest_element_values_in_every_sign_combination_sum_exactly_on_every_copy():
    # |q| = 28 on both sides in every element: the largest integer sums (64 * 784 per unit) and, in the
    # AVX2 copy, the largest int16 partial sums (8 pairs of 2 * 60 * 28): nothing saturates or wraps
    rows = 4
    codes = torch.tensor([0x77, 0xFF, 0x7F, 0xF7], dtype=torch.uint8)  # +28/+28, -28/-28, +28/-28, -28/+28
    packed_codes = codes.repeat_interleave(32 * 3).view(rows, 96)
    meta = torch.tensor([0xC0, 0xFF, 0xFF, 0xFF] * 3, dtype=torch.uint8).repeat(rows, 1)  # Eb, Ec all set
    a = api.HiF4Tensor(packed_codes, meta, (rows, 192), 0)
    expected = _dequantized64(a) @ _dequantized64(a).T
    assert float(expected.abs().max()) == 192 * 7.0**2  # (1.75 * 4)^2 per element at value(Ea) = 1
    operand = integer.expand(a)
    for copy in kernel.gemm_instruction_sets():
        out = torch.empty(rows, rows)
        kernel.gemm(operand.q, operand.scale, operand.sums, a.codes, a.meta, None, out, 192, copy)
        assert torch.equal(out.double(), expected), copy


@needs_kernel
def test_many_row_chunks_and_column_blocks_give_the_reference_bits():
    # more rows than one work item (1024) and more columns than one block (128), K over several K blocks
    x, w = _heavy_tailed((1100, 2200), 30), _heavy_tailed((300, 2200), 31)
    a, b = integer.quantize_activation(x), api.quantize(w)
    assert _same_bits(integer.product(a, b), integer.product_torch(a, integer.expand(b)))


def test_empty_products_are_zeros_plus_bias():
    w = api.quantize(torch.randn(5, 128))
    assert api.linear(torch.randn(0, 128), w).shape == (0, 5)
    assert torch.equal(api.matmul(api.quantize(torch.randn(3, 128)), api.quantize(torch.randn(0, 128))),
                       torch.zeros(3, 0))
    empty_k = api.quantize(torch.randn(3, 0))
    assert torch.equal(api.matmul(empty_k, api.quantize(torch.randn(4, 0))), torch.zeros(3, 4))
    bias = torch.randn(4)
    assert torch.equal(api.linear(torch.randn(3, 0), api.quantize(torch.randn(4, 0)), bias, out_dtype=torch.float32),
                       bias.expand(3, 4))


def test_linear_refuses_a_weight_with_the_reserved_code_and_operands_on_other_devices():
    w = api.quantize(torch.randn(4, 128))
    w.meta[2, 0] = 0xFF
    with pytest.raises(CodecError, match="reserved Ea code 0xFF at row 2, unit 0"):
        api.linear(torch.randn(3, 128), w)
    good = api.quantize(torch.randn(4, 128))
    with pytest.raises(CodecError, match="the bias on meta"):
        api.linear(torch.randn(3, 128), good, torch.zeros(4, device="meta"))


@needs_kernel
def test_default_copy_is_the_best_this_cpu_runs():
    assert kernel.default_gemm_copy() == kernel.gemm_instruction_sets()[0]
    assert kernel.gemm_instruction_sets()[-1] == "portable"


@needs_kernel
@pytest.mark.parametrize("m, k", [(1, 64), (5, 100), (40, 1000), (3, 5120)])
def test_fused_activation_path_gives_the_element_values_quantize_stores(m, k, monkeypatch):
    g = torch.Generator().manual_seed(k)
    x = _heavy_tailed((m, k), k)
    multiplier = torch.exp2(torch.randn(k, generator=g) * 3).to(torch.bfloat16)
    fused = integer.quantize_activation(x, multiplier)
    stored = integer.expand(api.quantize(x * multiplier))
    for name in ("q", "scale", "sums"):
        assert torch.equal(getattr(fused, name), getattr(stored, name)), name
    with monkeypatch.context() as patch:  # the torch path without the kernel: the same operand
        patch.setattr(kernel, "enabled", lambda: False)
        slow = integer.quantize_activation(x, multiplier)
        slow_stored = integer.expand(api.quantize(x * multiplier))
    for name in ("q", "scale", "sums"):
        assert torch.equal(getattr(slow, name), getattr(fused, name)), name
        assert torch.equal(getattr(slow_stored, name), getattr(stored, name)), name


def test_nan_unit_makes_its_row_nan_and_leaves_other_rows_exact():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 256, generator=g).to(torch.bfloat16)
    w = api.quantize(torch.randn(30, 256, generator=g))
    clean = api.linear(x, w, out_dtype=torch.float32)
    x[2, 130] = float("nan")
    out = api.linear(x, w, out_dtype=torch.float32)
    assert bool(torch.isnan(out[2]).all())
    assert torch.equal(out[[0, 1, 3]], clean[[0, 1, 3]])


def test_zero_and_infinite_inputs_follow_the_codec():
    w = api.quantize(torch.randn(8, 128, generator=torch.Generator().manual_seed(5)))
    zeros = api.linear(torch.zeros(3, 128), w, out_dtype=torch.float32)
    assert torch.equal(zeros, torch.zeros(3, 8)) and not bool(torch.signbit(zeros).any())
    x = torch.zeros(1, 128)
    x[0, 0] = float("inf")  # saturates to 1.75 * 4 * 49152 (spec 5.4), a finite product
    out = api.linear(x, w, out_dtype=torch.float32)
    expected = api.fake_quantize(x).double() @ _dequantized64(w).T
    assert bool(torch.isfinite(out).all()) and torch.equal(out.double(), expected)


def test_linear_equals_matmul_of_the_quantized_product_plus_bias_in_float32():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 300, generator=g).to(torch.bfloat16)
    m = torch.exp2(torch.randn(300, generator=g) * 2).to(torch.bfloat16)
    w = api.quantize(torch.randn(70, 300, generator=g))
    bias = torch.randn(70, generator=g).to(torch.bfloat16)
    out = api.linear(x, w, bias, multiplier=m)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 70)
    product = api.matmul(api.quantize(x * m), w)  # float32, before the bias
    assert torch.equal(out, (product + bias.float()).to(torch.bfloat16))


def test_operands_that_do_not_fit_are_refused():
    a = api.quantize(torch.randn(3, 128))
    with pytest.raises(CodecError, match="K differs"):
        api.matmul(a, api.quantize(torch.randn(4, 100)))
    with pytest.raises(CodecError, match="must be 2-D"):
        api.matmul(a, api.quantize(torch.randn(2, 4, 128)))
    with pytest.raises(CodecError, match="must be a HiF4Tensor"):
        api.matmul(torch.randn(3, 128), a)
    with pytest.raises(CodecError, match="out_dtype"):
        api.matmul(a, a, out_dtype=torch.int8)
    bad = api.quantize(torch.randn(4, 128))
    bad.meta[1, 4] = 0xFF  # the reserved Ea code
    with pytest.raises(CodecError, match="reserved Ea code 0xFF"):
        api.matmul(a, bad)
    with pytest.raises(CodecError, match="reserved Ea code 0xFF"):
        api.matmul(bad, a)
    with pytest.raises(CodecError, match="bias must be"):
        api.linear(torch.randn(2, 128), a, torch.randn(5))


def test_torch_path_without_the_kernel_gives_the_same_bits(monkeypatch):
    x = _heavy_tailed((20, 700), 9)
    w = api.quantize(_heavy_tailed((45, 700), 10))
    bias = torch.randn(45)
    fast = api.linear(x, w, bias, out_dtype=torch.float32)
    with monkeypatch.context() as patch:
        patch.setattr(kernel, "enabled", lambda: False)
        assert integer.product_path(torch.device("cpu")) == "torch"
        slow = api.linear(x, w, bias, out_dtype=torch.float32)
    assert torch.equal(_bits(fast), _bits(slow))


def test_integer_product_is_at_least_as_accurate_as_the_bf16_matmul_of_dequantized_operands():
    x, w = _heavy_tailed((64, 2048), 11), _heavy_tailed((96, 2048), 12)
    a, b = api.quantize(x), api.quantize(w)
    expected = _dequantized64(a) @ _dequantized64(b).T
    integer_error = (api.matmul(a, b).double() - expected).abs().max()
    bf16_error = ((api.dequantize(a) @ api.dequantize(b).T).double() - expected).abs().max()
    assert integer_error * 100 < bf16_error  # float32 across units vs BF16 output rounding


def test_triton_kernel_interpreted_on_the_cpu_equals_the_cpu_kernel():
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    script = Path(__file__).with_name("triton_interpreted.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cases = json.loads(done.stdout)["cases"]
    assert len(cases) == 4
    assert all(case["equal"] and case["differing"] == 0 for case in cases), cases


@pytest.mark.skipif(sys.platform != "linux", reason="builds the kernel with gcc")
def test_avx512_copy_built_over_plain_c_vectors_gives_the_same_bits(tmp_path):
    # This machine may lack AVX-512: the copy's own source, compiled over _avx512_emulation.h, must still
    # give the bits of the portable copy and of the torch reference.
    import importlib.util
    import shutil
    import sysconfig

    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        if REQUIRED:
            pytest.fail("no C compiler, but HIF4FMT_REQUIRE_KERNEL=1")
        pytest.skip("no C compiler")
    source = Path(api.__file__).resolve().parent / "codec" / "_kernel.c"
    target = tmp_path / ("_kernel" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-std=c11", "-ffp-contract=off", "-fno-strict-aliasing",
                    "-pthread", "-DHIF4_KERNEL_NO_CLONES", "-DHIF4_EMULATE_AVX512",
                    f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(target), "-lm"],
                   check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("_kernel", target)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    copies = dict(build.gemm_instruction_sets())
    assert "avx512-vnni" in copies and "portable" in copies
    for seed, (m, k, n) in enumerate([(1, 64, 1), (7, 100, 33), (13, 2100, 200), (130, 640, 161)]):
        x = _heavy_tailed((m, k), seed + 20)
        if m > 1:
            x[0, 0] = float("nan")
        w = _heavy_tailed((n, k), seed + 70)
        a, b = integer.quantize_activation(x), api.quantize(w)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(seed))
        reference = integer.product_torch(a, integer.expand(b), bias)
        for name, isa in copies.items():
            out = torch.empty(m, n)
            assert build.gemm_q(a.q.numpy(), a.scale.numpy(), a.sums.numpy(), b.codes.numpy(), b.meta.numpy(),
                                bias.numpy(), out.numpy(), m, n, k, False, isa, 2) == name
            assert _same_bits(out, reference), (name, m, k, n)
