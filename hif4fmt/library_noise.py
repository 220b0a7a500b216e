"""Drop one known-harmless notice of transformers, and nothing else, for the commands that load Wan.

Why this module exists: importing diffusers' Wan I2V pipeline makes transformers log, once, that
``CLIPImageProcessor`` requires torchvision and falls back to PIL. Wan2.2-I2V has no CLIP image
encoder, so the notice is noise in every ``hif4fmt calibrate`` and ``wan-runtime`` run; silencing whole
libraries would also hide warnings that matter. Torch-free (only ``logging``).
"""

from __future__ import annotations

import logging

# transformers' one-time notice when CLIPImageProcessor is imported without torchvision (both parts must match)
TORCHVISION_NOTICE_PARTS = ("requires torchvision", "falling back to")
TORCHVISION_NOTICE_LOGGER = "transformers.utils.import_utils"


class _TorchvisionNoticeFilter(logging.Filter):
    """Drop only transformers' notice that ``CLIPImageProcessor`` falls back to PIL without torchvision.

    diffusers' Wan I2V pipeline module imports ``CLIPImageProcessor`` for Wan2.1's CLIP image encoder;
    Wan2.2-I2V has none (``image_processor`` is null in its model_index.json), so the notice is noise.
    Every other record passes, warnings and errors of transformers included.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not all(part in message for part in TORCHVISION_NOTICE_PARTS)


def drop_torchvision_notice() -> None:
    """Install the filter above once on the logger that emits the notice (before diffusers imports it)."""
    logger = logging.getLogger(TORCHVISION_NOTICE_LOGGER)
    if not any(isinstance(existing, _TorchvisionNoticeFilter) for existing in logger.filters):
        logger.addFilter(_TorchvisionNoticeFilter())
