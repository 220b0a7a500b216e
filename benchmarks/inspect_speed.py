"""Benchmark: ``hif4fmt inspect`` wall time on an A14B-sized state vs ``python -c "import torch"``.

Why: inspect must be cheap enough to run on every downloaded state before any model loads: it reads the
preamble and header only and never imports torch. Goal: under 0.3 s for the 800-layer state of both
Wan2.2-I2V-A14B experts. Each command runs ``--repeats`` times in a fresh process; the median is shown.

    python benchmarks/inspect_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from state_size import a14b_state  # noqa: E402

from hif4fmt.state import read_state, write_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def median_wall(command: list[str], repeats: int) -> float:
    """Return the median wall time (s) of running ``command`` ``repeats`` times."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as temp:
        path = Path(temp) / "a14b.hif4"
        write_state(path, a14b_state())
        start = time.perf_counter()
        read_state(path, load_tensors=False)
        in_process = time.perf_counter() - start
        python = [sys.executable]
        empty = median_wall(python + ["-c", "pass"], args.repeats)
        torch_import = median_wall(python + ["-c", "import torch"], args.repeats)
        inspect = median_wall(python + ["-m", "hif4fmt", "inspect", str(path)], args.repeats)
        inspect_json = median_wall(python + ["-m", "hif4fmt", "inspect", str(path), "--json", "--layers"],
                                   args.repeats)
        size = path.stat().st_size
    print(f"state: 800 layers, {size} bytes; median of {args.repeats} fresh processes")
    print(f"python -c pass                  {empty:6.3f} s")
    print(f"python -c 'import torch'        {torch_import:6.3f} s  (baseline)")
    print(f"hif4fmt inspect                 {inspect:6.3f} s  ratio vs import torch {inspect / torch_import:.2f}")
    print(f"hif4fmt inspect --json --layers {inspect_json:6.3f} s  ratio vs import torch {inspect_json / torch_import:.2f}")
    print(f"read_state(header only), in-process {in_process * 1000:.1f} ms")
    print(f"goal < 0.3 s: {'met' if inspect < 0.3 else 'NOT met'}")


if __name__ == "__main__":
    main()
