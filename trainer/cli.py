"""The ``trainer`` console script: one dict of subcommand -> function, each a thin layer over the library.

    trainer run     --objective lm --shards OUT --llm NAME --output RUN [--config jobs/x.yaml] [flags]
    trainer export  RUN --format hf-llava --out DIR [--checkpoint STEP]

``run`` flags are the ``TrainConfig`` fields (``--optim.lr``), plus the short aliases in ``ALIASES``
(``--lr``). Errors the user can fix print one line (``trainer run: error: ...``) and exit with status 2.
Imports are lazy so ``trainer --help`` is instant and never loads Dask or FAISS (a test checks).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

# short flag -> dotted TrainConfig field (the flags the README and the presets' comments use)
ALIASES = {
    "--llm": "model.llm",
    "--projector": "model.projector",
    "--init-projector": "model.init_projector",
    "--gradient-checkpointing": "model.gradient_checkpointing",
    "--max-steps": "optim.max_steps",
    "--lr": "optim.lr",
    "--grad-accum": "optim.grad_accum",
    "--mixed-precision": "optim.mixed_precision",
    "--batch-size": "data.batch_size",
    "--max-length": "data.max_length",
    "--num-workers": "data.num_workers",
    "--save-every": "checkpoint.save_every",
    "--keep-last": "checkpoint.keep_last",
    "--log-every": "logging.log_every",
}
_BOOL_ALIASES = {"--gradient-checkpointing"}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input whose message names the input and the fix, not a bug: ``ValueError``
    covers ConfigError, ShardFormatError, CheckpointError, ConversationError and ExportError;
    ``UnknownNameError`` (a KeyError) is an unknown registry name."""
    from pipeline.registry import UnknownNameError

    return (ValueError, UnknownNameError, FileNotFoundError)


def _run_parser() -> argparse.ArgumentParser:
    from pipeline.config import build_parser
    from trainer.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="trainer run",
        description="Train the projector (+ LLM) on label shards with the chosen objectives.",
    )
    build_parser(TrainConfig, parser)
    for flag, dest in ALIASES.items():
        extra = {"nargs": "?", "const": "true"} if flag in _BOOL_ALIASES else {}
        parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=f"= --{dest}", **extra)
    return parser


def cmd_run(argv: list[str]) -> int:
    """``trainer run``: resolve the config, train (RUN/config.yaml is written first)."""
    from pipeline.config import resolve
    from trainer.config import TrainConfig

    parser = _run_parser()
    args = parser.parse_args(argv)
    try:
        cfg = resolve(TrainConfig, args)
        from trainer.train import run

        run(cfg)  # writes RUN/config.yaml before any work, so every run says how it was made
    except _user_errors() as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


def cmd_export(argv: list[str]) -> int:
    """``trainer export``: a run's checkpoint -> a HF LLaVA folder."""
    parser = argparse.ArgumentParser(
        prog="trainer export",
        description="Export a run's checkpoint as a HF LlavaForConditionalGeneration folder.",
    )
    parser.add_argument("run", help="a run folder (latest checkpoint) or a checkpoint folder")
    parser.add_argument("--format", default="hf-llava", choices=["hf-llava"], help="output format")
    parser.add_argument("--out", required=True, help="output folder (created; must not hold a model already)")
    parser.add_argument(
        "--checkpoint", type=int, default=None, metavar="STEP", help="a step (default: latest)"
    )
    parser.add_argument("--cache-dir", default=None, help="model cache (default $VISALIGN_CACHE)")
    args = parser.parse_args(argv)
    try:
        from trainer.export import export_hf_llava

        out = export_hf_llava(args.run, args.out, step=args.checkpoint, cache_dir=args.cache_dir)
    except _user_errors() as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(out)
    return 0


def cmd_eval(argv: list[str]) -> int:
    """``trainer eval``: alignment measures per layer + word pictures of a run (docs/eval.md)."""
    from trainer.evaluate.runner import eval_main

    return eval_main(argv, _user_errors())


def cmd_compare(argv: list[str]) -> int:
    """``trainer compare``: two runs side by side on the same samples (docs/eval.md)."""
    from trainer.evaluate.runner import compare_main

    return compare_main(argv, _user_errors())


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": cmd_run,
    "export": cmd_export,
    "eval": cmd_eval,
    "compare": cmd_compare,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in COMMANDS.items()]
        text = (
            "usage: trainer {"
            + ",".join(COMMANDS)
            + "} [--help] ...\n\ncommands:\n"
            + "\n".join(lines)
            + "\n"
        )
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(text + f"trainer: error: unknown command {argv[0]!r}\n")
            return 2
        sys.stdout.write(text)
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
