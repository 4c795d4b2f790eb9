"""``VisualLM``: projector + causal LM, visual tokens fed as ``inputs_embeds``; computes what objectives need.

Input: a collated batch (``input_ids_BT``, ``labels_BT``, ``attention_mask_BT``, ``visual_start_B``,
``feats_BPD``, and ``has_image_B``: all True when absent) and the union ``Needs`` of the active objectives. Output: ``VLMOutput`` with the projector
output V, the summed next-token NLL, and only on demand the hidden states at the visual positions, the
text->visual attention weights and the full logits. ``apply_stage`` sets what trains (LLaVA stages).

With a vision tower (``vision``: ``trainer.models.vision.VisionTower``, ``--model.vision.mode frozen|train``)
the projector reads the tower's features of the batch's ``pixels_BCHW`` instead of the cached ``feats_BPD``
(which stays in the batch: the distill objective's native target). A batch without pixels falls back to the
cached features for a frozen tower (the same values up to float16 rounding) and is refused for a tuned one.

The visual tokens of sample b occupy positions ``visual_start_B[b] .. visual_start_B[b] + P - 1``; the token
ids there (the pad id) are looked up and then overwritten by ``g(F)`` with one ``scatter``, so gradients reach
the projector whether or not the LLM trains.

Text-only samples (``has_image_B[b]`` False, ``visual_start_B[b] == -1``) have no visual slots. The projector
still runs on every row (their features are zeros), and their projected tokens are scattered into one extra
column that is cut off again: every rank runs the same modules, and the projector is in the graph (with a zero
gradient from those rows) even when a micro-batch has no image at all, as DDP and FSDP require. Their rows of
``hidden_BLPd`` (l >= 1) are zeros and their text->visual attention row is zero; objectives that need visual
tokens select the image rows (``trainer.objectives.base.image_mask``).

The LM loss never materialises B x T x N logits: the LLM's base model gives the final hidden states, only the
M positions whose next token is supervised go through the output head, in chunks of at most
``nll_chunk_elements`` logits, each chunk's float32 cross-entropy under activation checkpointing (so backward
recomputes a chunk's logits instead of keeping all M x N of them). When all M x N logits are few
(``nll_keep_elements``, e.g. a stage-1 caption), they are kept instead: the recompute would cost a GEMM for
a few MiB. Models whose logits are not plain ``lm_head(final hidden)`` (Gemma-2 soft-capping, Cohere logit
scale) are refused at construction.

Letters: B batch, T sequence, P visual tokens (patches), D encoder width, d LLM width, N vocabulary,
M supervised tokens in the batch, C S S the channels and side of the pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from trainer.objectives.base import Needs
from visalign.config import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
NO_VISUAL = -1
"""``visual_start_B`` of a text-only sample"""
BATCH_KEYS = ("input_ids_BT", "labels_BT", "attention_mask_BT", "visual_start_B", "feats_BPD")


@dataclasses.dataclass
class VLMOutput:
    visual_BPd: Tensor
    """projector output V = g(F) (with grad when the projector trains)"""
    lm_loss_sum: Tensor
    """summed next-token NLL over supervised tokens (labels != -100), float32 scalar"""
    num_target_tokens: int
    """number of supervised (shifted) tokens that entered lm_loss_sum"""
    hidden_BLPd: dict[int, Tensor]
    """{l: H_l at the visual positions [B, P, d]} (H_0 = V, else hidden_states[l])"""
    text_to_visual_BP: Tensor | None
    """text->visual attention probabilities (mean over heads, text queries, attention_layers), or None"""
    embed_Nd: Tensor
    """the LLM's input embedding matrix (llm.get_input_embeddings().weight)"""
    logits_BTN: Tensor | None = None
    """full logits, only with return_logits=True"""
    image_B: Tensor | None = None
    """bool [B]: rows with an image (the batch's ``has_image_B``, all True when it has none)"""
    prenorm_BPd: Tensor | None = None
    """if needs.final_norm_input: the last layer's output before the final norm at the visual positions"""
    feats_BPD: Tensor | None = None
    """the features the projector read: the tower's on the batch's pixels, or the batch's cached ones"""


def final_norm(llm: nn.Module) -> nn.Module | None:
    """The LLM's final norm (applied after the last decoder layer, before the LM head), or None."""
    names = ("norm", "final_layernorm", "final_layer_norm", "ln_f")
    owners = (
        llm.get_decoder() if hasattr(llm, "get_decoder") else None,
        getattr(llm, "base_model", None),
        llm,
    )
    for owner in owners:
        for name in names:
            module = getattr(owner, name, None) if owner is not None else None
            if isinstance(module, nn.Module):
                return module
    return None


def _text_config(llm: PreTrainedModel):
    config = llm.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class VisualLM(nn.Module):
    """Projector g + causal LM; ``forward(batch, needs)`` -> ``VLMOutput``."""

    nll_chunk_elements: int = 1 << 26
    """max logits (rows x vocabulary) materialised at once by the LM loss: 2^26 fp32 = 256 MiB"""
    nll_keep_elements: int = 1 << 22
    """up to this many logits in all (2^22 fp32 = 16 MiB) the LM loss keeps them for the backward instead of
    recomputing them there (the same numbers; measured on CPU with SmolLM2-135M, ~1 % of a stage-1 step)"""

    def __init__(
        self,
        llm: PreTrainedModel,
        projector: nn.Module,
        gradient_checkpointing: bool = False,
        vision: nn.Module | None = None,
    ):
        super().__init__()
        config = _text_config(llm)
        for attr in ("final_logit_softcapping", "logit_scale"):
            value = getattr(config, attr, None)
            if value not in (None, 1.0):
                raise NotImplementedError(
                    f"{type(llm).__name__} has {attr}={value}: VisualLM computes logits as "
                    f"lm_head(final hidden state) and would be wrong for it; use a Llama/Qwen2-style LM"
                )
        self.llm = llm
        self.projector = projector
        self.vision = vision
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            # Non-reentrant checkpointing back-propagates into inputs_embeds even when no LLM parameter
            # requires grad (frozen LLM in pre-training); the reentrant variant would silently drop the
            # projector's gradients unless the inputs were forced to require grad.
            if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.23 renamed it
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -----------------------------------------------------------------------------------------------------
    @staticmethod
    def image_rows(batch: dict) -> Tensor:
        """bool [B]: ``batch["has_image_B"]``, or all True for a batch without it (image samples only)."""
        image_B = batch.get("has_image_B")
        if image_B is None:
            return torch.ones(batch["input_ids_BT"].shape[0], dtype=torch.bool)
        return image_B.bool()

    def _check_batch(self, batch: dict) -> None:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"VisualLM batch lacks {missing}; the collator must provide {list(BATCH_KEYS)}")
        ids_BT, feats_BPD, start_B = batch["input_ids_BT"], batch["feats_BPD"], batch["visual_start_B"]
        if ids_BT.dim() != 2 or feats_BPD.dim() != 3 or start_B.dim() != 1:
            raise ValueError(
                f"VisualLM batch shapes: input_ids_BT {tuple(ids_BT.shape)} must be [B, T], feats_BPD "
                f"{tuple(feats_BPD.shape)} [B, P, D], visual_start_B {tuple(start_B.shape)} [B]"
            )
        num_batch, num_tokens = ids_BT.shape
        image_B = self.image_rows(batch).to(start_B.device)
        if feats_BPD.shape[0] != num_batch or start_B.shape[0] != num_batch or image_B.shape[0] != num_batch:
            raise ValueError(
                f"VisualLM batch sizes disagree: input_ids_BT {num_batch}, feats_BPD {feats_BPD.shape[0]}, "
                f"visual_start_B {start_B.shape[0]}, has_image_B {image_B.shape[0]}"
            )
        num_visual = feats_BPD.shape[1]
        bad_B = image_B & ((start_B < 0) | (start_B + num_visual > num_tokens))
        if bool(bad_B.any()):
            raise ValueError(
                f"visual_start_B {start_B.tolist()} + {num_visual} visual tokens do not fit in sequences of "
                f"length {num_tokens}; the collator must reserve P pad slots per image sample"
            )
        if bool((~image_B & (start_B != NO_VISUAL)).any()):
            raise ValueError(
                f"visual_start_B {start_B.tolist()}: a text-only row (has_image_B False) must have "
                f"visual_start {NO_VISUAL}"
            )

    def features(self, batch: dict) -> Tensor:
        """[B, P, D]: the projector's input (the tower's features of ``pixels_BCHW``, else ``feats_BPD``)."""
        cached_BPD = batch["feats_BPD"]
        if self.vision is None:
            return cached_BPD
        pixels_BCHW = batch.get("pixels_BCHW")
        if pixels_BCHW is None:
            if getattr(self.vision, "tuned", False):
                raise ConfigError(
                    "this model's vision tower was trained (--model.vision.mode train), so the shards' cached "
                    "features are not its features and it needs the images' pixels; evaluate its HF export "
                    "(`trainer export`) instead"
                )
            return cached_BPD
        feats_BPD = self.vision.features(pixels_BCHW, self.image_rows(batch))
        if feats_BPD.shape != cached_BPD.shape:
            raise ValueError(
                f"the vision tower gives features {tuple(feats_BPD.shape)} but the batch's cached ones are "
                f"{tuple(cached_BPD.shape)}: the tower is not the one that labelled the shards"
            )
        return feats_BPD

    def _embed(self, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """-> (inputs_embeds_BTd, visual_BPd, positions_BP, image_B, feats_BPD); text-only rows' positions
        are 0..P-1 placeholders (clamped to the sequence), never written."""
        self._check_batch(batch)
        ids_BT, feats_BPD = batch["input_ids_BT"], self.features(batch)
        embeds_BTd = self.llm.get_input_embeddings()(ids_BT)
        projector_dtype = next(self.projector.parameters()).dtype
        # every row goes through the projector, text-only ones too: the same modules on every rank
        visual_BPd = self.projector(feats_BPD.to(device=embeds_BTd.device, dtype=projector_dtype))
        num_batch, num_tokens, width = embeds_BTd.shape
        num_visual = feats_BPD.shape[1]
        device = embeds_BTd.device
        image_B = self.image_rows(batch).to(device)
        start_B = batch["visual_start_B"].to(device=device, dtype=torch.long)
        positions_BP = start_B.clamp(min=0)[:, None] + torch.arange(num_visual, device=device)
        if bool(image_B.all()):
            index_BPd = positions_BP[:, :, None].expand(-1, -1, width)
            # out-of-place scatter: gradients flow to visual_BPd (gathered) and to the token embeddings elsewhere
            embeds_BTd = embeds_BTd.scatter(1, index_BPd, visual_BPd.to(embeds_BTd.dtype))
            return embeds_BTd, visual_BPd, positions_BP, image_B, feats_BPD
        # text-only rows send their projected tokens to one extra column, cut off after the scatter
        target_BP = torch.where(image_B[:, None], positions_BP, num_tokens)
        padded_BTd = torch.cat([embeds_BTd, embeds_BTd.new_zeros(num_batch, 1, width)], dim=1)
        index_BPd = target_BP[:, :, None].expand(-1, -1, width)
        embeds_BTd = padded_BTd.scatter(1, index_BPd, visual_BPd.to(embeds_BTd.dtype))[:, :num_tokens]
        positions_BP = torch.where(image_B[:, None], positions_BP, 0)
        return embeds_BTd, visual_BPd, positions_BP, image_B, feats_BPD

    def embed(self, batch: dict) -> Tensor:
        """inputs_embeds [B, T, d]: token embeddings, the visual slots replaced by projector(feats_BPD)."""
        return self._embed(batch)[0]

    def _chunk_nll_sum(self, hidden_Md: Tensor, targets_M: Tensor) -> Tensor:
        logits_MN = self.llm.get_output_embeddings()(hidden_Md).float()
        return F.cross_entropy(logits_MN, targets_M, reduction="sum")

    def _lm_loss_sum(self, last_BTd: Tensor, labels_BT: Tensor) -> tuple[Tensor, int]:
        # position t predicts token t + 1: keep the hidden states whose next token is supervised
        targets_BT1 = labels_BT[:, 1:].to(last_BTd.device)
        supervised_BT1 = targets_BT1 != IGNORE_INDEX
        hidden_Md = last_BTd[:, :-1][supervised_BT1]
        targets_M = targets_BT1[supervised_BT1]
        num_targets = int(targets_M.numel())
        if num_targets == 0:
            # a zero that stays attached to the graph through the output head too (an untied head is used
            # nowhere else), so backward and DDP's / FSDP's gradient sync run the same on every rank
            head = self.llm.get_output_embeddings()
            return head(last_BTd[:1, :1]).float().sum() * 0.0, 0
        vocab = int(self.llm.get_output_embeddings().weight.shape[0])
        rows = max(1, self.nll_chunk_elements // vocab)
        total = torch.zeros((), dtype=torch.float32, device=last_BTd.device)
        recompute = num_targets * vocab > self.nll_keep_elements
        for begin in range(0, num_targets, rows):
            h_Md, t_M = hidden_Md[begin : begin + rows], targets_M[begin : begin + rows]
            if recompute and torch.is_grad_enabled() and h_Md.requires_grad:
                total = total + checkpoint(self._chunk_nll_sum, h_Md, t_M, use_reentrant=False)
            else:
                total = total + self._chunk_nll_sum(h_Md, t_M)
        return total, num_targets

    # -----------------------------------------------------------------------------------------------------
    def forward(self, batch: dict, needs: Needs = Needs(), return_logits: bool = False) -> VLMOutput:
        embeds_BTd, visual_BPd, positions_BP, image_B, feats_BPD = self._embed(batch)
        attention_mask_BT = batch["attention_mask_BT"].to(embeds_BTd.device)
        bad = [l for l in needs.hidden_layers if not 0 <= l <= self.num_layers]
        bad += [l for l in needs.attention_layers if not 1 <= l <= self.num_layers]
        if bad:
            raise ValueError(
                f"requested LLM layers {bad} do not exist: hidden layers are 0..{self.num_layers} "
                f"(0 = V), attention layers 1..{self.num_layers}"
            )

        capture_ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if needs.attention_layers:
            # written by the objectives engineer; imported lazily so plain LM training never loads it
            from trainer.models.attention import capture_text_to_visual

            visual_BT = torch.zeros_like(attention_mask_BT, dtype=torch.bool)
            visual_BT.scatter_(1, positions_BP, True)
            # a text-only row has no visual key to attend to: no query of it is scored
            text_query_mask_BT = attention_mask_BT.bool() & ~visual_BT & image_B[:, None]
            capture_ctx = capture_text_to_visual(
                self.llm,
                needs.attention_layers,
                torch.where(image_B, positions_BP[:, 0], NO_VISUAL),
                positions_BP.shape[1],
                text_query_mask_BT,
            )
        # the input of the final norm (= the last layer's output), caught in this forward by a hook
        prenorm: list[Tensor] = []
        hook = None
        if needs.final_norm_input:
            norm = final_norm(self.llm)
            if norm is None:
                raise ConfigError(
                    f"{type(self.llm).__name__} has no final norm found by name (norm, final_layernorm, ln_f): "
                    "use --objectives.distill.norm post"
                )
            hook = norm.register_forward_pre_hook(lambda _module, args: prenorm.append(args[0]))
        try:
            with capture_ctx as capture:
                base_out = self.llm.base_model(
                    inputs_embeds=embeds_BTd,
                    attention_mask=attention_mask_BT,
                    use_cache=False,
                    output_hidden_states=bool(needs.hidden_layers),
                    return_dict=True,
                )
        finally:
            if hook is not None:
                hook.remove()
        last_BTd = base_out.last_hidden_state

        hidden_BLPd: dict[int, Tensor] = {}
        for layer in needs.hidden_layers:
            if layer == 0:
                hidden_BLPd[0] = visual_BPd  # H_0 = V itself (exact, in the projector's dtype)
                continue
            states_BTd = base_out.hidden_states[layer]
            index_BPd = positions_BP[:, :, None].expand(-1, -1, states_BTd.shape[-1])
            hidden_BPd = states_BTd.gather(1, index_BPd)
            if not bool(image_B.all()):
                # zeros for text-only rows, still attached: an objective's zero term reaches the LLM
                hidden_BPd = hidden_BPd * image_B[:, None, None].to(hidden_BPd.dtype)
            hidden_BLPd[layer] = hidden_BPd

        prenorm_BPd = None
        if needs.final_norm_input:
            states_BTd = prenorm[-1]
            prenorm_BPd = states_BTd.gather(1, positions_BP[:, :, None].expand(-1, -1, states_BTd.shape[-1]))
            if not bool(image_B.all()):
                prenorm_BPd = prenorm_BPd * image_B[:, None, None].to(prenorm_BPd.dtype)

        lm_loss_sum, num_targets = self._lm_loss_sum(last_BTd, batch["labels_BT"])
        logits_BTN = self.llm.get_output_embeddings()(last_BTd) if return_logits else None
        return VLMOutput(
            visual_BPd=visual_BPd,
            lm_loss_sum=lm_loss_sum,
            num_target_tokens=num_targets,
            hidden_BLPd=hidden_BLPd,
            text_to_visual_BP=capture.result_BP if capture is not None else None,
            embed_Nd=self.llm.get_input_embeddings().weight,
            logits_BTN=logits_BTN,
            image_B=image_B,
            prenorm_BPd=prenorm_BPd,
            feats_BPD=feats_BPD,
        )


STAGES = {"pretrain": False, "finetune": True}  # stage -> does the LLM train (the projector always does)


def apply_stage(model: VisualLM, stage: str) -> dict[str, int]:
    """Set requires_grad for a LLaVA stage ("pretrain": projector only; "finetune": projector + LLM).

    Returns and logs ``{"trainable": n, "frozen": m}`` parameter counts (tied weights counted once).
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    model.llm.requires_grad_(STAGES[stage])
    model.projector.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info("stage %s: %s trainable, %s frozen parameters", stage, f"{trainable:,}", f"{frozen:,}")
    return {"trainable": trainable, "frozen": frozen}
