"""The `python -m kit` entry point, run as a user runs it (a subprocess of this interpreter)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO
from kit.cli import COMMANDS


def run_kit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kit", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_overview_lists_every_command_with_its_line():
    for flag in ("--help", "-h"):
        result = run_kit(flag)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        for name, (_, help_line) in COMMANDS.items():
            assert any(line.split() and line.split()[0] == name and help_line in line for line in lines), name
    assert run_kit().returncode == 0  # no command: the overview, not a traceback


def test_version():
    from kit import __version__

    result = run_kit("--version")
    assert result.returncode == 0 and result.stdout.strip() == __version__


def test_unknown_command_exits_2():
    result = run_kit("no-such-command")
    assert result.returncode == 2
    assert "unknown command 'no-such-command'" in result.stderr
    assert "Traceback" not in result.stderr


def test_user_error_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "no_such_dataset"
    result = run_kit("check-data", str(missing))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(missing) in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_option_is_one_line_exit_2():
    """argparse's errors are one line too, pointing at the command's --help (issue 16.9)."""
    result = run_kit("check-data", ".", "--no-such-option")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: unrecognized arguments: --no-such-option (see `python -m kit check-data --help`)"]


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package (e.g. kit.segment) does not exist yet
        return False


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_help(command):
    assert _module_exists(COMMANDS[command][0]), f"command {command!r} has no module"
    result = run_kit(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m kit {command}")
    assert "Traceback" not in result.stderr
