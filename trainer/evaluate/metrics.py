"""Alignment measures of visual tokens: pure tensor functions, no model, no I/O (definitions in docs/eval.md).

Inputs are the visual tokens of one layer (the projector output V = H_0, or an LLM hidden state H_l at the
visual positions) and reference vectors from the LLM's INPUT embedding matrix E:

* ``label_hits``            nearest word-list word (cosine to the SEA word targets) vs the patch's CLIP labels
* ``meaningful_share``      nearest vocabulary token (cosine to every row of E) is itself a word-list word
                            (BASIC's hand count of "meaningful" initial embeddings, automated)
* ``alignment_consistency`` mean of the 10 highest per-visual-token maximum cosines to the sample's own
                            caption-token embeddings
* ``reverse_cosine``        cosine between reverse-projected visual tokens and the cached encoder features

Each function returns plain floats/ints (shares plus the counts needed to pool batches exactly), so the
runner and the training loop can aggregate over any number of batches with ``pool``.

Letters: B batch, P patches, d LLM width, D feature width, N vocabulary, W words in the word list, K top-k
label slots, T caption tokens, M any number of query rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

# Rows of queries scored against all keys at once; bounds the [M, N] similarity block to ~1024 x N floats
# (200 MB for a 49k vocabulary) instead of B * P x N for a whole batch.
CHUNK_ROWS = 1024


def nearest(
    query_Md: torch.Tensor,
    keys_Nd: torch.Tensor,
    chunk: int = CHUNK_ROWS,
    allowed_N: torch.Tensor | None = None,
):
    """Index and cosine of each query row's most similar key row: ``(ids_M int64, cos_M float32)``.

    Computed in float32 on the keys' device, ``chunk`` query rows at a time. Ties go to the lowest index
    (``torch.max`` semantics), which keeps the result deterministic. ``allowed_N`` (bool) excludes keys
    that must never win, e.g. words of the list that tokenise to nothing (an all-zero target).
    """
    keys_Nd = F.normalize(keys_Nd.float(), dim=-1)
    block_N = None
    if allowed_N is not None:
        block_N = torch.zeros(keys_Nd.shape[0], device=keys_Nd.device)
        block_N[~allowed_N.to(keys_Nd.device)] = float("-inf")
    ids, cos = [], []
    for start in range(0, query_Md.shape[0], chunk):
        q_md = F.normalize(query_Md[start : start + chunk].to(keys_Nd.device).float(), dim=-1)
        sim_mN = q_md @ keys_Nd.T
        if block_N is not None:
            sim_mN = sim_mN + block_N
        best_m, idx_m = sim_mN.max(dim=-1)
        ids.append(idx_m)
        cos.append(best_m)
    if not ids:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(ids), torch.cat(cos)


def nearest_words(
    visual_BPd: torch.Tensor, word_targets_Wd: torch.Tensor, allowed_W: torch.Tensor | None = None
) -> torch.Tensor:
    """Word id (row of the word list) nearest to each visual token by cosine: ``[B, P]`` int64."""
    B, P, d = visual_BPd.shape
    ids_M, _ = nearest(visual_BPd.reshape(B * P, d), word_targets_Wd, allowed_N=allowed_W)
    return ids_M.view(B, P).cpu()


def label_hits(
    visual_BPd: torch.Tensor,
    word_targets_Wd: torch.Tensor,
    labels_BPK: torch.Tensor,
    ks: Sequence[int] = (1, 10),
    nearest_BP: torch.Tensor | None = None,
) -> dict[str, float]:
    """Share of labelled patches whose nearest word-list word is among their top-k CLIP labels.

    ``hit@1``: the nearest word is the patch's top label (slot 0). ``hit@k``: it is one of the first ``k``
    slots that hold a label (absent slots are -1 and never match). ``hit@K`` with ``k >= K`` uses every kept
    label. Patches whose top slot is absent (no label with score >= 0) are left out of the denominator;
    ``num_labelled`` is that denominator, the weight for pooling batches. Pass ``nearest_BP`` to reuse an
    already computed nearest-word map.
    """
    if nearest_BP is None:
        nearest_BP = nearest_words(visual_BPd, word_targets_Wd)
    labels_BPK = labels_BPK.to(nearest_BP.device).long()
    # Labels are sorted by descending score, so "slot 0 absent" == "no kept label at all".
    labelled_BP = labels_BPK[..., 0] >= 0
    match_BPK = (labels_BPK == nearest_BP[..., None]) & (labels_BPK >= 0)
    num = int(labelled_BP.sum())
    out: dict[str, float] = {"num_labelled": num}
    for k in ks:
        hits = int((match_BPK[..., :k].any(-1) & labelled_BP).sum())
        out[f"hit@{k}"] = hits / num if num else float("nan")
    return out


def word_token_mask(tokenizer, words: Iterable[str], vocab_size: int | None = None) -> torch.Tensor:
    """``[N]`` bool: vocabulary id n whose decoded text, stripped and lower-cased, is a word of the list.

    Special tokens never count. Decoding one id at a time is how a token reads on its own (SentencePiece
    "▁cat" and byte-level "Ġcat" both decode to " cat", which strips to "cat"). Pieces of longer words
    ("ele" of "elephant") only count if they are themselves words of the list: that is the point of the
    measure, a visual token that reads as a word rather than as a fragment or a symbol.
    """
    vocab = {w.strip().lower() for w in words if w.strip()}
    n = int(vocab_size if vocab_size is not None else len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    mask = torch.zeros(n, dtype=torch.bool)
    for i in range(min(n, len(tokenizer))):
        if i in special:
            continue
        text = tokenizer.decode([i]).strip().lower()
        mask[i] = text in vocab
    return mask


def meaningful_share(
    visual_BPd: torch.Tensor,
    embed_Nd: torch.Tensor,
    is_word_token_N: torch.Tensor,
    nearest_tokens_BP: torch.Tensor | None = None,
) -> float:
    """Share of visual tokens whose nearest vocabulary token (cosine vs every row of E) is a word token.

    ``is_word_token_N`` comes from ``word_token_mask``. Every visual token counts in the denominator, so a
    batch of B samples weighs B * P in pooling.
    """
    if nearest_tokens_BP is None:
        nearest_tokens_BP = nearest_tokens(visual_BPd, embed_Nd)
    hits_BP = is_word_token_N.to(nearest_tokens_BP.device)[nearest_tokens_BP]
    return float(hits_BP.float().mean()) if hits_BP.numel() else float("nan")


def nearest_tokens(visual_BPd: torch.Tensor, embed_Nd: torch.Tensor) -> torch.Tensor:
    """Vocabulary id nearest to each visual token by cosine against all rows of E: ``[B, P]`` int64."""
    B, P, d = visual_BPd.shape
    ids_M, _ = nearest(visual_BPd.reshape(B * P, d), embed_Nd)
    return ids_M.view(B, P).cpu()


def alignment_consistency_per_sample(
    visual_BPd: torch.Tensor, caption_embeds: Sequence[torch.Tensor], top: int = 10
) -> list[float]:
    """Per sample b: ``m_i = max_j cos(v_bi, c_bj)`` over its caption-token embeddings ``c_b [T_b, d]``,
    then the mean of the ``top`` largest ``m_i`` (all P when P < top). NaN for a sample without caption
    tokens.
    """
    scores = []
    for v_Pd, c_Td in zip(visual_BPd, caption_embeds, strict=True):
        if c_Td is None or c_Td.shape[0] == 0:
            scores.append(float("nan"))
            continue
        _, max_P = nearest(v_Pd, c_Td.to(v_Pd.device))
        k = min(top, max_P.numel())
        scores.append(float(max_P.topk(k).values.mean()))
    return scores


def alignment_consistency(
    visual_BPd: torch.Tensor, caption_embeds: Sequence[torch.Tensor], top: int = 10
) -> float:
    """Token alignment consistency score of a batch: mean of the per-sample scores (samples without caption
    tokens are skipped; NaN if none has any)."""
    vals = [s for s in alignment_consistency_per_sample(visual_BPd, caption_embeds, top) if s == s]
    return sum(vals) / len(vals) if vals else float("nan")


def reverse_cosine(reversed_BPD: torch.Tensor, feats_BPD: torch.Tensor) -> float:
    """Mean over patches of ``cos(r(H)_i, F_i)``: how much of the target features the visual tokens keep.

    1 - this value is the distillation loss of Bao et al. for this target.
    """
    if reversed_BPD.shape != feats_BPD.shape:
        raise ValueError(
            f"reverse-projected {tuple(reversed_BPD.shape)} vs features {tuple(feats_BPD.shape)}"
        )
    cos = F.cosine_similarity(reversed_BPD.float(), feats_BPD.to(reversed_BPD.device).float(), dim=-1)
    return float(cos.mean())


def pool(records: Sequence[tuple[float, float]]) -> float:
    """Weighted mean of ``(value, weight)`` pairs, skipping NaN values and zero weights (NaN if none left)."""
    num = sum(v * w for v, w in records if w and v == v)
    den = sum(w for v, w in records if w and v == v)
    return num / den if den else float("nan")
