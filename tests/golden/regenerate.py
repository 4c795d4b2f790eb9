"""Regenerate ``tests/golden/losses.json``: the first steps' losses of every objective on tiny models.

    .venv/bin/python tests/golden/regenerate.py --why "what changed and why the numbers move"

Each case trains ``tiny-llm`` for ``STEPS`` steps on the synthetic shards of ``tests/conftest.py``
(``write_tiny_shards``, fixed seed) through the real ``Trainer`` and records every ``*_loss`` and the gradient
norm of every step. ``tests/test_golden.py`` reruns the cases and compares. A change that moves these numbers
is either a bug or a deliberate change of the computation: regenerate only for the latter, and say why with
``--why`` (appended to the file's ``history``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "losses.json"
STEPS = 3
CASES = {
    "lm-pretrain": ("lm", "pretrain"),
    "sea-pretrain": ("sea", "pretrain"),
    "basic-pretrain": ("basic", "pretrain"),
    "distill-pretrain": ("distill", "pretrain"),
    "sea+basic+distill-finetune": ("sea+basic+distill", "finetune"),
}
KEYS = ("lm_loss", "sea_loss", "basic_das_loss", "basic_sds_loss", "distill_loss", "total_loss", "grad_norm")


def run_case(objective: str, stage: str, work: Path) -> list[dict[str, float]]:
    """Per-step ``{key: value}`` of one case, trained in ``work``."""
    sys.path.insert(0, str(HERE.parents[1]))  # the repository root, when run as a script
    from tests.conftest import write_tiny_shards
    from trainer.cli import parse_run_args
    from trainer.train import Trainer

    shards = work / "shards"
    if not shards.exists():
        write_tiny_shards(shards, num_samples=8, samples_per_shard=3)
    run = work / f"run-{objective}-{stage}"
    args = ["--shards", str(shards), "--output", str(run), "--llm", "tiny-llm", "--objective", objective]
    args += ["--stage", stage, "--max-steps", str(STEPS), "--lr", "1e-2", "--batch-size", "2"]
    args += ["--logging.progress", "false", "--logging.tensorboard", "false", "--data.shuffle_buffer", "4"]
    Trainer(parse_run_args(args)).train()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in KEYS if k in r} for r in records]


def compute_all(work: Path) -> dict[str, list[dict[str, float]]]:
    return {name: run_case(objective, stage, work) for name, (objective, stage) in CASES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--why", required=True, help="why the numbers change (recorded in the file)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VISALIGN_CACHE"] = str(Path(tmp) / "cache")  # tiny models built fresh, as in the tests
        cases = compute_all(Path(tmp))
    history = json.loads(GOLDEN.read_text())["history"] if GOLDEN.is_file() else []
    history.append({"date": time.strftime("%Y-%m-%d"), "why": args.why})
    GOLDEN.write_text(json.dumps({"steps": STEPS, "cases": cases, "history": history}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
