"""A second .hif4 reader and base fingerprinter, written from spec/state-v1.md alone.

Why this module exists: the spec claims that someone could implement an independent reader from it. This
is that reader: it imports nothing from ``hif4fmt`` (only struct, hashlib, json, math, re and msgpack's
decoder) and follows the section numbers of the spec. ``tests/test_spec_independent_reader.py`` checks
that it accepts and refuses exactly the files the reference reader does and computes the same
fingerprints; any disagreement is a defect of the spec or of the reference. Not a test module.

    read_state_file(path, header_only=False) -> dict      # raises SpecInvalid
    canonical_msgpack(value) -> bytes                      # spec 4.1, written from its rules
    fingerprint_folder(path) -> (fingerprint hex, {component: digest hex})   # spec 6
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct

import msgpack


class SpecInvalid(Exception):
    """The file breaks a rule of spec/state-v1.md (the message names the rule)."""


# --- spec 2, 3.1 ------------------------------------------------------------------------------------
MAGIC = bytes.fromhex("89484946340D0A1A")
NAME = re.compile(r"[A-Za-z0-9_.\-]{1,1024}")
TENSOR_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,4096}")
HEX = re.compile(r"[0-9a-f]{64}")
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
BYTES_PER_VALUE = {"float32": 4, "float16": 2, "bfloat16": 2}  # spec 3.3 item 5
RETAINED = re.compile(r"(transformer|transformer_2):(0|[1-9][0-9]{0,8})")  # spec 4.4
MAX_FEATURES = 16_777_216


def align(n: int) -> int:
    return (n + 63) // 64 * 64


def is_text(value) -> bool:
    return isinstance(value, str) and value != "" and not CONTROL.search(value)


# --- spec 4.1: canonical msgpack, from the rules (not from a library's encoder) --------------------
def canonical_msgpack(value, depth: int = 1, counts: list | None = None) -> bytes:
    """Return the canonical encoding of ``value`` per spec 4.1; SpecInvalid for what it forbids.

    ``counts`` = [maps and arrays, values] accumulates over the whole header (limits 10^6 and 4 * 10^6).
    """
    counts = [0, 0] if counts is None else counts
    if isinstance(value, (dict, list)):
        if depth > 32:
            raise SpecInvalid("4.1: nested deeper than 32")
        counts[0] += 1
        counts[1] += len(value) * (2 if isinstance(value, dict) else 1)
        if counts[0] > 1_000_000 or counts[1] > 4_000_000:
            raise SpecInvalid("4.1: too many maps, arrays or values")
    if value is None:
        return b"\xc0"
    if value is True:
        return b"\xc3"
    if value is False:
        return b"\xc2"
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise SpecInvalid("4.1: integer outside int64")
        if value >= 0:
            if value <= 0x7F:
                return bytes([value])
            for first, fmt, top in ((0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF), (0xCE, ">I", 2**32 - 1), (0xCF, ">Q", 2**64)):
                if value <= top:
                    return bytes([first]) + struct.pack(fmt, value)
        if value >= -32:
            return struct.pack(">b", value)
        for first, fmt, bottom in ((0xD0, ">b", -128), (0xD1, ">h", -32768), (0xD2, ">i", -(2**31)), (0xD3, ">q", -(2**63))):
            if value >= bottom:
                return bytes([first]) + struct.pack(fmt, value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SpecInvalid("4.1: float not finite")
        return b"\xcb" + struct.pack(">d", value)
    if isinstance(value, str):
        data = value.encode("utf-8")
        size = len(data)
        if size > 65536:
            raise SpecInvalid("4.1: string over 65,536 bytes")
        if size <= 31:
            return bytes([0xA0 | size]) + data
        if size <= 0xFF:
            return b"\xd9" + struct.pack(">B", size) + data
        if size <= 0xFFFF:
            return b"\xda" + struct.pack(">H", size) + data
        return b"\xdb" + struct.pack(">I", size) + data
    if isinstance(value, list):
        size = len(value)
        head = (bytes([0x90 | size]) if size <= 15 else
                b"\xdc" + struct.pack(">H", size) if size <= 0xFFFF else b"\xdd" + struct.pack(">I", size))
        return head + b"".join(canonical_msgpack(item, depth + 1, counts) for item in value)
    if isinstance(value, dict):
        size = len(value)
        head = (bytes([0x80 | size]) if size <= 15 else
                b"\xde" + struct.pack(">H", size) if size <= 0xFFFF else b"\xdf" + struct.pack(">I", size))
        parts = [head]
        for key in sorted(value):  # spec 2: code point order
            if not isinstance(key, str):
                raise SpecInvalid("4.1: map key not a str")
            parts += [canonical_msgpack(key, depth + 1, counts), canonical_msgpack(value[key], depth + 1, counts)]
        return b"".join(parts)
    raise SpecInvalid(f"4.1: {type(value).__name__} not allowed")


# --- spec 4: schema helpers -------------------------------------------------------------------------
def need(mapping, key, kind):
    """Return mapping[key] of exactly ``kind`` (bool is not int; int is not float)."""
    if not isinstance(mapping, dict) or key not in mapping:
        raise SpecInvalid(f"4: missing key {key!r}")
    value = mapping[key]
    if kind in (int, float):
        ok = type(value) is kind
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise SpecInvalid(f"4: {key!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _recipe(recipe: dict) -> tuple[str, list[tuple[str, int]]]:
    """Check spec 4.4; return (mask dtype, retained blocks as (component, index))."""
    statistic = need(recipe, "statistic", str)
    if statistic == "percentile":
        if not 0 < need(recipe, "percentile", float) <= 100:
            raise SpecInvalid("4.4: percentile out of (0, 100]")
    elif statistic == "max":
        if "percentile" not in recipe or recipe["percentile"] is not None:
            raise SpecInvalid("4.4: percentile must be nil for max")
    else:
        raise SpecInvalid("4.4: statistic")
    if not 0 <= need(recipe, "alpha", float) <= 1:
        raise SpecInvalid("4.4: alpha")
    if not need(recipe, "eps", float) > 0:
        raise SpecInvalid("4.4: eps")
    if need(recipe, "encoder", str) not in ("toolkit", "ascend"):
        raise SpecInvalid("4.4: encoder")
    mask_dtype = need(recipe, "mask_dtype", str)
    if mask_dtype not in BYTES_PER_VALUE:
        raise SpecInvalid("4.4: mask_dtype")
    blocks = []
    for text in need(recipe, "retained_blocks", list):
        match = RETAINED.fullmatch(text) if isinstance(text, str) else None
        if not match:
            raise SpecInvalid(f"4.4: retained block {text!r}")
        blocks.append((match.group(1), int(match.group(2))))
    if blocks != sorted(set(blocks)) or len(blocks) > 2:
        raise SpecInvalid("4.4: retained blocks not sorted, duplicated or more than 2")
    return mask_dtype, blocks


def _decode_mask(raw: bytes, dtype: str) -> list[float]:
    """Return the stored values widened exactly (spec 3.3 item 7, 4.8)."""
    count = len(raw) // BYTES_PER_VALUE[dtype]
    if dtype == "float32":
        return list(struct.unpack(f"<{count}f", raw))
    if dtype == "float16":
        return list(struct.unpack(f"<{count}e", raw))
    return [struct.unpack("<f", struct.pack("<I", bits << 16))[0] for bits in struct.unpack(f"<{count}H", raw)]


# --- spec 5: reading --------------------------------------------------------------------------------
def read_state_bytes(data: bytes, header_only: bool = False) -> dict:
    """Return {"format_version", "header", "data_offset", "components": {name: {"quantized", "excluded"}},
    "masks": {tensor name: [float]}} of a valid file; SpecInvalid naming the broken rule otherwise."""
    size = len(data)
    # 5.1
    if size < 64 or data[:8] != MAGIC:
        raise SpecInvalid("5.1: size or magic")
    major, minor, length = struct.unpack_from("<HHQ", data, 8)
    if major != 1:
        raise SpecInvalid(f"5.1: unsupported major {major}")
    if data[52:64] != bytes(12):
        raise SpecInvalid("5.1: reserved bytes")
    if not 1 <= length <= 64 * 1024 * 1024 or 64 + length > size:
        raise SpecInvalid("5.1: header length")
    # 5.2 (3.2)
    if hashlib.sha256(data[0:20] + data[64:64 + length]).digest() != data[20:52]:
        raise SpecInvalid("5.2: header checksum")
    # 5.3 (4.1)
    header_bytes = data[64:64 + length]
    try:
        header = msgpack.unpackb(header_bytes, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0,
                                 max_str_len=65536, max_array_len=1_000_000, max_map_len=1_000_000)
    except Exception as exc:  # any decoding failure is a refusal
        raise SpecInvalid(f"5.3: not msgpack: {exc}") from None
    if not isinstance(header, dict) or canonical_msgpack(header) != header_bytes:
        raise SpecInvalid("5.3: not the canonical encoding of a map")
    data_offset = align(64 + length)
    if data_offset > size or data[64 + length:data_offset] != bytes(data_offset - 64 - length):
        raise SpecInvalid("5.3: header padding")
    # 5.4 (4.2 .. 4.8)
    if need(header, "format", str) != "hif4-state":
        raise SpecInvalid("4.2: format")
    if need(header, "format_version", str) != f"{major}.{minor}":
        raise SpecInvalid("4.2: format_version")
    need(header, "producer", dict)
    need(header, "calibration", dict)
    mask_dtype, blocks = _recipe(need(header, "recipe", dict))
    recipe = header["recipe"]
    quantization = need(header, "quantization", dict)
    element = {"format": "hifloat4", "codec_spec": "hifloat4-spec 1.0", "unit": 64, "axis": -1,
               "axis_name": "in_features", "encoder": recipe["encoder"]}
    mask = {"dtype": mask_dtype, "axis_name": "in_features", "application": "y = HiF4(x * m) @ HiF4(W / m).T + b"}
    for role, fields in (("weight", element), ("activation", element), ("mask", mask)):
        found = need(quantization, role, dict)
        for key, value in fields.items():
            if key not in found or found[key] != value or type(found[key]) is not type(value):
                raise SpecInvalid(f"4.3: quantization.{role}.{key}")
    base = need(header, "base", dict)
    if need(base, "algorithm", str) != "hif4fmt-sha256-tensors-v1" or not HEX.fullmatch(need(base, "fingerprint", str)):
        raise SpecInvalid("4.6: algorithm or fingerprint")
    bound = need(base, "components", dict)
    if not 1 <= len(bound) <= 64 or not all(NAME.fullmatch(k) and isinstance(v, str) and HEX.fullmatch(v)
                                            for k, v in bound.items()):
        raise SpecInvalid("4.6: components")
    if need(base, "total_bytes", int) < 0:
        raise SpecInvalid("4.6: total_bytes")
    if not all(NAME.fullmatch(k) and is_text(v) for k, v in need(base, "hub_hints", dict).items()):
        raise SpecInvalid("4.6: hub_hints")
    tensors = need(header, "tensors", dict)
    if len(tensors) > 1_000_000:
        raise SpecInvalid("4.8: too many tensors")
    layout = {}
    position = 0
    for name in sorted(tensors):  # 3.3 items 3..6
        entry = tensors[name]
        if not TENSOR_NAME.fullmatch(name):
            raise SpecInvalid(f"4.8: tensor name {name!r}")
        dtype = need(entry, "dtype", str)
        shape = need(entry, "shape", list)
        offsets = need(entry, "offsets", list)
        digest = need(entry, "sha256", str)
        if dtype not in BYTES_PER_VALUE or not HEX.fullmatch(digest):
            raise SpecInvalid("4.8: dtype or sha256")
        if len(shape) != 1 or type(shape[0]) is not int or not 1 <= shape[0] <= MAX_FEATURES:
            raise SpecInvalid("4.8: shape")
        if len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise SpecInvalid("4.8: offsets")
        begin, end = offsets
        if begin != align(position) or end - begin != shape[0] * BYTES_PER_VALUE[dtype] or data_offset + end > size:
            raise SpecInvalid(f"3.3: layout of {name}")
        layout[name] = (dtype, shape[0], begin, end, digest)
        position = end
    if data_offset + position != size:
        raise SpecInvalid("3.3: file does not end at the last tensor")
    components = need(header, "components", dict)
    summary = {}
    layers_total = 0
    for component, entry in components.items():
        if not NAME.fullmatch(component) or component not in bound:
            raise SpecInvalid(f"4.7: component {component!r}")
        seen: set[str] = set()
        for key in ("layers", "excluded"):
            modules = []
            for row in need(entry, key, list):
                module = need(row, "module", str)
                if not NAME.fullmatch(module) or module in seen:
                    raise SpecInvalid(f"4.7: module {module!r}")
                seen.add(module)
                modules.append(module)
                if key == "excluded":
                    if not is_text(need(row, "reason", str)):
                        raise SpecInvalid("4.7: reason")
                    continue
                in_features, out_features = need(row, "in_features", int), need(row, "out_features", int)
                if not (1 <= in_features <= MAX_FEATURES and 1 <= out_features <= MAX_FEATURES):
                    raise SpecInvalid("4.7: features")
                tensor = need(row, "mask", str)
                if tensor != f"{component}/{module}.mask" or tensor not in layout:
                    raise SpecInvalid("4.7: mask tensor name")
                if layout[tensor][0] != mask_dtype or layout[tensor][1] != in_features:
                    raise SpecInvalid("4.7: mask dtype or shape")
                if not HEX.fullmatch(need(row, "weight_fingerprint", str)):
                    raise SpecInvalid("4.7: weight_fingerprint")
                stats = need(row, "mask_stats", dict)
                for stat in ("min", "max", "mean"):
                    need(stats, stat, float)
                if any(c == component and module.startswith(f"blocks.{i}.") for c, i in blocks):
                    raise SpecInvalid("4.4: quantized layer in a retained block")
            if modules != sorted(modules):
                raise SpecInvalid(f"4.7: {key} not sorted")
        layers_total += len(seen)
        summary[component] = {"quantized": len(entry["layers"]), "excluded": len(entry["excluded"])}
    if layers_total > 1_000_000:
        raise SpecInvalid("11: too many layers")
    result = {"format_version": header["format_version"], "header": header, "data_offset": data_offset,
              "components": summary, "masks": {}}
    if header_only:
        return result
    # 5.5
    position = 0
    for name in sorted(layout):
        dtype, _, begin, end, digest = layout[name]
        if data[data_offset + position:data_offset + begin] != bytes(begin - position):
            raise SpecInvalid("3.3: padding between tensors")
        if hashlib.sha256(data[data_offset + begin:data_offset + end]).hexdigest() != digest:
            raise SpecInvalid(f"4.8: sha256 of {name}")
        position = end
    for component, entry in components.items():
        for row in entry["layers"]:
            dtype, _, begin, end, _ = layout[row["mask"]]
            values = _decode_mask(data[data_offset + begin:data_offset + end], dtype)
            if not all(math.isfinite(v) and v > 0 for v in values):
                raise SpecInvalid("4.8: mask value not finite and > 0")
            stats = row["mask_stats"]
            if (stats["min"], stats["max"], stats["mean"]) != (min(values), max(values), math.fsum(values) / len(values)):
                raise SpecInvalid(f"4.7: mask_stats of {row['module']}")
            result["masks"][row["mask"]] = values
    return result


def read_state_file(path, header_only: bool = False) -> dict:
    with open(path, "rb") as handle:
        return read_state_bytes(handle.read(), header_only)


# --- spec 6: the base fingerprint ---------------------------------------------------------------------
DTYPE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "I64": 64, "U64": 64, "F64": 64, "C64": 64}
ALGORITHM = b"hif4fmt-sha256-tensors-v1"
HASH_SLICE = 1 << 24


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _json(path: str):
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise SpecInvalid(f"6.1: duplicate key in {path}")
        return dict(pairs)

    if os.path.getsize(path) > 64 * 1024 * 1024:
        raise SpecInvalid("6.1: JSON file over 64 MiB")
    with open(path, "rb") as handle:
        return json.loads(handle.read().decode("utf-8"), object_pairs_hook=no_duplicates)


def safetensors_tensors(path: str) -> dict:
    """Return {name: (dtype, shape, absolute begin, nbytes)} of one safetensors file (spec 6.1)."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100_000_000 or 8 + length > file_size:
            raise SpecInvalid("6.1: safetensors header length")

        def no_duplicates(pairs):
            if len({k for k, _ in pairs}) != len(pairs):
                raise SpecInvalid("6.1: duplicate key")
            return dict(pairs)

        header = json.loads(handle.read(length).decode("utf-8"), object_pairs_hook=no_duplicates)
    data_size = file_size - 8 - length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BITS or not 0 <= begin <= end <= data_size:
            raise SpecInvalid(f"6.1: tensor {name}")
        numel = math.prod(shape)
        if end - begin != -(-numel * DTYPE_BITS[dtype] // 8):
            raise SpecInvalid(f"6.1: size of {name}")
        tensors[name] = (dtype, tuple(shape), path, 8 + length + begin, end - begin)
    return tensors


def _indexed(folder: str, index_path: str) -> dict:
    weight_map = _json(index_path)["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or shard in (".", ".."):
            raise SpecInvalid("6.1: shard name")
        for name, entry in safetensors_tensors(os.path.join(folder, shard)).items():
            if weight_map.get(name) != shard:
                raise SpecInvalid(f"6.1: {name} not mapped to {shard}")
            tensors[name] = entry
    if set(tensors) != set(weight_map):
        raise SpecInvalid("6.1: mapped tensor missing from its shard")
    return tensors


def component_tensors(folder: str) -> dict:
    """Return every tensor of one component folder, chosen by the rules of spec 6.1."""
    def is_file(name):
        return os.path.isfile(os.path.join(folder, name))

    if is_file("diffusion_pytorch_model.safetensors.index.json"):
        return _indexed(folder, os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"))
    if is_file("diffusion_pytorch_model.safetensors"):
        return safetensors_tensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    indexes = [n for n in os.listdir(folder) if n.endswith(".safetensors.index.json") and is_file(n)]
    if len(indexes) == 1:
        return _indexed(folder, os.path.join(folder, indexes[0]))
    if len(indexes) > 1:
        raise SpecInvalid("6.1: several index files")
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors") and is_file(n))
    if not files:
        raise SpecInvalid("6.1: no weights")
    tensors = {}
    for name in files:
        for tensor, entry in safetensors_tensors(os.path.join(folder, name)).items():
            if tensor in tensors:
                raise SpecInvalid("6.1: tensor in two files")
            tensors[tensor] = entry
    return tensors


def tensor_digest(name: str, dtype: str, shape, path: str, begin: int, nbytes: int) -> bytes:
    """Return the raw 32-byte digest of spec 6.2, streaming the bytes from the file."""
    name_bytes, dtype_bytes = name.encode("utf-8"), dtype.encode("ascii")
    hasher = hashlib.sha256(u64(len(name_bytes)) + name_bytes + u64(len(dtype_bytes)) + dtype_bytes
                            + u64(len(shape)) + b"".join(u64(d) for d in shape) + u64(nbytes))
    with open(path, "rb") as handle:
        handle.seek(begin)
        left = nbytes
        while left:
            chunk = handle.read(min(left, HASH_SLICE))
            hasher.update(chunk)
            left -= len(chunk)
    return hasher.digest()


def component_digest(folder: str) -> tuple[bytes, dict[str, str]]:
    """Return (raw component digest of spec 6.3, {tensor name: hex tensor digest})."""
    tensors = component_tensors(folder)
    digests = {name: tensor_digest(name, *tensors[name]) for name in sorted(tensors)}
    return hashlib.sha256(u64(len(digests)) + b"".join(digests.values())).digest(), \
        {name: digest.hex() for name, digest in digests.items()}


def base_components(path: str) -> dict[str, str]:
    """Return {component name: folder} of a base folder (spec 6.1 rules 1..3)."""
    wan = ("transformer", "transformer_2")
    if os.path.isfile(os.path.join(path, "model_index.json")):
        index = _json(os.path.join(path, "model_index.json"))
        chosen = {c: os.path.join(path, c) for c in wan
                  if isinstance(index.get(c), list) and len(index[c]) == 2 and index[c][1] is not None
                  and os.path.isdir(os.path.join(path, c))}
        if not chosen:
            raise SpecInvalid("6.1: model_index.json declares no transformer")
        return chosen
    present = {c: os.path.join(path, c) for c in wan if os.path.isdir(os.path.join(path, c))}
    if present:
        return present
    name = os.path.basename(os.path.normpath(os.path.abspath(path)))
    return {name if name in wan else "transformer": path}


def fingerprint_folder(path) -> tuple[str, dict[str, str]]:
    """Return (hex fingerprint of spec 6.4, {component: hex component digest}) of a base folder."""
    components = base_components(str(path))
    hasher = hashlib.sha256(u64(len(ALGORITHM)) + ALGORITHM + u64(len(components)))
    digests = {}
    for name in sorted(components):
        digest, _ = component_digest(components[name])
        digests[name] = digest.hex()
        name_bytes = name.encode("utf-8")
        hasher.update(u64(len(name_bytes)) + name_bytes + digest)
    return hasher.hexdigest(), digests
