"""Shared builders for the state / fingerprint / verify / CLI tests: synthetic bases and states.

Not a test module: imported by tests/test_state_*.py, test_fingerprint*.py, test_verify*.py and
test_cli_state*.py. Bases are written by ``tools.make_synthetic_base`` (raw safetensors, BF16 included).
"""

from __future__ import annotations

import copy
import hashlib
import random
import sys
from pathlib import Path

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tools.* is importable however pytest was started
    sys.path.insert(0, str(ROOT))

from hif4fmt.base import BaseCheckpoint  # noqa: E402
from hif4fmt.constants import ALIGNMENT, CHECKSUMMED_PREAMBLE_BYTES, HEADER_OFFSET, PREAMBLE_STRUCT  # noqa: E402
from hif4fmt.fingerprint import fingerprint_base  # noqa: E402
from hif4fmt.recipe import Recipe  # noqa: E402
from hif4fmt.state import BaseBinding, ExcludedLayer, QuantizedLayer, State  # noqa: E402
from tools.make_synthetic_base import make_synthetic_base  # noqa: E402

BOUNDARY = ("proj_out",)


def build_base(folder: Path, **kwargs) -> Path:
    """Return ``folder`` holding a synthetic two-expert diffusers base (2 blocks, dim 128 by default)."""
    return make_synthetic_base(folder, **kwargs)


def state_for_base(base_dir: Path, recipe: Recipe | None = None, calibration: dict | None = None,
                   hub_hints: dict | None = None, seed: int = 0) -> State:
    """Return a State for every block linear of ``base_dir`` with masks w_i**0.5 (always > 0)."""
    recipe = recipe or Recipe()
    fingerprint = fingerprint_base(base_dir)
    rng = np.random.default_rng(seed)
    layers, excluded = [], []
    with BaseCheckpoint.open(base_dir) as base:
        for component_name, component in base.components.items():
            for name in component.tensor_names():
                if not name.endswith(".weight") or not name.startswith("blocks.") or ".norm" in name:
                    continue
                module = name[: -len(".weight")]
                index = int(module.split(".")[1])
                if any(b.component == component_name and b.index == index for b in recipe.retained_blocks):
                    excluded.append(ExcludedLayer(component_name, module, "retained block"))
                    continue
                weight = component.read_tensor_numpy(name)
                mask = (np.sqrt(np.abs(weight).max(axis=0)) * rng.uniform(0.5, 2.0, weight.shape[1])).astype(np.float32)
                layers.append(QuantizedLayer(component_name, module, weight.shape[1], weight.shape[0], mask,
                                             fingerprint.components[component_name].tensors[name]))
            for module in BOUNDARY:
                excluded.append(ExcludedLayer(component_name, module, "boundary layer"))
    calibration = {"statistic": recipe.statistic, "prompts": 8, "seed": 0, "height": 480, "width": 832,
                   "frames": 81, "steps": 40, "guidance": 5.0, "prompt_set_sha256": "ab" * 32,
                   "image": "placeholder: 480x832 gray gradient"} if calibration is None else calibration
    return State(recipe, calibration, BaseBinding.from_fingerprint(fingerprint, hub_hints), tuple(layers),
                 tuple(excluded))


def tiny_state(mask_dtype: str = "float32", layers: int = 2, in_features: int = 64) -> State:
    """Return a small State (no base on disk needed): ``layers`` layers of ``in_features`` channels."""
    digest = hashlib.sha256(b"component").hexdigest()
    built = []
    for i in range(layers):
        mask = (np.arange(1, in_features + 1, dtype=np.float32) / np.float32(8.0) + np.float32(i))
        built.append(QuantizedLayer("transformer", f"blocks.{i}.attn1.to_q", in_features, in_features, mask,
                                    hashlib.sha256(f"w{i}".encode()).hexdigest()))
    base = BaseBinding("hif4fmt-sha256-tensors-v1", hashlib.sha256(b"base").hexdigest(), {"transformer": digest},
                       123456, {"repo_id": "example/base"})
    return State(Recipe(mask_dtype=mask_dtype), {"prompts": 1, "seed": 0}, base, tuple(built),
                 (ExcludedLayer("transformer", "proj_out", "boundary layer"),))


def split_file(data: bytes) -> tuple[int, int, dict, bytes]:
    """Return (major, minor, decoded header, data section bytes) of a state file."""
    _, major, minor, length, _, _ = PREAMBLE_STRUCT.unpack(data[:HEADER_OFFSET])
    header = msgpack.unpackb(data[HEADER_OFFSET:HEADER_OFFSET + length], raw=False)
    data_offset = -(-(HEADER_OFFSET + length) // ALIGNMENT) * ALIGNMENT
    return major, minor, header, data[data_offset:]


def canonical(value):
    """Return ``value`` with every map's keys sorted (the canonical msgpack order)."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def assemble(header: dict | bytes, data_section: bytes, major: int = 1, minor: int = 0,
             sort_keys: bool = True) -> bytes:
    """Return a state file around ``header`` (re-encoded, valid checksum) and ``data_section``."""
    header_bytes = header if isinstance(header, bytes) else msgpack.packb(
        canonical(header) if sort_keys else header, use_bin_type=True)
    unsigned = PREAMBLE_STRUCT.pack(b"\x89HIF4\r\n\x1a", major, minor, len(header_bytes), bytes(32), bytes(12))
    digest = hashlib.sha256(unsigned[:CHECKSUMMED_PREAMBLE_BYTES] + header_bytes).digest()
    preamble = PREAMBLE_STRUCT.pack(b"\x89HIF4\r\n\x1a", major, minor, len(header_bytes), digest, bytes(12))
    padding = bytes(-(HEADER_OFFSET + len(header_bytes)) % ALIGNMENT)
    return preamble + header_bytes + padding + data_section


def replace_tensor(header: dict, data_section: bytes, tensor: str, new_bytes: bytes) -> bytes:
    """Return ``data_section`` with ``tensor``'s bytes replaced (same length) and its sha256 updated in ``header``."""
    begin, end = header["tensors"][tensor]["offsets"]
    assert end - begin == len(new_bytes)
    header["tensors"][tensor]["sha256"] = hashlib.sha256(new_bytes).hexdigest()
    return data_section[:begin] + new_bytes + data_section[end:]


# values of every type and of the shapes the format's rules look at (names, keys, hashes, dtypes)
REPLACEMENTS = [None, True, False, -1, 0, 1, 64, -33, 2**40, 2**63 - 1, 1.0, 0.5, 100.0, -0.0, 1e-300, "", "x",
                "blocks.0", "blocks.0.attn1.to_q", "a b", "a\u00a0b", "a\x1bb", "a/b", "transformer", "transformer:1",
                "transformer:01", " transformer:1", "transformer_2:0", "transformer:\u00b2", "float16", "bfloat16",
                "toolkit", "ascend", "max", "percentile", "hifloat4", "0" * 64, "f" * 64, [], {}, [1, "a"],
                {"k": 1}, ["transformer:3", "transformer:1"], ["transformer:1", "transformer:10"]]


def mutate_header(value, rng: random.Random) -> None:
    """Replace, delete or add one random leaf or key of a nested header (in place)."""
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        roll = rng.random()
        if roll < 0.1:
            del value[key]
        elif roll < 0.2:
            value[rng.choice([key + "_x", "zz", "a"])] = copy.deepcopy(rng.choice(REPLACEMENTS))
        elif roll < 0.65 and isinstance(value[key], (dict, list)) and value[key]:
            mutate_header(value[key], rng)
        else:
            value[key] = copy.deepcopy(rng.choice(REPLACEMENTS))
    elif isinstance(value, list) and value:
        index = rng.randrange(len(value))
        roll = rng.random()
        if roll < 0.1:
            value.reverse()
        elif roll < 0.2:
            value.append(copy.deepcopy(value[index]))
        elif roll < 0.65 and isinstance(value[index], (dict, list)) and value[index]:
            mutate_header(value[index], rng)
        else:
            value[index] = copy.deepcopy(rng.choice(REPLACEMENTS))
