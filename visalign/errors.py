"""The one base class for errors a user can fix, and the exit codes both console scripts use.

Raise a ``VisalignError`` subclass when the input (a flag, a path, a shard, a checkpoint, a sample) is what is
wrong and the message can name it and say how to fix it. The CLIs (``visalign.cli.run_command``) print such an
error as one line and exit with ``EXIT_USER``; anything else is a bug and keeps its full traceback.

Exit codes (documented in docs/architecture.md):

    0   success
    1   an internal error: a bug or an environment failure; the traceback is printed
    2   a malformed command line (argparse's own code)
    3   an input the user can fix: one line ``<prog>: error: <message>``
    130 interrupted (Ctrl-C); rerunning the same command resumes where that makes sense

Only the standard library is imported here: every module of both halves may import it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_USER = 3
EXIT_INTERRUPTED = 130


class VisalignError(Exception):
    """An error the user can fix; ``str()`` names the input and the fix, on one line where possible."""


class InputError(VisalignError):
    """An input path or file that cannot be used at all (fails the command before any work)."""
