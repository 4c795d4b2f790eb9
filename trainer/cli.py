"""The ``trainer`` console script: one dict of subcommand -> function, each a thin layer over the library.

    trainer run      --objective lm --shards OUT --llm NAME --output RUN [--config jobs/x.yaml] [flags]
    trainer export   RUN --format hf-llava|llava-projector --out DIR [--checkpoint STEP] [--dtype bf16]
    trainer eval     RUN --shards OUT --out DIR [--samples N] [--layers 0,8,16]
    trainer compare  RUN_A RUN_B --shards OUT --out DIR
    trainer sample   OUT KEY --llm NAME [--conv-template vicuna_v1] [--json]   (one sample as trained on)

``run`` flags are the ``TrainConfig`` fields (``--optim.lr``), plus the short aliases in ``ALIASES``
(``--lr``); ``eval``/``compare`` flags are the ``EvalConfig`` fields. Errors and exit codes are those of
``visalign.cli`` (one line and exit 3 for input the user can fix, a traceback and exit 1 for a bug,
``--debug`` for every traceback). Imports are lazy so ``trainer --help`` is instant and never loads Dask or
FAISS.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from visalign.cli import run_command

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
# trainer.export.FORMATS / DTYPES, spelled out so that `trainer export --help` imports nothing heavy
EXPORT_FORMATS = ("hf-llava", "llava-projector")
EXPORT_DTYPES = ("bf16", "fp16", "fp32")


def run_parser() -> argparse.ArgumentParser:
    from trainer.config import TrainConfig
    from visalign.config import build_parser

    parser = argparse.ArgumentParser(
        prog="trainer run",
        description="Train the projector (+ LLM) on label shards with the chosen objectives.",
    )
    build_parser(TrainConfig, parser)
    for flag, dest in ALIASES.items():
        extra = {"nargs": "?", "const": "true"} if flag in _BOOL_ALIASES else {}
        parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=f"= --{dest}", **extra)
    return parser


def parse_run_args(argv: list[str]):
    """``trainer run`` arguments -> a resolved ``TrainConfig`` (defaults < --config preset < flags)."""
    from trainer.config import TrainConfig
    from visalign.config import resolve

    return resolve(TrainConfig, run_parser().parse_args(argv))


def cmd_run(argv: list[str]) -> int:
    """Train the projector (+ LLM) on label shards with the chosen objectives."""
    from trainer.train import run

    run(parse_run_args(argv))  # writes RUN/config.yaml once the start is accepted
    return 0


def cmd_export(argv: list[str]) -> int:
    """Export a run's checkpoint: an HF LLaVA folder, or the projector as LLaVA's mm_projector.bin."""
    parser = argparse.ArgumentParser(prog="trainer export", description=(cmd_export.__doc__ or "").strip())
    parser.add_argument("run", help="a run folder (latest checkpoint) or a checkpoint folder")
    parser.add_argument(
        "--format",
        default="hf-llava",
        choices=EXPORT_FORMATS,
        help="hf-llava: LlavaForConditionalGeneration + processor + model card (transformers 4.57+ and 5.x); "
        "llava-projector: mm_projector.bin for LLaVA's --pretrain_mm_mlp_adapter",
    )
    parser.add_argument("--out", required=True, help="output folder (created; must not exist or be empty)")
    parser.add_argument(
        "--checkpoint", type=int, default=None, metavar="STEP", help="a step (default: latest)"
    )
    parser.add_argument(
        "--dtype", default="fp32", choices=EXPORT_DTYPES, help="precision of the written weights"
    )
    parser.add_argument(
        "--encoder-path",
        default=None,
        help="hf-llava: the vision tower's HF folder, when the path the manifest records is not on this "
        "machine (its fingerprint is checked)",
    )
    args = parser.parse_args(argv)
    from trainer.export import export

    print(
        export(
            args.run,
            args.out,
            format=args.format,
            dtype=args.dtype,
            step=args.checkpoint,
            encoder_path=args.encoder_path,
        )
    )
    return 0


def _eval_parser(prog: str, description: str, num_runs: int | str) -> argparse.ArgumentParser:
    from trainer.evaluate.report import EvalConfig
    from visalign.config import build_parser

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("_runs", nargs=num_runs, metavar="RUN", help="run folder(s) written by `trainer run`")
    return build_parser(EvalConfig, parser)


def _eval_config(args: argparse.Namespace, run: str | None):
    from trainer.evaluate.report import EvalConfig
    from visalign.config import resolve

    given = {k: v for k, v in vars(args).items() if k != "_runs"}
    if run is not None:
        given.setdefault("run", run)
    return resolve(EvalConfig, given)


def cmd_eval(argv: list[str]) -> int:
    """Alignment measures per layer and word pictures of a run (docs/eval.md)."""
    from trainer.evaluate.report import run_eval

    args = _eval_parser("trainer eval", (cmd_eval.__doc__ or "").strip(), "?").parse_args(argv)
    if args._runs is None:
        from visalign.config import ConfigError

        raise ConfigError("give the run to evaluate: trainer eval RUN --shards OUT --out DIR")
    cfg = _eval_config(args, args._runs)
    run_eval(cfg)
    print(Path(cfg.out) / "metrics.json")
    return 0


def cmd_compare(argv: list[str]) -> int:
    """Two runs side by side on the same samples (docs/eval.md)."""
    from trainer.evaluate.report import run_compare

    args = _eval_parser("trainer compare", (cmd_compare.__doc__ or "").strip(), 2).parse_args(argv)
    cfg_a = _eval_config(args, args._runs[0])
    run_compare(cfg_a, dataclasses.replace(cfg_a, run=args._runs[1]))
    print(Path(cfg_a.out) / "metrics.md")
    return 0


def cmd_sample(argv: list[str]) -> int:
    """Print one shard sample as the LLM is trained on it: rendered text, visual tokens, supervised spans."""
    from trainer.config import DataConfig

    parser = argparse.ArgumentParser(prog="trainer sample", description=(cmd_sample.__doc__ or "").strip())
    parser.add_argument("shards", metavar="OUT", help="a `pipeline label` output folder")
    parser.add_argument("key", metavar="KEY", help="the sample's id or tar key")
    parser.add_argument("--config", help="take the settings below from a preset or a run's config.yaml")
    parser.add_argument("--llm", help="the LLM whose tokenizer is used (registry name or HF folder)")
    parser.add_argument("--stage", choices=["pretrain", "finetune"], help="resolves --conv-template auto")
    parser.add_argument("--conv-template", help="= --data.conv-template (trainer run --help)")
    parser.add_argument("--image-position", help="= --data.image-position")
    parser.add_argument("--system-prompt", help="= --data.system-prompt ('' = none)")
    parser.add_argument("--max-length", type=int, help="= --data.max_length")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    import json

    from trainer.data.conversations import Formatter, text_format
    from trainer.data.sample import as_text, explain, find_sample, has_image_of, load_tokenizer
    from visalign.config import ConfigError, from_dict, load_yaml
    from visalign.shards import read_manifest

    preset = load_yaml(args.config) if args.config else {}
    data = dict(preset.get("data") or {})
    for name in ("conv_template", "image_position", "system_prompt", "max_length"):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    data_cfg = from_dict(DataConfig, {k: v for k, v in data.items() if k in known}, "data")
    llm = args.llm or (preset.get("model") or {}).get("llm")
    if not llm:
        raise ConfigError("trainer sample needs the LLM whose tokenizer to use: --llm NAME (or --config)")
    stage = args.stage or preset.get("stage") or "pretrain"
    manifest = read_manifest(args.shards)
    sample = find_sample(args.shards, args.key)
    meta = dict(sample.get("meta") or {})
    meta.setdefault("id", sample["__key__"])
    tokenizer = load_tokenizer(llm, (preset.get("model") or {}).get("cache_dir"))
    formatter = Formatter(tokenizer, manifest.num_patches, text_format(data_cfg, stage), data_cfg.max_length)
    report = explain(formatter, meta, has_image_of(sample), key=sample["__key__"])
    print(json.dumps(report, ensure_ascii=False, indent=1) if args.json else as_text(report))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": cmd_run,
    "export": cmd_export,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "sample": cmd_sample,
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_command("trainer", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
