#!/usr/bin/env bash
# Create .venv (if missing) and install hif4fmt with every extra. Idempotent; used by demo.sh and test.sh.
# torch is pinned to 2.13.0 in pyproject.toml: that CPU wheel lies on disk on the project's machines,
# while an open range would pull a multi-GB CUDA build.
# The install also compiles the optional codec kernel (hif4fmt/codec/_kernel.c, setup.py) with the
# machine's C compiler, and the optional sketch kernel (hif4fmt/calibration/_sketch_kernel.c); they are
# rebuilt whenever their sources or setup.py change.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.hif4fmt-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || [ hif4fmt/codec/_kernel.c -nt "$stamp" ] || [ hif4fmt/codec/_gemm.c -nt "$stamp" ] \
    || [ hif4fmt/calibration/_sketch_kernel.c -nt "$stamp" ]; then
  .venv/bin/python -m pip install -qq --upgrade pip
  .venv/bin/python -m pip install -qq -e ".[all]"  # -qq: errors only (pip prints its own config notices otherwise)
  touch "$stamp"
  if ! .venv/bin/python -c "import hif4fmt.codec._kernel" 2>/dev/null; then
    echo "warning: the codec kernel (hif4fmt/codec/_kernel.c) was not built, probably for want of a C compiler:" >&2
    echo "  everything works, on the slower torch paths (same results). To build it: install gcc, then" >&2
    echo "  rm .venv/.hif4fmt-installed && bash tools/bootstrap.sh" >&2
  fi
  if ! .venv/bin/python -c "import hif4fmt.calibration._sketch_kernel" 2>/dev/null; then
    echo "warning: the sketch kernel (hif4fmt/calibration/_sketch_kernel.c) was not built: calibration works," >&2
    echo "  on the slower torch path (same counts). To build it: install gcc, then" >&2
    echo "  rm .venv/.hif4fmt-installed && bash tools/bootstrap.sh" >&2
  fi
fi
