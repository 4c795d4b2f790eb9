"""`trainer run` in which rank 1's first micro-batch supervises no token (test helper, launched on 2 processes).

    accelerate launch ... tests/label_less_run.py TRAINER-RUN-ARGS...

The batch is made label-less by hand (labels all -100): that rank's LM head then gets no gradient from the
LM loss, the case that makes ranks disagree on what to reduce (an untied head: a gloo "collective mismatch"
error, or an NCCL hang).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.cli import parse_run_args  # noqa: E402
from trainer.train import Trainer  # noqa: E402

trainer = Trainer(parse_run_args(sys.argv[1:]))
stream = trainer.batches


def batches():
    for i, batch in enumerate(stream):
        if i == 0 and trainer.accelerator.process_index == 1:
            batch = dict(batch, labels_BT=torch.full_like(batch["labels_BT"], -100), num_target_tokens=0)
        yield batch


trainer.batches = batches()
trainer.train()
