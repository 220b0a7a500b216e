"""Value rules that the writer and the reader both enforce (spec 4.4): names, digests, blocks, descriptors.

Why this module exists: reader and writer mirror each other but never import each other; every rule
that decides whether a value is valid lives here once, and each caller passes the exception class to
raise (``StateWriteError`` when writing, ``StateFormatError`` when reading) and the location prefix.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from hif4fmt.constants import (
    CODEC_SPEC_VERSION,
    COMPONENT_SEPARATOR,
    MASK_APPLICATION,
    MASK_AXIS_NAME,
    MASK_TENSOR_SUFFIX,
    MAX_NAME_BYTES,
    QUANT_AXIS,
    QUANT_AXIS_NAME,
    QUANT_FORMAT,
    QUANT_UNIT,
    SHA256_HEX_CHARS,
)
from hif4fmt.errors import Hif4Error
from hif4fmt.recipe import Recipe

ErrorFactory = Callable[[str], Hif4Error]

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")  # component and module names (PyTorch module paths)
HEX_DIGEST_PATTERN = re.compile(r"[0-9a-f]{%d}" % SHA256_HEX_CHARS)  # lowercase hex sha256
BLOCK_PREFIX = "blocks.{index}."  # module path prefix of transformer block ``index``


def check_name(value: Any, what: str, where: str, error: ErrorFactory) -> str:
    """Return ``value`` if it is a valid component/module name: 1..1024 chars of [A-Za-z0-9_.-]."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or len(value) > MAX_NAME_BYTES:
        raise error(f"{where}: {what} {value!r} must be 1 to {MAX_NAME_BYTES} characters of "
                    f"A-Z a-z 0-9 _ . - (a PyTorch module path)")
    return value


def check_hex_digest(value: Any, what: str, where: str, error: ErrorFactory) -> str:
    """Return ``value`` if it is a lowercase 64-character hex SHA-256 digest."""
    if not isinstance(value, str) or not HEX_DIGEST_PATTERN.fullmatch(value):
        raise error(f"{where}: {what} {value!r} must be 64 lowercase hex characters (a sha256 digest)")
    return value


def check_text(value: Any, what: str, where: str, error: ErrorFactory) -> str:
    """Return ``value`` if it is a printable string (no control characters), as reasons must be."""
    if not isinstance(value, str) or not value or not value.isprintable():
        raise error(f"{where}: {what} {value!r} must be a non-empty printable string")
    return value


def mask_tensor_name(component: str, module: str) -> str:
    """Return the tensor name of a layer's mask: ``<component>/<module>.mask`` (spec 4.7)."""
    return f"{component}{COMPONENT_SEPARATOR}{module}{MASK_TENSOR_SUFFIX}"


def retained_block_of(recipe: Recipe, component: str, module: str) -> str | None:
    """Return "component:index" of the retained block that contains ``module``, else None."""
    for block in recipe.retained_blocks:
        if block.component == component and module.startswith(BLOCK_PREFIX.format(index=block.index)):
            return str(block)
    return None


def quantization_descriptor(recipe: Recipe) -> dict[str, Any]:
    """Return header["quantization"] (spec 4.3): weight/activation formats and the mask descriptor."""
    element = {"format": QUANT_FORMAT, "codec_spec": CODEC_SPEC_VERSION, "unit": QUANT_UNIT,
               "axis": QUANT_AXIS, "axis_name": QUANT_AXIS_NAME, "encoder": recipe.encoder}
    return {"weight": dict(element), "activation": dict(element),
            "mask": {"dtype": recipe.mask_dtype, "axis_name": MASK_AXIS_NAME, "application": MASK_APPLICATION}}
