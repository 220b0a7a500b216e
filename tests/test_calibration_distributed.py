"""Scale-out: two torchrun processes (gloo on CPU) produce the same statistics file, byte for byte, as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")

from hif4fmt.calibration.stats_file import read_stats

PROMPTS = ["a cat walks on the beach", "a red car on a city street", "a bird flies over the sea"]
TINY_OPTIONS = ["--num-prompts", "3", "--height", "32", "--width", "32", "--frames", "5", "--steps", "3",
                "--max-sequence-length", "32", "--holdout-rows", "8", "--device", "cpu", "--no-progress"]


def _run(command: list[str], cwd) -> dict:
    """Run a calibrate command line with --json; return the summary printed by the process that wrote the file."""
    # one thread per process in both runs, so every matmul sums in the same order
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([*command, "--json"], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    # --no-progress: no loading bars on any rank, and no torchvision notice from transformers
    assert "Loading pipeline components" not in result.stderr and "torchvision" not in result.stderr
    return json.loads(result.stdout)  # only rank 0 prints: two summaries would not parse


def test_two_process_calibration_equals_one_process_exactly(tiny_wan_dir, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"cap": text} for text in PROMPTS]))
    common = ["calibrate", "--base", str(tiny_wan_dir), "--prompts", str(prompts), *TINY_OPTIONS]
    single, double = tmp_path / "single.safetensors", tmp_path / "double.safetensors"
    alone = _run([sys.executable, "-m", "hif4fmt", *common, "--out", str(single)], tmp_path)
    merged = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "hif4fmt", *common, "--out", str(double)], tmp_path)
    assert (alone["processes"], merged["processes"]) == (1, 2)  # the merge really ran over two processes
    assert single.read_bytes() == double.read_bytes()
    # and the file is a complete calibration (3 records: rank 0 ran records 0 and 2, rank 1 record 1)
    header = read_stats(double).header
    assert header.prompts["count"] == 3
    assert all(info.tokens > 0 and info.holdout_rows == 8 for info in header.layers.values())
    assert not list(tmp_path.glob(".*.tmp"))
