"""Read a .hif4 file into a ``State``, trusting nothing: every length, offset and value is checked first.

Why this module exists: a state file may come from anywhere (a hub download, a truncated copy, a
hostile author), so the reader bounds each length before it reads, verifies the header checksum before
it decodes, checks the tensor layout against the file size before it reads a tensor, and validates
every value the writer would have refused. Each failure raises a typed error (``StateFormatError`` or
its subclasses ``UnsupportedVersionError`` and ``ChecksumError``) naming the file, the byte offset or
layer, what was expected and what was found. ``load_tensors=False`` reads only the preamble and header
(what ``inspect`` needs). The steps follow spec/state-v1.md section 5.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import stat
from typing import Any, BinaryIO

from hif4fmt.constants import (
    ALIGNMENT,
    CHECKSUMMED_PREAMBLE_BYTES,
    FINGERPRINT_ALGORITHMS,
    HEADER_OFFSET,
    HEADER_SHA256_OFFSET,
    MASK_DTYPES,
    MAX_COMPONENTS,
    MAX_FEATURES,
    MAX_HEADER_BYTES,
    MAX_LAYERS,
    MAX_TENSORS,
    PREAMBLE_BYTES,
    PREAMBLE_STRUCT,
    RESERVED_OFFSET,
    STATE_FORMAT_NAME,
    STATE_MAGIC,
    SUPPORTED_MAJORS,
)
from hif4fmt.errors import ChecksumError, RecipeError, StateFormatError, UnsupportedVersionError
from hif4fmt.recipe import Recipe
from hif4fmt.state.canonical import pack_canonical, unpack_canonical
from hif4fmt.state.masks import decode_mask, first_invalid_value, mask_stats
from hif4fmt.state.model import (
    BaseBinding,
    ExcludedLayer,
    LayerRecipe,
    MaskRecord,
    MaskStats,
    QuantizedLayer,
    State,
    StateLayout,
    TensorDigest,
)
from hif4fmt.codec.rotation import ROTATION_SIZE
from hif4fmt.state.rules import (
    RETAINED_BLOCK_PATTERN,
    check_base_tensors,
    check_hex_digest,
    check_hub_hints,
    check_layer_recipe,
    check_layout,
    check_name,
    check_rotation,
    check_tensor_name,
    check_text,
    mask_tensor_name,
    quantization_descriptor,
    retained_block_of,
)

KNOWN_TOP_LEVEL_KEYS = ("base", "calibration", "components", "format", "format_version", "producer",
                        "quantization", "recipe", "tensors")  # spec 4.2; everything else -> State.extra


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


class _Source:
    """A readable state: a binary file object of known size and a name for messages."""

    def __init__(self, handle: BinaryIO, size: int, name: str):
        self.handle, self.size, self.name = handle, size, name

    def error(self, message: str) -> StateFormatError:
        return StateFormatError(f"{self.name}: {message}")

    def read(self, offset: int, length: int, what: str) -> bytes:
        """Return exactly ``length`` bytes at ``offset``; truncation raises StateFormatError."""
        if offset + length > self.size:
            raise self.error(f"{what} needs bytes {offset}..{offset + length} but the file has {self.size} "
                             f"bytes; the file is truncated")
        self.handle.seek(offset)
        data = self.handle.read(length)
        if len(data) != length:
            raise self.error(f"{what}: read {len(data)} of {length} bytes at offset {offset}; the file is truncated")
        return data


def _get(mapping: dict, key: str, kind: type | tuple, where: str, source: _Source) -> Any:
    """Return mapping[key] if present and of ``kind`` (bool never counts as int); else StateFormatError."""
    if key not in mapping:
        raise source.error(f"{where}: missing key {key!r}")
    value = mapping[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise source.error(f"{where}.{key}: expected {names}, found {type(value).__name__} {value!r:.80}")
    return value


def _parse_recipe(stored: dict, source: _Source) -> Recipe:
    """Return the recipe of header["recipe"] (spec 4.4), refusing any spelling but the canonical one.

    ``Recipe.from_dict`` is lenient (it accepts ints for floats, unsorted blocks, " transformer:01");
    the file must hold exactly ``Recipe.to_dict()`` for every known key, so one recipe has one encoding.
    Unknown keys are ignored (spec 4.2).
    """
    error = source.error
    blocks = stored.get("retained_blocks")
    if isinstance(blocks, list):
        for block in blocks:
            if not isinstance(block, str) or not RETAINED_BLOCK_PATTERN.fullmatch(block):
                raise error(f"recipe.retained_blocks: {block!r} is not COMPONENT:INDEX (component transformer or "
                            f"transformer_2, INDEX decimal without sign, spaces or leading zeros, < 10^9)")
    try:
        recipe = Recipe.from_dict(stored)
    except (RecipeError, ValueError, TypeError) as exc:
        raise error(f"recipe: {exc}") from None
    for key, canonical in recipe.to_dict().items():
        found = stored[key]
        if pack_canonical(found, StateFormatError) != pack_canonical(canonical, StateFormatError):
            raise error(f"recipe.{key}: stored {found!r} ({type(found).__name__}), canonical form is {canonical!r} "
                        f"({type(canonical).__name__}); floats are float64, retained blocks sorted by component "
                        f"then index without duplicates")
    return recipe


def _parse_base(header: dict, source: _Source) -> BaseBinding:
    error = source.error
    base = _get(header, "base", dict, "header", source)
    algorithm = _get(base, "algorithm", str, "base", source)
    if algorithm not in FINGERPRINT_ALGORITHMS:
        raise error(f"base.algorithm {algorithm!r} is unknown; this version implements "
                    f"{', '.join(FINGERPRINT_ALGORITHMS)}")
    fingerprint = check_hex_digest(_get(base, "fingerprint", str, "base", source), "base.fingerprint", "header", error)
    components = _get(base, "components", dict, "base", source)
    if not 1 <= len(components) <= MAX_COMPONENTS:
        raise error(f"base.components: expected 1 to {MAX_COMPONENTS} components, found {len(components)}")
    for name, digest in components.items():
        check_name(name, "component", "base.components", error)
        check_hex_digest(digest, f"digest of component {name}", "base.components", error)
    total_bytes = _get(base, "total_bytes", int, "base", source)
    if total_bytes < 0:
        raise error(f"base.total_bytes {total_bytes}: expected >= 0")
    hub_hints = check_hub_hints(_get(base, "hub_hints", dict, "base", source), "base.hub_hints", error)
    layout = check_layout(base["layout"], "base", error) if "layout" in base else None  # 1.1
    tensors: dict[str, dict[str, TensorDigest]] = {}
    if "tensors" in base:  # 1.1
        for component, table in check_base_tensors(base["tensors"], components, "base", error).items():
            tensors[component] = {name: TensorDigest(*row) for name, row in table.items()}
    return BaseBinding(algorithm, fingerprint, dict(components), total_bytes, dict(hub_hints), layout, tensors)


def _parse_tensors(header: dict, data_offset: int, source: _Source) -> dict[str, MaskRecord]:
    """Return the tensor table after checking the layout rules of spec 3.3 against the file size."""
    error = source.error
    table = _get(header, "tensors", dict, "header", source)
    if len(table) > MAX_TENSORS:
        raise error(f"tensors: {len(table)} entries exceed the limit {MAX_TENSORS}")
    records: dict[str, MaskRecord] = {}
    expected_begin = 0
    previous = None
    data_bytes = source.size - data_offset
    for name in sorted(table):
        where = f"tensors.{name}"
        check_tensor_name(name, "tensors", error)
        info = table[name]
        if not isinstance(info, dict):
            raise error(f"{where}: expected a map, found {type(info).__name__}")
        dtype = _get(info, "dtype", str, where, source)
        if dtype not in MASK_DTYPES:
            raise error(f"{where}.dtype {dtype!r}: expected one of {', '.join(MASK_DTYPES)}")
        shape = _get(info, "shape", list, where, source)
        if len(shape) != 1 or type(shape[0]) is not int or not 1 <= shape[0] <= MAX_FEATURES:
            raise error(f"{where}.shape {shape!r}: expected [n] with 1 <= n <= {MAX_FEATURES}")
        offsets = _get(info, "offsets", list, where, source)
        if len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise error(f"{where}.offsets {offsets!r}: expected [begin, end] integers")
        begin, end = offsets
        sha256 = check_hex_digest(_get(info, "sha256", str, where, source), f"{where}.sha256", "header", error)
        nbytes = shape[0] * MASK_DTYPES[dtype][1]
        if begin < 0:
            raise error(f"{where}: offsets {offsets!r} are negative")
        if begin < expected_begin and previous is not None:
            raise error(f"{where}: begins at data byte {begin}, overlapping {previous} which ends at data byte "
                        f"{records[previous].end}; tensors must not overlap (spec 3.3)")
        if begin != expected_begin:
            raise error(f"{where}: begins at data byte {begin}, expected {expected_begin} (tensors follow each other "
                        f"in name order at the next {ALIGNMENT}-byte boundary, spec 3.3)")
        if end - begin != nbytes:
            raise error(f"{where}: offsets [{begin}, {end}] hold {end - begin} bytes, but dtype {dtype} shape "
                        f"{shape} needs {nbytes}")
        if end > data_bytes:
            raise error(f"{where}: ends at data byte {end} (file byte {data_offset + end}) but the file has "
                        f"{source.size} bytes; the file is truncated or the offsets are out of range")
        records[name] = MaskRecord(name, dtype, (shape[0],), begin, end, sha256)
        previous = name
        expected_begin = _align(end)
    last_end = records[previous].end if previous is not None else 0
    if data_offset + last_end != source.size:
        raise error(f"file has {source.size} bytes but its tensors end at byte {data_offset + last_end}; "
                    f"{source.size - data_offset - last_end} trailing bytes are not allowed (spec 3.3)")
    return records


def _parse_layers(header: dict, recipe: Recipe, base: BaseBinding, records: dict[str, MaskRecord],
                  source: _Source) -> tuple[list[QuantizedLayer], list[ExcludedLayer]]:
    error = source.error
    components = _get(header, "components", dict, "header", source)
    layers: list[QuantizedLayer] = []
    excluded: list[ExcludedLayer] = []
    used_tensors: set[str] = set()
    for component in sorted(components):
        where = f"components.{component}"
        check_name(component, "component", "components", error)
        if component not in base.components:
            raise error(f"{where}: component is not bound in base.components ({', '.join(sorted(base.components))})")
        entry = components[component]
        if not isinstance(entry, dict):
            raise error(f"{where}: expected a map, found {type(entry).__name__}")
        quantized_modules: list[str] = []
        excluded_modules: list[str] = []
        for i, row in enumerate(_get(entry, "layers", list, where, source)):
            row_where = f"{where}.layers[{i}]"
            if not isinstance(row, dict):
                raise error(f"{row_where}: expected a map")
            module = check_name(_get(row, "module", str, row_where, source), "module", row_where, error)
            row_where = f"layer {component}/{module}"
            in_features = _get(row, "in_features", int, row_where, source)
            out_features = _get(row, "out_features", int, row_where, source)
            for what, value in (("in_features", in_features), ("out_features", out_features)):
                if not 1 <= value <= MAX_FEATURES:
                    raise error(f"{row_where}: {what} {value} must be in [1, {MAX_FEATURES}]")
            weight_fingerprint = check_hex_digest(_get(row, "weight_fingerprint", str, row_where, source),
                                                  "weight_fingerprint", row_where, error)
            tensor = _get(row, "mask", str, row_where, source)
            if tensor != mask_tensor_name(component, module):
                raise error(f"{row_where}: mask tensor {tensor!r}, expected {mask_tensor_name(component, module)!r}")
            if tensor not in records:
                raise error(f"{row_where}: mask tensor {tensor!r} is not in the tensor table")
            record = records[tensor]
            used_tensors.add(tensor)
            if record.dtype != recipe.mask_dtype or record.shape != (in_features,):
                raise error(f"{row_where}: mask is {record.dtype} {list(record.shape)}, expected "
                            f"{recipe.mask_dtype} [{in_features}] (recipe.mask_dtype, in_features)")
            stats_map = _get(row, "mask_stats", dict, row_where, source)
            stats = MaskStats(*(_get(stats_map, key, float, f"{row_where}.mask_stats", source)
                                for key in ("min", "max", "mean")))
            block = retained_block_of(recipe, component, module)
            if block is not None:
                raise error(f"{row_where}: quantized, but it lies in retained block {block} which must stay "
                            f"high precision")
            layer_recipe = None
            if "recipe" in row:  # 1.1
                stored = check_layer_recipe(row["recipe"], row_where, error)
                layer_recipe = LayerRecipe(stored["statistic"], stored["percentile"], stored["alpha"])
            rotation = None
            if "rotation" in row:  # 1.1
                rotation = check_rotation(row["rotation"], row_where, error)
                if in_features % ROTATION_SIZE:
                    raise error(f"{row_where}: rotation {rotation} needs in_features to be a multiple of "
                                f"{ROTATION_SIZE}, found {in_features}")
            table = base.tensors.get(component)
            if table is not None:
                weight = table.get(f"{module}.weight")
                if weight is None or weight.digest != weight_fingerprint:
                    raise error(f"{row_where}: base.tensors.{component} "
                                f"{'has no' if weight is None else 'gives another digest for'} {module}.weight "
                                f"than weight_fingerprint; the state contradicts itself (spec 4.6)")
            quantized_modules.append(module)
            layers.append(QuantizedLayer(component, module, in_features, out_features, None, weight_fingerprint,
                                         stats, record, layer_recipe, rotation))
        for i, row in enumerate(_get(entry, "excluded", list, where, source)):
            row_where = f"{where}.excluded[{i}]"
            if not isinstance(row, dict):
                raise error(f"{row_where}: expected a map")
            module = check_name(_get(row, "module", str, row_where, source), "module", row_where, error)
            reason = check_text(_get(row, "reason", str, row_where, source), "reason", row_where, error)
            excluded_modules.append(module)
            excluded.append(ExcludedLayer(component, module, reason))
        for kind, names in (("layers", quantized_modules), ("excluded", excluded_modules)):
            if names != sorted(names):
                raise error(f"{where}.{kind}: not sorted by module name (spec 4.7)")
        modules = quantized_modules + excluded_modules
        if len(set(modules)) != len(modules):
            duplicate = next(m for m in modules if modules.count(m) > 1)
            raise error(f"{where}: module {duplicate!r} is listed twice (a layer is quantized or excluded, once)")
        if len(layers) + len(excluded) > MAX_LAYERS:
            raise error(f"components: more than {MAX_LAYERS} layers")
    return layers, excluded


def _read(source: _Source, load_tensors: bool) -> State:
    error = source.error
    # spec 5.1: preamble
    if source.size < PREAMBLE_BYTES:
        raise error(f"{source.size} bytes is shorter than the {PREAMBLE_BYTES}-byte preamble; "
                    f"the file is truncated or not a .hif4 state")
    preamble = source.read(0, PREAMBLE_BYTES, "preamble")
    magic, major, minor, header_length, header_sha256, reserved = PREAMBLE_STRUCT.unpack(preamble)
    if magic != STATE_MAGIC:
        raise error(f"bad magic {magic!r} at byte 0, expected {STATE_MAGIC!r}; not a .hif4 state file")
    if major not in SUPPORTED_MAJORS:
        supported = ", ".join(f"{m}.x" for m in SUPPORTED_MAJORS)
        raise UnsupportedVersionError(f"{source.name}: format version {major}.{minor} is not supported; this "
                                      f"reader implements {supported}; upgrade hif4fmt to read it")
    if reserved != bytes(len(reserved)):
        raise error(f"reserved preamble bytes {RESERVED_OFFSET}..{PREAMBLE_BYTES} must be zero, found "
                    f"{reserved.hex()}")
    if not 0 < header_length <= MAX_HEADER_BYTES:
        raise error(f"header length {header_length} (bytes 12..20) must be in [1, {MAX_HEADER_BYTES}]")
    if HEADER_OFFSET + header_length > source.size:
        raise error(f"header length {header_length} runs past the end of the file ({source.size} bytes); "
                    f"the file is truncated")
    header_bytes = source.read(HEADER_OFFSET, header_length, "header")
    # spec 5.2: checksum before decoding
    actual = hashlib.sha256(preamble[:CHECKSUMMED_PREAMBLE_BYTES] + header_bytes).digest()
    if actual != header_sha256:
        raise ChecksumError(f"{source.name}: header checksum mismatch: bytes {HEADER_SHA256_OFFSET}.."
                            f"{HEADER_SHA256_OFFSET + 32} say {header_sha256.hex()}, the header hashes to "
                            f"{actual.hex()}; the file is corrupt (re-download or rebuild it)")
    header = unpack_canonical(header_bytes, source.name, StateFormatError)  # spec 5.3
    data_offset = _align(HEADER_OFFSET + header_length)
    if data_offset > source.size:
        raise error(f"data section starts at byte {data_offset} but the file has {source.size} bytes; truncated")
    padding = source.read(HEADER_OFFSET + header_length, data_offset - HEADER_OFFSET - header_length, "header padding")
    if padding.count(0) != len(padding):
        raise error(f"padding bytes {HEADER_OFFSET + header_length}..{data_offset} after the header must be zero")
    # spec 5.4: schema
    if _get(header, "format", str, "header", source) != STATE_FORMAT_NAME:
        raise error(f"header.format {header['format']!r}, expected {STATE_FORMAT_NAME!r}")
    format_version = _get(header, "format_version", str, "header", source)
    if format_version != f"{major}.{minor}":
        raise error(f"header.format_version {format_version!r} disagrees with the preamble version {major}.{minor}")
    producer = _get(header, "producer", dict, "header", source)
    calibration = _get(header, "calibration", dict, "header", source)
    recipe = _parse_recipe(_get(header, "recipe", dict, "header", source), source)
    quantization = _get(header, "quantization", dict, "header", source)
    base = _parse_base(header, source)
    records = _parse_tensors(header, data_offset, source)
    layers, excluded = _parse_layers(header, recipe, base, records, source)
    rotated = any(layer.rotation is not None for layer in layers)
    expected_quantization = quantization_descriptor(recipe, rotated)
    for key, expected in expected_quantization.items():
        found = _get(quantization, key, dict, "quantization", source)
        for field_name, value in expected.items():
            if field_name not in found or found[field_name] != value or type(found[field_name]) is not type(value):
                why = (" (a state with rotated layers names R in it, one without does not)"
                       if field_name == "application" else "")
                raise error(f"quantization.{key}.{field_name}: found {found.get(field_name)!r}, expected {value!r} "
                            f"(this reader implements that descriptor only){why}")
    extra = {key: value for key, value in header.items() if key not in KNOWN_TOP_LEVEL_KEYS}
    # spec 5.5: tensor data
    if load_tensors:
        layers = _load_masks(source, data_offset, records, layers)
    layout = StateLayout(format_version, source.size, header_length, data_offset, source.size - data_offset,
                         len(records))
    return State(recipe, calibration, base, tuple(layers), tuple(excluded), producer, extra, layout)


def _load_masks(source: _Source, data_offset: int, records: dict[str, MaskRecord],
                layers: list[QuantizedLayer]) -> list[QuantizedLayer]:
    """Return ``layers`` with masks read, checksummed, decoded and checked (finite, > 0, stats equal)."""
    error = source.error
    blobs: dict[str, bytes] = {}
    position = 0
    for name in sorted(records):
        record = records[name]
        gap = source.read(data_offset + position, record.begin - position, f"padding before {name}")
        if gap.count(0) != len(gap):
            raise error(f"padding bytes before tensor {name} (file bytes {data_offset + position}.."
                        f"{data_offset + record.begin}) must be zero")
        blob = source.read(data_offset + record.begin, record.nbytes, f"tensor {name}")
        actual = hashlib.sha256(blob).hexdigest()
        if actual != record.sha256:
            raise ChecksumError(f"{source.name}: tensor {name} (file bytes {data_offset + record.begin}.."
                                f"{data_offset + record.end}) hashes to {actual}, header says {record.sha256}; "
                                f"the file is corrupt")
        blobs[name] = blob
        position = record.end
    loaded = []
    for layer in layers:
        where = f"layer {layer.component}/{layer.module}"
        record = layer.record
        mask = decode_mask(blobs[record.tensor], record.dtype)
        bad = first_invalid_value(mask)
        if bad is not None:
            raise error(f"{where}: mask value {float(mask[bad])!r} at input channel {bad} is not finite and > 0")
        stats = mask_stats(mask)
        if stats != layer.mask_stats:
            raise error(f"{where}: mask_stats {layer.mask_stats} disagree with the stored mask ({stats})")
        loaded.append(dataclasses.replace(layer, mask=mask, record=record))
    return loaded


def read_state(path: str | os.PathLike, *, load_tensors: bool = True) -> State:
    """Return the ``State`` stored at ``path``, fully validated (masks float32, or None header-only).

    Raises ``StateFormatError`` (bad magic, bounds, schema, values), ``UnsupportedVersionError`` (other
    major version), ``ChecksumError`` (header or tensor bytes corrupt); messages name the file, the
    byte offset or layer, expected and found.
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # a FIFO or device could block or never end: read regular files only
            raise StateFormatError(f"{path}: cannot open the state file: not a regular file")
        handle = open(path, "rb")
    except OSError as exc:
        raise StateFormatError(f"{path}: cannot open the state file: {exc.strerror or exc}") from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        return _read(_Source(handle, size, str(path)), load_tensors)


def read_state_bytes(data: bytes, *, load_tensors: bool = True, name: str = "<bytes>") -> State:
    """Return the ``State`` encoded in ``data`` (same checks and errors as ``read_state``)."""
    return _read(_Source(io.BytesIO(data), len(data), name), load_tensors)
