"""BASIC's Figure-3 probe: every visual token replaced by its nearest vocabulary embedding, then the LLM speaks.

BASIC (Tang et al., Sec. 3.2, Eq. 2 and Figure 3) replaces each initial visual embedding v_i (the projector
output) by the token embedding e_j of the LLM's vocabulary with the highest cosine, ``argmax_j cos(v_i, e_j)``
over all N rows of the input embedding matrix E, and prompts the LLM to describe the image from those
embeddings alone: if the description still fits the image, the visual tokens carry word-like meaning.

Input: a run's ``VisualLM`` (eval mode), its tokenizer and text format, a few image samples of a shard root.
Per sample the prompt is the run's own conversation format with one user turn ``<image>\\n<prompt>`` up to
where the assistant's reply starts (the ``plain`` format has no instruction: the model continues from the
visual tokens, as in stage 1). The LLM generates greedily (no sampling, no repetition penalty: the model's own
generation settings are not used) twice: from V itself and from the nearest embeddings.
Output: ``probe_sample`` records; ``write_probe`` writes ``probe.jsonl`` (one record per sample) and
``probe.md`` (for people) into the eval folder.

Letters: P visual tokens, d LLM width, N vocabulary rows, T prompt tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainer.evaluate import metrics as M

PLACEHOLDER_REPLY = "x"
"""a reply rendered only to find where the assistant's turn starts; never shown to the model"""


def nearest_token_embeddings(
    visual_Pd: torch.Tensor, embed_Nd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids_P, cos_P, replaced_Pd)``: each visual token's most similar row of E by cosine (ties to the lower
    id) and that row itself, in E's dtype (so the LLM sees exactly a token embedding)."""
    ids_P, cos_P = M.nearest(visual_Pd, embed_Nd)
    ids_P = ids_P.to(embed_Nd.device)
    return ids_P, cos_P, embed_Nd[ids_P]


def probe_meta(sample: dict[str, Any], prompt: str) -> dict[str, Any]:
    """The sample's record with one user turn ``<image>\\n<prompt>`` and a placeholder reply."""
    meta = {k: v for k, v in (sample.get("meta") or {}).items() if k not in ("conversations", "caption")}
    meta.setdefault("id", sample["__key__"])
    meta["conversations"] = [
        {"from": "human", "value": "<image>\n" + prompt},
        {"from": "gpt", "value": PLACEHOLDER_REPLY},
    ]
    return meta


def prompt_batch(sample: dict[str, Any], transform: Any, collate: Any, prompt: str) -> dict[str, Any]:
    """One-row batch holding the prompt only: the tokens before the first supervised one (the reply)."""
    row = transform(dict(sample, meta=probe_meta(sample, prompt), has_image=True))
    if "skip" in row:
        from trainer.data.conversations import ConversationError

        raise ConversationError(f"probe prompt for sample {row['id']!r}: {row['skip']}")
    row.setdefault("slot", 0)
    row.setdefault("pass", 0)
    batch = collate([row])
    supervised_T = (batch["labels_BT"][0] != -100).nonzero().flatten()
    end = int(supervised_T[0]) if supervised_T.numel() else batch["input_ids_BT"].shape[1]
    for key in ("input_ids_BT", "labels_BT", "attention_mask_BT"):
        batch[key] = batch[key][:, :end]
    batch["labels_BT"] = torch.full_like(batch["labels_BT"], -100)
    return batch


def stop_ids(llm: Any, tokenizer: Any) -> list[int]:
    """Token ids that end a generation: the tokenizer's eos and whatever the LLM's generation config lists
    (chat models end a turn with their own marker)."""
    ids = set()
    for source in (
        getattr(getattr(llm, "generation_config", None), "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    return sorted(ids)


@torch.no_grad()
def greedy(llm: Any, embeds_1Td: torch.Tensor, max_new_tokens: int, eos: list[int], pad_id: int) -> list[int]:
    """Greedy continuation of ``inputs_embeds`` (new token ids only, the stop token excluded)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad_id
    )
    mask_1T = torch.ones(embeds_1Td.shape[:2], dtype=torch.long, device=embeds_1Td.device)
    out = llm.generate(inputs_embeds=embeds_1Td, attention_mask=mask_1T, generation_config=config)
    ids = out[0].tolist()
    for i, token in enumerate(ids):
        if token in eos:
            return ids[:i]
    return ids


def token_text(tokenizer: Any, token_id: int) -> str:
    """How one vocabulary row reads; rows past the tokenizer (padded vocabularies) as ``<id>``."""
    if token_id >= len(tokenizer):
        return f"<{token_id}>"
    return tokenizer.decode([token_id])


@torch.no_grad()
def probe_sample(
    vlm: Any,
    tokenizer: Any,
    sample: dict[str, Any],
    transform: Any,
    collate: Any,
    prompt: str,
    max_new_tokens: int,
) -> dict[str, Any]:
    """One sample's probe record (``id``, ``reference``, ``prompt``, ``generated`` from V,
    ``generated_nearest`` from the nearest embeddings, ``nearest_ids``/``nearest_tokens`` per patch,
    ``nearest_cos_mean``)."""
    from trainer.data.conversations import caption_of

    device = next(vlm.parameters()).device
    batch = prompt_batch(sample, transform, collate, prompt)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    embeds_1Td = vlm.embed(batch)
    start, num_visual = int(batch["visual_start_B"][0]), batch["feats_BPD"].shape[1]
    embed_Nd = vlm.llm.get_input_embeddings().weight
    visual_Pd = embeds_1Td[0, start : start + num_visual]
    ids_P, cos_P, replaced_Pd = nearest_token_embeddings(visual_Pd, embed_Nd)
    nearest_1Td = embeds_1Td.clone()
    nearest_1Td[0, start : start + num_visual] = replaced_Pd.to(nearest_1Td.dtype)
    eos = stop_ids(vlm.llm, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    generated = greedy(vlm.llm, embeds_1Td, max_new_tokens, eos, pad)
    generated_nearest = greedy(vlm.llm, nearest_1Td, max_new_tokens, eos, pad)
    ids_T = batch["input_ids_BT"][0].tolist()
    shown = tokenizer.decode(ids_T[:start]) + "<image>" + tokenizer.decode(ids_T[start + num_visual :])
    meta = sample.get("meta") or {}
    return {
        "id": meta.get("id", sample["__key__"]),
        "reference": caption_of(meta) if ("caption" in meta or "conversations" in meta) else None,
        "prompt": shown,
        # special tokens stay visible: a probe that yields only BOS or pad tokens should say so
        "generated": tokenizer.decode(generated),
        "generated_nearest": tokenizer.decode(generated_nearest),
        "generated_ids": generated,
        "generated_nearest_ids": generated_nearest,
        "nearest_ids": ids_P.tolist(),
        "nearest_tokens": [token_text(tokenizer, i) for i in ids_P.tolist()],
        "nearest_cos_mean": float(cos_P.float().mean()),
    }


def write_probe(
    out: str | Path, records: list[dict[str, Any]], grid_hw: tuple[int, int], title: str
) -> list[str]:
    """``probe.jsonl`` and ``probe.md`` in ``out``; returns their names."""
    out = Path(out)
    with open(out / "probe.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    rows, cols = grid_hw
    lines = [
        f"# Nearest-token probe (BASIC Figure 3): {title}",
        "",
        "Each visual token replaced by the LLM input embedding with the highest cosine; greedy generation.",
        "",
    ]
    for record in records:
        tokens = record["nearest_tokens"]
        grid = [" | ".join(repr(t) for t in tokens[r * cols : (r + 1) * cols]) for r in range(rows)]
        lines += [
            f"## {record['id']}",
            "",
            f"* reference: {record['reference']!r}",
            f"* from the visual tokens: {record['generated']!r}",
            f"* from the nearest token embeddings: {record['generated_nearest']!r}",
            f"* mean cosine to the nearest embedding: {record['nearest_cos_mean']:.3f}",
            "",
            "```",
            *grid,
            "```",
            "",
        ]
    (out / "probe.md").write_text("\n".join(lines), encoding="utf-8")
    return ["probe.jsonl", "probe.md"]
