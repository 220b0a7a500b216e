"""wan_runtime: run Wan2.2 I2V with HiF4 W4A4 experts rebuilt from a BF16 base and a .hif4 state.

Why this package exists: a .hif4 state holds masks, not weights; this package turns base + state into a
normal diffusers ``WanImageToVideoPipeline`` whose listed linears are ``HiF4Linear`` (packed HiF4
weights, HiF4 activations), renders videos with it and compares them with BF16 (``wan-runtime``).
Modules: ``hif4_linear`` (the layer), ``loader`` (base + state -> pipeline), ``generate`` (one render),
``video`` (MP4/GIF files), ``frame_metrics`` (PSNR/SSIM), ``placeholder`` (default image), ``cli``.
Docs: docs/runtime.md.

The names below are imported on first use, so ``wan-runtime`` can start (and name the extra it needs,
``pip install "hif4fmt[runtime]"``) where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {"HiF4Linear": "wan_runtime.hif4_linear", "apply_state": "wan_runtime.loader",
            "load_pipeline": "wan_runtime.loader", "quantized_layers": "wan_runtime.loader"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wan_runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
