"""Value rules that the writer and the reader both enforce (spec 4): names, text, digests, blocks, descriptors.

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
    MAX_RETAINED_BLOCK_INDEX,
    MAX_TENSOR_NAME_BYTES,
    QUANT_AXIS,
    QUANT_AXIS_NAME,
    QUANT_FORMAT,
    QUANT_UNIT,
    SHA256_HEX_CHARS,
)
from hif4fmt.errors import Hif4Error
from hif4fmt.recipe import COMPONENTS, Recipe

ErrorFactory = Callable[[str], Hif4Error]

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")  # component and module names (PyTorch module paths)
TENSOR_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-/]+")  # tensor names: names joined by "/" (spec 4.8)
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc: never allowed in text
RETAINED_BLOCK_PATTERN = re.compile(  # canonical "COMPONENT:INDEX": no spaces, no sign, no leading zeros
    r"(%s):(0|[1-9][0-9]{0,%d})" % ("|".join(map(re.escape, COMPONENTS)), len(str(MAX_RETAINED_BLOCK_INDEX)) - 1))
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


def check_tensor_name(value: Any, where: str, error: ErrorFactory) -> str:
    """Return ``value`` if it is a valid tensor name: 1..4096 characters of [A-Za-z0-9_.-/] (spec 4.8)."""
    if not isinstance(value, str) or not TENSOR_NAME_PATTERN.fullmatch(value) or len(value) > MAX_TENSOR_NAME_BYTES:
        raise error(f"{where}: tensor name {value!r} must be 1 to {MAX_TENSOR_NAME_BYTES} characters of "
                    f"A-Z a-z 0-9 _ . - /")
    return value


def check_text(value: Any, what: str, where: str, error: ErrorFactory) -> str:
    """Return ``value`` if it is non-empty text without control characters (spec 4.7: reasons, hub hints).

    Control characters are exactly Unicode category Cc (U+0000..U+001F, U+007F..U+009F), a set that does
    not depend on the Unicode version, so every reader accepts the same strings.
    """
    if not isinstance(value, str) or not value:
        raise error(f"{where}: {what} {value!r} must be a non-empty string")
    bad = CONTROL_CHARACTERS.search(value)
    if bad:
        raise error(f"{where}: {what} {value!r} contains the control character U+{ord(bad.group()):04X} at "
                    f"index {bad.start()}; text may not hold control characters (they could drive a terminal)")
    return value


def check_hub_hints(value: Any, where: str, error: ErrorFactory) -> dict[str, str]:
    """Return ``value`` if it maps hint names ([A-Za-z0-9_.-]) to non-empty text without control characters."""
    if not isinstance(value, dict):
        raise error(f"{where}: hub_hints must be a map of str -> str, found {type(value).__name__}")
    for key, hint in value.items():
        check_name(key, "hub hint key", where, error)
        if not isinstance(hint, str):
            raise error(f"{where}: hub hint {key!r} must be a string, found {type(hint).__name__}")
        check_text(hint, f"hub hint {key}", where, error)
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
