"""The one small interface every training objective implements.

An objective is an ``nn.Module`` (so learnable pieces such as SEA's temperature or distillation's reverse
projectors are trained with the model and saved in checkpoints, but never exported). It declares which model
outputs it needs (``Needs``); the model wrapper computes only the union of what the active objectives need;
``forward(batch, out, step)`` returns ``(losses, report)``:

* ``losses``: ``{"<name>_loss": scalar tensor}``; the loop multiplies each by its configured weight and sums.
* ``report``: ``{"<name>/<what>": float}`` diagnostics for logs; never back-propagated.

``step`` is a ``StepContext``: where in the run this micro-batch is (step, micro-step, rank, world size), the
run seed, and the loop's token normaliser. Everything an objective needs from the loop comes through it; the
batch holds data only. ``eval_measures(batch, out)`` lets an objective add its own measures to ``trainer
eval`` and the periodic evaluation (distillation: the reverse-projector cosine per target).

The loop never branches on an objective's name: adding one is a module + a registry entry + tests.

Batch and output fields (letters: B batch, T sequence, P patches, D encoder width, d LLM width, K top-k,
N vocabulary):

    batch["feats_BPD"]        cached encoder features (float32)
    batch["labels_BPK"]       word ids into the shards' word list, -1 = absent (int64)
    batch["scores_BPK"]       label scores (float32, -inf where absent)
    batch["experts"]          {name: [B, P_e, D_e]} cached expert features
    batch["input_ids_BT"], batch["labels_BT"] (-100 = unsupervised), batch["attention_mask_BT"]
    batch["visual_start_B"]   index of the first visual token; visual tokens occupy start .. start + P - 1
    batch["has_image_B"]      False for a text-only sample (no visual tokens, visual_start -1, zero features,
                              labels -1); objectives that need visual tokens use only the image rows
                              (``image_mask``) and, for a micro-batch without any, return a zero attached
                              to every parameter they own or use (DDP/FSDP sync every trainable parameter)
    batch["num_target_tokens"] supervised tokens in this micro-batch

    out.visual_BPd            projector output V = g(F) (with grad)
    out.lm_loss_sum           summed token NLL of this micro-batch (the loop normalises by token count)
    out.hidden_BLPd           if needs.hidden_layers: {layer l: H_l at visual positions [B, P, d]}; H_0 = V
    out.prenorm_BPd           if needs.final_norm_input: the last layer's output *before* the LLM's final norm
                              at the visual positions (HF's hidden_states[L] is after it), from a hook on the
                              norm's input in the same forward
    out.text_to_visual_BP     if needs.attention_layers: text->image attention probs averaged over heads,
                              text tokens and the requested layers (not normalised per sample)
    out.embed_Nd              the LLM's input embedding matrix (weight tensor, frozen or not)
"""

from __future__ import annotations

import dataclasses
import hashlib
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
    final_norm_input: bool = False
    """the last layer's output before the LLM's final norm at the visual positions (out.prenorm_BPd)"""

    def union(self, other: Needs) -> Needs:
        return Needs(
            hidden_layers=tuple(sorted(set(self.hidden_layers) | set(other.hidden_layers))),
            attention_layers=tuple(sorted(set(self.attention_layers) | set(other.attention_layers))),
            final_norm_input=self.final_norm_input or other.final_norm_input,
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
    """visalign.shards.Manifest of the training shards (word list, experts, patch grid)"""
    shards_root: str | None = None
    tokenizer: Any = None
    embed_Nd: torch.Tensor | None = None
    """the LLM input embedding matrix at build time (e.g. to pre-compute SEA word targets)"""
    cache_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Where a micro-batch sits in the run; built by the loop (or by a test) for every forward."""

    step: int = 0
    """the optimiser step this micro-batch contributes to (0-based: the first step is 0)"""
    micro_step: int = 0
    """index of the micro-batch inside its gradient-accumulation window"""
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    """the run seed (``--seed``): objectives derive their random streams from it"""
    lm_normaliser: float | None = None
    """supervised tokens of the whole accumulation window on all ranks / world size / grad_accum, counted
    before the window's forward passes (``trainer/train.py``); None = this micro-batch's own token count"""

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU generator whose stream depends only on (purpose, seed, step, rank, micro-step): the same on any
        device, different for every ``--seed``, and identical again when a run is resumed."""
        key = f"{purpose}/{self.seed}/{self.step}/{self.rank}/{self.micro_step}".encode()
        digest = hashlib.sha256(key).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def image_mask(batch: dict[str, Any], num_rows: int, device: torch.device | str) -> torch.Tensor:
    """bool [B]: the rows with an image (``batch["has_image_B"]``; all of them for a batch without it)."""
    image_B = batch.get("has_image_B")
    if image_B is None:
        return torch.ones(num_rows, dtype=torch.bool, device=device)
    return image_B.to(device=device, dtype=torch.bool)


class Objective(nn.Module):
    """Base class: subclasses set ``needs`` and implement ``forward`` (and ``build``, ``loss_weights``)."""

    name: str = "objective"

    def __init__(self) -> None:
        super().__init__()
        self.needs = Needs()

    def forward(
        self, batch: dict[str, Any], out: Any, step: StepContext
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        raise NotImplementedError

    def eval_measures(self, batch: dict[str, Any], out: Any) -> dict[str, tuple[float, float]]:
        """``{measure: (value, weight)}`` this objective adds to the evaluation; pooled as weighted means over
        batches and reported as ``<name>/<measure>``. Called without gradient, in eval mode."""
        return {}

    def carry_over(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Take over learned state from an earlier run's checkpoint (``state``: this objective's tensors there,
        names relative to the objective) when a run starts from it with ``--init-projector``; returns what
        was taken (distillation: its reverse projectors). Default: nothing."""
        return []
