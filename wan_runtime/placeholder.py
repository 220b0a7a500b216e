"""The default conditioning image of ``wan-runtime generate`` when no ``--image`` is given.

Why this module exists: Wan2.2 I2V always needs a first frame. Without a picture at hand the runtime
uses the same explicit placeholder as the calibration protocol (hif4fmt/calibration/protocol.py,
IMAGE_RULE): a blank RGB image whose every channel of every pixel is ``fill`` (default 0, black), so
that default renders see the activation distribution the masks were calibrated on.
"""

from __future__ import annotations

import numpy as np

DEFAULT_FILL = 0  # 8-bit channel value of the blank placeholder (0: black), as in calibration


def placeholder_image(width: int, height: int, fill: int = DEFAULT_FILL):
    """Return a blank PIL RGB image of width x height pixels, every channel ``fill`` (0..255)."""
    from PIL import Image

    if not 0 <= fill <= 255:
        raise ValueError(f"placeholder fill {fill}: expected 0..255")
    return Image.fromarray(np.full((height, width, 3), fill, dtype=np.uint8))
