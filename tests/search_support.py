"""Shared by tests/test_search*.py and tests/test_rank*.py: one tiny calibration, made once per session.

The statistics of the tiny Wan folder (2 prompts, 3 steps, 16 held-out rows per layer) are written
beside their prompts file, as ``hif4fmt calibrate`` users do, so ``rank`` finds the prompts by default.
"""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS = ["a cat walks on the beach", "a red car drives fast"]
_CACHE: dict[str, Path] = {}


def tiny_stats(tiny_wan_dir: Path, tmp_path_factory) -> Path:
    """Return the statistics file of ``tiny_wan_dir`` (calibrated on the CPU once per session)."""
    if "stats" not in _CACHE:
        from hif4fmt.calibration.protocol import CalibrationProtocol
        from hif4fmt.calibration.runner import run_calibration

        folder = tmp_path_factory.mktemp("search_stats")
        (folder / "prompts.json").write_text(json.dumps(PROMPTS))
        protocol = CalibrationProtocol(num_prompts=2, height=32, width=32, frames=5, steps=3, max_sequence_length=32)
        run_calibration(tiny_wan_dir, folder / "prompts.json", folder / "tiny.safetensors", protocol,
                        holdout_rows=16, device="cpu", progress=False)
        _CACHE["stats"] = folder / "tiny.safetensors"
    return _CACHE["stats"]
