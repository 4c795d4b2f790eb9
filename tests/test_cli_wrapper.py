"""The console-script wrapper both CLIs share: one error policy, documented exit codes, one debug switch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from visalign.cli import run_command
from visalign.config import ConfigError
from visalign.errors import EXIT_INTERNAL, EXIT_USAGE, EXIT_USER


def commands():
    def user(argv):
        """Raise a user error."""
        raise ConfigError("--lr -1: must be > 0\n  details: from the preset")

    def bug(argv):
        """Raise a bug."""
        raise ZeroDivisionError("internal")

    def ok(argv):
        """Succeed."""
        print("ran", argv)
        return 0

    return {"user": user, "bug": bug, "ok": ok}


def test_user_error_is_one_line_and_exit_3(capsys):
    assert run_command("prog", commands(), ["user"]) == EXIT_USER
    err = capsys.readouterr().err
    assert err.splitlines() == ["prog user: error: --lr -1: must be > 0", "  details: from the preset"]


def test_bug_keeps_its_traceback_and_exits_1(capsys):
    assert run_command("prog", commands(), ["bug"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: internal" in err and "internal error" in err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_user_error_tracebacks(capsys, monkeypatch, how):
    argv = ["user", "--debug"] if how == "flag" else ["user"]
    if how == "env":
        monkeypatch.setenv("VISALIGN_DEBUG", "1")
    assert run_command("prog", commands(), argv) == EXIT_USER
    err = capsys.readouterr().err
    assert "Traceback" in err and "prog user: error: --lr -1" in err


def test_usage_unknown_command_and_flag_stripping(capsys):
    assert run_command("prog", commands(), []) == EXIT_USAGE
    assert "user" in capsys.readouterr().out
    assert run_command("prog", commands(), ["nope"]) == EXIT_USAGE
    assert (
        capsys.readouterr().err.strip()
        == "prog: error: unknown command 'nope'; valid: user, bug, ok (prog --help)"
    )
    assert run_command("prog", commands(), ["ok", "--debug", "a"]) == 0
    assert capsys.readouterr().out.strip() == "ran ['a']"  # --debug is the wrapper's, not the command's


def test_a_closed_pipe_is_not_an_error():
    code = (
        "import sys\n"
        "from visalign.cli import run_command\n"
        "def big(argv):\n"
        "    for i in range(200000): print('line', i)\n"
        "sys.exit(run_command('x', {'big': big}, ['big']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()  # the reader goes away, as `| head -1` does
    assert proc.wait(timeout=60) == 0 and proc.stderr.read() == b""
