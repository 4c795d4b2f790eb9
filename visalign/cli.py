"""The shared console-script wrapper: one dict of subcommand -> function, one error policy, one debug switch.

``run_command(prog, commands, argv)`` dispatches ``prog CMD ARGS`` to ``commands[CMD](ARGS)`` and applies the
exit-code policy of ``visalign.errors``:

* a ``VisalignError`` (bad flag value, unusable path, refused shards, unknown registry name, ...) prints one
  line ``prog CMD: error: message`` and exits ``EXIT_USER`` (3);
* argparse errors keep argparse's message and code 2;
* anything else is a bug or an environment failure: the full traceback, exit 1;
* Ctrl-C exits 130.

``--debug`` anywhere on the command line (or ``VISALIGN_DEBUG=1``) turns user errors into tracebacks too, for
bug reports. Subcommand functions take their argument list and return an exit code.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from visalign.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, EXIT_USER, VisalignError

DEBUG_FLAG = "--debug"


def debug_enabled(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("VISALIGN_DEBUG", "") not in ("", "0")


def usage(prog: str, commands: dict[str, Callable[[list[str]], int]]) -> str:
    lines = [f"  {name:<8} {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in commands.items()]
    return (
        f"usage: {prog} {{{','.join(commands)}}} [--help] [--debug] ...\n\ncommands:\n"
        + "\n".join(lines)
        + f"\n\n{DEBUG_FLAG} (or VISALIGN_DEBUG=1) shows the traceback of every error.\n"
        "exit codes: 0 ok, 1 internal error (traceback), 2 bad command line, 3 input to fix, 130 interrupted\n"
    )


def run_command(prog: str, commands: dict[str, Callable[[list[str]], int]], argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage(prog, commands))
        return 0 if argv else EXIT_USAGE
    cmd, rest = argv[0], argv[1:]
    if cmd not in commands:
        sys.stderr.write(
            f"{prog}: error: unknown command {cmd!r}; valid: {', '.join(commands)} ({prog} --help)\n"
        )
        return EXIT_USAGE
    try:
        return int(commands[cmd](rest) or 0)
    except SystemExit as exc:  # argparse: --help (0) or a malformed command line (2, message printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except VisalignError as err:
        if debug:
            traceback.print_exc()
        lines = [line.rstrip() for line in str(err).strip().splitlines() if line.strip()]
        lines = lines or [type(err).__name__]
        # the first line is the message; further lines (e.g. a list of changed settings) are details
        sys.stderr.write(
            f"{prog} {cmd}: error: {lines[0]}\n" + "".join(f"  {ln.strip()}\n" for ln in lines[1:])
        )
        return EXIT_USER
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog} {cmd}: interrupted; rerun the same command to resume\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of our output went away (`pipeline stats OUT | head`): not an error of ours; silence
        # the interpreter's own complaint when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception:  # noqa: BLE001 - a bug: show everything, exit non-zero
        traceback.print_exc()
        sys.stderr.write(
            f"{prog} {cmd}: internal error (above); please report it with the command line and "
            f"{DEBUG_FLAG} output\n"
        )
        return EXIT_INTERNAL
