"""Session-wide pytest fixtures: the tiny random-weight Wan2.2 I2V pipeline folder.

Why this module exists: several test modules (fingerprint/verify on a real layout, calibration, build,
the W4A4 runtime, the CLI) need a genuine diffusers ``WanImageToVideoPipeline`` folder. Building it
takes a few seconds, so it is built once per session by ``tools.make_tiny_wan`` and shared read-only.
Tests that change files must copy it first (``shutil.copytree``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tools.* is importable however pytest was started
    sys.path.insert(0, str(ROOT))

TINY_WAN_SEED = 0


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return the folder of the tiny Wan2.2 I2V pipeline (seed 0), built once per session; do not modify."""
    pytest.importorskip("diffusers")
    from tools.make_tiny_wan import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("tiny_wan") / "base", seed=TINY_WAN_SEED)


@pytest.fixture(scope="session")
def tiny_wan_state(tiny_wan_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a .hif4 state bound to ``tiny_wan_dir`` quantizing all 2 x 20 block linears.

    Its masks are synthetic (``tools.make_tiny_wan.write_synthetic_state``), so runtime tests do not
    depend on calibration or ``hif4fmt build``.
    """
    from tools.make_tiny_wan import write_synthetic_state

    return write_synthetic_state(tiny_wan_dir, tmp_path_factory.mktemp("tiny_wan_state") / "tiny.hif4")
