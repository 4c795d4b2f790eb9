"""The one small interface every training objective implements.

An objective is an ``nn.Module`` (so learnable pieces such as SEA's temperature or distillation's reverse
projectors are trained with the model and saved in checkpoints, but never exported). It declares which model
outputs it needs (``Needs``); the model wrapper computes only the union of what the active objectives need;
``forward`` returns ``(losses, report)``:

* ``losses``: ``{"<name>_loss": scalar tensor}``; the loop multiplies each by its configured weight and sums.
* ``report``: ``{"<name>/<what>": float}`` diagnostics for logs; never back-propagated.

The loop never branches on an objective's name: adding one is a module + a registry entry + tests.

Batch and output fields (letters: B batch, T sequence, P patches, D encoder width, d LLM width, K top-k,
N vocabulary):

    batch["feats_BPD"]        cached encoder features (float32)
    batch["labels_BPK"]       word ids into the shards' word list, -1 = absent (int64)
    batch["scores_BPK"]       label scores (float32, -inf where absent)
    batch["experts"]          {name: [B, P_e, D_e]} cached expert features
    batch["input_ids_BT"], batch["labels_BT"] (-100 = unsupervised), batch["attention_mask_BT"]
    batch["visual_start_B"]   index of the first visual token; visual tokens occupy start .. start + P - 1
    batch["num_target_tokens"] supervised tokens in this micro-batch

    out.visual_BPd            projector output V = g(F) (with grad)
    out.lm_loss_sum           summed token NLL of this micro-batch (the loop normalises by token count)
    out.hidden_BLPd           if needs.hidden_layers: {layer l: H_l at visual positions [B, P, d]}; H_0 = V
    out.text_to_visual_BP     if needs.attention_layers: text->image attention probs averaged over heads,
                              text tokens and the requested layers (not normalised per sample)
    out.embed_Nd              the LLM's input embedding matrix (weight tensor, frozen or not)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass
class Needs:
    """What an objective asks the model wrapper to compute on top of the LM forward."""

    hidden_layers: tuple[int, ...] = ()
    """LLM layers l whose hidden states H_l at the visual positions are needed (HF ``hidden_states[l]``)."""
    attention_layers: tuple[int, ...] = ()
    """LLM layers (1-based, as H_l) whose text->visual attention probabilities are averaged into
    out.text_to_visual_BP."""

    def union(self, other: Needs) -> Needs:
        return Needs(
            hidden_layers=tuple(sorted(set(self.hidden_layers) | set(other.hidden_layers))),
            attention_layers=tuple(sorted(set(self.attention_layers) | set(other.attention_layers))),
        )


@dataclasses.dataclass
class ObjectiveContext:
    """What an objective may need to build itself (dimensions, the shards' manifest, the tokenizer)."""

    llm_config: Any
    """the HF config of the LLM (num_hidden_layers, hidden_size, vocab_size, ...)"""
    projector: str
    """projector registry name, so reverse projectors can mirror it"""
    feature_dim: int
    """encoder feature width D of the shards"""
    manifest: Any = None
    """pipeline.shards.Manifest of the training shards (word list, experts, patch grid)"""
    shards_root: str | None = None
    tokenizer: Any = None
    embed_Nd: torch.Tensor | None = None
    """the LLM input embedding matrix at build time (e.g. to pre-compute SEA word targets)"""
    cache_dir: str | None = None


class Objective(nn.Module):
    """Base class: subclasses set ``needs`` and implement ``forward``."""

    name: str = "objective"

    def __init__(self) -> None:
        super().__init__()
        self.needs = Needs()

    def forward(self, batch: dict[str, Any], out: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        raise NotImplementedError
