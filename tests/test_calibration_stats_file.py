"""The statistics file: round trip, deterministic bytes, and a typed StatsFormatError for every damaged form."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from hif4fmt.calibration.constants import STATS_METADATA_KEY
from hif4fmt.calibration.hooks import HoldoutSample, LayerObservation
from hif4fmt.calibration.protocol import CalibrationProtocol
from hif4fmt.calibration.sketch import ChannelSketch, SketchGrid
from hif4fmt.calibration.stats_file import read_stats, tensor_name, write_stats
from hif4fmt.errors import StatsFormatError
from stats_support import rewrite_stats

PROTOCOL = CalibrationProtocol(num_prompts=2, height=32, width=32, frames=5, steps=3, max_sequence_length=32)
PROMPTS = {"count": 2, "sha256": "ab" * 32, "source": "prompts.json"}
BASE = {"algorithm": "hif4fmt-sha256-tensors-v1", "fingerprint": "cd" * 32,
        "components": {"transformer": "ef" * 32, "transformer_2": "01" * 32}, "total_bytes": 1234}
LAYERS = {"blocks.0.attn1.to_q": (64, 64), "blocks.0.ffn.net.2": (128, 64)}


def _observations(seed: int = 0) -> list[LayerObservation]:
    grid = SketchGrid()
    g = torch.Generator().manual_seed(seed)
    observations = []
    for component in ("transformer", "transformer_2"):
        for module, (channels, out_features) in LAYERS.items():
            sketch, sample = ChannelSketch(grid, channels), HoldoutSample(4, channels)
            for call in range(3):
                x = (torch.randn(20, channels, generator=g) * 3).to(torch.bfloat16)
                sketch.update(x)
                sample.offer(x, 0, call)
            observations.append(LayerObservation(component, module, channels, out_features, sketch, sample, calls=3))
    return observations


def _write(path, observations=None):
    return write_stats(path, SketchGrid(), PROTOCOL, PROMPTS, BASE, 4, observations or _observations())


@pytest.fixture()
def stats_path(tmp_path):
    path = tmp_path / "stats.safetensors"
    _write(path)
    return path


def test_round_trip_keeps_every_statistic_exactly(stats_path):
    observations = _observations()
    stats = read_stats(stats_path)
    assert stats.header.protocol == PROTOCOL and stats.header.base == BASE and stats.header.prompts == PROMPTS
    assert len(stats.header.layers) == 4
    for observation in observations:
        layer = stats.load_layer(observation.component, observation.module)
        assert torch.equal(layer.counts, observation.sketch.counts)  # trimmed on disk, full grid in memory
        assert torch.equal(layer.absmax, observation.sketch.absmax)
        assert torch.equal(layer.absmin, observation.sketch.absmin)
        assert torch.equal(layer.holdout, observation.holdout.rows) and layer.holdout.dtype == torch.bfloat16
        assert torch.equal(layer.holdout_ids, observation.holdout.ids)
        assert layer.info.tokens == 60 and layer.info.calls == 3
        assert torch.equal(layer.percentile(99.9).values, observation.sketch.percentile(99.9).values)


def test_same_statistics_give_byte_identical_files(tmp_path):
    _write(tmp_path / "a.safetensors")
    _write(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def _counts_offset(path, name: str) -> int:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    return 8 + length + header[name]["data_offsets"][0]


def test_flipped_count_byte_raises_stats_format_error_naming_the_channel(stats_path):
    name = tensor_name("transformer", "blocks.0.ffn.net.2", "counts")
    data = bytearray(stats_path.read_bytes())
    data[_counts_offset(stats_path, name)] ^= 0x04
    stats_path.write_bytes(bytes(data))
    stats = read_stats(stats_path)  # the header is intact
    with pytest.raises(StatsFormatError, match=r"blocks\.0\.ffn\.net\.2: channel 0 histogram sums to"):
        stats.load_layer("transformer", "blocks.0.ffn.net.2")


def test_truncated_file_raises_stats_format_error(stats_path):
    data = stats_path.read_bytes()
    stats_path.write_bytes(data[: len(data) - 100])
    with pytest.raises(StatsFormatError):
        read_stats(stats_path)
    stats_path.write_bytes(data[:5])
    with pytest.raises(StatsFormatError, match="too short"):
        read_stats(stats_path)


def test_huge_header_length_raises_stats_format_error(stats_path):
    data = stats_path.read_bytes()
    stats_path.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])
    with pytest.raises(StatsFormatError, match="header length"):
        read_stats(stats_path)


def test_non_statistics_files_raise_stats_format_error(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 8)
    with pytest.raises(StatsFormatError, match="not a valid safetensors file"):
        read_stats(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(StatsFormatError, match="not a hif4fmt statistics file"):
        read_stats(tmp_path / "plain.safetensors")
    with pytest.raises(StatsFormatError, match="cannot read"):
        read_stats(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.update(format_version="2.0"), "reads major 1 only"),
    (lambda h: h.update(format="gguf"), "expected 'hif4fmt-stats'"),
    (lambda h: h.pop("protocol"), "misses"),
    (lambda h: h["protocol"].update(frames=6), "4 k \\+ 1 frames"),
    (lambda h: h["sketch"].update(bins=999), "sketch bins 999"),
    (lambda h: h["sketch"].update(mantissa_bits=40), "mantissa_bits 40"),
    (lambda h: h["layers"]["transformer/blocks.0.attn1.to_q"].update(stored_bins=10_000), "stored_bins"),
    (lambda h: h["layers"]["transformer/blocks.0.attn1.to_q"].update(module="blocks.1.attn1.to_q"),
     "do not match the key"),
    (lambda h: h["layers"]["transformer/blocks.0.attn1.to_q"].update(in_features=65), "expected I64 \\[65"),
])
def test_tampered_header_raises_stats_format_error(stats_path, edit, message):
    rewrite_stats(stats_path, edit_header=edit)
    with pytest.raises(StatsFormatError, match=message):
        read_stats(stats_path)


def test_tokens_not_matching_the_histograms_raise_stats_format_error(stats_path):
    rewrite_stats(stats_path, edit_header=lambda h: h["layers"]["transformer_2/blocks.0.attn1.to_q"].update(tokens=61))
    with pytest.raises(StatsFormatError, match="sums to 60 but 61 tokens"):
        read_stats(stats_path).load_layer("transformer_2", "blocks.0.attn1.to_q")


def test_nan_in_header_raises_stats_format_error(stats_path):
    rewrite_stats(stats_path, edit_header=lambda h: h["protocol"].update(guidance=float("nan")))
    with pytest.raises(StatsFormatError, match="NaN is not allowed"):
        read_stats(stats_path)


def test_missing_or_extra_tensors_raise_stats_format_error(stats_path, tmp_path):
    name = tensor_name("transformer", "blocks.0.attn1.to_q", "absmax")
    rewrite_stats(stats_path, edit_tensors=lambda t: t.pop(name))
    with pytest.raises(StatsFormatError, match="missing"):
        read_stats(stats_path)
    other = tmp_path / "other.safetensors"
    _write(other)
    rewrite_stats(other, edit_tensors=lambda t: t.update({"transformer/evil.counts": torch.zeros(1)}))
    with pytest.raises(StatsFormatError, match="not described by the header"):
        read_stats(other)


def test_held_out_ids_out_of_key_order_raise_stats_format_error(stats_path):
    name = tensor_name("transformer", "blocks.0.attn1.to_q", "holdout_ids")
    rewrite_stats(stats_path, edit_tensors=lambda t: t.update({name: t[name].flip(0).contiguous()}))
    with pytest.raises(StatsFormatError, match="ascending key order"):
        read_stats(stats_path).load_layer("transformer", "blocks.0.attn1.to_q")


def test_layer_absent_from_the_file_raises_stats_format_error(stats_path):
    with pytest.raises(StatsFormatError, match="made for other layers"):
        read_stats(stats_path).load_layer("transformer", "blocks.7.attn1.to_q")


def test_unwritable_destination_raises_and_leaves_no_file(tmp_path):
    target = tmp_path / "absent" / "stats.safetensors"
    with pytest.raises(StatsFormatError, match="nothing was written"):
        _write(target)
    assert not target.exists()


def test_metadata_that_is_not_json_raises_stats_format_error(stats_path):
    tensors = load_file(str(stats_path))
    save_file(tensors, str(stats_path), metadata={STATS_METADATA_KEY: '{"format": "hif4fmt-stats",'})
    with pytest.raises(StatsFormatError, match="header is not valid JSON"):
        read_stats(stats_path)


COUNTS = tensor_name("transformer", "blocks.0.attn1.to_q", "counts")
ABSMAX = tensor_name("transformer", "blocks.0.attn1.to_q", "absmax")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({COUNTS: t[COUNTS].to(torch.int32)}), r"counts: expected I64 \[64, \d+\], found I32"),
    (lambda t: t.update({COUNTS: t[COUNTS].to(torch.float32).fill_(float("nan"))}), "found F32"),  # NaN counts
    (lambda t: t.update({ABSMAX: torch.cat([t[ABSMAX], t[ABSMAX][:1]])}), r"expected F32 \[64\], found F32 \[65\]"),
    (lambda t: t.update({ABSMAX: t[ABSMAX].double()}), r"expected F32 \[64\], found F64 \[64\]"),
])
def test_tensor_of_wrong_dtype_or_shape_raises_stats_format_error(stats_path, edit, message):
    rewrite_stats(stats_path, edit_tensors=edit)
    with pytest.raises(StatsFormatError, match=message):
        read_stats(stats_path)


def _negative_count_same_row_sum(tensors):
    """Make one count of channel 0 negative while keeping the channel's sum (so only the sign check fires)."""
    counts = tensors[COUNTS]
    column = int(torch.nonzero(counts[0])[0])
    moved = int(counts[0, column]) + 1
    counts[0, column] -= moved  # now -1
    counts[0, (column + 1) % counts.shape[1]] += moved


@pytest.mark.parametrize("edit, message", [
    (_negative_count_same_row_sum, "negative histogram counts"),
    (lambda t: t[ABSMAX].__setitem__(5, float("nan")), "NaN, negative or min > max"),
    (lambda t: t[ABSMAX].__setitem__(5, float(t[ABSMAX][5]) * 4), "channel 5 absmax .* lies in bin"),
    (lambda t: t[tensor_name("transformer", "blocks.0.attn1.to_q", "absmin")].__setitem__(7, 0.0),
     "channel 7 absmin 0.0 lies in bin 0"),
    (lambda t: t[tensor_name("transformer", "blocks.0.attn1.to_q", "nonfinite")].__setitem__(0, -1),
     "non-finite counts"),
    (lambda t: t[tensor_name("transformer", "blocks.0.attn1.to_q", "nonfinite")].__setitem__(0, 1),
     "non-finite counts"),
])
def test_damaged_statistics_values_raise_stats_format_error_on_load(stats_path, edit, message):
    rewrite_stats(stats_path, edit_tensors=edit)
    stats = read_stats(stats_path)  # names, dtypes and shapes are intact: values are checked per layer
    with pytest.raises(StatsFormatError, match=message):
        stats.load_layer("transformer", "blocks.0.attn1.to_q")
    stats.load_layer("transformer", "blocks.0.ffn.net.2")  # other layers still load


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["sketch"].update(kind="t-digest"), "reads 'float32-exponent-mantissa-histogram'"),
    (lambda h: h["prompts"].update(count=3), "prompts count 3 differs from protocol num_prompts 2"),
    (lambda h: h["holdout"].update(rows_per_layer=2), "holdout_rows 4 exceeds holdout.rows_per_layer 2"),
    (lambda h: h["layers"]["transformer/blocks.0.attn1.to_q"].pop("tokens"), r"missing \['tokens'\]"),
    (lambda h: h["layers"]["transformer/blocks.0.attn1.to_q"].update(tokens=-1), "tokens -1"),
    (lambda h: h.update(format_version="one"), "expected 'MAJOR.MINOR'"),
    (lambda h: h.update(base={"fingerprint": 5}), "base must be null or hold fingerprint"),
])
def test_more_tampered_headers_raise_stats_format_error(stats_path, edit, message):
    rewrite_stats(stats_path, edit_header=edit)
    with pytest.raises(StatsFormatError, match=message):
        read_stats(stats_path)


def test_later_minor_version_with_added_keys_is_read(stats_path):
    def add_keys(header):
        header["format_version"] = "1.7"
        header["new_top_level_key"] = {"anything": [1, 2]}
        header["layers"]["transformer/blocks.0.attn1.to_q"]["new_layer_key"] = "ignored"

    rewrite_stats(stats_path, edit_header=add_keys)
    stats = read_stats(stats_path)
    assert stats.header.format_version == "1.7"
    assert stats.load_layer("transformer", "blocks.0.attn1.to_q").info.tokens == 60
