"""Calibration inputs: prompt files in every accepted layout, their digest, and protocol validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hif4fmt.calibration.prompts import load_prompts, prompt_set_digest
from hif4fmt.calibration.protocol import CalibrationProtocol
from hif4fmt.errors import CalibrationError, StatsFormatError

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, document, text=None) -> Path:
    path = tmp_path / "prompts.json"
    path.write_text(text if text is not None else json.dumps(document))
    return path


@pytest.mark.parametrize("document", [
    [{"cap": "a cat"}, {"cap": "a dog", "other": 1}, {"cap": "a bird"}],
    [{"cap": ["a cat", "ignored"]}, {"cap": ["", "a dog"]}, "a bird"],
    ["a cat", "  a dog  ", "a bird"],
    {"id-9": {"cap": "a cat"}, "id-1": {"cap": "a dog"}, "id-5": {"cap": "a bird"}},  # file order kept
])
def test_prompt_layouts_give_the_same_prompts_and_digest(tmp_path, document):
    prompts = load_prompts(_write(tmp_path, document), 3)
    assert prompts.prompts == ("a cat", "a dog", "a bird")
    assert prompts.sha256 == prompt_set_digest(["a cat", "a dog", "a bird"])
    assert prompts.to_dict() == {"count": 3, "sha256": prompts.sha256, "source": "prompts.json"}


def test_digest_ignores_file_formatting_but_not_content(tmp_path):
    compact = load_prompts(_write(tmp_path, None, '[{"cap":"a cat"},{"cap":"a dog"}]'), 2).sha256
    spaced = load_prompts(_write(tmp_path, None, '[\n  {"cap": "a cat"},\n  {"cap": "a dog"}\n]\n'), 2).sha256
    assert compact == spaced
    assert load_prompts(_write(tmp_path, ["a dog", "a cat"]), 2).sha256 != compact
    assert prompt_set_digest(["a cat", "a dog"]) == compact


def test_only_the_first_num_prompts_are_used(tmp_path):
    assert load_prompts(_write(tmp_path, ["a", "b", "c"]), 2).prompts == ("a", "b")


@pytest.mark.parametrize("document, message", [
    (["a cat"], "holds 1 prompts but 2 were asked for; pass --num-prompts 1"),
    ([{"caption": "a cat"}, "x"], "record 0: expected a string or an object with 'cap'"),
    ([{"cap": 5}, "x"], "record 0: 'cap' must be a string"),
    (["a", "   "], "record 1: empty prompt"),
    ("just a string", "expected a JSON list"),
])
def test_bad_prompt_files_raise_calibration_error(tmp_path, document, message):
    with pytest.raises(CalibrationError, match=message):
        load_prompts(_write(tmp_path, document), 2)


def test_unreadable_prompt_file_raises_calibration_error(tmp_path):
    with pytest.raises(CalibrationError, match="cannot read the prompts file"):
        load_prompts(_write(tmp_path, None, "[{"), 1)
    with pytest.raises(CalibrationError, match="cannot read the prompts file"):
        load_prompts(tmp_path / "absent.json", 1)


def test_bundled_prompt_sets_load():
    assert len(load_prompts(ROOT / "tools" / "prompts" / "calibration_16.json", 16).prompts) == 16
    tiny = json.loads((ROOT / "tools" / "prompts" / "tiny_calibration.json").read_text())
    assert 8 <= len(tiny) <= 16 and all(set(record) == {"cap"} for record in tiny)
    assert len(load_prompts(ROOT / "tools" / "prompts" / "tiny_calibration.json", len(tiny)).prompts) == len(tiny)


def test_default_protocol_is_the_papers():
    protocol = CalibrationProtocol()
    assert (protocol.num_prompts, protocol.height, protocol.width, protocol.frames) == (16, 720, 1280, 61)
    assert (protocol.steps, protocol.guidance, protocol.seed) == (40, 3.5, 42)
    assert CalibrationProtocol.from_dict(protocol.to_dict()) == protocol


@pytest.mark.parametrize("change, message", [
    ({"frames": 60}, "4 k \\+ 1 frames"),
    ({"guidance": 1.0}, "both classifier-free guidance branches"),
    ({"guidance_2": 0.5}, "guidance_2"),
    ({"steps": 0}, "steps 0"),
    ({"height": 10_000}, "height 10000"),
    ({"seed": -1}, "seed -1"),
    ({"image_fill": 256}, "image_fill 256"),
    ({"dtype": "int8"}, "dtype 'int8'"),
    ({"num_prompts": True}, "num_prompts True"),
])
def test_invalid_protocol_raises_calibration_error(change, message):
    with pytest.raises(CalibrationError, match=message):
        CalibrationProtocol(**change)


def test_protocol_from_stats_header_raises_the_given_error_type():
    data = CalibrationProtocol().to_dict()
    data["steps"] = "forty"
    with pytest.raises(StatsFormatError, match="steps 'forty'"):
        CalibrationProtocol.from_dict(data, StatsFormatError)
    with pytest.raises(StatsFormatError, match="missing fields"):
        CalibrationProtocol.from_dict({}, StatsFormatError)


def test_a_prompt_holding_a_lone_surrogate_is_a_calibration_error_naming_the_record(tmp_path):
    path = _write(tmp_path, None, '[{"cap": "a cat"}, {"cap": "a dog \\ud83d barks"}]')
    with pytest.raises(CalibrationError, match=r"record 1: character 6 is a lone surrogate \(U\+D83D\)"):
        load_prompts(path, 2)
    with pytest.raises(CalibrationError, match="negative_prompt: character 0 is a lone surrogate"):
        CalibrationProtocol(negative_prompt="\udc80")


def test_generate_settings_name_a_lone_surrogate_in_the_prompt():
    pytest.importorskip("imageio")
    from wan_runtime.generate import GenerationSettings

    problems = GenerationSettings(prompt="a cat \ud800", height=32, width=32, frames=5).problems()
    assert problems == ["prompt: character 6 is a lone surrogate (not text); drop it"]


def test_a_full_disk_while_writing_statistics_is_a_stats_format_error(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import safetensors.torch
    from safetensors import SafetensorError

    from hif4fmt.calibration.sketch import SketchGrid
    from hif4fmt.calibration.stats_file import write_stats

    target = tmp_path / "stats.safetensors"
    target.write_bytes(b"previous statistics")

    def full_disk(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(StatsFormatError, match=r"stats\.safetensors: cannot write the statistics file: .*No space "
                                               r"left.*not written"):
        write_stats(target, SketchGrid(), CalibrationProtocol(), {"count": 0}, None, 0, [])
    assert target.read_bytes() == b"previous statistics"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]
