"""Write the .hif4 golden vector (spec/vectors/state/) and the hostile-file corpus (tests/hostile/).

Why this tool exists: the golden files pin the byte layout of format 1.0 and 1.1 (a test checks their
sha256 and that the writer reproduces them bit for bit; spec/state-v1.md section 10 walks through the
1.0 file's hex and lists what the 1.1 file adds), and
the hostile corpus keeps one file per attack or corruption class, each with the typed error the reader
must raise (tests/hostile/manifest.json). Everything is deterministic: running the tool again rewrites
identical files.

    python tools/make_state_vectors.py [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hif4fmt.constants import (  # noqa: E402
    ALIGNMENT,
    CHECKSUMMED_PREAMBLE_BYTES,
    HEADER_OFFSET,
    PREAMBLE_STRUCT,
    RESERVED_BYTES,
    STATE_MAGIC,
)
from hif4fmt.recipe import Recipe  # noqa: E402
from hif4fmt.state import (BaseBinding, ExcludedLayer, LayerRecipe, QuantizedLayer, State,  # noqa: E402
                           TensorDigest, encode_state)

VECTOR_DIR = ROOT / "spec" / "vectors" / "state"
HOSTILE_DIR = ROOT / "tests" / "hostile"
GOLDEN_NAME = "tiny-v1.hif4"
GOLDEN_1_1_NAME = "tiny-v1.1.hif4"


def golden_state() -> State:
    """Return the tiny state of the golden vector: one component, one 4-channel layer, one exclusion."""
    digest = hashlib.sha256(b"hif4fmt golden transformer").hexdigest()
    weight = hashlib.sha256(b"hif4fmt golden blocks.0.attn1.to_q.weight").hexdigest()
    fingerprint = hashlib.sha256(b"hif4fmt golden base").hexdigest()
    layer = QuantizedLayer("transformer", "blocks.0.attn1.to_q", 4, 8,
                           np.array([0.5, 1.0, 2.0, 4.0], dtype=np.float32), weight)
    return State(
        recipe=Recipe(),
        calibration={"prompts": 1, "seed": 0},
        base=BaseBinding("hif4fmt-sha256-tensors-v1", fingerprint, {"transformer": digest}, 64),
        layers=(layer,),
        excluded=(ExcludedLayer("transformer", "proj_out", "boundary layer"),),
        producer={"name": "make_state_vectors", "version": "1"},
    )


def golden_state_1_1() -> State:
    """Return the 1.1 golden state: the 1.0 one plus a rotated 64-channel layer with its own recipe,
    the base layout and a per-tensor table (the keys version 1.1 adds, spec 4.6, 4.7)."""
    base = golden_state()
    weight = hashlib.sha256(b"hif4fmt golden blocks.0.attn1.to_k.weight").hexdigest()
    rotated = QuantizedLayer("transformer", "blocks.0.attn1.to_k", 64, 8,
                             np.arange(1, 65, dtype=np.float32) / np.float32(16), weight,
                             recipe=LayerRecipe("percentile", 99.5, 0.25), rotation="hadamard-64")
    tensors = {"blocks.0.attn1.to_k.weight": TensorDigest("BF16", (8, 64), weight),
               "blocks.0.attn1.to_q.weight": TensorDigest("BF16", (8, 4), base.layers[0].weight_fingerprint),
               "proj_out.weight": TensorDigest("BF16", (4, 8), hashlib.sha256(b"hif4fmt golden proj_out").hexdigest())}
    binding = BaseBinding(base.base.algorithm, base.base.fingerprint, dict(base.base.components), 1152,
                          layout={"name": "wan2.2-i2v-a14b", "pipeline": "WanImageToVideoPipeline",
                                  "transformers": ["transformer"]},
                          tensors={"transformer": tensors})
    return State(base.recipe, base.calibration, binding, (base.layers[0], rotated), base.excluded, base.producer)


def corpus_state() -> State:
    """Return the state the hostile files are derived from: two 64-channel layers (masks 1/8..8)."""
    base = golden_state()
    layers = tuple(QuantizedLayer("transformer", f"blocks.{i}.attn1.to_q", 64, 64,
                                  np.arange(1, 65, dtype=np.float32) / np.float32(8), "0" * 63 + str(i))
                   for i in range(2))
    return State(base.recipe, base.calibration, base.base, layers, base.excluded, base.producer)


def split(data: bytes) -> tuple[dict, bytes]:
    """Return (decoded header, data section) of a well-formed state file."""
    length = struct.unpack_from("<Q", data, 12)[0]
    header = msgpack.unpackb(data[HEADER_OFFSET:HEADER_OFFSET + length], raw=False)
    data_offset = -(-(HEADER_OFFSET + length) // ALIGNMENT) * ALIGNMENT
    return header, data[data_offset:]


def _sorted(value):
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def assemble(header: dict | bytes, section: bytes, major: int = 1, minor: int = 0) -> bytes:
    """Return a file with a valid header checksum around ``header`` (canonically re-encoded) and ``section``."""
    header_bytes = header if isinstance(header, bytes) else msgpack.packb(_sorted(header), use_bin_type=True)
    unsigned = PREAMBLE_STRUCT.pack(STATE_MAGIC, major, minor, len(header_bytes), bytes(32), bytes(RESERVED_BYTES))
    digest = hashlib.sha256(unsigned[:CHECKSUMMED_PREAMBLE_BYTES] + header_bytes).digest()
    preamble = PREAMBLE_STRUCT.pack(STATE_MAGIC, major, minor, len(header_bytes), digest, bytes(RESERVED_BYTES))
    return preamble + header_bytes + bytes(-(HEADER_OFFSET + len(header_bytes)) % ALIGNMENT) + section


def _with_mask_value(good: bytes, value: float) -> bytes:
    header, section = split(good)
    name = "transformer/blocks.0.attn1.to_q.mask"
    begin, end = header["tensors"][name]["offsets"]
    mask = np.frombuffer(section[begin:end], dtype="<f4").copy()
    mask[7] = value
    header["tensors"][name]["sha256"] = hashlib.sha256(mask.tobytes()).hexdigest()
    return assemble(header, section[:begin] + mask.tobytes() + section[end:])


def _edited(good: bytes, edit) -> bytes:
    header, section = split(good)
    section = edit(header, section) or section
    return assemble(header, section)


def _shift_second_tensor(delta: int):
    def edit(header, section):
        name = sorted(header["tensors"])[1]
        begin, end = header["tensors"][name]["offsets"]
        header["tensors"][name]["offsets"] = [begin + delta, end + delta]
    return edit


def _rename_second_tensor(new_name: str):
    """Return an edit that renames the second tensor (unreferenced afterwards; only its name is wrong)."""
    def edit(header, section):
        name = sorted(header["tensors"])[1]
        header["tensors"][new_name] = header["tensors"].pop(name)
        header["components"]["transformer"]["layers"] = header["components"]["transformer"]["layers"][:1]
    return edit


def _deep_calibration(header, section):
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    header["calibration"]["deep"] = nested


def _edited_1_1(good: bytes, edit) -> bytes:
    header, section = split(good)
    section = edit(header, section) or section
    return assemble(header, section, minor=1)


def _rotated_row(header: dict) -> dict:
    """Return the header row of the 1.1 golden file's rotated layer (blocks.0.attn1.to_k)."""
    return next(row for row in header["components"]["transformer"]["layers"] if row["module"].endswith("to_k"))


def hostile_files() -> dict[str, tuple[bytes, str, str]]:
    """Return {file name: (bytes, expected error class name, why)} for the hostile corpus."""
    good_1_1 = encode_state(golden_state_1_1())
    good = encode_state(corpus_state())
    header_length = struct.unpack_from("<Q", good, 12)[0]
    flipped_header = bytearray(good)
    flipped_header[HEADER_OFFSET + 10] ^= 0x04
    flipped_tensor = bytearray(good)
    flipped_tensor[-1] ^= 0x01
    header, section = split(good)
    float32_header = msgpack.packb(_sorted(header), use_bin_type=True, use_single_float=True)
    duplicate_key = b"\x82\xa1a\x01\xa1a\x02"  # {"a": 1, "a": 2}
    huge_array = b"\xdd\xff\xff\xff\xff"  # array32 claiming 4294967295 entries, none present
    return {
        "empty.hif4": (b"", "StateFormatError", "zero bytes"),
        "bad_magic_gguf.hif4": (b"GGUF" + good[4:], "StateFormatError", "another format's magic"),
        "pickle_payload.hif4": (b"\x80\x04\x95" + bytes(80), "StateFormatError", "a pickle stream must never be loaded"),
        "safetensors_renamed.hif4": (struct.pack("<Q", 2) + b"{}", "StateFormatError", "a safetensors file"),
        "major_2.hif4": (good[:8] + struct.pack("<H", 2) + good[10:], "UnsupportedVersionError", "major 2"),
        "truncated_preamble.hif4": (good[:40], "StateFormatError", "cut inside the preamble"),
        "truncated_header.hif4": (good[:HEADER_OFFSET + header_length // 2], "StateFormatError", "cut in the header"),
        "truncated_tensor.hif4": (good[:-17], "StateFormatError", "cut inside the last mask"),
        "header_length_huge.hif4": (good[:12] + struct.pack("<Q", 2**63) + good[20:], "StateFormatError",
                                    "header length 2^63: must be refused before any allocation"),
        "header_length_past_eof.hif4": (good[:12] + struct.pack("<Q", len(good)) + good[20:], "StateFormatError",
                                        "header length larger than the file"),
        "reserved_nonzero.hif4": (good[:63] + b"\xff" + good[64:], "StateFormatError", "reserved byte set"),
        "header_checksum.hif4": (bytes(flipped_header), "ChecksumError", "one header bit flipped"),
        "tensor_checksum.hif4": (bytes(flipped_tensor), "ChecksumError", "one mask bit flipped"),
        "trailing_zip.hif4": (good + b"PK\x05\x06" + bytes(18), "StateFormatError",
                              "polyglot: an empty zip appended after the last tensor"),
        "overlapping_tensors.hif4": (_edited(good, _shift_second_tensor(-64)), "StateFormatError", "overlap"),
        "gap_between_tensors.hif4": (_edited(good, _shift_second_tensor(64)), "StateFormatError", "hole"),
        "offsets_out_of_range.hif4": (_edited(good, lambda h, s: s[:-64]), "StateFormatError", "ends past EOF"),
        "nan_mask.hif4": (_with_mask_value(good, float("nan")), "StateFormatError", "NaN mask value"),
        "zero_mask.hif4": (_with_mask_value(good, 0.0), "StateFormatError", "zero mask value"),
        "negative_mask.hif4": (_with_mask_value(good, -2.0), "StateFormatError", "negative mask value"),
        "infinite_mask.hif4": (_with_mask_value(good, float("inf")), "StateFormatError", "infinite mask value"),
        "three_retained_blocks.hif4": (_edited(good, lambda h, s: h["recipe"].update(
            retained_blocks=["transformer:5", "transformer:6", "transformer:7"])), "StateFormatError",
            "more than 2 retained blocks"),
        "float32_in_header.hif4": (assemble(float32_header, section), "StateFormatError",
                                   "floats encoded as float32: not canonical"),
        "duplicate_map_key.hif4": (assemble(duplicate_key, b""), "StateFormatError", "a key twice in one map"),
        "huge_array_claim.hif4": (assemble(huge_array, b""), "StateFormatError",
                                  "array length 2^32-1 with no data: bounded before allocation"),
        "deep_nesting.hif4": (_edited(good, _deep_calibration), "StateFormatError", "40 nested arrays"),
        "ext_timestamp.hif4": (_edited(good, lambda h, s: h["calibration"].update(
            when=msgpack.Timestamp(0))), "StateFormatError", "msgpack ext (timestamp) value"),
        "bin_value.hif4": (_edited(good, lambda h, s: h["calibration"].update(blob=b"\x00")), "StateFormatError",
                           "msgpack bin value"),
        "header_not_a_map.hif4": (assemble(msgpack.packb([1, 2, 3]), b""), "StateFormatError", "header is an array"),
        "path_in_module_name.hif4": (_edited(good, lambda h, s: h["components"]["transformer"]["excluded"][0].update(
            module="../../etc/passwd")), "StateFormatError", "module name with path characters"),
        "control_chars_in_reason.hif4": (_edited(good, lambda h, s: h["components"]["transformer"]["excluded"][0]
                                                 .update(reason="boundary\x1b[2Jlayer")), "StateFormatError",
                                         "terminal escape sequence in a reason"),
        "control_chars_in_hub_hint.hif4": (_edited(good, lambda h, s: h["base"]["hub_hints"].update(
            repo_id="org/name\nlicense: mit")), "StateFormatError", "newline in a hub hint (YAML injection)"),
        "tensor_name_with_escape.hif4": (_edited(good, _rename_second_tensor("transformer/\x1b[2J.mask")),
                                         "StateFormatError", "terminal escape sequence in a tensor name"),
        "retained_block_non_ascii_digit.hif4": (_edited(good, lambda h, s: h["recipe"].update(
            retained_blocks=["transformer:\u0661"])), "StateFormatError", "Arabic-Indic digit as block index"),
        "retained_blocks_unsorted.hif4": (_edited(good, lambda h, s: h["recipe"].update(
            retained_blocks=["transformer:9", "transformer:8"])), "StateFormatError",
            "retained blocks out of canonical order"),
        "integer_where_float.hif4": (_edited(good, lambda h, s: h["recipe"].update(alpha=1)), "StateFormatError",
                                     "recipe.alpha as integer 1 instead of float 1.0"),
        "v1_1_rotation_with_plain_application.hif4": (_edited_1_1(good_1_1, lambda h, s: h["quantization"]["mask"]
                                                                 .update(application="y = HiF4(x * m) @ HiF4(W / m).T + b")),
                                                     "StateFormatError",
                                                     "a rotated layer under the 1.0 application string"),
        "v1_1_rotation_none.hif4": (_edited_1_1(good_1_1, lambda h, s: _rotated_row(h).update(rotation="none")),
                                    "StateFormatError", "rotation 'none' (absent is the only way to say none)"),
        "v1_1_unknown_rotation.hif4": (_edited_1_1(good_1_1, lambda h, s: _rotated_row(h).update(rotation="hadamard-128")),
                                       "StateFormatError", "a rotation this version does not implement"),
        "v1_1_layer_recipe_integer_alpha.hif4": (_edited_1_1(good_1_1, lambda h, s: _rotated_row(h)["recipe"]
                                                            .update(alpha=0)), "StateFormatError",
                                                "layer recipe alpha as integer 0"),
        "v1_1_tensor_table_contradicts_layer.hif4": (_edited_1_1(good_1_1, lambda h, s: h["base"]["tensors"]
                                                                ["transformer"]["blocks.0.attn1.to_k.weight"]
                                                                .update(digest="0" * 64)), "StateFormatError",
                                                    "base.tensors and weight_fingerprint disagree"),
        "v1_1_tensor_table_unbound_component.hif4": (_edited_1_1(good_1_1, lambda h, s: h["base"]["tensors"]
                                                                .update(transformer_2={})), "StateFormatError",
                                                    "base.tensors names a component the state does not bind"),
        "v1_1_layout_control_chars.hif4": (_edited_1_1(good_1_1, lambda h, s: h["base"]["layout"]
                                                      .update(name="wan\x1b[2J")), "StateFormatError",
                                          "terminal escape sequence in the layout name"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = parser.parse_args()
    golden = encode_state(golden_state())
    golden_1_1 = encode_state(golden_state_1_1())
    outputs = {VECTOR_DIR / GOLDEN_NAME: golden, VECTOR_DIR / GOLDEN_1_1_NAME: golden_1_1}
    manifest = {}
    for name, (data, error, why) in sorted(hostile_files().items()):
        outputs[HOSTILE_DIR / name] = data
        manifest[name] = {"error": error, "why": why}
    outputs[HOSTILE_DIR / "manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    stale = [p for p, data in outputs.items() if not p.is_file() or p.read_bytes() != data]
    if args.check:
        print("\n".join(f"differs: {p.relative_to(ROOT)}" for p in stale) or "all vectors up to date")
        sys.exit(1 if stale else 0)
    for path, data in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    print(f"{GOLDEN_NAME}: {len(golden)} bytes, sha256 {hashlib.sha256(golden).hexdigest()}")
    print(f"{GOLDEN_1_1_NAME}: {len(golden_1_1)} bytes, sha256 {hashlib.sha256(golden_1_1).hexdigest()}")
    print(f"{len(manifest)} hostile files in {HOSTILE_DIR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
