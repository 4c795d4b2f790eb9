"""The alignment measures over batches: shared by ``trainer eval``/``compare`` and the periodic evaluation.

Input: the ``VisualLM``, the run's objective modules, collated batches (``eval_inputs`` builds them from the
first image samples of a shard root, in manifest order) and the word list's SEA targets. Every measure is
about visual tokens: text-only samples are never picked (``first_samples``), and a text-only row in a batch
given here is left out of every measure. Output: every measure of
``trainer/evaluate/metrics.py`` at every requested layer (0 = projector output, l = LLM layer l), pooled
exactly over batches, plus each objective's own ``eval_measures``. Definitions: docs/eval.md.

Letters: B batch, P patches, d LLM width, D feature width, N vocabulary, W words, K top-k slots, T tokens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from trainer.evaluate import metrics as M
from trainer.objectives.base import Needs, image_mask
from visalign.errors import InputError

IGNORE_INDEX = -100


def caption_token_ids(batch: Mapping[str, Any], special_ids: Iterable[int] = ()) -> list[torch.Tensor]:
    """Per sample, the ids of its supervised text tokens (caption / assistant replies), special tokens out.

    The supervised tokens are exactly the text the model is trained to produce about the image; end-of-turn
    and eos markers carry no content and would give every sample the same "caption" token.
    """
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    ids_BT, labels_BT = batch["input_ids_BT"], batch["labels_BT"]
    out = []
    for ids_T, lab_T in zip(ids_BT.cpu(), labels_BT.cpu()):
        keep_T = lab_T != IGNORE_INDEX
        if special.numel():
            keep_T &= ~torch.isin(ids_T, special)
        out.append(ids_T[keep_T])
    return out


def final_norm_of(llm: torch.nn.Module) -> torch.nn.Module | None:
    """The LLM's final norm (the one before the LM head), or None if this architecture hides it: the one
    ``VisualLM`` hooks for the pre-norm last layer, so both read the same module."""
    from trainer.models.vlm import final_norm

    return final_norm(llm)


def layer_states(out: Any, layers: Iterable[int], num_layers: int, norm: torch.nn.Module | None):
    """``{l: [B, P, d]}``: l = 0 is the projector output V; l >= 1 is H_l (through ``norm`` for l < L).

    HF records ``hidden_states[L]`` after the final norm already, so only 1..L-1 are normalised here.
    """
    states = {}
    for layer in layers:
        if layer == 0:
            states[0] = out.visual_BPd
            continue
        h_BPd = out.hidden_BLPd[layer]
        if norm is not None and layer < num_layers:
            h_BPd = norm(h_BPd)
        states[layer] = h_BPd
    return states


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device)
        elif isinstance(value, dict):
            moved[key] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
        else:
            moved[key] = value
    return moved


@torch.no_grad()
def evaluate_batches(
    model: Any,
    objectives: Mapping[str, Any] | None,
    batches: Iterable[Mapping[str, Any]],
    word_targets_Wd: torch.Tensor | None,
    is_word_token_N: torch.Tensor,
    word_ok_W: torch.Tensor | None = None,
    word_tokens_WS: torch.Tensor | None = None,
    special_ids: Iterable[int] = (),
    top_k: int = 10,
    lens: str = "norm",
    consistency_top: int = 10,
    keep_nearest: int = 0,
    layers: Iterable[int] | None = None,
) -> dict[str, Any]:
    """All measures at every layer over ``batches`` (collated training batches), pooled exactly.

    ``model`` is the ``VisualLM`` (``model.llm``, ``model(batch, needs=...)``); ``objectives`` the run's
    objective modules, whose own ``eval_measures`` are added (e.g. distillation's reverse cosines); ``word_targets_Wd`` the SEA word targets of the
    shards' word list (``word_targets``), or None with ``word_tokens_WS`` (SEA's sub-token ids of the words)
    to build them from the model's current E (the Trainer's way: E changes when the LLM trains);
    ``word_ok_W`` the words that have sub-tokens (the others never win);
    ``is_word_token_N`` from ``metrics.word_token_mask``; ``top_k`` the shards' K.
    Returns ``{"per_layer": {l: {measure: value}}, "objectives": {"<objective>/<measure>": value},
    "counts": {...}}`` and,
    with ``keep_nearest = n``, ``"nearest"``: the first n samples' nearest word ids per layer (for pictures).
    The model is put in eval mode for the duration and restored afterwards.
    """
    num_layers = int(model.llm.config.get_text_config().num_hidden_layers)
    layers = sorted(set(layers)) if layers is not None else list(range(num_layers + 1))
    needs = Needs(hidden_layers=tuple(layer for layer in layers if layer > 0))
    for obj in (objectives or {}).values():  # e.g. the distill objective's own layers (no attention capture)
        needs = needs.union(
            Needs(hidden_layers=obj.needs.hidden_layers, final_norm_input=obj.needs.final_norm_input)
        )
    norm = final_norm_of(model.llm) if lens == "norm" else None
    ks = sorted({1, min(10, top_k), top_k})
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if word_targets_Wd is None:
        from trainer.objectives.sea import word_targets as sea_word_targets

        tokens_WS = word_tokens_WS.to(device)
        word_targets_Wd = sea_word_targets(tokens_WS, model.llm.get_input_embeddings().weight.detach())
        word_ok_W = (tokens_WS >= 0).any(1) if word_ok_W is None else word_ok_W
    word_targets_Wd = word_targets_Wd.to(device)
    # E may have more rows than the tokenizer has ids (padded vocabularies: never words) or fewer (an image
    # token added to the tokenizer only): fit the mask to E
    num_rows = model.llm.get_input_embeddings().weight.shape[0]
    mask_N = torch.zeros(num_rows, dtype=torch.bool)
    n = min(num_rows, is_word_token_N.shape[0])
    mask_N[:n] = is_word_token_N[:n].cpu()
    is_word_token_N = mask_N.to(device)

    hits = defaultdict(list)  # layer -> [(label_hits dict)]
    meaningful = defaultdict(list)  # layer -> [(share, weight)]
    consistency = defaultdict(list)  # layer -> per-sample scores
    extra = defaultdict(list)  # "<objective>/<measure>" -> [(value, weight)]
    nearest: list[dict[int, list[int]]] = []
    num_samples = 0
    try:
        for batch in batches:
            batch = _to_device(batch, device)
            out = model(batch, needs=needs)
            embed_Nd = out.embed_Nd.detach()
            image_B = image_mask(batch, batch["input_ids_BT"].shape[0], device)
            rows = image_B.nonzero().flatten().tolist()
            if not rows:
                continue
            all_ids = caption_token_ids(batch, special_ids)
            caption_embeds = [embed_Nd[all_ids[i].to(device)] for i in rows]
            labels_BPK = batch["labels_BPK"][image_B]
            B = len(rows)
            take = max(0, min(B, keep_nearest - num_samples))
            picked = [{} for _ in range(take)]
            for layer, h_BPd in layer_states(out, layers, num_layers, norm).items():
                h_BPd = h_BPd[image_B].float()
                near_BP = M.nearest_words(h_BPd, word_targets_Wd, word_ok_W)
                hits[layer].append(M.label_hits(h_BPd, word_targets_Wd, labels_BPK, ks, near_BP))
                share = M.meaningful_share(h_BPd, embed_Nd, is_word_token_N)
                meaningful[layer].append((share, h_BPd.shape[0] * h_BPd.shape[1]))
                consistency[layer] += M.alignment_consistency_per_sample(
                    h_BPd, caption_embeds, consistency_top
                )
                for i in range(take):
                    picked[i][layer] = near_BP[i].tolist()
            for obj in (objectives or {}).values():
                for measure, value_weight in obj.eval_measures(batch, out).items():
                    extra[f"{obj.name}/{measure}"].append(value_weight)
            nearest += picked
            num_samples += B
    finally:
        model.train(was_training)

    per_layer: dict[int, dict[str, float]] = {}
    for layer in layers:
        row = {}
        for k in ks:
            row[f"hit@{k}"] = M.pool([(h[f"hit@{k}"], h["num_labelled"]) for h in hits[layer]])
        row["meaningful_share"] = M.pool(meaningful[layer])
        row["consistency"] = M.pool([(s, 1) for s in consistency[layer]])
        per_layer[layer] = row
    first = layers[0]
    result: dict[str, Any] = {
        "per_layer": per_layer,
        "objectives": {name: M.pool(v) for name, v in sorted(extra.items())},
        "counts": {
            "samples": num_samples,
            "labelled_patches": sum(h["num_labelled"] for h in hits[first]),
            "visual_tokens": sum(w for _, w in meaningful[first]),
            "captioned_samples": sum(1 for s in consistency[first] if s == s),
        },
    }
    if keep_nearest:
        result["nearest"] = nearest
    return result


def _word_cache(cache_dir: str | Path | None) -> Path:
    """Where the pre-tokenised word list lives: the SEA objective's place ($VISALIGN_CACHE by default), so a
    run, its periodic evaluation and `trainer eval` tokenise a word list once."""
    from visalign.cache import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


def word_targets(words: list[str], tokenizer: Any, embed_Nd: torch.Tensor, cache_dir=None, wordlist_sha=None):
    """``(word_targets_Wd, word_ok_W)``: SEA's targets (mean input embedding of a word's sub-tokens), through
    the SEA objective's own cached tokenisation of the word list, so both always agree."""
    from trainer.objectives.sea import cached_word_tokens
    from trainer.objectives.sea import word_targets as sea_word_targets

    tokens_WS = torch.from_numpy(cached_word_tokens(words, tokenizer, _word_cache(cache_dir), wordlist_sha))
    return sea_word_targets(tokens_WS.to(embed_Nd.device), embed_Nd), (tokens_WS >= 0).any(1)


def eval_inputs(
    shards: str | Path,
    tokenizer: Any,
    fmt: str,
    max_length: int,
    num_samples: int,
    batch_size: int,
    cache_dir: str | None = None,
    samples: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything ``evaluate_batches`` needs besides the model, built once: ``evaluate_batches(model,
    objectives, **inputs)``. ``batches`` is a list (re-iterable: the Trainer evaluates the same held-out
    batches every time); word targets are rebuilt from the model's current E on every call."""
    from trainer.data.collate import Collator, SampleTransform
    from trainer.data.conversations import ConversationError, Formatter
    from trainer.objectives.sea import cached_word_tokens
    from visalign.shards import read_manifest, read_wordlist

    manifest = read_manifest(shards)
    words = read_wordlist(shards)
    samples = samples if samples is not None else first_samples(shards, num_samples, cache_dir=cache_dir)
    if not samples:
        raise InputError(f"{shards} holds no samples to evaluate")
    formatter = Formatter(tokenizer, manifest.num_patches, fmt, max_length)  # type: ignore[arg-type]
    transform, collate = SampleTransform(formatter), Collator(formatter.pad_id, manifest)
    batches = []
    for i in range(0, len(samples), batch_size):
        rows = [transform(dict(s)) for s in samples[i : i + batch_size]]
        unusable = [r for r in rows if "skip" in r]
        if unusable:  # first_samples checked the records; what is left is a setting (format, length)
            raise ConversationError(f"evaluation sample {unusable[0]['id']!r}: {unusable[0]['skip']}")
        batches.append(collate(rows))
    tokens_WS = torch.from_numpy(
        cached_word_tokens(words, tokenizer, _word_cache(cache_dir), manifest.wordlist.sha256)
    )
    return {
        "batches": batches,
        "word_targets_Wd": None,
        "word_tokens_WS": tokens_WS,
        "word_ok_W": (tokens_WS >= 0).any(1),
        "is_word_token_N": M.word_token_mask(tokenizer, words),
        "special_ids": list(tokenizer.all_special_ids),
        "top_k": manifest.top_k,
    }


def flat_report(result: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{"eval/hit@1/l0": ..., "eval/distill/reverse_cos/encoder": ...}``: the form the Trainer logs."""
    flat = {}
    for layer, row in result["per_layer"].items():
        for name, value in row.items():
            flat[f"{prefix}/{name}/l{layer}"] = value
    for name, value in result["objectives"].items():
        flat[f"{prefix}/{name}"] = value
    return flat


def first_samples(
    shards_root: str | Path, num: int, verify: str = "full", cache_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """The first ``num`` usable image samples in manifest order (the same ones for every run compared).

    Text-only samples, and samples whose record fails ``visalign.samples.check_record`` or whose arrays do
    not decode as the manifest says, are passed over (logged). Each shard is verified against the manifest
    (``trainer.data.verify``, ``verify`` mode, stamped in ``cache_dir``) before its first sample is used.
    """
    import logging

    from trainer.data.verify import verify_shards
    from visalign.samples import check_record
    from visalign.shards import SampleError, decode_checked, iter_raw, read_manifest, sample_layout

    manifest = read_manifest(shards_root)
    layout = sample_layout(manifest)
    samples: list[dict[str, Any]] = []
    passed: list[str] = []
    for index, path in enumerate(manifest.shard_paths(shards_root)):
        if len(samples) >= num:
            break
        if manifest.shards[index].num_samples == manifest.shards[index].num_text_only:
            continue
        verify_shards(shards_root, manifest, verify, cache_dir=cache_dir, indices=[index])
        for raw in iter_raw(path):
            try:
                sample = decode_checked(raw, layout)
            except SampleError as err:
                passed.append(f"{raw['__key__']}: {err}")
                continue
            if not sample["has_image"]:
                continue
            reason = check_record(sample["meta"], True)
            if reason is not None:
                passed.append(f"{sample['meta'].get('id', raw['__key__'])}: {reason}")
                continue
            sample["slot"], sample["pass"] = 0, 0  # the collator records them; evaluation has no slots
            samples.append(sample)
            if len(samples) >= num:
                break
    if passed:
        logging.getLogger(__name__).warning(
            "%d unusable samples of %s were passed over (first: %s)", len(passed), shards_root, passed[0]
        )
    return samples
