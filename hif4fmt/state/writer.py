"""Write a ``State`` as a .hif4 file: validate everything, lay out canonical bytes, replace atomically.

Why this module exists: the writer is the only place that turns a state into bytes, so it is where
determinism is won: layers sorted canonically, masks encoded bit-exactly, the header canonical msgpack,
tensors laid out in name order on 64-byte boundaries with zero padding, no timestamps (spec 3, 4).
Invalid content (a NaN or non-positive mask, a quantized layer inside a retained block, a duplicate
layer, an unbound component) raises ``StateWriteError`` naming the layer before any byte is written;
I/O failures leave no partial file (``hif4fmt.atomic``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from hif4fmt.atomic import atomic_write
from hif4fmt.constants import (
    ALIGNMENT,
    CHECKSUMMED_PREAMBLE_BYTES,
    FINGERPRINT_ALGORITHMS,
    HEADER_OFFSET,
    MAX_COMPONENTS,
    MAX_FEATURES,
    MAX_FREE_MAP_BYTES,
    MAX_HEADER_BYTES,
    MAX_LAYERS,
    PREAMBLE_STRUCT,
    RESERVED_BYTES,
    STATE_FORMAT_NAME,
    STATE_MAGIC,
    STATE_MAJOR,
    STATE_MINOR,
    STATE_MINOR_1_0,
)
from hif4fmt.codec.rotation import ROTATION_SIZE
from hif4fmt.errors import StateWriteError
from hif4fmt.recipe import Recipe
from hif4fmt.state.canonical import pack_canonical
from hif4fmt.state.masks import encode_mask, decode_mask, first_invalid_value, mask_stats
from hif4fmt.state.model import LayerRecipe, State, TensorDigest
from hif4fmt.state.rules import (
    RETAINED_BLOCK_PATTERN,
    check_base_tensors,
    check_hex_digest,
    check_hub_hints,
    check_layer_recipe,
    check_layout,
    check_name,
    check_rotation,
    check_text,
    mask_tensor_name,
    quantization_descriptor,
    retained_block_of,
)

KNOWN_TOP_LEVEL_KEYS = ("base", "calibration", "components", "format", "format_version", "producer",
                        "quantization", "recipe", "tensors")  # spec 4.2; State.extra may not reuse them


def align(offset: int) -> int:
    """Return ``offset`` rounded up to the next multiple of ALIGNMENT (64) bytes."""
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _free_map(value: Any, what: str) -> dict[str, Any]:
    """Return a free-form map (calibration, producer, extra) as canonical plain types, size bounded."""
    if not isinstance(value, dict):
        raise StateWriteError(f"state.{what}: expected a dict, found {type(value).__name__}")
    packed = pack_canonical(value, lambda message: StateWriteError(f"state.{what}: {message}"))
    if len(packed) > MAX_FREE_MAP_BYTES:
        raise StateWriteError(f"state.{what}: {len(packed)} bytes encoded exceeds {MAX_FREE_MAP_BYTES}")
    return value


def _validate(state: State) -> None:
    """Raise ``StateWriteError`` (or ``RecipeError``) for anything the reader would refuse."""
    error = StateWriteError
    if not isinstance(state, State):
        raise error(f"write_state: expected a State, found {type(state).__name__}")
    if not isinstance(state.recipe, Recipe):
        raise error(f"state.recipe: expected a hif4fmt.recipe.Recipe, found {type(state.recipe).__name__}")
    state.recipe.validate()  # RecipeError: e.g. more than 2 retained blocks
    for block in state.recipe.retained_blocks:
        if not RETAINED_BLOCK_PATTERN.fullmatch(str(block)):
            raise error(f"state.recipe.retained_blocks: {str(block)!r} is outside what the format stores "
                        f"(COMPONENT:INDEX with INDEX < 10^9)")
    base = state.base
    if base.algorithm not in FINGERPRINT_ALGORITHMS:
        raise error(f"state.base.algorithm {base.algorithm!r}: expected one of {', '.join(FINGERPRINT_ALGORITHMS)}")
    check_hex_digest(base.fingerprint, "base fingerprint", "state.base", error)
    if not isinstance(base.components, dict) or not 1 <= len(base.components) <= MAX_COMPONENTS:
        raise error(f"state.base.components: expected 1 to {MAX_COMPONENTS} components, found {base.components!r}")
    for name, digest in base.components.items():
        check_name(name, "component", "state.base.components", error)
        check_hex_digest(digest, f"digest of component {name}", "state.base.components", error)
    if type(base.total_bytes) is not int or base.total_bytes < 0:
        raise error(f"state.base.total_bytes {base.total_bytes!r}: expected an int >= 0")
    check_hub_hints(base.hub_hints, "state.base.hub_hints", error)
    if base.layout is not None:
        check_layout(base.layout, "state.base", error)
    if not isinstance(base.tensors, dict):
        raise error(f"state.base.tensors: expected a dict, found {type(base.tensors).__name__}")
    if base.tensors:
        for component, table in base.tensors.items():
            for name, digest in (table.items() if isinstance(table, dict) else ()):
                if not isinstance(digest, TensorDigest):
                    raise error(f"state.base.tensors.{component}.{name}: expected a TensorDigest, "
                                f"found {type(digest).__name__}")
        check_base_tensors(base.to_dict()["tensors"], base.components, "state.base", error)
    if len(state.layers) + len(state.excluded) > MAX_LAYERS:
        raise error(f"state: {len(state.layers) + len(state.excluded)} layers exceed the limit {MAX_LAYERS}")
    seen: dict[tuple[str, str], str] = {}
    for layer in state.layers:
        where = f"layer {layer.component}/{layer.module}"
        check_name(layer.component, "component", where, error)
        check_name(layer.module, "module", where, error)
        if layer.component not in base.components:
            raise error(f"{where}: component {layer.component!r} is not bound in state.base.components "
                        f"({', '.join(sorted(base.components))})")
        if layer.key in seen:
            raise error(f"{where}: listed twice")
        seen[layer.key] = "quantized"
        for what, value in (("in_features", layer.in_features), ("out_features", layer.out_features)):
            if type(value) is not int or not 1 <= value <= MAX_FEATURES:
                raise error(f"{where}: {what} {value!r} must be an int in [1, {MAX_FEATURES}]")
        check_hex_digest(layer.weight_fingerprint, "weight_fingerprint", where, error)
        if layer.recipe is not None:
            if not isinstance(layer.recipe, LayerRecipe):
                raise error(f"{where}: recipe must be a hif4fmt.state.LayerRecipe or None, found "
                            f"{type(layer.recipe).__name__}")
            try:
                check_layer_recipe(layer.recipe.to_dict(), where, error)
            except (TypeError, ValueError):
                raise error(f"{where}: recipe {layer.recipe!r} holds a value that is not a number") from None
        if layer.rotation is not None:
            check_rotation(layer.rotation, where, error)
            if layer.in_features % ROTATION_SIZE:
                raise error(f"{where}: rotation {layer.rotation} needs in_features to be a multiple of "
                            f"{ROTATION_SIZE}, found {layer.in_features}")
        table = base.tensors.get(layer.component)
        if table is not None:
            weight = table.get(f"{layer.module}.weight")
            if weight is None or weight.digest != layer.weight_fingerprint:
                raise error(f"{where}: base.tensors records {layer.module}.weight "
                            f"{'as absent' if weight is None else 'with another digest'} than weight_fingerprint; "
                            f"record both from the same fingerprint")
        block = retained_block_of(state.recipe, layer.component, layer.module)
        if block is not None:
            raise error(f"{where}: lies in retained block {block}, which must stay high precision; "
                        f"exclude it or drop the block from recipe.retained_blocks")
        mask = layer.mask
        if not isinstance(mask, np.ndarray) or mask.dtype != np.float32 or mask.shape != (layer.in_features,):
            found = (f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__)
            raise error(f"{where}: mask must be a float32 array of shape ({layer.in_features},) "
                        f"(in_features), found {found}; use mask.astype(np.float32)")
        bad = first_invalid_value(mask)
        if bad is not None:
            raise error(f"{where}: mask value {float(mask[bad])!r} at input channel {bad} is not finite and > 0; "
                        f"masks divide weights, so every value must be a positive finite number")
    for layer in state.excluded:
        where = f"excluded layer {layer.component}/{layer.module}"
        check_name(layer.component, "component", where, error)
        check_name(layer.module, "module", where, error)
        check_text(layer.reason, "reason", where, error)
        if layer.component not in base.components:
            raise error(f"{where}: component {layer.component!r} is not bound in state.base.components")
        if layer.key in seen:
            raise error(f"{where}: also listed as {seen[layer.key]}; a layer is either quantized or excluded")
        seen[layer.key] = "excluded"
    for key in state.extra:
        if key in KNOWN_TOP_LEVEL_KEYS:
            raise error(f"state.extra key {key!r} collides with a header key of this version")


def state_minor(state: State) -> int:
    """Return the lowest minor version whose features ``state`` uses (spec 8): 1 for any 1.1 key, else 0."""
    uses_1_1 = (state.base.layout is not None or bool(state.base.tensors)
                or any(layer.recipe is not None or layer.rotation is not None for layer in state.layers))
    return STATE_MINOR if uses_1_1 else STATE_MINOR_1_0


def encode_state(state: State) -> bytes:
    """Return the complete .hif4 file bytes of ``state`` (deterministic: same state, same bytes).

    Raises ``StateWriteError`` for invalid content (naming the layer) and ``RecipeError`` for a recipe
    that breaks its own rules (e.g. more than 2 retained blocks).
    """
    _validate(state)
    recipe = state.recipe
    mask_dtype = recipe.mask_dtype
    tensors: dict[str, dict[str, Any]] = {}
    blobs: dict[str, bytes] = {}
    components: dict[str, dict[str, list]] = {name: {"layers": [], "excluded": []} for name in state.base.components}
    for layer in state.layers:  # spec 4.7
        where = f"layer {layer.component}/{layer.module}"
        blob = encode_mask(layer.mask, mask_dtype)
        stored = decode_mask(blob, mask_dtype)
        bad = first_invalid_value(stored)
        if bad is not None:
            raise StateWriteError(f"{where}: mask value {float(layer.mask[bad])!r} at input channel {bad} becomes "
                                  f"{float(stored[bad])!r} in {mask_dtype}; use mask_dtype float32")
        stats = mask_stats(stored)
        name = mask_tensor_name(layer.component, layer.module)
        blobs[name] = blob
        tensors[name] = {"dtype": mask_dtype, "shape": [layer.in_features],
                         "sha256": hashlib.sha256(blob).hexdigest()}
        row = {
            "module": layer.module, "in_features": layer.in_features, "out_features": layer.out_features,
            "mask": name, "weight_fingerprint": layer.weight_fingerprint,
            "mask_stats": {"min": stats.min, "max": stats.max, "mean": stats.mean},
        }
        if layer.recipe is not None:  # 1.1
            row["recipe"] = layer.recipe.to_dict()
        if layer.rotation is not None:  # 1.1
            row["rotation"] = layer.rotation
        components[layer.component]["layers"].append(dict(sorted(row.items())))
    for layer in state.excluded:
        components[layer.component]["excluded"].append({"module": layer.module, "reason": layer.reason})
    offset = 0  # spec 3.3: tensors in ascending name order, each on a 64-byte boundary
    for name in sorted(tensors):
        begin = align(offset)
        tensors[name]["offsets"] = [begin, begin + len(blobs[name])]
        offset = begin + len(blobs[name])
    minor = state_minor(state)
    rotated = any(layer.rotation is not None for layer in state.layers)
    header = {
        "format": STATE_FORMAT_NAME,
        "format_version": f"{STATE_MAJOR}.{minor}",
        "producer": _free_map(state.producer, "producer"),
        "quantization": quantization_descriptor(recipe, rotated),
        "recipe": recipe.to_dict(),
        "calibration": _free_map(state.calibration, "calibration"),
        "base": state.base.to_dict(),
        "components": components,
        "tensors": tensors,
        **_free_map(state.extra, "extra"),
    }
    header_bytes = pack_canonical(header, StateWriteError)
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise StateWriteError(f"state header is {len(header_bytes)} bytes; the limit is {MAX_HEADER_BYTES}")
    unsigned = PREAMBLE_STRUCT.pack(STATE_MAGIC, STATE_MAJOR, minor, len(header_bytes), b"\0" * 32,
                                    b"\0" * RESERVED_BYTES)
    header_sha256 = hashlib.sha256(unsigned[:CHECKSUMMED_PREAMBLE_BYTES] + header_bytes).digest()  # spec 3.2
    preamble = PREAMBLE_STRUCT.pack(STATE_MAGIC, STATE_MAJOR, minor, len(header_bytes), header_sha256,
                                    b"\0" * RESERVED_BYTES)
    data_offset = align(HEADER_OFFSET + len(header_bytes))
    parts = [preamble, header_bytes, b"\0" * (data_offset - HEADER_OFFSET - len(header_bytes))]
    position = 0
    for name in sorted(tensors):
        begin, end = tensors[name]["offsets"]
        parts.append(b"\0" * (begin - position))
        parts.append(blobs[name])
        position = end
    return b"".join(parts)


def write_state(path: str | os.PathLike, state: State) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    Raises ``StateWriteError`` for invalid content or an I/O failure; in both cases no file is left
    at ``path`` except a previous one, untouched. ``RecipeError`` for an invalid recipe.
    """
    data = encode_state(state)
    try:
        with atomic_write(path) as handle:
            handle.write(data)
    except OSError as exc:
        raise StateWriteError(f"{path}: cannot write the state: {exc}; nothing was written") from None


