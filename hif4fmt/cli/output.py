"""The one output layer of the CLI: print a result as text or JSON, and errors as one line.

Why this module exists: every command builds a plain dict and hands it here, so text and ``--json``
stay in step and every error path looks the same (one line on stderr, a distinct exit code:
0 ok, 1 differs/mismatch, 2 bad input or an unexpected internal error, which is reported as such,
130 interrupted by Ctrl-C). ``--debug`` (on the group) prints the traceback too and keeps the exit code.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any, Callable, Mapping

import click

from hif4fmt.errors import Hif4Error, MissingExtraError

INTERNAL_ERROR_EXIT_CODE = 2  # an unexpected exception: same code as bad input (what usually triggers one)
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C: 128 + SIGINT, what shells report for a process stopped by it
INTERRUPTED_MESSAGE = ("interrupted (Ctrl-C); outputs are replaced only when complete, so earlier files are "
                       "unchanged")


def emit(result: dict[str, Any], as_json: bool, render_text: Callable[[dict[str, Any]], str]) -> None:
    """Print ``result`` as canonical JSON (sorted keys) or as the text ``render_text`` makes of it."""
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True, allow_nan=False, default=_json_default))
    else:
        click.echo(render_text(result))


def print_notes(notes: list[str]) -> None:
    """Print each note (e.g. a leftover of an interrupted write that was cleared) as one stderr line."""
    for note in notes:
        click.echo(f"note: {note}", err=True)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """Return a plain left-aligned text table (no dependency on rich/tabulate)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# top-level modules that only the optional dependency groups install (pyproject.toml), and the group
OPTIONAL_MODULES = {"torch": "torch", "tqdm": "torch", "diffusers": "runtime", "transformers": "runtime",
                    "tokenizers": "runtime", "accelerate": "runtime", "ftfy": "runtime", "imageio": "runtime",
                    "imageio_ffmpeg": "runtime", "PIL": "runtime"}


def missing_extra(exc: ModuleNotFoundError, args: list[str],
                  command_extras: Mapping[str, str]) -> MissingExtraError | None:
    """Return the error naming the extra to install when ``exc`` is an optional module, else None.

    The extra is the command's own (``command_extras``, keyed by sub-command name, the first of ``args``
    that is one), so installing it is enough for that command; else the module's group.
    """
    module = (exc.name or "").split(".")[0]
    if module not in OPTIONAL_MODULES:
        return None
    command = next((arg for arg in args if arg in command_extras), None)
    extra = command_extras.get(command, OPTIONAL_MODULES[module]) if command else OPTIONAL_MODULES[module]
    what = f"'{command}'" if command else "this command"
    return MissingExtraError(f"{what} needs the optional dependencies of hif4fmt[{extra}] ({module} is not "
                             f"installed): pip install \"hif4fmt[{extra}]\"")


def _fail(message: str, code: int, debug: bool) -> None:
    """Print the traceback (``--debug``) and ``message`` as one ``error:`` line; exit with ``code``."""
    if debug:
        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def run_cli(group: click.Group, command_extras: Mapping[str, str] = {}) -> None:
    """Run ``group``; map ``Hif4Error`` to one stderr line and its exit code (2 unless stated).

    A missing optional module names the extra the command needs (``command_extras``: sub-command name
    -> extra). Ctrl-C exits ``INTERRUPTED_EXIT_CODE`` (130). ``--debug`` prints the traceback first and keeps the
    exit code the error would have without it.
    """
    args = sys.argv[1:]
    debug = "--debug" in args
    if debug:  # accepted anywhere on the line: moved in front of the subcommand, where the group reads it
        args = ["--debug", *(arg for arg in args if arg != "--debug")]
    try:
        # With standalone_mode=False, click returns the value of ctx.exit(n) instead of exiting.
        code = group.main(args=args, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else group.name
        _fail(f"{exc.format_message()} (see '{command} --help')", 2, debug)
    except click.ClickException as exc:
        _fail(exc.format_message(), 2, debug)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        _fail(INTERRUPTED_MESSAGE, INTERRUPTED_EXIT_CODE, debug)
    except Hif4Error as exc:
        _fail(str(exc), exc.exit_code, debug)
    except ModuleNotFoundError as exc:
        missing = missing_extra(exc, args, command_extras)
        if missing is None:
            _fail(f"internal error {type(exc).__name__}: {exc} (rerun with --debug for the traceback and report it)",
                  INTERNAL_ERROR_EXIT_CODE, debug)
        _fail(str(missing), missing.exit_code, debug)
    except (OSError, MemoryError) as exc:
        _fail(f"{type(exc).__name__}: {exc}", 2, debug)
    except Exception as exc:  # a bug, not bad input: one line, and the way to see the traceback
        _fail(f"internal error {type(exc).__name__}: {exc} (rerun with --debug for the traceback and report it)",
              INTERNAL_ERROR_EXIT_CODE, debug)
    sys.exit(code if isinstance(code, int) else 0)
