"""hif4fmt: the HiFloat4 codec, the .hif4 compact PTQ state format and the tools around it.

Why this module is nearly empty: ``hif4fmt inspect/diff/verify`` must start without importing torch,
so importing the package imports nothing heavy. The codec names (``quantize``, ``dequantize``,
``fake_quantize``, ``HiF4Tensor``) are resolved lazily from ``hif4fmt.hifloat4`` on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

_CODEC_NAMES = ("quantize", "dequantize", "fake_quantize", "HiF4Tensor")


def __getattr__(name: str):
    if name in _CODEC_NAMES:
        from hif4fmt import hifloat4

        return getattr(hifloat4, name)
    raise AttributeError(f"module 'hif4fmt' has no attribute {name!r}")


__all__ = ["__version__", *_CODEC_NAMES]
