"""Base fingerprint: byte-level definition, layout independence, sensitivity, and bad checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import numpy as np
import pytest

from hif4fmt.base import BaseCheckpoint, parse_safetensors_header
from hif4fmt.errors import BaseCheckpointError
from hif4fmt.fingerprint import combine_fingerprint, component_digest, fingerprint_base, tensor_digest
import state_support  # noqa: F401  (puts the repo root on sys.path for tools.*)
from tools.make_synthetic_base import make_synthetic_base, wan_like_tensors, write_component, write_safetensors

U64 = struct.Struct("<Q")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_synthetic_base(tmp_path_factory.mktemp("fp") / "wan", blocks=2, dim=128, ffn=256)


def _component_tensors(seed_index: int, dtype: str = "BF16"):
    return wan_like_tensors(np.random.default_rng([0, seed_index]), 2, 128, 256, dtype)


def test_tensor_digest_is_the_spec_byte_stream():
    data = np.arange(6, dtype="<f4").tobytes()
    stream = (U64.pack(8) + b"layer.w1" + U64.pack(3) + b"F32" + U64.pack(2) + U64.pack(2) + U64.pack(3)
              + U64.pack(24) + data)
    assert tensor_digest("layer.w1", "F32", (2, 3), data) == hashlib.sha256(stream).hexdigest()


def test_tensor_digest_golden_value():
    # spec 6.2 worked example: name "w", dtype "BF16", shape [2], bytes 80 3f 00 40 (1.0, 2.0)
    assert tensor_digest("w", "BF16", (2,), bytes.fromhex("803f0040")) == hashlib.sha256(
        bytes.fromhex("0100000000000000" "77" "0400000000000000" "42463136" "0100000000000000"
                      "0200000000000000" "0400000000000000" "803f0040")).hexdigest()


def test_component_and_combined_fingerprint_follow_the_spec():
    digests = {"b": hashlib.sha256(b"1").hexdigest(), "a": hashlib.sha256(b"2").hexdigest()}
    expected_component = hashlib.sha256(U64.pack(2) + bytes.fromhex(digests["a"]) + bytes.fromhex(digests["b"]))
    assert component_digest(digests) == expected_component.hexdigest()
    algorithm = b"hif4fmt-sha256-tensors-v1"
    combined = hashlib.sha256(U64.pack(len(algorithm)) + algorithm + U64.pack(2)
                              + U64.pack(11) + b"transformer" + bytes.fromhex(digests["a"])
                              + U64.pack(13) + b"transformer_2" + bytes.fromhex(digests["b"]))
    assert combine_fingerprint({"transformer_2": digests["b"], "transformer": digests["a"]}) == combined.hexdigest()


def test_fingerprint_of_base_matches_independent_recomputation(base_dir):
    fingerprint = fingerprint_base(base_dir)
    for name, component in fingerprint.components.items():
        tensors = _component_tensors(0 if name == "transformer" else 1)
        expected = {n: tensor_digest(n, d, s, b) for n, (d, s, b) in tensors.items()}
        assert component.tensors == expected
        assert component.total_bytes == sum(len(b) for _, _, b in tensors.values())
    assert fingerprint.algorithm == "hif4fmt-sha256-tensors-v1"
    assert fingerprint.fingerprint == combine_fingerprint({n: c.digest for n, c in fingerprint.components.items()})


def test_resharding_reordering_and_metadata_keep_the_fingerprint(base_dir, tmp_path):
    reference = fingerprint_base(base_dir).fingerprint
    for variant, options in (("sharded", {"shards": 3}), ("reversed", {"reverse_order": True}),
                             ("metadata", {"metadata": {"format": "pt", "note": "edited"}})):
        folder = tmp_path / variant
        for index, component in enumerate(("transformer", "transformer_2")):
            write_component(folder / component, _component_tensors(index), **options)
        shutil.copy(base_dir / "model_index.json", folder / "model_index.json")
        assert fingerprint_base(folder).fingerprint == reference, variant
    assert (tmp_path / "sharded" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_one_flipped_weight_bit_changes_the_fingerprint_and_only_that_tensor(base_dir, tmp_path):
    copy = tmp_path / "flipped"
    shutil.copytree(base_dir, copy)
    path = copy / "transformer_2" / "diffusion_pytorch_model.safetensors"
    entries, _ = parse_safetensors_header(path)
    entry = entries["blocks.1.ffn.net.2.weight"]
    data = bytearray(path.read_bytes())
    data[entry.begin + 100] ^= 0x01
    path.write_bytes(bytes(data))
    before, after = fingerprint_base(base_dir), fingerprint_base(copy)
    assert before.fingerprint != after.fingerprint
    assert before.components["transformer"] == after.components["transformer"]
    changed = [n for n, d in after.components["transformer_2"].tensors.items()
               if before.components["transformer_2"].tensors[n] != d]
    assert changed == ["blocks.1.ffn.net.2.weight"]


def test_threads_do_not_change_the_result(base_dir):
    assert fingerprint_base(base_dir, threads=1) == fingerprint_base(base_dir, threads=4)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_every_float_dtype_is_hashed_and_read(tmp_path, dtype):
    folder = make_synthetic_base(tmp_path / dtype, blocks=1, dim=64, ffn=128, dtype=dtype,
                                 components=("transformer",))
    with BaseCheckpoint.open(folder) as base:
        component = base.components["transformer"]
        assert component.tensor_info("blocks.0.attn1.to_q.weight") == (dtype, (64, 64), 64 * 64 * (4 if dtype == "F32" else 2))
        values = component.read_tensor_numpy("blocks.0.attn1.to_q.weight")
        assert values.dtype == np.float32 and values.shape == (64, 64) and np.isfinite(values).all()
        assert 0.005 < float(values.std()) < 0.05
    assert len(fingerprint_base(folder).components["transformer"].tensors) == 10 * 2 + 1 + 2


def test_bf16_is_widened_exactly(tmp_path):
    bits = np.array([0x3F80, 0xC000, 0x0001, 0x7F7F], dtype="<u2")
    folder = tmp_path / "transformer"
    write_component(folder, {"w": ("BF16", (4,), bits.tobytes())})
    with BaseCheckpoint.open(folder) as base:
        values = base.components["transformer"].read_tensor_numpy("w")
    assert values.view(np.uint32).tolist() == [b << 16 for b in bits.tolist()]


def test_non_float_and_sub_byte_dtypes_are_hashed_by_raw_bytes(tmp_path):
    tensors = {"i8": ("I8", (3,), b"\x01\x02\xff"), "fp8": ("F8_E4M3", (2, 2), b"\x10\x20\x30\x40"),
               "f4": ("F4", (3,), b"\x21\x03"), "flag": ("BOOL", (1,), b"\x01"), "empty": ("F32", (0, 4), b"")}
    folder = tmp_path / "transformer"
    write_component(folder, tensors)
    fingerprint = fingerprint_base(folder)
    for name, (dtype, shape, data) in tensors.items():
        assert fingerprint.components["transformer"].tensors[name] == tensor_digest(name, dtype, shape, data)
    with BaseCheckpoint.open(folder) as base:
        with pytest.raises(BaseCheckpointError, match="no numpy equivalent"):
            base.components["transformer"].read_tensor_numpy("fp8")


def test_single_component_folder_is_named_after_itself(base_dir):
    with BaseCheckpoint.open(base_dir / "transformer_2") as base:
        assert list(base.components) == ["transformer_2"]
    assert fingerprint_base(base_dir / "transformer_2").components["transformer_2"] == \
        fingerprint_base(base_dir).components["transformer_2"]


def test_model_index_decides_which_components_are_read(base_dir, tmp_path):
    folder = tmp_path / "one"
    shutil.copytree(base_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer_2"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert list(fingerprint_base(folder).components) == ["transformer"]


def test_hub_hints_come_from_a_hub_cache_path(base_dir, tmp_path):
    snapshot = tmp_path / "models--Wan-AI--Wan2.2-I2V-A14B-Diffusers" / "snapshots" / "0123456789abcdef"
    shutil.copytree(base_dir, snapshot)
    with BaseCheckpoint.open(snapshot) as base:
        assert base.hub_hints() == {"repo_id": "Wan-AI/Wan2.2-I2V-A14B-Diffusers", "revision": "0123456789abcdef"}
    with BaseCheckpoint.open(base_dir) as base:
        assert base.hub_hints() == {}


def _write_raw(path, header_bytes: bytes, data: bytes = b"", length: int | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(U64.pack(len(header_bytes) if length is None else length) + header_bytes + data)


@pytest.mark.parametrize("header, data, length, message", [
    (b"", b"", None, "too short"),
    (b"{}", b"", 10**9, "exceeds the file"),
    (b"{not json", b"", None, "not valid JSON"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', b"\0" * 4, None, "duplicate"),
    (b'{"a": {"dtype": "Q4_K", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, None, "unknown dtype"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', b"\0" * 4, None, "needs 8"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 40]}}', b"\0" * 4, None, "data_offsets"),
    (b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', b"\0" * 4, None, "shape"),
    (b'[1, 2]', b"", None, "JSON object"),
])
def test_bad_safetensors_files_raise_base_checkpoint_error(tmp_path, header, data, length, message):
    path = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    if header == b"" and length is None:
        path.parent.mkdir(parents=True)
        path.write_bytes(b"\x01\x02")
    else:
        _write_raw(path, header, data, length)
    (path.parent / "config.json").write_text("{}")
    with pytest.raises(BaseCheckpointError, match=message):
        fingerprint_base(tmp_path / "transformer")


def test_index_problems_raise_base_checkpoint_error(base_dir, tmp_path):
    folder = tmp_path / "transformer"
    write_component(folder, _component_tensors(0), shards=2)
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first_in_shard_1 = next(k for k, v in sorted(index["weight_map"].items()) if "00001" in v)
    cases = [
        ({"weight_map": {**index["weight_map"], "extra.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}},
         "listed but not in their shard"),
        ({"weight_map": {**index["weight_map"], "x": "../escape.safetensors"}}, "no path separators"),
        ({"weight_map": {**index["weight_map"], "x": "missing.safetensors"}}, "missing from"),
        ({"weight_map": {**index["weight_map"], first_in_shard_1: "diffusion_pytorch_model-00002-of-00002.safetensors"}},
         "not mapped to this shard"),
        ({"no_weight_map": 1}, "weight_map"),
    ]
    for bad_index, message in cases:
        index_path.write_text(json.dumps(bad_index))
        with pytest.raises(BaseCheckpointError, match=message):
            fingerprint_base(folder)


def test_the_same_tensor_in_two_unindexed_files_is_refused(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    write_safetensors(folder / "a.safetensors", {"w": ("F32", (1,), b"\0" * 4)})
    write_safetensors(folder / "b.safetensors", {"w": ("F32", (1,), b"\0" * 4)})
    with pytest.raises(BaseCheckpointError, match="in both a.safetensors and b.safetensors"):
        fingerprint_base(folder)


def test_missing_or_empty_folders_raise_base_checkpoint_error(tmp_path):
    with pytest.raises(BaseCheckpointError, match="no such file"):
        fingerprint_base(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseCheckpointError, match="no config.json, so this is not a transformer folder"):
        fingerprint_base(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(BaseCheckpointError, match="no \\*.safetensors"):
        fingerprint_base(tmp_path / "empty")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKLWan"]}))
    with pytest.raises(BaseCheckpointError, match="declares none of"):
        fingerprint_base(tmp_path / "pipe")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_index.json").write_text("{")
    with pytest.raises(BaseCheckpointError, match="cannot read model_index.json"):
        fingerprint_base(tmp_path / "bad")


def test_fingerprint_to_dict_is_json_serialisable(base_dir):
    result = fingerprint_base(base_dir).to_dict(include_tensors=True)
    text = json.dumps(result)
    assert result["components"]["transformer"]["tensor_count"] == 2 * 21 + 2
    assert "blocks.0.attn1.to_q.weight" in text


def test_fingerprint_streams_tensors_from_the_mmap_without_copying_them(tmp_path):
    import tracemalloc

    tensor_bytes = 48 * 1024 * 1024  # three 16 MiB hash slices
    folder = tmp_path / "transformer"
    write_component(folder, {"big.weight": ("BF16", (tensor_bytes // 2,), bytes(tensor_bytes)),
                             "small.weight": ("F32", (4,), bytes(16))})
    for threads in (1, 2):
        tracemalloc.start()
        try:
            fingerprint = fingerprint_base(folder, threads=threads)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert fingerprint.components["transformer"].total_bytes == tensor_bytes + 16
        assert peak < tensor_bytes // 8, f"{peak} bytes allocated while hashing a {tensor_bytes}-byte tensor"


def test_hub_hints_are_only_taken_from_well_formed_hub_cache_paths(base_dir, tmp_path):
    for relative in ("models--a b--c/snapshots/0123456789", "models--org--name/snapshots/NOTHEX",
                     "xmodels--org--name/snapshots/0123456789"):
        folder = tmp_path / relative
        shutil.copytree(base_dir, folder)
        with BaseCheckpoint.open(folder) as base:
            assert base.hub_hints() == {}, relative
    nested = tmp_path / "models--org--name" / "snapshots" / "abcdef0123" / "transformer"
    shutil.copytree(base_dir / "transformer", nested)
    with BaseCheckpoint.open(nested) as base:
        assert base.hub_hints() == {"repo_id": "org/name", "revision": "abcdef0123"}


def test_a_folder_of_safetensors_without_a_transformer_config_or_model_index_is_refused(tmp_path):
    artifacts = tmp_path / "artifacts"  # the demo's output folder: a statistics file is not a transformer
    artifacts.mkdir()
    write_safetensors(artifacts / "tiny.stats.safetensors", {"w": ("F32", (1,), b"\0" * 4)})
    with pytest.raises(BaseCheckpointError, match="artifacts: no config.json, so this is not a transformer folder"):
        fingerprint_base(artifacts)


def test_a_component_folder_that_is_a_symlink_loop_or_missing_is_refused_by_name(base_dir, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(base_dir, folder)
    shutil.rmtree(folder / "transformer_2")
    (folder / "transformer_2").symlink_to(folder / "transformer_2")
    with pytest.raises(BaseCheckpointError, match=r"transformer_2: symbolic link loop"):
        fingerprint_base(folder)
    (folder / "transformer_2").unlink()
    (folder / "transformer_2").symlink_to(tmp_path / "gone")
    with pytest.raises(BaseCheckpointError, match=r"transformer_2: symbolic link to .*gone, which does not exist"):
        fingerprint_base(folder)
    (folder / "transformer_2").unlink()
    with pytest.raises(BaseCheckpointError, match="declares transformer_2 but there is no transformer_2/ folder"):
        fingerprint_base(folder)


def test_overlapping_data_offsets_are_refused_naming_both_tensors(tmp_path):
    folder = tmp_path / "transformer"
    header = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, ' \
             b'"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}'
    _write_raw(folder / "diffusion_pytorch_model.safetensors", header, b"\0" * 12)
    (folder / "config.json").write_text("{}")
    with pytest.raises(BaseCheckpointError, match=r"tensors 'a' and 'b' overlap"):
        fingerprint_base(folder)


def test_too_many_tensors_in_one_file_are_refused_before_any_per_tensor_work(tmp_path):
    from hif4fmt.constants import SAFETENSORS_MAX_TENSORS

    folder = tmp_path / "transformer"
    entries = ",".join(f'"t{i}": {{"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'
                       for i in range(SAFETENSORS_MAX_TENSORS + 1))
    _write_raw(folder / "diffusion_pytorch_model.safetensors", ("{" + entries + "}").encode())
    (folder / "config.json").write_text("{}")
    with pytest.raises(BaseCheckpointError, match=f"{SAFETENSORS_MAX_TENSORS + 1} tensors in one safetensors file"):
        fingerprint_base(folder)


def test_many_small_tensors_are_hashed_in_batches_not_one_task_each(tmp_path):
    from hif4fmt.constants import HASH_BATCH_TENSORS
    from hif4fmt.fingerprint import hash_batches

    folder = tmp_path / "transformer"
    count = 3 * HASH_BATCH_TENSORS + 5
    write_component(folder, {f"t{i:05d}": ("F32", (1,), bytes(4)) for i in range(count)})
    with BaseCheckpoint.open(folder) as base:
        component = base.components["transformer"]
        jobs = [(component, name) for name in component.tensor_names()]
        batches = hash_batches(jobs)
        assert len(batches) == 4 and [job for batch in batches for job in batch] == jobs
        assert fingerprint_base(base, threads=2) == fingerprint_base(base, threads=1)
