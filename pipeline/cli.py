"""The ``pipeline`` console script: one dict of subcommand -> function (litgpt style), thin over the package.

    pipeline label --encoder tiny-clip --input data/llava.json --shards out/   # label images into shards
    pipeline info out/                                                          # the manifest, human form
    pipeline show out/ --key ID --out cell-words.png                            # top word drawn on each patch
    pipeline stats out/                                                         # word use, score distribution

Errors and exit codes are those of ``visalign.cli`` (one line and exit 3 for input the user can fix, a
traceback and exit 1 for a bug, ``--debug`` for every traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from visalign.cli import run_command
from visalign.config import build_parser, resolve


def cmd_label(argv: list[str]) -> int:
    """Label images: cached LLaVA features + per-patch top-k word labels -> WebDataset shards."""
    from pipeline.config import LabelConfig
    from pipeline.driver import format_summary, run_label

    parser = build_parser(LabelConfig, prog="pipeline label", description=(cmd_label.__doc__ or "").strip())
    cfg = resolve(LabelConfig, parser.parse_args(argv))
    print(format_summary(run_label(cfg)))
    return 0


def cmd_info(argv: list[str]) -> int:
    """Print a label output's manifest in human form."""
    from pipeline.inspect import format_info

    ap = argparse.ArgumentParser(prog="pipeline info", description=(cmd_info.__doc__ or "").strip())
    ap.add_argument("out", help="a `pipeline label` output folder")
    args = ap.parse_args(argv)
    print(format_info(args.out))
    return 0


def cmd_show(argv: list[str]) -> int:
    """Draw the top word of each patch on the image the encoder saw."""
    from pipeline.inspect import show

    ap = argparse.ArgumentParser(prog="pipeline show", description=(cmd_show.__doc__ or "").strip())
    ap.add_argument("out", help="a `pipeline label` output folder")
    ap.add_argument("--key", required=True, help="sample id (as in the input) or its tar key")
    ap.add_argument("--out", dest="png", required=True, help="PNG file to write")
    ap.add_argument("--cell", type=int, default=64, help="pixels per patch cell in the drawing")
    args = ap.parse_args(argv)
    print(f"wrote {show(args.out, args.key, args.png, cell=args.cell)}")
    return 0


def cmd_stats(argv: list[str]) -> int:
    """Word-list use and score distribution of a label output."""
    from pipeline.inspect import format_stats, label_stats

    ap = argparse.ArgumentParser(prog="pipeline stats", description=(cmd_stats.__doc__ or "").strip())
    ap.add_argument("out", help="a `pipeline label` output folder")
    ap.add_argument("--top", type=int, default=20, help="most frequent top-1 words to list")
    args = ap.parse_args(argv)
    print(format_stats(label_stats(args.out, num_top=args.top)))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "label": cmd_label,
    "info": cmd_info,
    "show": cmd_show,
    "stats": cmd_stats,
}


def main(argv: list[str] | None = None) -> int:
    return run_command("pipeline", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
