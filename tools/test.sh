#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite. This is the README's test command and what CI runs.
# HIF4FMT_REQUIRE_KERNEL=1: a codec kernel that failed to build fails the tests (tests/test_codec_kernel.py)
# instead of leaving the slower torch paths silently in charge. Export HIF4FMT_REQUIRE_KERNEL=0 to run
# the suite on a machine without a C compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
export HIF4FMT_REQUIRE_KERNEL=${HIF4FMT_REQUIRE_KERNEL:-1}
exec .venv/bin/python -m pytest -q "$@"
