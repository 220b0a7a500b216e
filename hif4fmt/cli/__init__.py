"""The ``hif4fmt`` click group: a table of sub-commands, each imported only when it runs.

Why lazy: ``hif4fmt inspect/diff/verify/card`` must start fast and never import torch, while
``plan/calibrate/build/quantize`` need it. Each command lives in the module named in ``COMMANDS``;
this file only parses the top-level options and maps typed errors to exit codes (via ``output``).
"""

from __future__ import annotations

import importlib

import click

from hif4fmt import __version__

# command name -> (module, attribute, one-line help shown by `hif4fmt --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "inspect": ("hif4fmt.cli.state_cmds", "inspect_cmd", "Summarise a .hif4 state (header only)."),
    "diff": ("hif4fmt.cli.state_cmds", "diff_cmd", "Compare two .hif4 states (exit 1 if they differ)."),
    "verify": ("hif4fmt.cli.state_cmds", "verify_cmd", "Check a state against a base checkpoint."),
    "card": ("hif4fmt.cli.state_cmds", "card_cmd", "Write a hub-ready folder: state + model card."),
    "fingerprint": ("hif4fmt.cli.state_cmds", "fingerprint_cmd", "Fingerprint a base checkpoint."),
    "plan": ("hif4fmt.cli.build_cmds", "plan_cmd", "List which linears will be quantized / kept."),
    "calibrate": ("hif4fmt.cli.build_cmds", "calibrate_cmd", "Collect activation statistics."),
    "build": ("hif4fmt.cli.build_cmds", "build_cmd", "Build a .hif4 state from base + statistics."),
    "rank": ("hif4fmt.cli.rank_cmds", "rank_cmd", "Rank blocks by what keeping each in BF16 buys."),
    "codec": ("hif4fmt.cli.codec_cmds", "codec_cmd", "Quantize a random tensor and print errors."),
}

# command name -> the pip extra it needs (pyproject.toml); commands not named need no extra
COMMAND_EXTRAS: dict[str, str] = {"plan": "runtime", "calibrate": "runtime", "build": "runtime", "rank": "runtime",
                                  "codec": "torch"}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported from ``COMMANDS`` on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[name]
        command = getattr(importlib.import_module(module_name), attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hif4fmt")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """hif4fmt: HiFloat4 W4A4 compact PTQ states for Wan2.2."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main() -> None:
    """Console-script entry point: run the group, turning typed errors into one line + exit code."""
    from hif4fmt.cli.output import run_cli

    run_cli(cli, COMMAND_EXTRAS)
