"""The ``pipeline`` console script: one dict of subcommand -> function (litgpt style).

    pipeline label --encoder tiny-clip --input data/llava.json --shards out/   # label images into shards
    pipeline info out/                                                          # the manifest, human form
    pipeline show out/ --key ID --out cell-words.png                            # top word drawn on each patch
    pipeline stats out/                                                         # word use, score distribution

User errors (bad flags, unusable paths, unknown names, an OUT made with other settings) print one line
``pipeline <cmd>: error: ...`` to stderr and exit non-zero without a traceback
(``VISALIGN_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from pipeline.config import ConfigError, build_parser, resolve


def _label(argv: list[str]) -> int:
    from pipeline.label import LabelConfig
    from pipeline.run import format_summary, run_label

    parser = build_parser(
        LabelConfig,
        prog="pipeline label",
        description="Label images: cached LLaVA features + per-patch top-k word labels -> WebDataset shards.",
    )
    cfg = resolve(LabelConfig, parser.parse_args(argv))
    summary = run_label(cfg)
    print(format_summary(summary))
    return 0


def _info(argv: list[str]) -> int:
    from pipeline.inspect import format_info

    ap = argparse.ArgumentParser(prog="pipeline info", description="Print a label output's manifest.")
    ap.add_argument("out", help="a `pipeline label` output folder")
    args = ap.parse_args(argv)
    print(format_info(args.out))
    return 0


def _show(argv: list[str]) -> int:
    from pipeline.inspect import show

    ap = argparse.ArgumentParser(
        prog="pipeline show", description="Draw the top word of each patch on the image the encoder saw."
    )
    ap.add_argument("out", help="a `pipeline label` output folder")
    ap.add_argument("--key", required=True, help="sample id (as in the input) or its tar key")
    ap.add_argument("--out", dest="png", required=True, help="PNG file to write")
    ap.add_argument("--cell", type=int, default=64, help="pixels per patch cell in the drawing")
    args = ap.parse_args(argv)
    path = show(args.out, args.key, args.png, cell=args.cell)
    print(f"wrote {path}")
    return 0


def _stats(argv: list[str]) -> int:
    from pipeline.inspect import format_stats, label_stats

    ap = argparse.ArgumentParser(prog="pipeline stats", description="Word-list use and score distribution.")
    ap.add_argument("out", help="a `pipeline label` output folder")
    ap.add_argument("--top", type=int, default=20, help="most frequent top-1 words to list")
    args = ap.parse_args(argv)
    print(format_stats(label_stats(args.out, num_top=args.top)))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "label": _label,
    "info": _info,
    "show": _show,
    "stats": _stats,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'fix your input', shown as one line; anything else keeps its traceback."""
    from pipeline.registry import UnknownNameError
    from pipeline.shards import ShardFormatError

    return (
        ConfigError,
        UnknownNameError,
        ShardFormatError,
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: pipeline {" + ",".join(COMMANDS) + "} ...   (pipeline CMD --help for each)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"pipeline: error: unknown command {cmd!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest)
    except SystemExit as exc:  # argparse: --help (0) or a malformed command line (2, message already printed)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except _user_errors() as err:
        if os.environ.get("VISALIGN_DEBUG"):
            raise
        msg = str(err).strip() or type(err).__name__
        print(f"pipeline {cmd}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pipeline {cmd}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
