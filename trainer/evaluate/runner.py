"""``trainer eval`` and ``trainer compare``: alignment measures per layer, written as metrics.json + PNGs.

Input: a run folder (``RUN/config.yaml`` + ``RUN/checkpoints/step-NNNNNN/``), a finished ``pipeline label``
output (``--shards OUT``); the first ``--samples`` samples of its shards, in manifest order (deterministic).
Output under ``--out DIR``:

    metrics.json            every measure at every layer (0 = projector output, l = LLM layer l), the
                            reverse-projector cosines of distill runs, the counts behind each share
    curves.png              per-layer curves of the measures
    words-<key>-l<L>.png    the sample's image with each patch's nearest word (SEA Figure 1 style) at the
                            projector output and the chosen --layers

``trainer compare RUN_A RUN_B`` evaluates both on the same samples and writes the side-by-side word pictures,
``metrics.md``/``metrics.png`` (one table) and overlaid curves.

``evaluate_batches`` is the in-loop entry point: the Trainer calls it every N steps on held-out batches.
Definitions and choices: docs/eval.md.

Letters: B batch, P patches, d LLM width, D feature width, N vocabulary, W words, K top-k slots, T tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from trainer.evaluate import metrics as M
from trainer.objectives.base import Needs

IGNORE_INDEX = -100


@dataclasses.dataclass
class EvalConfig:
    run: str
    """a run folder written by `trainer run` (config.yaml + checkpoints/)"""
    shards: str
    """a finished `pipeline label` output to evaluate on (its word list and labels are the reference)"""
    out: str
    """output folder for metrics.json and the pictures"""
    checkpoint: int | None = None
    """checkpoint step to load (default: the newest complete checkpoint)"""
    samples: int = 64
    """number of samples, taken in manifest order from the first shards"""
    batch_size: int = 8
    """samples per forward pass"""
    layers: tuple[int, ...] = ()
    """layers drawn as word pictures besides the projector output (default: the middle and the last)"""
    pictures: int = 2
    """number of samples drawn as word pictures"""
    lens: Literal["norm", "raw"] = "norm"
    """'norm': layers 1..L-1 pass through the LLM's final norm before the comparison with E (logit-lens
    style; HF already normalises layer L); 'raw': hidden states as they are"""
    consistency_top: int = 10
    """the consistency score averages this many highest per-token maxima"""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', ..."""


# ------------------------------------------------------------------------------------------------------------
# The measures over batches: shared by `trainer eval` and the Trainer's periodic evaluation.


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
    """The LLM's final norm (the one before the LM head), or None if this architecture hides it."""
    for path in ("model.norm", "model.final_layernorm", "transformer.ln_f", "norm"):
        mod = llm
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, torch.nn.Module):
            return mod
    return None


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


def reverse_cosines(objectives: Mapping[str, Any] | None, batch: Mapping[str, Any], out: Any) -> dict:
    """``{target: (mean cosine, weight)}`` for every objective that owns reverse projectors.

    Preferred hook: ``obj.reverse_pairs(batch, out) -> {target: (reversed_BPD, feats_BPD)}``, measured with
    ``metrics.reverse_cosine``. Otherwise an objective with a ``reverse`` module dict (the distill objective)
    is run once without gradient and its own per-target report ``<name>/cos_<target>`` is read: it is the
    same mean cosine over (sample, patch), computed after the objective's own grid resizing, so the two
    never disagree on what was measured.
    """
    found: dict[str, tuple[float, int]] = {}
    for obj in (objectives or {}).values():
        pairs_fn = getattr(obj, "reverse_pairs", None)
        if callable(pairs_fn):
            for target, (rev_BPD, feats_BPD) in pairs_fn(batch, out).items():
                found[target] = (M.reverse_cosine(rev_BPD, feats_BPD), rev_BPD.shape[0] * rev_BPD.shape[1])
        elif isinstance(getattr(obj, "reverse", None), torch.nn.ModuleDict):
            _, report = obj(batch, out)
            prefix = f"{obj.name}/cos_"
            weight = out.visual_BPd.shape[0] * out.visual_BPd.shape[1]
            for key, value in report.items():
                if key.startswith(prefix):
                    found[key[len(prefix) :]] = (float(value), weight)
    return found


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
    objective modules (only used for reverse projectors); ``word_targets_Wd`` the SEA word targets of the
    shards' word list (``word_targets``), or None with ``word_tokens_WS`` (SEA's sub-token ids of the words)
    to build them from the model's current E (the Trainer's way: E changes when the LLM trains);
    ``word_ok_W`` the words that have sub-tokens (the others never win);
    ``is_word_token_N`` from ``metrics.word_token_mask``; ``top_k`` the shards' K.
    Returns ``{"per_layer": {l: {measure: value}}, "reverse_cosine": {target: value}, "counts": {...}}`` and,
    with ``keep_nearest = n``, ``"nearest"``: the first n samples' nearest word ids per layer (for pictures).
    The model is put in eval mode for the duration and restored afterwards.
    """
    num_layers = int(model.llm.config.get_text_config().num_hidden_layers)
    layers = sorted(set(layers)) if layers is not None else list(range(num_layers + 1))
    needs = Needs(hidden_layers=tuple(layer for layer in layers if layer > 0))
    for obj in (objectives or {}).values():  # e.g. the distill objective's own layer
        needs = needs.union(Needs(hidden_layers=getattr(obj, "needs", Needs()).hidden_layers))
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
    reverse = defaultdict(list)  # target -> [(cos, weight)]
    nearest: list[dict[int, list[int]]] = []
    num_samples = 0
    try:
        for batch in batches:
            batch = _to_device(batch, device)
            out = model(batch, needs=needs)
            embed_Nd = out.embed_Nd.detach()
            caption_ids = caption_token_ids(batch, special_ids)
            caption_embeds = [embed_Nd[ids.to(device)] for ids in caption_ids]
            B = batch["input_ids_BT"].shape[0]
            take = max(0, min(B, keep_nearest - num_samples))
            picked = [{} for _ in range(take)]
            for layer, h_BPd in layer_states(out, layers, num_layers, norm).items():
                h_BPd = h_BPd.float()
                near_BP = M.nearest_words(h_BPd, word_targets_Wd, word_ok_W)
                hits[layer].append(M.label_hits(h_BPd, word_targets_Wd, batch["labels_BPK"], ks, near_BP))
                share = M.meaningful_share(h_BPd, embed_Nd, is_word_token_N)
                meaningful[layer].append((share, h_BPd.shape[0] * h_BPd.shape[1]))
                consistency[layer] += M.alignment_consistency_per_sample(
                    h_BPd, caption_embeds, consistency_top
                )
                for i in range(take):
                    picked[i][layer] = near_BP[i].tolist()
            for target, value_weight in reverse_cosines(objectives, batch, out).items():
                reverse[target].append(value_weight)
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
        "reverse_cosine": {t: M.pool(v) for t, v in sorted(reverse.items())},
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
    from trainer.models.llm import default_cache_dir

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
    from pipeline.shards import read_manifest, read_wordlist
    from trainer.data.collate import Collator, SampleTransform
    from trainer.data.conversations import Formatter
    from trainer.objectives.sea import cached_word_tokens

    manifest = read_manifest(shards)
    words = read_wordlist(shards)
    samples = samples if samples is not None else first_samples(shards, num_samples)
    if not samples:
        raise ValueError(f"{shards} holds no samples to evaluate")
    formatter = Formatter(tokenizer, manifest.num_patches, fmt, max_length)  # type: ignore[arg-type]
    transform, collate = SampleTransform(formatter), Collator(formatter.pad_id)
    batches = [
        collate([transform(dict(s)) for s in samples[i : i + batch_size]])
        for i in range(0, len(samples), batch_size)
    ]
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
    """``{"eval/hit@1/l0": ..., "eval/reverse_cos/encoder": ...}``: the form the Trainer logs."""
    flat = {}
    for layer, row in result["per_layer"].items():
        for name, value in row.items():
            flat[f"{prefix}/{name}/l{layer}"] = value
    for target, value in result["reverse_cosine"].items():
        flat[f"{prefix}/reverse_cos/{target}"] = value
    return flat


def _jsonable(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_metrics(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """metrics.json with NaN written as null (strict JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(dict(payload)), indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------------
# `trainer eval` / `trainer compare`: loading, sample selection, pictures.


def first_samples(shards_root: str | Path, num: int) -> list[dict[str, Any]]:
    """The first ``num`` decoded samples in manifest order (the same ones for every run compared)."""
    from pipeline.shards import iter_tar, read_manifest

    manifest = read_manifest(shards_root)
    samples: list[dict[str, Any]] = []
    for path in manifest.shard_paths(shards_root):
        for sample in iter_tar(path):
            sample["slot"], sample["pass"] = 0, 0  # the collator records them; evaluation has no slots
            samples.append(sample)
            if len(samples) >= num:
                return samples
    return samples


def picture_layers(requested: Iterable[int], num_layers: int) -> list[int]:
    """Layer 0 always; then the requested layers, or the middle and the last by default."""
    chosen = list(requested) or [num_layers // 2, num_layers]
    for layer in chosen:
        if not 0 <= layer <= num_layers:
            raise ValueError(f"--layers {layer}: the LLM has layers 0..{num_layers} (0 = projector output)")
    return sorted({0, *chosen})


def cell_status(nearest_P: list[int], labels_PK) -> list[str]:
    """Per patch: 'hit' if its nearest word is one of its kept labels, 'miss' if not, 'none' if unlabelled."""
    from pipeline.pictures import HIT, MISS, UNLABELLED

    status = []
    for word, row in zip(nearest_P, labels_PK.tolist()):
        kept = [w for w in row if w >= 0]
        status.append(UNLABELLED if not kept else HIT if word in kept else MISS)
    return status


def _grid(values: list, grid_hw: tuple[int, int]) -> list[list]:
    rows, cols = grid_hw
    return [values[r * cols : (r + 1) * cols] for r in range(rows)]


def word_pictures(
    samples: list[dict[str, Any]],
    nearest: list[dict[int, list[int]]],
    words: list[str],
    manifest: Any,
    layers: list[int],
    title: str = "",
):
    """``{(sample key, layer): PIL image}``: each patch's nearest word on the encoder view of the image."""
    from pipeline.pictures import encoder_view, view_geometry, word_grid_image

    grid_hw = tuple(manifest.encoder.patch_grid)
    geometry = view_geometry(manifest)
    out = {}
    for sample, per_layer in zip(samples, nearest):
        meta = sample.get("meta") or {}
        view, found = encoder_view(meta.get("source"), *geometry)
        for layer in layers:
            ids = per_layer[layer]
            status = cell_status(ids, sample["labels"])
            hits = sum(s == "hit" for s in status)
            labelled = sum(s != "none" for s in status)
            head = f"{title + ' · ' if title else ''}{sample['__key__']} · layer {layer}"
            head += f" · {hits}/{labelled} on a label" + ("" if found else " · image missing")
            out[(sample["__key__"], layer)] = word_grid_image(
                view, _grid([words[i] for i in ids], grid_hw), _grid(status, grid_hw), title=head
            )
    return out


@dataclasses.dataclass
class LoadedRun:
    model: Any
    """the VisualLM with the checkpoint's weights, eval mode"""
    objectives: Any
    """the run's objective modules with their checkpoint state (reverse projectors), or None"""
    tokenizer: Any
    train_cfg: Any
    step: int


def load_run(run: str | Path, step: int | None, device: torch.device, shards: str | Path) -> LoadedRun:
    """Rebuild a run's model from its checkpoint (latest, or ``step``), as ``Trainer.build_model`` does.

    The resolved TrainConfig comes from the checkpoint's ``trainer_state.json`` (else ``RUN/config.yaml``);
    the LLM from its registry name/path, the projector for the feature width of ``shards`` (it must match
    the checkpoint); ``model.safetensors`` (trainable parameters: the projector, plus the LLM after a
    finetune stage) is loaded over it; the objectives are rebuilt and given ``objectives.safetensors`` (their
    reverse projectors are measured). ``shards`` stands in for the training shards when an objective needs
    a manifest or word list, so a run can be evaluated on another machine.
    """
    import yaml

    from pipeline.config import from_dict
    from pipeline.shards import read_manifest
    from trainer.checkpoint import OBJECTIVES, load_tensors, read_state, resolve_checkpoint
    from trainer.config import TrainConfig
    from trainer.models.llm import load_llm
    from trainer.models.projector import build_projector
    from trainer.models.vlm import VisualLM
    from trainer.objectives import ObjectiveContext, build_objectives

    ckpt = resolve_checkpoint(run, step)
    state = read_state(ckpt)
    if "config" in state:  # the resolved TrainConfig the checkpoint was trained with
        config = state["config"]
    else:
        config_path = ckpt.parent.parent / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"{ckpt} records no config and {config_path} is missing")
        config = yaml.safe_load(config_path.read_text())
    train_cfg = from_dict(TrainConfig, config)
    manifest = read_manifest(shards)
    feature_dim = manifest.encoder.feature_dim
    if state.get("feature_dim", feature_dim) != feature_dim:
        raise ValueError(
            f"{ckpt} was trained on {state['feature_dim']}-d features but {shards} holds {feature_dim}-d "
            "ones: evaluate on shards of the run's encoder"
        )
    llm, tokenizer = load_llm(
        train_cfg.model.llm,
        attn_implementation=train_cfg.model.attn_implementation,
        cache_dir=train_cfg.model.cache_dir,
    )
    text_config = llm.config.get_text_config()
    projector = build_projector(train_cfg.model.projector, feature_dim, text_config.hidden_size)
    model = VisualLM(llm, projector)
    loaded = model.load_state_dict(load_tensors(ckpt), strict=False)
    missing_projector = [k for k in loaded.missing_keys if k.startswith("projector.")]
    if loaded.unexpected_keys or missing_projector:
        raise ValueError(
            f"checkpoint {ckpt} does not fit the model rebuilt from its config: unexpected "
            f"{loaded.unexpected_keys[:5]}, missing {missing_projector[:5]}"
        )
    model.to(device).eval()

    objectives = None
    if (ckpt / OBJECTIVES).is_file():
        ctx = ObjectiveContext(
            llm_config=text_config,
            projector=train_cfg.model.projector,
            feature_dim=feature_dim,
            manifest=manifest,
            shards_root=str(shards),
            tokenizer=tokenizer,
            embed_Nd=llm.get_input_embeddings().weight.detach(),
            cache_dir=train_cfg.model.cache_dir,
        )
        objectives = build_objectives(train_cfg.objective, train_cfg.objectives, ctx)
        # non-strict: buffers rebuilt at build time (SEA's word table) are not in checkpoints
        objectives.load_state_dict(load_tensors(ckpt, OBJECTIVES), strict=False)
        objectives.to(device).eval()
    return LoadedRun(model, objectives, tokenizer, train_cfg, int(state["step"]))


def _resolve_format(train_cfg: Any) -> str:
    fmt = train_cfg.data.format
    return ("plain" if train_cfg.stage == "pretrain" else "chat") if fmt == "auto" else fmt


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclasses.dataclass
class Evaluation:
    """One run evaluated on one set of samples (what `compare` puts side by side)."""

    name: str
    step: int | None
    result: dict[str, Any]
    num_layers: int


def evaluate_run(
    cfg: EvalConfig, samples: list[dict[str, Any]] | None = None
) -> tuple[Evaluation, list, Any]:
    """Load the run, evaluate ``cfg.samples`` samples; returns (evaluation, samples, manifest)."""
    from pipeline.shards import read_manifest

    manifest = read_manifest(cfg.shards)
    loaded = load_run(cfg.run, cfg.checkpoint, _device(cfg.device), shards=cfg.shards)
    model, train_cfg = loaded.model, loaded.train_cfg
    samples = samples if samples is not None else first_samples(cfg.shards, cfg.samples)
    fmt, max_length = _resolve_format(train_cfg), train_cfg.data.max_length
    inputs = eval_inputs(
        cfg.shards,
        loaded.tokenizer,
        fmt,
        max_length,
        len(samples),
        cfg.batch_size,
        train_cfg.model.cache_dir,
        samples,
    )
    result = evaluate_batches(
        model,
        loaded.objectives,
        **inputs,
        lens=cfg.lens,
        consistency_top=cfg.consistency_top,
        keep_nearest=cfg.pictures,
    )
    num_layers = int(model.llm.config.get_text_config().num_hidden_layers)
    return Evaluation(Path(cfg.run).name, loaded.step, result, num_layers), samples, manifest


def _payload(cfg: EvalConfig, ev: Evaluation, pictures: list[str]) -> dict[str, Any]:
    return {
        "run": str(cfg.run),
        "checkpoint_step": ev.step,
        "shards": str(cfg.shards),
        "lens": cfg.lens,
        "consistency_top": cfg.consistency_top,
        "num_layers": ev.num_layers,
        "per_layer": ev.result["per_layer"],
        "reverse_cosine": ev.result["reverse_cosine"],
        "counts": ev.result["counts"],
        "pictures": pictures,
    }


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """`trainer eval`: metrics.json, curves.png and the word pictures; returns the payload"""
    from pipeline.shards import read_wordlist
    from trainer.evaluate.pictures import plot_layer_curves

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ev, samples, manifest = evaluate_run(cfg)
    layers = picture_layers(cfg.layers, ev.num_layers)
    title = f"{ev.name} step {ev.step}"
    images = {}
    if cfg.pictures > 0:  # --pictures 0: measures only
        images = word_pictures(
            samples[: cfg.pictures], ev.result["nearest"], read_wordlist(cfg.shards), manifest, layers, title
        )
    names = []
    for (key, layer), image in images.items():
        name = f"words-{key}-l{layer}.png"
        image.save(out / name)
        names.append(name)
    curves = {ev.name: _curves(ev.result)}
    plot_layer_curves(curves, out / "curves.png", title=f"{title}: {ev.result['counts']['samples']} samples")
    payload = _payload(cfg, ev, names + ["curves.png"])
    write_metrics(out / "metrics.json", payload)
    return payload


def _curves(result: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    for layer, row in result["per_layer"].items():
        for name, value in row.items():
            curves[name][int(layer)] = value
    return dict(curves)


def table_rows(evals: list[Evaluation], layers: list[int]) -> list[list]:
    """``[measure@layer, value per run...]`` rows for the chosen layers, then the reverse cosines."""
    rows = []
    measures = list(evals[0].result["per_layer"][0])
    for layer in layers:
        for m in measures:
            rows.append(
                [f"{m} @ l{layer}"]
                + [ev.result["per_layer"].get(layer, {}).get(m, float("nan")) for ev in evals]
            )
    targets = sorted({t for ev in evals for t in ev.result["reverse_cosine"]})
    for t in targets:
        rows.append(
            [f"reverse cos ({t})"] + [ev.result["reverse_cosine"].get(t, float("nan")) for ev in evals]
        )
    return rows


def run_compare(cfg_a: EvalConfig, cfg_b: EvalConfig) -> dict[str, Any]:
    """`trainer compare`: both runs on the same samples; side-by-side words, one table, overlaid curves."""
    from pipeline.shards import read_wordlist
    from trainer.evaluate.pictures import markdown_table, plot_layer_curves, side_by_side, table_png

    out = Path(cfg_a.out)
    out.mkdir(parents=True, exist_ok=True)
    ev_a, samples, manifest = evaluate_run(cfg_a)
    ev_b, _, _ = evaluate_run(cfg_b, samples=samples)
    if ev_a.name == ev_b.name:  # two checkpoints of one run
        ev_a.name, ev_b.name = f"{ev_a.name}@{ev_a.step}", f"{ev_b.name}@{ev_b.step}"
    words = read_wordlist(cfg_a.shards)
    shown = samples[: cfg_a.pictures]
    names = []
    if not shown:  # --pictures 0: the metrics table and curves only
        layers_drawn = []
    else:
        layers_drawn = picture_layers(cfg_a.layers, min(ev_a.num_layers, ev_b.num_layers))
    # layer indices are compared as they are; two LLMs of different depth meet at 0 and at their own last
    for layer in layers_drawn:
        pics_a = word_pictures(shown, ev_a.result["nearest"], words, manifest, [layer], ev_a.name)
        pics_b = word_pictures(shown, ev_b.result["nearest"], words, manifest, [layer], ev_b.name)
        for key, img_a in pics_a.items():
            name = f"compare-{key[0]}-l{layer}.png"
            side_by_side([img_a, pics_b[key]]).save(out / name)
            names.append(name)
    layers = sorted({0, min(ev_a.num_layers, ev_b.num_layers)})
    headers = ["measure", ev_a.name, ev_b.name]
    rows = table_rows([ev_a, ev_b], layers)
    (out / "metrics.md").write_text(
        f"# {ev_a.name} vs {ev_b.name} on {len(samples)} samples of {cfg_a.shards}\n\n"
        + markdown_table(headers, rows)
    )
    table_png(headers, rows, out / "metrics.png")
    plot_layer_curves({ev_a.name: _curves(ev_a.result), ev_b.name: _curves(ev_b.result)}, out / "curves.png")
    payload = {
        "runs": [_payload(cfg_a, ev_a, []), _payload(cfg_b, ev_b, [])],
        "pictures": names + ["metrics.png", "curves.png"],
    }
    write_metrics(out / "metrics.json", payload)
    return payload


# ------------------------------------------------------------------------------------------------------------
# command lines (registered in trainer/cli.py)


def _parser(prog: str, description: str, num_runs: int | str):
    import argparse

    from pipeline.config import build_parser

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("_runs", nargs=num_runs, metavar="RUN", help="run folder(s) written by `trainer run`")
    return build_parser(EvalConfig, parser)


def _config(args, run: str) -> EvalConfig:
    from pipeline.config import resolve

    given = {k: v for k, v in vars(args).items() if k != "_runs"}
    given.setdefault("run", run)
    return resolve(EvalConfig, given)


def eval_main(argv: list[str], user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """``trainer eval RUN --shards OUT --out DIR``: prints the metrics.json path."""
    description = "Alignment measures per layer and word pictures of a run (docs/eval.md)."
    parser = _parser("trainer eval", description, "?")
    args = parser.parse_args(argv)
    try:
        cfg = _config(args, args._runs)
        run_eval(cfg)
    except user_errors as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(Path(cfg.out) / "metrics.json")
    return 0


def compare_main(argv: list[str], user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """``trainer compare RUN_A RUN_B --shards OUT --out DIR``: prints the metrics.md path."""
    parser = _parser("trainer compare", "Two runs side by side on the same samples (docs/eval.md).", 2)
    args = parser.parse_args(argv)
    try:
        cfg_a = _config(args, args._runs[0])
        run_compare(cfg_a, dataclasses.replace(cfg_a, run=args._runs[1]))
    except user_errors as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(Path(cfg_a.out) / "metrics.md")
    return 0
