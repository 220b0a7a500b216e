"""The compiled HiF4 toolkit encoder (``_kernel.c``): whether it is here, and running it over threads.

Why this module exists: loading a W4A4 model quantizes every target weight, HiF4(W / m), and every
forward quantizes every activation, HiF4(x * m); the torch paths make a dozen passes over each tensor
for that. The C kernel does the scaling, the encoding and the packing (or the decoding, for
fake-quantization) in one pass per 64-element unit, with the same float32 operations in the same order
(same bytes; tests/test_codec_kernel.py compares them on every BF16 value). It is built at install time
when a C compiler is there (setup.py) and is optional: ``hif4fmt.hifloat4`` falls back to the torch
paths without it.

``HIF4FMT_KERNEL=0`` (or false/off/no) in the environment turns it off (to compare paths, or to rule it out). CI sets
``HIF4FMT_REQUIRE_KERNEL=1`` so a kernel that failed to build fails the tests instead of going unseen.

Rows are split over ``torch.get_num_threads()`` threads (a shared pool made once, re-made in a forked
child; ``quantize_many`` starts its own threads in C); the kernel releases the GIL.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

try:
    from hif4fmt.codec import _kernel
except ImportError as exc:  # not built (no compiler at install time) or built for another Python
    _kernel = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""

DISABLE_ENV = "HIF4FMT_KERNEL"  # "0", "false", "off" or "no" (any case) turns the kernel off
OFF_VALUES = ("0", "false", "off", "no")
MIN_ELEMENTS_PER_TASK = 1 << 16  # below this a row range is not worth a thread hand-off
_POOL: ThreadPoolExecutor | None = None  # made once (lock), sized for every core; never shut down
_POOL_LOCK = threading.Lock()
_CALLER = threading.local()  # .single: this thread's calls run on this thread only (see single_threaded)


def enabled() -> bool:
    """Return whether ``quantize`` runs the compiled kernel (built, importable, not disabled, little-endian)."""
    return _kernel is not None and not _turned_off() and sys.byteorder == "little"


def _turned_off() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in OFF_VALUES


def status() -> str:
    """Return one line saying whether the kernel runs, and why not when it does not."""
    if _kernel is None:
        return (f"not built ({_IMPORT_ERROR}); the codec uses the torch paths (same bytes, slower); with a C "
                "compiler installed, rebuild it: rm .venv/.hif4fmt-installed && bash tools/bootstrap.sh")
    if _turned_off():
        return f"built, turned off by {DISABLE_ENV}={os.environ[DISABLE_ENV]}; the codec uses the torch paths"
    if sys.byteorder != "little":
        return "built, not used on this big-endian host; the codec uses the torch paths"
    return (f"compiled kernel in use, {_kernel.instruction_set()} code, integer GEMM copy {default_gemm_copy()} "
            f"(this CPU runs: {', '.join(gemm_instruction_sets())}) ({_kernel.__file__})")


@contextmanager
def single_threaded():
    """Within this block, kernel calls made by this thread run on this thread only.

    For callers that spread work over their own threads (or a forked worker that must not start any).
    """
    before = getattr(_CALLER, "single", False)
    _CALLER.single = True
    try:
        yield
    finally:
        _CALLER.single = before


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="hif4-kernel")
        return _POOL


def _forget_pool_after_fork() -> None:
    """A forked child has none of the parent's threads: drop the pool (made anew on first use)."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _row_ranges(rows_count: int, k: int, workers: int) -> list[tuple[int, int]]:
    step = max(1, MIN_ELEMENTS_PER_TASK // k, -(-rows_count // (workers * 4)))
    return [(start, min(rows_count, start + step)) for start in range(0, rows_count, step)]


def _threads() -> int:
    """Return how many threads this caller's kernel work may use (1 within ``single_threaded``)."""
    return 1 if getattr(_CALLER, "single", False) else max(1, torch.get_num_threads())


def _run(function, rows_count: int, k: int, *buffers) -> int:
    """Call ``function(*buffers, rows, k, start, stop)`` over row ranges, on the pool when it pays.

    Returns the smallest non-negative index the calls returned (the first NaN or bad unit), else -1.
    """
    workers = _threads()
    ranges = _row_ranges(rows_count, k, workers)
    if workers == 1 or len(ranges) == 1:
        found = [function(*buffers, rows_count, k, start, stop) for start, stop in ranges]
    else:
        futures = [_pool().submit(function, *buffers, rows_count, k, start, stop) for start, stop in ranges]
        found = [future.result() for future in futures]
    hits = [index for index in found if index is not None and index >= 0]
    return min(hits) if hits else -1


def _patterns(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.view(torch.int16).numpy()


def quantize_rows(rows: torch.Tensor, divisor: torch.Tensor | None, codes: torch.Tensor, meta: torch.Tensor) -> int:
    """Write the toolkit encoding of bf16(rows / divisor) into ``codes`` and ``meta``; return -1 or a NaN index.

    ``rows``: contiguous CPU BF16 (R, K); ``divisor``: None or contiguous CPU BF16 (K,); ``codes``
    uint8 (R, P/2) and ``meta`` uint8 (R, P/16), contiguous, P = K rounded up to 64. Returns the flat
    index r * K + i of the first NaN (after the division), -1 when there is none.
    """
    rows_count, k = rows.shape
    return _run(_kernel.quantize_bf16, rows_count, k, _patterns(rows), _patterns(divisor), codes.numpy(), meta.numpy())


def fake_quantize_rows(rows: torch.Tensor, multiplier: torch.Tensor | None, out: torch.Tensor) -> None:
    """Write HiF4 quantize-dequantize (toolkit) of bf16(rows * multiplier) into BF16 ``out`` (R, K).

    ``rows``, ``out``: contiguous CPU BF16 (R, K); ``multiplier``: None or contiguous CPU BF16 (K,).
    A unit holding a NaN comes out all NaN.
    """
    rows_count, k = rows.shape
    _run(_kernel.fake_quantize_bf16, rows_count, k, _patterns(rows), _patterns(multiplier), _patterns(out))


def quantize_many(jobs: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]]) -> list[int]:
    """Run ``quantize_rows`` for every (rows, divisor, codes, meta) job in one kernel call; return NaN indices.

    The rows of all jobs are spread over ``torch.get_num_threads()`` threads (1 within
    ``single_threaded``) made by the kernel itself, with the GIL released for the whole call: no
    per-tensor thread hand-off, which dominated for many small tensors (a model's linears).
    """
    return _kernel.quantize_many([(_patterns(rows), _patterns(divisor), codes.numpy(), meta.numpy(), *rows.shape)
                                  for rows, divisor, codes, meta in jobs], _threads())


def dequantize_rows(codes: torch.Tensor, meta: torch.Tensor, out: torch.Tensor) -> int:
    """Write the BF16 values of packed ``codes`` (R, P/2) and ``meta`` (R, P/16) into ``out`` (R, K).

    Returns -1, or the flat unit index r * (P/64) + u of the first unit with the reserved Ea code 0xFF.
    """
    rows_count, k = out.shape
    return _run(_kernel.dequantize_bf16, rows_count, k, codes.numpy(), meta.numpy(), _patterns(out))


def quantize_q_rows(rows: torch.Tensor, multiplier: torch.Tensor | None, q: torch.Tensor, scale: torch.Tensor,
                    sums: torch.Tensor) -> None:
    """Write HiF4(bf16(rows * multiplier)) as int8 ``q`` (R, P), float32 ``scale`` (R, U), int32 ``sums`` (R, U).

    ``rows``: contiguous CPU BF16 (R, K); ``multiplier``: None or contiguous CPU BF16 (K,). ``scale`` is
    value(Ea) / 4 per unit, NaN for a unit holding a NaN (its q are 0); ``sums`` the unit sums of q
    (spec/hifloat4.md 8.3).
    """
    rows_count, k = rows.shape
    _run(_kernel.quantize_q_bf16, rows_count, k, _patterns(rows), _patterns(multiplier), q.numpy(), scale.numpy(),
         sums.numpy())


def expand_q_rows(codes: torch.Tensor, meta: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, sums: torch.Tensor,
                  k: int) -> int:
    """Write packed ``codes``/``meta`` rows as int8 ``q``, float32 ``scale`` and int32 ``sums``; see quantize_q_rows.

    Returns -1, or the flat unit index of the first reserved Ea code 0xFF.
    """
    return _run(_kernel.expand_q, codes.shape[0], k, codes.numpy(), meta.numpy(), q.numpy(), scale.numpy(),
                sums.numpy())


GEMM_COPIES = ("portable", "avx2", "avx512-vnni")  # instruction-set copies of the integer GEMM, by name


def gemm_instruction_sets() -> list[str]:
    """Return the names of the integer GEMM copies this CPU runs, best first (``portable`` always)."""
    return [name for name, _ in _kernel.gemm_instruction_sets()]


_CHECKED_COPY: list[str] = []  # the copy gemm runs by default, once checked (see default_gemm_copy)
SELF_CHECK_SHAPE = (13, 70, 700)  # m, n, k of the product every copy must give bit for bit before it is used


def default_gemm_copy() -> str:
    """Return the best GEMM copy that gives the portable copy's bits on a check product (made once per process).

    The copies are tested against each other in the test suite on the CPUs it runs on; this guards
    the ones a CPU there lacked (a copy that disagrees is not used, with a warning).
    """
    if not _CHECKED_COPY:
        import warnings

        m, n, k = SELF_CHECK_SHAPE
        generator = torch.Generator().manual_seed(0)
        units = -(-k // 64)
        a_q = torch.randint(-28, 29, (m, units * 64), generator=generator, dtype=torch.int8)
        a_q[:, k:] = 0
        a_scale = torch.exp2(torch.randint(-20, 20, (m, units), generator=generator).float())
        a_sums = a_q.view(m, units, 64).sum(-1, dtype=torch.int32)
        w_codes = torch.randint(0, 256, (n, units * 32), generator=generator, dtype=torch.uint8)
        w_meta = torch.randint(0, 255, (n, units * 4), generator=generator, dtype=torch.uint8)
        w_meta.view(n, units, 4)[..., 0] = torch.randint(150, 220, (n, units), generator=generator, dtype=torch.uint8)
        bias = torch.randn(n, generator=generator)
        outputs = {}
        for copy in gemm_instruction_sets():
            outputs[copy] = torch.empty(m, n)
            gemm(a_q, a_scale, a_sums, w_codes, w_meta, bias, outputs[copy], k, copy)
        chosen = "portable"
        for copy in gemm_instruction_sets():
            if torch.equal(outputs[copy].view(torch.int32), outputs["portable"].view(torch.int32)):
                chosen = copy
                break
            warnings.warn(f"hif4fmt: the {copy} copy of the integer GEMM disagrees with the portable copy on this CPU; "
                          "not using it (please report this)", RuntimeWarning, stacklevel=2)
        _CHECKED_COPY.append(chosen)
    return _CHECKED_COPY[0]


def gemm(a_q: torch.Tensor, a_scale: torch.Tensor, a_sums: torch.Tensor, w_codes: torch.Tensor, w_meta: torch.Tensor,
         bias: torch.Tensor | None, out: torch.Tensor, k: int, copy: str | None = None) -> str:
    """Write the integer HiF4 product (spec/hifloat4.md 8) of the activation and weight operands into ``out``.

    ``a_q`` int8 (M, P), ``a_scale`` float32 (M, U), ``a_sums`` int32 (M, U); ``w_codes`` uint8 (N, P/2),
    ``w_meta`` uint8 (N, U*4) (packed HiF4, no Ea 0xFF); ``bias`` None or float32 (N,); ``out`` float32 or
    BF16 (M, N), all contiguous on the CPU. ``copy``: one of ``gemm_instruction_sets()`` (default
    ``default_gemm_copy()``, the best one checked against the portable copy). Runs on ``torch.get_num_threads()`` threads (1 within ``single_threaded``), GIL released.
    Returns the name of the copy that ran.
    """
    for name, tensor, dtypes in (("a_q", a_q, (torch.int8,)), ("a_scale", a_scale, (torch.float32,)),
                                 ("a_sums", a_sums, (torch.int32,)), ("w_codes", w_codes, (torch.uint8,)),
                                 ("w_meta", w_meta, (torch.uint8,)), ("out", out, (torch.float32, torch.bfloat16)),
                                 ("bias", bias, (torch.float32,))):
        if tensor is not None and (tensor.dtype not in dtypes or tensor.device.type != "cpu"
                                   or not tensor.is_contiguous()):
            raise ValueError(f"gemm: {name} must be a contiguous CPU tensor of dtype {' or '.join(map(str, dtypes))}")
    if copy is None:
        copy = default_gemm_copy()
    isa = dict(_kernel.gemm_instruction_sets()).get(copy)
    if isa is None:
        raise ValueError(f"integer GEMM copy {copy!r} does not run on this CPU; it runs {gemm_instruction_sets()}")
    m, n = out.shape
    out_bf16 = out.dtype == torch.bfloat16
    return _kernel.gemm_q(a_q.numpy(), a_scale.numpy(), a_sums.numpy(), w_codes.numpy(), w_meta.numpy(),
                          None if bias is None else bias.numpy(), _patterns(out) if out_bf16 else out.numpy(),
                          m, n, k, out_bf16, isa, _threads())


if __name__ == "__main__":  # python -m hif4fmt.codec.kernel: say which implementation the codec runs
    print(status())
