"""``sea``: Supervised Embedding Alignment (Yin et al.): contrast visual tokens with LLM word embeddings.

Inputs (see ``base.py``): ``batch["labels_BPK"]`` / ``batch["scores_BPK"]`` (per-patch top-K word ids into the
shards' word list, -1 = absent), ``out.visual_BPd`` (V, with grad) and ``out.embed_Nd`` (E).
Output: ``sea_loss`` (weight lambda), report ``sea/pairs`` (M), ``sea/temperature``, ``sea/pair_acc``.

Per step:
1. every patch draws one word from its kept labels with probability proportional to the score;
2. the patch grid is cut into k x k windows; one random eligible patch (>= 1 kept label) per window is used;
3. among the selected patches of the *local* batch that drew the same word, one is kept at random;
4. target t = mean of E over the word's sub-tokens (word list pre-tokenised once, cached as .npy);
5. L = symmetric InfoNCE over the M kept (v_i, t_i) pairs, cosine logits times a learnable scale.

Our choices where the paper is silent (all configurable or documented in docs/objectives.md):
* lambda = 1.0; the temperature is CLIP's (learnable, init 0.07, scale clamped at 100) - the paper's "tau = 0"
  cannot be meant literally.
* de-duplication is per rank: the InfoNCE negatives are the local pairs (no all-gather), so only local
  duplicates are false negatives, and a cross-rank rule would cost a collective per step to drop more pairs.
* a word is tokenised as it appears mid-sentence: ``" " + word`` without special tokens (BPE tokenizers
  give the leading-space form; SentencePiece's ``"▁"`` prefix is the same thing); pieces that are only
  whitespace are dropped. Words with no sub-token left are never drawn.
* targets come from the current E, detached: SEA moves the projector toward the LLM's word space, not the
  word embeddings toward the patches (in stage 2 E is trained by the LM loss alone).
* sampling runs on CPU with ``step.generator("sea")``, seeded from (run seed, step, rank, micro-step):
  identical on any device, different for every ``--seed``, and the same draws again after a resume.
* text-only samples (``has_image_B`` False) are left out before drawing: the draws of a micro-batch are
  those of its image rows alone. Fewer than two pairs (a micro-batch without an image among them) give a
  zero that stays attached to V (the projector) and the temperature, so every rank syncs every gradient.

Letters: B batch, P patches, K label slots, d LLM width, N vocabulary, W words, S sub-tokens, M pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.objectives.base import Needs, Objective, ObjectiveContext, StepContext, image_mask
from visalign.shards import ShardFormatError

TOKENISATION_RULE = "leading-space-v1"
"""bump when ``tokenize_words`` changes, so cached sub-token matrices are rebuilt"""


# ----------------------------------------------------------------------------------------------------------
# pure pieces
# ----------------------------------------------------------------------------------------------------------


def contrastive_loss(visual_MD: torch.Tensor, target_MD: torch.Tensor, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE: logits = cos(v_i, t_j) * logit_scale; L = (CE(logits, i) + CE(logits^T, i)) / 2."""
    logits_MM = F.normalize(visual_MD.float(), dim=-1) @ F.normalize(target_MD.float(), dim=-1).T
    logits_MM = logits_MM * logit_scale
    labels_M = torch.arange(logits_MM.shape[0], device=logits_MM.device)
    return (F.cross_entropy(logits_MM, labels_M) + F.cross_entropy(logits_MM.T, labels_M)) / 2


def sample_labels(
    labels_BPK: torch.Tensor, scores_BPK: torch.Tensor, generator: torch.Generator, eligible_BPK=None
) -> torch.Tensor:
    """One word id per patch, drawn from its kept labels with probability proportional to the score: [B, P].

    Kept = ``labels != -1`` (and ``eligible_BPK`` if given). A kept label with score <= 0 has probability 0
    unless all of the patch's kept scores are <= 0, in which case they are drawn uniformly. Patches with no
    kept label get -1.
    """
    kept_BPK = labels_BPK >= 0
    if eligible_BPK is not None:
        kept_BPK = kept_BPK & eligible_BPK
    scores_BPK = torch.nan_to_num(scores_BPK.float(), nan=0.0, neginf=0.0, posinf=0.0)
    weight_BPK = torch.where(kept_BPK, scores_BPK.clamp(min=0), torch.zeros_like(scores_BPK))
    no_mass_BP = weight_BPK.sum(-1) <= 0
    weight_BPK = torch.where(no_mass_BP[..., None], kept_BPK.float(), weight_BPK)
    has_label_BP = kept_BPK.any(-1)
    # rows without any kept label get a dummy uniform row so multinomial is valid; masked to -1 below
    weight_BPK = torch.where(has_label_BP[..., None], weight_BPK, torch.ones_like(weight_BPK))
    num_batch, num_patches, num_slots = labels_BPK.shape
    slot_M = torch.multinomial(weight_BPK.reshape(-1, num_slots), 1, generator=generator).reshape(
        num_batch, num_patches
    )
    word_BP = labels_BPK.gather(-1, slot_M[..., None]).squeeze(-1)
    return torch.where(has_label_BP, word_BP, torch.full_like(word_BP, -1))


def window_ids(grid_hw: tuple[int, int], window: int) -> torch.Tensor:
    """Row-major patch index -> index of its window x window cell: [P]. Edge cells may be smaller."""
    rows, cols = grid_hw
    r_P = torch.arange(rows).repeat_interleave(cols)
    c_P = torch.arange(cols).repeat(rows)
    return (r_P // window) * math.ceil(cols / window) + (c_P // window)


def select_one_per_window(
    eligible_BP: torch.Tensor, grid_hw: tuple[int, int], window: int, generator: torch.Generator
) -> torch.Tensor:
    """Bool [B, P]: exactly one uniformly random eligible patch in every window that has one."""
    num_batch, num_patches = eligible_BP.shape
    if grid_hw[0] * grid_hw[1] != num_patches:
        raise ValueError(f"patch grid {list(grid_hw)} does not hold {num_patches} patches")
    win_P = window_ids(grid_hw, window)
    num_windows = int(win_P.max()) + 1
    # distinct random priorities per row (a permutation), so the max of a window is unique: no ties
    prio_BP = torch.argsort(torch.rand(num_batch, num_patches, generator=generator), dim=1).float()
    prio_BP = torch.where(eligible_BP, prio_BP, torch.full_like(prio_BP, -1.0))
    best_BW = torch.full((num_batch, num_windows), -1.0).scatter_reduce(
        1, win_P.expand(num_batch, -1), prio_BP, reduce="amax"
    )
    return eligible_BP & (prio_BP == best_BW.gather(1, win_P.expand(num_batch, -1)))


def keep_one_per_word(word_M: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Bool [M]: among entries with the same word id, exactly one (uniformly random) is kept."""
    num_pairs = word_M.shape[0]
    if num_pairs == 0:
        return torch.zeros(0, dtype=torch.bool)
    prio_M = torch.randperm(num_pairs, generator=generator).float()
    uniq_U, inverse_M = torch.unique(word_M, return_inverse=True)
    best_U = torch.full((uniq_U.shape[0],), -1.0).scatter_reduce(0, inverse_M, prio_M, reduce="amax")
    return prio_M == best_U[inverse_M]


def sample_pairs(
    labels_BPK: torch.Tensor,
    scores_BPK: torch.Tensor,
    grid_hw: tuple[int, int],
    window: int,
    generator: torch.Generator,
    eligible_BPK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-3 on CPU tensors: (batch index [M], patch index [M], word id [M]) of the kept pairs."""
    word_BP = sample_labels(labels_BPK, scores_BPK, generator, eligible_BPK)
    chosen_BP = select_one_per_window(word_BP >= 0, grid_hw, window, generator)
    b_M, p_M = chosen_BP.nonzero(as_tuple=True)
    word_M = word_BP[b_M, p_M]
    keep_M = keep_one_per_word(word_M, generator)
    return b_M[keep_M], p_M[keep_M], word_M[keep_M]


# ----------------------------------------------------------------------------------------------------------
# word targets
# ----------------------------------------------------------------------------------------------------------


def tokenize_words(words: list[str], tokenizer: Any) -> np.ndarray:
    """Sub-token ids of each word as it appears mid-sentence: int64 [W, S_max], padded with -1."""
    encoded = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    rows = []
    for ids in encoded:
        # SentencePiece may emit a lone "▁" for the leading space; a whitespace-only piece carries no meaning
        rows.append([i for i in ids if tokenizer.decode([i]).strip() != ""])
    width = max((len(r) for r in rows), default=1) or 1
    out_WS = np.full((len(rows), width), -1, dtype=np.int64)
    for w, ids in enumerate(rows):
        out_WS[w, : len(ids)] = ids
    return out_WS


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([type(tokenizer).__name__, TOKENISATION_RULE, vocab], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def cached_word_tokens(
    words: list[str], tokenizer: Any, cache_dir: str | Path | None, wordlist_sha256: str | None = None
) -> np.ndarray:
    """``tokenize_words`` once per (word-list sha256, tokenizer), cached under ``cache_dir/sea_words/``."""
    wl_sha = wordlist_sha256 or hashlib.sha256(("\n".join(words) + "\n").encode()).hexdigest()
    if cache_dir is None:
        return tokenize_words(words, tokenizer)
    path = Path(cache_dir) / "sea_words" / f"{wl_sha[:16]}-{tokenizer_fingerprint(tokenizer)[:16]}.npy"
    if path.is_file():
        tokens_WS = np.load(path, allow_pickle=False)
        if tokens_WS.shape[0] == len(words):
            return tokens_WS
    tokens_WS = tokenize_words(words, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, tokens_WS, allow_pickle=False)
    os.replace(tmp, path)  # atomic: concurrent ranks may build it at the same time
    return tokens_WS


def word_targets(tokens_MS: torch.Tensor, embed_Nd: torch.Tensor) -> torch.Tensor:
    """t = mean of E over each word's sub-tokens (ids -1 = padding), detached: [M, d]."""
    valid_MS = tokens_MS >= 0
    emb_MSd = embed_Nd.detach()[tokens_MS.clamp(min=0)].float()
    num_MS = valid_MS.sum(1, keepdim=True).clamp(min=1)
    return (emb_MSd * valid_MS[..., None]).sum(1) / num_MS


# ----------------------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SeaConfig:
    weight: float = 1.0
    """lambda, weight of the alignment loss (the paper does not give it; 1.0 is our choice)"""
    top_k: int = 10
    """use the first top_k label slots of the shards (paper: n = 10); 0 = all slots the shards hold"""
    window: int = 2
    """k of the k x k localised-sampling windows: one patch per window (paper: 2)"""
    init_temperature: float = 0.07
    """initial tau; the logit scale 1/tau is learnable (CLIP's init; the paper's 'tau = 0' is not usable)"""
    learn_temperature: bool = True
    """learn the logit scale (paper: learnable); False keeps 1/init_temperature"""
    max_logit_scale: float = 100.0
    """clamp of the logit scale 1/tau, as in CLIP"""


class SeaObjective(Objective):
    name = "sea"

    def __init__(self, cfg: SeaConfig, word_tokens_WS: np.ndarray, grid_hw: tuple[int, int] | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid_hw = tuple(grid_hw) if grid_hw else None
        # shape [1], not a 0-dim scalar: FSDP shards every parameter along dim 0 and refuses 0-dim ones
        init = torch.tensor([math.log(1.0 / cfg.init_temperature)])
        self.logit_scale = nn.Parameter(init, requires_grad=cfg.learn_temperature)
        tokens_WS = torch.from_numpy(np.ascontiguousarray(word_tokens_WS))
        # vocab-independent lookup tables: kept off the state dict, rebuilt from the cache at build time
        self.register_buffer("word_tokens_WS", tokens_WS, persistent=False)
        self.register_buffer("word_ok_W", (tokens_WS >= 0).any(1), persistent=False)
        self.needs = Needs()

    @classmethod
    def build(cls, cfg: SeaConfig, ctx: ObjectiveContext) -> SeaObjective:
        from visalign.shards import read_wordlist

        if ctx.shards_root is None or ctx.tokenizer is None:
            raise ValueError(
                "sea needs the shards' word list (ctx.shards_root) and the LLM tokenizer (ctx.tokenizer)"
            )
        words = read_wordlist(ctx.shards_root)
        manifest = ctx.manifest
        sha = manifest.wordlist.sha256 if manifest is not None else None
        # no cache dir given: the model cache ($VISALIGN_CACHE), so 41k words are not re-tokenised every run
        from visalign.cache import default_cache_dir

        tokens_WS = cached_word_tokens(words, ctx.tokenizer, ctx.cache_dir or default_cache_dir(), sha)
        grid = tuple(manifest.encoder.patch_grid) if manifest is not None else None
        return cls(cfg, tokens_WS, grid)

    @staticmethod
    def loss_weights(cfg: SeaConfig) -> dict[str, float]:
        return {"sea_loss": cfg.weight}

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale).reshape(())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written while logit_scale was 0-dim
        key = prefix + "logit_scale"
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def draw(
        self, batch: dict[str, Any], step: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-3 for this batch (CPU, reproducible): batch index, patch index, word id of each pair.

        Only image rows are drawn from; the batch indices returned are those of the whole batch."""
        labels_BPK = batch["labels_BPK"].detach().cpu().long()
        scores_BPK = batch["scores_BPK"].detach().cpu()
        image_B = image_mask(batch, labels_BPK.shape[0], "cpu")
        rows_B = torch.arange(labels_BPK.shape[0])
        if not bool(image_B.all()):
            labels_BPK, scores_BPK, rows_B = labels_BPK[image_B], scores_BPK[image_B], rows_B[image_B]
        if labels_BPK.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, empty
        if self.cfg.top_k:
            labels_BPK, scores_BPK = labels_BPK[..., : self.cfg.top_k], scores_BPK[..., : self.cfg.top_k]
        generator = step.generator("sea")
        word_ok_W = self.word_ok_W.cpu()
        if labels_BPK.numel() and int(labels_BPK.max()) >= word_ok_W.shape[0]:
            raise ShardFormatError(
                f"label id {int(labels_BPK.max())} but the word list has {word_ok_W.shape[0]} words: the "
                "shards and the word list the objective was built from disagree"
            )
        eligible_BPK = word_ok_W[labels_BPK.clamp(min=0)] & (labels_BPK >= 0)
        num_patches = labels_BPK.shape[1]
        grid = self.grid_hw or _square(num_patches)
        b_M, p_M, word_M = sample_pairs(
            labels_BPK, scores_BPK, grid, self.cfg.window, generator, eligible_BPK
        )
        return rows_B[b_M], p_M, word_M

    def forward(
        self, batch: dict[str, Any], out: Any, step: StepContext
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        v_BPd = out.visual_BPd
        b_M, p_M, word_M = (t.to(v_BPd.device) for t in self.draw(batch, step))
        scale = self.scale()
        num_pairs = int(word_M.shape[0])
        report = {"sea/pairs": float(num_pairs), "sea/temperature": float(1.0 / scale.detach())}
        if num_pairs < 2:
            # no negatives, no contrast: a zero that keeps the graph connected (DDP expects every grad);
            # the report keeps the same keys on every rank (the loop all-reduces them by position)
            report["sea/pair_acc"] = 0.0
            return {"sea_loss": v_BPd.sum() * 0.0 + self.logit_scale.sum() * 0.0}, report
        visual_Md = v_BPd[b_M, p_M]
        target_Md = word_targets(self.word_tokens_WS[word_M], out.embed_Nd)
        loss = contrastive_loss(visual_Md, target_Md, scale)
        with torch.no_grad():
            cos_MM = F.normalize(visual_Md.float(), dim=-1) @ F.normalize(target_Md, dim=-1).T
            arange_M = torch.arange(num_pairs, device=cos_MM.device)
            acc = (
                (cos_MM.argmax(1) == arange_M).float().mean() + (cos_MM.argmax(0) == arange_M).float().mean()
            ) / 2
        report["sea/pair_acc"] = float(acc)
        return {"sea_loss": loss}, report


def _square(num_patches: int) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches are not a square grid; the manifest must give patch_grid")
    return side, side
