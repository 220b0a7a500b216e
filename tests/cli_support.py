"""Run the ``hif4fmt`` console script in the test process. Not a test module.

Shared by the CLI tests (build, search, rank, every Wan layout): they assert exit codes and the
one-line errors, which only the real entry point (``hif4fmt.cli.main``, with its error mapping) gives.
"""

from __future__ import annotations

import sys

import pytest


def run_hif4fmt(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """Run ``hif4fmt ARGS`` in this process (as the console script does); return (exit code, stdout, stderr)."""
    from hif4fmt.cli import main

    monkeypatch.setattr(sys, "argv", ["hif4fmt", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err
