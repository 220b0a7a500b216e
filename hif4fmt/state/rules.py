"""Value rules that the writer and the reader both enforce (spec 4): names, text, digests, blocks, descriptors.

Why this module exists: reader and writer mirror each other but never import each other; every rule
that decides whether a value is valid lives here once, and each caller passes the exception class to
raise (``StateWriteError`` when writing, ``StateFormatError`` when reading) and the location prefix.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from hif4fmt.constants import (
    CODEC_SPEC_VERSION,
    COMPONENT_SEPARATOR,
    LAYER_STATISTICS,
    MASK_APPLICATION,
    MASK_APPLICATION_ROTATED,
    MASK_AXIS_NAME,
    MAX_BASE_TENSORS,
    MAX_COMPONENTS,
    MAX_TENSOR_DIMS,
    MAX_INT,
    MASK_TENSOR_SUFFIX,
    MAX_NAME_BYTES,
    MAX_RETAINED_BLOCK_INDEX,
    MAX_TENSOR_NAME_BYTES,
    QUANT_AXIS,
    QUANT_AXIS_NAME,
    QUANT_FORMAT,
    QUANT_UNIT,
    ROTATIONS,
    SAFETENSORS_DTYPE_PATTERN,
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


def quantization_descriptor(recipe: Recipe, rotated: bool = False) -> dict[str, Any]:
    """Return header["quantization"] (spec 4.3): weight/activation formats and the mask descriptor.

    ``rotated``: at least one layer has a rotation (1.1); the application string then names R, which
    a 1.0 reader does not implement and so refuses (spec 4.3, 8).
    """
    element = {"format": QUANT_FORMAT, "codec_spec": CODEC_SPEC_VERSION, "unit": QUANT_UNIT,
               "axis": QUANT_AXIS, "axis_name": QUANT_AXIS_NAME, "encoder": recipe.encoder}
    application = MASK_APPLICATION_ROTATED if rotated else MASK_APPLICATION
    return {"weight": dict(element), "activation": dict(element),
            "mask": {"dtype": recipe.mask_dtype, "axis_name": MASK_AXIS_NAME, "application": application}}


def _is_float(value: Any) -> bool:
    return type(value) is float and math.isfinite(value)


def check_layer_recipe(value: Any, where: str, error: ErrorFactory) -> dict[str, Any]:
    """Return ``value`` if it is a layer recipe map (spec 4.7, 1.1): statistic, percentile, alpha.

    ``statistic`` "percentile" with ``percentile`` a float in (0, 100], or "max" with ``percentile`` nil;
    ``alpha`` a float in [0, 1]. Floats are float64 (an integer is refused, as in the state recipe).
    """
    if not isinstance(value, dict):
        raise error(f"{where}.recipe: expected a map, found {type(value).__name__}")
    for key in ("alpha", "percentile", "statistic"):
        if key not in value:
            raise error(f"{where}.recipe: missing key {key!r}")
    statistic, percentile, alpha = value["statistic"], value["percentile"], value["alpha"]
    if statistic not in LAYER_STATISTICS:
        raise error(f"{where}.recipe.statistic {statistic!r}: expected one of {', '.join(LAYER_STATISTICS)}")
    if statistic == "max" and percentile is not None:
        raise error(f"{where}.recipe.percentile {percentile!r}: must be nil when the statistic is max")
    if statistic == "percentile" and not (_is_float(percentile) and 0.0 < percentile <= 100.0):
        raise error(f"{where}.recipe.percentile {percentile!r}: expected a float in (0, 100]")
    if not (_is_float(alpha) and 0.0 <= alpha <= 1.0):
        raise error(f"{where}.recipe.alpha {alpha!r}: expected a float in [0, 1]")
    return value


def check_rotation(value: Any, where: str, error: ErrorFactory) -> str:
    """Return ``value`` if it names a rotation this version applies (spec 4.7, 1.1: "hadamard-64")."""
    if value not in ROTATIONS:
        raise error(f"{where}.rotation {value!r}: expected one of {', '.join(ROTATIONS)} (omit the key for none)")
    return value


def check_layout(value: Any, where: str, error: ErrorFactory) -> dict[str, Any]:
    """Return the known keys of a base layout map (spec 4.6, 1.1): name, pipeline, transformers."""
    if not isinstance(value, dict):
        raise error(f"{where}.layout: expected a map, found {type(value).__name__}")
    for key in ("name", "pipeline", "transformers"):
        if key not in value:
            raise error(f"{where}.layout: missing key {key!r}")
    check_name(value["name"], "layout name", f"{where}.layout", error)
    check_name(value["pipeline"], "pipeline class", f"{where}.layout", error)
    transformers = value["transformers"]
    if not isinstance(transformers, list) or len(transformers) > MAX_COMPONENTS:
        raise error(f"{where}.layout.transformers: expected an array of at most {MAX_COMPONENTS} names")
    for name in transformers:
        check_name(name, "transformer component", f"{where}.layout.transformers", error)
    if len(set(transformers)) != len(transformers):
        raise error(f"{where}.layout.transformers: {transformers!r} names a component twice")
    return {"name": value["name"], "pipeline": value["pipeline"], "transformers": list(transformers)}


_DTYPE = re.compile(SAFETENSORS_DTYPE_PATTERN)


def check_base_tensors(value: Any, components: dict[str, str], where: str,
                       error: ErrorFactory) -> dict[str, dict[str, tuple[str, tuple[int, ...], str]]]:
    """Return base.tensors (spec 4.6, 1.1) as component -> tensor -> (dtype, shape, digest), validated.

    Every key is a bound component; tensor names follow the module-name rule; dtype is a safetensors
    dtype spelling (``[A-Z0-9_]{1,16}``), shape at most 16 dimensions of ints in [0, 2^63 - 1], digest hex.
    """
    if not isinstance(value, dict):
        raise error(f"{where}.tensors: expected a map, found {type(value).__name__}")
    result: dict[str, dict[str, tuple[str, tuple[int, ...], str]]] = {}
    count = 0
    for component, table in value.items():
        check_name(component, "component", f"{where}.tensors", error)
        if component not in components:
            raise error(f"{where}.tensors.{component}: component is not bound in base.components")
        if not isinstance(table, dict):
            raise error(f"{where}.tensors.{component}: expected a map, found {type(table).__name__}")
        count += len(table)
        if count > MAX_BASE_TENSORS:
            raise error(f"{where}.tensors: more than {MAX_BASE_TENSORS} tensors")
        rows = {}
        for name, row in table.items():
            at = f"{where}.tensors.{component}"
            check_name(name, "tensor name", at, error)
            at = f"{at}.{name}"
            if not isinstance(row, dict):
                raise error(f"{at}: expected a map, found {type(row).__name__}")
            for key in ("digest", "dtype", "shape"):
                if key not in row:
                    raise error(f"{at}: missing key {key!r}")
            dtype, shape = row["dtype"], row["shape"]
            if not isinstance(dtype, str) or not _DTYPE.fullmatch(dtype):
                raise error(f"{at}.dtype {dtype!r}: expected a safetensors dtype such as BF16 or F32")
            if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
                    or not all(type(d) is int and 0 <= d <= MAX_INT for d in shape)):
                raise error(f"{at}.shape {shape!r}: expected at most {MAX_TENSOR_DIMS} integers >= 0")
            digest = check_hex_digest(row["digest"], "digest", at, error)
            rows[name] = (dtype, tuple(shape), digest)
        result[component] = rows
    return result
