"""One rank of the two-process text-only check (run by ``tests/test_text_only_distributed.py`` through
``accelerate launch``), and the micro-batches both that run and its single-process reference use.

The rank builds the real ``Trainer`` from the command line it is given, replaces its loader by fixed
micro-batches (``micro_batches(rank, step)``: rank 1 gets only text-only samples, rank 0 a mix, then images
only), trains, and writes what each step saw: its losses and report (``rank{r}.json``) and the gradients
after the DDP sync or FSDP's reduce-scatter (gathered whole), just before the optimiser step
(``grads-rank{r}-step{s}.safetensors``).

    accelerate launch --multi_gpu --num_processes 2 tests/dist_text_only.py OUT -- <trainer run flags>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.data.conversations import Formatter  # noqa: E402

STEPS = 2
# rank -> step -> sample positions in the shards of ``write_shards`` (text-only ones: TEXT_ONLY)
PLAN = {0: [[0, 1], [2, 3]], 1: [[1, 4], [4, 1]]}
TEXT_ONLY = {1, 4}


def write_shards(root: Path) -> Path:
    from tests.conftest import write_tiny_shards

    return write_tiny_shards(root, num_samples=6, samples_per_shard=3, text_only=TEXT_ONLY)


def micro_batches(shards: Path, tokenizer, rank: int) -> list[dict]:
    """The fixed micro-batches of ``rank``, one per step (``PLAN``), collated as the loader would."""
    from trainer.data import Collator, SampleTransform
    from visalign import shards as S

    manifest = S.read_manifest(shards)
    layout = S.sample_layout(manifest)
    raw = [r for path in manifest.shard_paths(shards) for r in S.iter_raw(path)]
    transform = SampleTransform(Formatter(tokenizer, manifest.num_patches, "plain", 128))
    collate = Collator(tokenizer.pad_token_id, manifest)
    out = []
    for positions in PLAN[rank]:
        samples = []
        for i in positions:
            sample = transform(S.decode_checked(raw[i], layout))
            sample["slot"], sample["pass"] = 0, 0
            samples.append(sample)
        out.append(collate(samples))
    return out


def main(out: Path, args: list[str]) -> None:
    from safetensors.torch import save_file

    from trainer.cli import parse_run_args
    from trainer.train import Trainer

    cfg = parse_run_args(args)
    trainer = Trainer(cfg)
    acc = trainer.accelerator
    rank = acc.process_index
    trainer.batches = iter(micro_batches(Path(cfg.shards), trainer.tokenizer, rank))
    records = []
    forward_backward = trainer.forward_backward

    def recording(batch, step, num_accum):
        values = forward_backward(batch, step, num_accum)
        records.append({"step": step.step, "lm_normaliser": step.lm_normaliser, **values})
        return values

    trainer.forward_backward = recording
    optimizer_step = trainer.optimizer.step
    module = acc.unwrap_model(trainer.model)

    def full(grad):
        # FSDP2: every rank holds a shard of each gradient (a DTensor); gathering it is a collective, which
        # every rank runs for the same parameters in the same order
        return grad.full_tensor() if hasattr(grad, "full_tensor") else grad.detach().clone()

    def step_and_save(*a, **k):
        grads = {n: full(p.grad) for n, p in module.named_parameters() if p.grad is not None}
        save_file(grads, str(out / f"grads-rank{rank}-step{trainer.step}.safetensors"))
        return optimizer_step(*a, **k)

    trainer.optimizer.step = step_and_save
    trainer.train()
    (out / f"rank{rank}.json").write_text(json.dumps(records))


if __name__ == "__main__":
    split = sys.argv.index("--")
    main(Path(sys.argv[1]), sys.argv[split + 1 :])
