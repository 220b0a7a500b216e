"""Every CLI error is one ``error:`` line on stderr with exit code 2, never a usage block or a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from hif4fmt.cli.output import run_cli
from hif4fmt.errors import BaseMismatchError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, fragment", [
    (["verify"], "Missing argument 'STATE'"),
    (["inspect", "--bogus", "x.hif4"], "No such option '--bogus'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["build", "--base", "b", "--stats", "s", "--out", "o", "--alpha", "abc"], "'abc' is not a valid float"),
    (["plan", "tools/configs/wan2.2-i2v-a14b", "--retain-block", "transformer:\u00b2"], "retained block"),
])
def test_usage_and_input_errors_print_one_line_and_exit_2(argv, fragment):
    result = subprocess.run([sys.executable, "-m", "hif4fmt", *argv], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert result.stdout == ""


def _group_that_raises(exception: BaseException) -> click.Group:
    @click.group()
    @click.option("--debug", is_flag=True)
    def group(debug):
        pass

    @group.command()
    def boom():
        raise exception

    @group.command()
    @click.pass_context
    def differs(ctx):
        ctx.exit(1)

    return group


def test_an_unexpected_exception_is_one_line_naming_it_as_internal(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prog", "boom"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_group_that_raises(ValueError("deep inside numpy")))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: internal error ValueError: deep inside numpy (rerun with --debug for the traceback "
                   "and report it)"]


@pytest.mark.parametrize("exception, code", [(ValueError("deep"), 2), (BaseMismatchError("other base"), 1),
                                             (KeyboardInterrupt(), 130)])
def test_debug_prints_the_traceback_and_keeps_the_exit_code(monkeypatch, capsys, exception, code):
    monkeypatch.setattr(sys, "argv", ["prog", "--debug", "boom"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_group_that_raises(exception))
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prog", "boom"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_group_that_raises(KeyboardInterrupt()))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)")


def test_sigint_to_a_running_command_exits_130(tmp_path):
    import signal
    import time

    script = ("import sys, time, click\nfrom hif4fmt.cli.output import run_cli\n"
              "@click.group()\ndef g(): pass\n@g.command()\ndef wait():\n    print('ready', flush=True)\n"
              "    time.sleep(60)\nsys.argv = ['prog', 'wait']\nrun_cli(g)\n")
    # a shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # handler: give the child the default disposition, as a terminal would
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stdout.readline().strip() == "ready"
    time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and "interrupted (Ctrl-C)" in err and "Traceback" not in err


def test_a_command_exit_code_survives(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog", "differs"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_group_that_raises(ValueError("unused")))
    assert exit_info.value.code == 1


def test_debug_is_accepted_after_the_subcommand_too():
    result = subprocess.run([sys.executable, "-m", "hif4fmt", "inspect", "/nonexistent.hif4", "--debug"],
                            capture_output=True, text=True)
    assert "StateFormatError" in result.stderr and "Traceback" in result.stderr
    assert "No such option" not in result.stderr


MINIMAL_INSTALL = """
import sys
BLOCKED = {"torch", "tqdm", "diffusers", "transformers", "accelerate", "imageio", "imageio_ffmpeg", "PIL"}
class NotInstalled:  # a minimal install: `pip install hif4fmt`, no extras
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NotInstalled())
program, *sys.argv[1:] = sys.argv[1:]
if program == "hif4fmt":
    from hif4fmt.cli import main
else:
    from wan_runtime.cli import main
main()
"""


@pytest.mark.parametrize("argv, extra", [
    (["hif4fmt", "plan", "tools/configs/wan2.2-i2v-a14b"], "runtime"),
    (["hif4fmt", "build", "--base", "b", "--stats", "s", "--out", "o.hif4"], "runtime"),
    (["hif4fmt", "calibrate", "--base", "b", "--prompts", "p", "--out", "o"], "runtime"),
    (["hif4fmt", "codec", "--rows", "4", "--cols", "64"], "torch"),
    (["wan-runtime", "generate", "--base", "b", "--out", "o.mp4"], "runtime"),
])
def test_a_minimal_install_names_the_extra_each_command_needs(argv, extra):
    result = subprocess.run([sys.executable, "-c", MINIMAL_INSTALL, *argv], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "internal error" not in result.stderr, result.stderr
    assert f"'{argv[1]}' needs the optional dependencies of hif4fmt[{extra}]" in result.stderr
    assert f'pip install "hif4fmt[{extra}]"' in result.stderr


def test_a_minimal_install_runs_the_state_commands():
    state = "spec/vectors/state/tiny-v1.hif4"
    for argv in (["inspect", state, "--check"], ["diff", state, state]):
        result = subprocess.run([sys.executable, "-c", MINIMAL_INSTALL, "hif4fmt", *argv], capture_output=True,
                                text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
