"""The compiled HiF4 encoder (hif4fmt/codec/_kernel.c) gives the bytes of the torch paths and the spec.

The kernel is what ``quantize`` runs on the CPU when it is built, and what the runtime runs for every
weight at load (``quantize_divided``: HiF4(W / m) in one pass). CI sets HIF4FMT_REQUIRE_KERNEL=1
(tools/test.sh), so a kernel that failed to build fails here instead of leaving the torch paths
silently in charge. The golden vectors and the rest of tests/test_hifloat4_codec.py run through the
kernel too, since it is quantize's default path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hif4fmt.hifloat4 as api  # noqa: E402
from hif4fmt.codec import kernel  # noqa: E402
from codec_support import every_bf16_value  # noqa: E402
from hif4fmt.errors import CodecError, NonFiniteInputError  # noqa: E402

KERNEL_SOURCE = Path(__file__).resolve().parents[1] / "hif4fmt" / "codec" / "_kernel.c"
REQUIRED = os.environ.get("HIF4FMT_REQUIRE_KERNEL") == "1"
needs_kernel = pytest.mark.skipif(not kernel.enabled() and not REQUIRED, reason=f"kernel: {kernel.status()}")


def _torch_path(x: torch.Tensor, monkeypatch, path: str = "swar"):
    """Return quantize(x) through one of the torch implementations instead of the kernel."""
    with monkeypatch.context() as patch:
        patch.setattr(api, "_quantize_path", lambda encoder, device: path)
        return api.quantize(x)


def _general_fake(x: torch.Tensor, monkeypatch) -> torch.Tensor:
    """Return fake_quantize(x) through the general float32 path instead of the kernel."""
    with monkeypatch.context() as patch:
        patch.setattr(api, "_fake_quantize_path", lambda *args: "general")
        return api.fake_quantize(x)


def _masks(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp2(torch.randn(k, generator=g) * 6).to(torch.bfloat16)  # 2^-20 .. 2^20 and between


def test_kernel_is_built_and_used_when_ci_requires_it():
    if not REQUIRED:
        pytest.skip("HIF4FMT_REQUIRE_KERNEL is not 1 (tools/test.sh sets it)")
    assert kernel.enabled(), kernel.status()
    assert api._quantize_path("toolkit", torch.device("cpu")) == "kernel"
    assert api._quantize_path("ascend", torch.device("cpu")) != "kernel"  # the kernel is the toolkit encoder


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 64), (3, 128), (37, 640), (5, 768), (300, 77), (33, 1000), (9, 1088), (2, 5, 192)])
def test_quantize_divided_equals_quantize_of_the_torch_quotient(shape, monkeypatch):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * torch.exp2(torch.randn(shape[-1], generator=g) * 8)).to(torch.bfloat16)
    x.view(-1)[::7] = -0.0
    m = _masks(shape[-1], 1)
    fused = api.quantize_divided(x, m)
    expected = _torch_path(x / m, monkeypatch)
    assert fused.shape == expected.shape and fused.pad == expected.pad
    assert torch.equal(fused.codes, expected.codes) and torch.equal(fused.meta, expected.meta)


@needs_kernel
def test_quantize_divided_rounds_overflow_and_underflow_like_torch(monkeypatch):
    # quotients past the BF16 range become +-inf (the unit saturates), tiny ones subnormal or +-0
    x = torch.tensor([[3e38, -3e38, 2e-36, -2e-36, 1.0, -2.5, 0.0, -0.0] * 8], dtype=torch.bfloat16)
    m = torch.tensor([1e-3, 1e-3, 1e3, 1e3, 3.0, 7.0, 5.0, 5.0] * 8, dtype=torch.bfloat16)
    quotient = x / m
    assert torch.isinf(quotient).any() and (quotient != 0).logical_and(quotient.abs() < 1e-38).any()
    fused, expected = api.quantize_divided(x, m), _torch_path(quotient, monkeypatch)
    assert torch.equal(fused.codes, expected.codes) and torch.equal(fused.meta, expected.meta)


@needs_kernel
def test_kernel_and_torch_paths_agree_on_every_bf16_value_divided_by_masks(monkeypatch):
    x = every_bf16_value(3)
    m = _masks(x.shape[-1], 2)
    fused = api.quantize_divided(x, m)
    expected = _torch_path(x / m, monkeypatch, "general")
    assert torch.equal(fused.codes, expected.codes) and torch.equal(fused.meta, expected.meta)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_rounds_other_input_dtypes_to_bf16_first(dtype, monkeypatch):
    x = (torch.randn(16, 320, generator=torch.Generator().manual_seed(4)) * 100).to(dtype)
    q, expected = api.quantize(x), _torch_path(x, monkeypatch, "general")
    assert torch.equal(q.codes, expected.codes) and torch.equal(q.meta, expected.meta)


@needs_kernel
@pytest.mark.parametrize("k", [128, 100])  # rows of whole units (blocks cross rows) and padded rows
def test_nan_is_refused_naming_row_element_and_unit(k):
    x = torch.randn(12, k, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    x[9, 70] = float("nan")
    x[11, 3] = float("nan")
    with pytest.raises(NonFiniteInputError, match="row 9, element 70 \\(unit 1\\)"):
        api.quantize(x)
    with pytest.raises(NonFiniteInputError, match="row 9, element 70"):
        api.quantize_divided(x, _masks(k, 0))


@needs_kernel
def test_rows_split_over_threads_give_the_same_bytes_as_one_thread(monkeypatch):
    x = torch.randn(301, 704, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    m = _masks(704, 3)
    monkeypatch.setattr(kernel, "MIN_ELEMENTS_PER_TASK", 704)  # one task per few rows
    threaded = api.quantize_divided(x, m)
    with kernel.single_threaded():
        single = api.quantize_divided(x, m)
    assert torch.equal(threaded.codes, single.codes) and torch.equal(threaded.meta, single.meta)


def test_scaled_entry_points_check_their_scale_vector():
    x = torch.randn(4, 64).to(torch.bfloat16)
    with pytest.raises(CodecError, match="quantize_divided: divisor must have shape \\(64,\\)"):
        api.quantize_divided(x, torch.ones(32, dtype=torch.bfloat16))
    with pytest.raises(CodecError, match="fake_quantize_scaled: multiplier must have shape \\(64,\\)"):
        api.fake_quantize_scaled(x, torch.ones(4, 64, dtype=torch.bfloat16))
    with pytest.raises(CodecError, match="expected a torch.Tensor"):
        api.fake_quantize_scaled(x, [1.0] * 64)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_scaled_entry_points_follow_torch_type_promotion_for_other_dtypes(scale_dtype, monkeypatch):
    x = torch.randn(8, 192, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    m = _masks(192, 6).to(scale_dtype)
    divided, expected = api.quantize_divided(x, m), _torch_path(x / m, monkeypatch, "general")
    assert torch.equal(divided.codes, expected.codes) and torch.equal(divided.meta, expected.meta)
    scaled = api.fake_quantize_scaled(x, m)
    assert scaled.dtype == (x * m).dtype
    assert torch.equal(scaled, _general_fake(x * m, monkeypatch))


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_disabling_the_kernel_by_environment_switches_to_the_torch_path(monkeypatch, value):
    monkeypatch.setenv(kernel.DISABLE_ENV, value)
    assert not kernel.enabled()
    assert api._quantize_path("toolkit", torch.device("cpu")) == "swar"
    assert "turned off" in kernel.status() or "not built" in kernel.status()


@needs_kernel
def test_kernel_refuses_buffers_shorter_than_the_shape_says():
    from hif4fmt.codec import _kernel

    src = np.zeros(2 * 64, np.int16)
    codes, meta = np.zeros(2 * 32, np.uint8), np.zeros(2 * 4, np.uint8)
    assert _kernel.quantize_bf16(src, None, codes, meta, 2, 64, 0, 2) == -1
    with pytest.raises(ValueError, match="src holds 256 bytes, needs 384"):
        _kernel.quantize_bf16(src, None, codes, meta, 3, 64, 0, 3)
    with pytest.raises(ValueError, match="codes holds"):
        _kernel.quantize_bf16(src, None, codes[:10], meta, 2, 64, 0, 2)
    with pytest.raises(ValueError, match="divisor holds"):
        _kernel.quantize_bf16(src, np.ones(10, np.int16), codes, meta, 2, 64, 0, 2)
    with pytest.raises(ValueError, match="bad rows, k or row range"):
        _kernel.quantize_bf16(src, None, codes, meta, 2, 64, 1, 3)
    with pytest.raises(TypeError):
        _kernel.quantize_bf16(src, None, bytes(64), meta, 2, 64, 0, 2)  # read-only output


@needs_kernel
@pytest.mark.parametrize("shuffle_seed", [None, 0])
def test_fake_quantize_kernel_equals_the_general_path_on_every_bf16_value(shuffle_seed, monkeypatch):
    x = every_bf16_value(shuffle_seed)
    assert api._fake_quantize_path("toolkit", x.device) == "kernel"
    assert torch.equal(api.fake_quantize(x).view(torch.int16), _general_fake(x, monkeypatch).view(torch.int16))
    assert torch.equal(api.fake_quantize(x).view(torch.int16), api.dequantize(api.quantize(x)).view(torch.int16))


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 64), (37, 640), (5, 768), (300, 77), (2, 5, 192), (4, 1000)])
def test_fake_quantize_scaled_equals_fake_quantize_of_the_torch_product(shape, monkeypatch):
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = (torch.randn(shape, generator=g) * torch.exp2(torch.randn(shape[-1], generator=g) * 8)).to(torch.bfloat16)
    x.view(-1)[::9] = -0.0
    m = _masks(shape[-1], 7)
    fused = api.fake_quantize_scaled(x, m)
    assert fused.shape == x.shape and fused.dtype == x.dtype
    assert torch.equal(fused.view(torch.int16), _general_fake(x * m, monkeypatch).view(torch.int16))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fake_quantize_kernel_returns_the_input_dtype_with_the_general_paths_values(dtype, monkeypatch):
    x = (torch.randn(16, 320, generator=torch.Generator().manual_seed(9)) * 3000).to(dtype)
    y = api.fake_quantize(x)
    assert y.dtype == dtype and torch.equal(y, _general_fake(x, monkeypatch))


@needs_kernel
@pytest.mark.parametrize("k", [128, 100])
def test_fake_quantize_kernel_turns_a_unit_with_nan_into_nan_and_nothing_else(k, monkeypatch):
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    clean = api.fake_quantize(x)
    x[4, 70 if k == 128 else 30] = float("nan")
    y = api.fake_quantize(x)
    nan_unit = torch.zeros_like(x, dtype=torch.bool)
    if k == 128:
        nan_unit[4, 64:] = True  # unit 1 of row 4
    else:
        nan_unit[4, :64] = True  # unit 0 of row 4; unit 1 (36 elements + padding) stays clean
    assert torch.isnan(y[nan_unit]).all() and not torch.isnan(y[~nan_unit]).any()
    assert torch.equal(y[~nan_unit], clean[~nan_unit])
    assert torch.equal(torch.isnan(_general_fake(x, monkeypatch)), nan_unit)


@needs_kernel
def test_fake_quantize_kernel_refuses_buffers_shorter_than_the_shape_says():
    from hif4fmt.codec import _kernel

    src, out = np.zeros(2 * 64, np.int16), np.zeros(2 * 64, np.int16)
    assert _kernel.fake_quantize_bf16(src, None, out, 2, 64, 0, 2) is None
    with pytest.raises(ValueError, match="out holds 128 bytes, needs 256"):
        _kernel.fake_quantize_bf16(src, None, out[:64], 2, 64, 0, 2)
    with pytest.raises(ValueError, match="multiplier holds"):
        _kernel.fake_quantize_bf16(src, np.ones(3, np.int16), out, 2, 64, 0, 2)


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


# Each single-target build of the kernel (what target_clones picks per CPU) gives the same bytes.
BUILDS = {"x86-64": None, "x86-64-v3": "avx2", "x86-64-v4": "avx512bw"}


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 Linux builds only")
@pytest.mark.parametrize("march", sorted(BUILDS))
def test_every_instruction_set_build_gives_the_same_bytes(march, tmp_path, monkeypatch):
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        if REQUIRED:
            pytest.fail("no C compiler, but HIF4FMT_REQUIRE_KERNEL=1")
        pytest.skip("no C compiler")
    if BUILDS[march] and not _cpu_has(BUILDS[march]):
        pytest.skip(f"this CPU lacks {BUILDS[march]}")
    target = tmp_path / ("_kernel" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run([compiler, "-shared", "-fPIC", "-O3", "-std=c11", "-ffp-contract=off", "-fno-strict-aliasing",
                    f"-march={march}", "-DHIF4_KERNEL_NO_CLONES", f"-I{sysconfig.get_paths()['include']}",
                    str(KERNEL_SOURCE), "-o", str(target)], check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("_kernel", target)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    x = every_bf16_value(5)
    rows, k = x.shape
    for divisor in (None, _masks(k, 4)):
        codes = torch.empty(rows, k // 2, dtype=torch.uint8)
        meta = torch.empty(rows, k // 16, dtype=torch.uint8)
        div = None if divisor is None else divisor.view(torch.int16).numpy()
        assert build.quantize_bf16(x.view(torch.int16).numpy(), div, codes.numpy(), meta.numpy(), rows, k, 0, rows) == -1
        expected = _torch_path(x if divisor is None else x / divisor, monkeypatch, "general")
        assert torch.equal(codes, expected.codes) and torch.equal(meta, expected.meta)
        values = torch.empty(rows, k, dtype=torch.bfloat16)
        assert build.fake_quantize_bf16(x.view(torch.int16).numpy(), div, values.view(torch.int16).numpy(),
                                        rows, k, 0, rows) is None
        expected_values = _general_fake(x if divisor is None else x * divisor, monkeypatch)
        assert torch.equal(values.view(torch.int16), expected_values.view(torch.int16))
    packed = _random_packed(rows, k, seed=6)
    decoded = torch.empty(rows, k, dtype=torch.bfloat16)
    assert build.dequantize_bf16(packed.codes.numpy(), packed.meta.numpy(), decoded.view(torch.int16).numpy(),
                                 rows, k, 0, rows) == -1
    with monkeypatch.context() as patch:
        patch.setattr(api, "_dequantize_path", lambda device: "general")
        assert torch.equal(decoded.view(torch.int16), api.dequantize(packed).view(torch.int16))


@pytest.mark.parametrize("switch", ["1", "0"])
def test_codec_command_says_which_implementation_ran_and_checks_vectors_through_it(switch):
    env = {**os.environ, kernel.DISABLE_ENV: switch}
    done = subprocess.run([sys.executable, "-m", "hif4fmt", "codec", "--rows", "8", "--cols", "128", "--check-vectors",
                           "--json"], capture_output=True, text=True, env=env, check=True)
    report = json.loads(done.stdout)
    assert report["vector_check"]["failures"] == [] and report["vector_check"]["cases"] == 24
    implementation = report["implementation"]
    if switch == "0":
        assert implementation == {"toolkit_quantize_path": "swar", "kernel_in_use": False,
                                  "kernel": implementation["kernel"]}
        assert "turned off" in implementation["kernel"] or "not built" in implementation["kernel"]
    else:
        built = kernel._kernel is not None  # the child runs with the kernel switched on, whatever this process has
        assert implementation["kernel_in_use"] == built
        assert implementation["toolkit_quantize_path"] == ("kernel" if built else "swar")


def _pairs(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 768), (7, 100), (0, 64), (1, 64), (130, 3072), (33, 1000)]
    return [((torch.randn(shape, generator=g) * 4).to(torch.bfloat16), _masks(shape[-1], seed + i))
            for i, shape in enumerate(shapes)]


@pytest.mark.parametrize("switch", ["1", "0"])
def test_quantize_divided_many_equals_quantize_divided_per_tensor(switch, monkeypatch):
    monkeypatch.setenv(kernel.DISABLE_ENV, switch)
    pairs = _pairs(20)
    many = api.quantize_divided_many(pairs)
    monkeypatch.setenv(kernel.DISABLE_ENV, "0")
    for (x, m), q in zip(pairs, many):
        expected = api.quantize(x / m)
        assert q.shape == expected.shape and q.pad == expected.pad
        assert torch.equal(q.codes, expected.codes) and torch.equal(q.meta, expected.meta)


@pytest.mark.parametrize("switch", ["1", "0"])
def test_quantize_divided_many_names_the_first_tensor_holding_a_nan(switch, monkeypatch):
    monkeypatch.setenv(kernel.DISABLE_ENV, switch)
    pairs = _pairs(21)
    pairs[4][0][100, 2000] = float("nan")
    pairs[5][0][0, 0] = float("nan")
    names = [f"layer {i}" for i in range(len(pairs))]
    with pytest.raises(NonFiniteInputError, match="^layer 4: quantize: NaN at row 100, element 2000 \\(unit 31\\)"):
        api.quantize_divided_many(pairs, names=names)


@needs_kernel
def test_kernel_quantize_many_gives_the_same_bytes_on_any_thread_count():
    from hif4fmt.codec import _kernel

    pairs = _pairs(22)
    results = []
    for threads in (1, 2, 5):
        jobs, outputs = [], []
        for x, m in pairs:
            codes_shape, meta_shape = api.packed_shapes(tuple(x.shape))
            codes, meta = torch.zeros(codes_shape, dtype=torch.uint8), torch.zeros(meta_shape, dtype=torch.uint8)
            jobs.append((x.view(torch.int16).numpy(), m.view(torch.int16).numpy(), codes.numpy(), meta.numpy(),
                         *x.shape))
            outputs.append((codes, meta))
        assert _kernel.quantize_many(jobs, threads) == [-1] * len(pairs)
        results.append(outputs)
    for outputs in results[1:]:
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(results[0], outputs))


@needs_kernel
def test_kernel_quantize_many_checks_every_job_before_running_any():
    from hif4fmt.codec import _kernel

    src, codes, meta = np.zeros(128, np.int16), np.full(64, 7, np.uint8), np.full(8, 7, np.uint8)
    with pytest.raises(ValueError, match="codes holds 10 bytes, needs 64"):
        _kernel.quantize_many([(src, None, codes, meta, 2, 64), (src, None, codes[:10], meta, 2, 64)], 2)
    assert (codes == 7).all()  # the valid first job did not run either
    with pytest.raises(TypeError, match="a job is \\(src, divisor, codes, meta, rows, k\\)"):
        _kernel.quantize_many([(src, None, codes)], 2)
    with pytest.raises(TypeError, match="job 0: a job is"):
        _kernel.quantize_many([[src, None, codes, meta, 2, 64]], 2)
    with pytest.raises(ValueError, match="quantize_many: job 0: bad rows, k or row range"):
        _kernel.quantize_many([(src, None, codes, meta, 2, 0)], 2)
    assert _kernel.quantize_many([], 2) == []


@needs_kernel
def test_kernel_refuses_16_bit_buffers_at_odd_addresses():
    from hif4fmt.codec import _kernel

    raw = np.zeros(2 * 64 * 2 + 1, np.uint8)
    odd = raw[1:].view(np.uint8)  # 16-bit data starting at an odd address
    codes, meta = np.zeros(64, np.uint8), np.zeros(8, np.uint8)
    with pytest.raises(ValueError, match="quantize_bf16: src is not 2-byte aligned"):
        _kernel.quantize_bf16(odd, None, codes, meta, 2, 64, 0, 2)
    with pytest.raises(ValueError, match="fake_quantize_bf16: out is not 2-byte aligned"):
        _kernel.fake_quantize_bf16(np.zeros(128, np.int16), None, odd, 2, 64, 0, 2)


@needs_kernel
def test_kernel_keeps_ieee_subnormals_when_the_caller_flushes_denormals(monkeypatch):
    # torch.set_flush_denormal sets FTZ/DAZ on the calling thread only; the kernel computes the spec's
    # IEEE arithmetic on every thread regardless: a subnormal divisor or multiplier stays a number
    # (flushed to zero it would turn W / m into inf or NaN)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(48, 640, generator=g).to(torch.bfloat16) * 1e-30
    m = _masks(640, 8)
    m[::3] = torch.tensor(3e-39).to(torch.bfloat16)  # subnormal in BF16 and float32
    assert (m.float().abs() < 1.1754944e-38).sum() > 100
    expected = _torch_path(x / m, monkeypatch, "general")
    expected_fake = _general_fake(x * m, monkeypatch)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        monkeypatch.setattr(kernel, "MIN_ELEMENTS_PER_TASK", 640)  # pool threads and the calling thread
        threaded = api.quantize_divided(x, m)
        fused = api.fake_quantize_scaled(x, m)
        many = api.quantize_divided_many([(x, m)])[0]
        with kernel.single_threaded():
            single = api.quantize_divided(x, m)
    finally:
        torch.set_flush_denormal(False)
    for q in (threaded, many, single):
        assert torch.equal(q.codes, expected.codes) and torch.equal(q.meta, expected.meta)
    assert torch.equal(fused.view(torch.int16), expected_fake.view(torch.int16))


def test_fake_quantize_keeps_the_autograd_graph_for_inputs_that_require_grad():
    x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
    y = api.fake_quantize(x)
    assert y.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(api.fake_quantize(x).view(torch.int16), y.detach().view(torch.int16))


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_codec_works_in_a_forked_child_after_the_parent_used_its_threads():
    # the kernel's thread pool is re-made in the child; (torch's own intra-op threads do not survive a
    # fork either, which is why this runs only with the kernel: the torch paths would hang in torch)
    import multiprocessing

    x = torch.randn(256, 1024).to(torch.bfloat16)
    expected = api.quantize(x)  # the parent's thread pool now exists
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        codes = pool.apply_async(_quantize_codes_bytes, (x,)).get(timeout=30)
    assert codes == expected.codes.numpy().tobytes()


def _quantize_codes_bytes(x: torch.Tensor) -> bytes:
    return api.quantize(x).codes.numpy().tobytes()


def _random_packed(rows: int, k: int, seed: int) -> api.HiF4Tensor:
    """Random code bytes and metadata words (every Ea code but the reserved 0xFF), shape (rows, k)."""
    g = torch.Generator().manual_seed(seed)
    codes_shape, meta_shape = api.packed_shapes((rows, k))
    codes = torch.randint(0, 256, codes_shape, generator=g, dtype=torch.uint8)
    meta = torch.randint(0, 256, meta_shape, generator=g, dtype=torch.uint8)
    meta.view(rows, -1, 4)[..., 0] = torch.randint(0, 255, (rows, meta_shape[-1] // 4), generator=g).to(torch.uint8)
    return api.HiF4Tensor(codes, meta, (rows, k), (-k) % 64)


@needs_kernel
@pytest.mark.parametrize("shape", [(300, 640), (17, 100), (1, 64), (64, 3072)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_dequantize_kernel_equals_the_torch_decoders_on_random_packed_bytes(shape, dtype, monkeypatch):
    q = _random_packed(*shape, seed=sum(shape))
    assert api._dequantize_path(q.device) == "kernel"
    values = api.dequantize(q, dtype)
    for path in ("swar", "general"):
        with monkeypatch.context() as patch:
            patch.setattr(api, "_dequantize_path", lambda device, path=path: path)
            expected = api.dequantize(q, dtype)
        int_view = torch.int32 if dtype == torch.float32 else torch.int16
        assert values.dtype == dtype and torch.equal(values.view(int_view), expected.view(int_view)), path


@needs_kernel
def test_dequantize_kernel_refuses_the_reserved_ea_code_naming_row_and_unit():
    q = _random_packed(12, 200, seed=3)
    q.meta.view(12, -1, 4)[7, 2, 0] = 0xFF
    q.meta.view(12, -1, 4)[9, 0, 0] = 0xFF
    with pytest.raises(CodecError, match="reserved Ea code 0xFF at row 7, unit 2"):
        api.dequantize(q)


@needs_kernel
def test_dequantize_kernel_refuses_buffers_shorter_than_the_shape_says():
    from hif4fmt.codec import _kernel

    codes, meta, out = np.zeros(64, np.uint8), np.zeros(8, np.uint8), np.zeros(128, np.int16)
    assert _kernel.dequantize_bf16(codes, meta, out, 2, 64, 0, 2) == -1
    with pytest.raises(ValueError, match="dequantize_bf16: meta holds 4 bytes, needs 8"):
        _kernel.dequantize_bf16(codes, meta[:4], out, 2, 64, 0, 2)
    with pytest.raises(ValueError, match="dequantize_bf16: out holds"):
        _kernel.dequantize_bf16(codes, meta, out[:10], 2, 64, 0, 2)


@needs_kernel
def test_kernel_compiles_in_the_format_constants_of_the_one_table():
    from hif4fmt.codec import _kernel
    from hif4fmt.codec.format import HIF4

    compiled = _kernel.constants()
    assert compiled == {"unit": HIF4.unit, "ec_per_unit": HIF4.ec_per_unit, "eb_per_unit": HIF4.eb_per_unit,
                        "toolkit_r7": HIF4.toolkit_r7, "scale_min": HIF4.scale_min, "scale_max": HIF4.scale_max,
                        "ea_exponent_bias": HIF4.ea_exponent_bias, "ea_reserved_code": HIF4.ea_reserved_code}
