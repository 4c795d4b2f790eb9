"""``lm``: the language-model loss of plain LLaVA training (next-token NLL on supervised assistant tokens).

The model wrapper returns the *summed* token NLL of the micro-batch; the loop supplies
``step.lm_normaliser`` = supervised tokens over the whole accumulation window and all ranks (divided by the
world size, since DDP averages gradients), so accumulated gradients equal one big batch's token mean and not a
mean of per-micro-batch means. Without it (a direct call) the micro-batch's own token count is used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from trainer.objectives.base import Objective, ObjectiveContext, StepContext


@dataclasses.dataclass
class LMConfig:
    weight: float = 1.0
    """weight of the language-model loss"""


class LMObjective(Objective):
    name = "lm"

    @classmethod
    def build(cls, cfg: LMConfig, ctx: ObjectiveContext) -> LMObjective:
        return cls()

    @staticmethod
    def loss_weights(cfg: LMConfig) -> dict[str, float]:
        return {"lm_loss": cfg.weight}

    def forward(
        self, batch: dict[str, Any], out: Any, step: StepContext
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        normaliser = step.lm_normaliser or max(int(batch["num_target_tokens"]), 1)
        loss = out.lm_loss_sum / normaliser
        tokens = max(int(batch["num_target_tokens"]), 1)
        return {"lm_loss": loss}, {"lm/token_nll": float(out.lm_loss_sum.detach()) / tokens}
