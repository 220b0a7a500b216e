"""The compiled sketch updates: the C kernel for CPU activations, the Triton kernel for GPU ones; which one runs.

Why this module exists: the calibration hook adds every input block of every quantized linear to its
sketch (spec/stats-v1.md 3.1). The torch path (``ChannelSketch._update_torch``) makes several passes
and one ``bincount`` over ``channel x bins + bin``; these kernels make one pass and give the same counts,
max, min and non-finite counts on every input (tests/test_sketch_kernel.py checks every BF16 value and
adversarial blocks against the torch path).

  * CPU: ``_sketch_kernel.c`` (built at install time when a C compiler is there, setup.py; optional):
    threads over channel tiles (each thread owns its channels' counts: no atomics), GIL released.
  * GPU: ``sketch_triton.py`` (when ``triton`` imports): per-channel bins accumulated on chip, one pass.

``HIF4FMT_SKETCH_KERNEL=0`` (or false/off/no) turns both off, so the torch path runs (to compare paths,
or to rule the kernels out).
"""

from __future__ import annotations

import os
import sys

import torch

from hif4fmt.codec.kernel import OFF_VALUES  # the one list of off values for the kernel switches

try:
    from hif4fmt.calibration import _sketch_kernel
except ImportError as exc:  # not built (no compiler at install time) or built for another Python
    _sketch_kernel = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""

DISABLE_ENV = "HIF4FMT_SKETCH_KERNEL"  # "0", "false", "off" or "no" (any case) turns the kernels off
MIN_ELEMENTS_PER_THREAD = 1 << 16  # below this a thread start costs more than it saves
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # as _sketch_kernel.c numbers them
BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
COUNT_DTYPES = (torch.int64, torch.int32)


def turned_off() -> bool:
    """Return whether ``HIF4FMT_SKETCH_KERNEL`` turns the compiled sketch updates off."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in OFF_VALUES


def cpu_enabled() -> bool:
    """Return whether CPU sketch updates run the C kernel (built, importable, not turned off, little-endian)."""
    return _sketch_kernel is not None and not turned_off() and sys.byteorder == "little"


def status() -> str:
    """Return two lines: which CPU and which GPU sketch update runs, and why not the compiled one."""
    from hif4fmt.calibration import sketch_triton

    if _sketch_kernel is None:
        cpu = (f"not built ({_IMPORT_ERROR}); CPU sketch updates use the torch path (same counts, slower); with "
               "a C compiler installed, rebuild it: rm .venv/.hif4fmt-installed && bash tools/bootstrap.sh")
    elif turned_off():
        cpu = f"built, turned off by {DISABLE_ENV}={os.environ[DISABLE_ENV]}; CPU sketch updates use the torch path"
    elif sys.byteorder != "little":
        cpu = "built, not used on this big-endian host; CPU sketch updates use the torch path"
    else:
        cpu = f"compiled kernel in use ({_sketch_kernel.__file__})"
    return f"sketch update, CPU: {cpu}\nsketch update, GPU: {sketch_triton.status()}"


def _threads(elements: int) -> int:
    return max(1, min(torch.get_num_threads(), elements // MIN_ELEMENTS_PER_THREAD))


def update_cpu(rows: torch.Tensor, counts: torch.Tensor, absmax: torch.Tensor, absmin: torch.Tensor,
               nonfinite: torch.Tensor, shift: int, first_code: int) -> None:
    """Add ``rows`` to the statistics in place with the C kernel (call only when ``cpu_enabled()``).

    ``rows``: contiguous CPU (R, C) float32, bfloat16 or float16; ``counts`` contiguous CPU (C, bins)
    int64 or int32 (the caller keeps int32 totals below 2**31); ``absmax``/``absmin`` contiguous CPU
    float32 (C,) (non-negative, at most +inf); ``nonfinite`` contiguous CPU int64 (C,).
    """
    row_count, channels = rows.shape
    _sketch_kernel.update(rows.view(BITS_VIEW[rows.dtype]).numpy(), DTYPE_CODES[rows.dtype], row_count, channels,
                          counts.numpy(), counts.element_size(), absmax.view(torch.int32).numpy(),
                          absmin.view(torch.int32).numpy(), nonfinite.numpy(), shift, first_code,
                          counts.shape[1], _threads(rows.numel()))


if __name__ == "__main__":  # python -m hif4fmt.calibration.sketch_kernel: say which sketch updates run
    print(status())
