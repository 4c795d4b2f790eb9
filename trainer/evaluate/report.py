"""``trainer eval`` and ``trainer compare``: a run's model, the measures, and what is written for people.

Input: a run folder (``RUN/checkpoints/step-NNNNNN/``, rebuilt with ``trainer.models.build.load_trained``)
and a finished ``pipeline label`` output (``--shards OUT``); the first ``--samples`` samples of its shards, in
manifest order (deterministic). Output under ``--out DIR``:

    metrics.json            every measure at every layer (0 = projector output, l = LLM layer l), the
                            objectives' own measures (distill: reverse-projector cosines), the counts behind
                            each share
    curves.png              per-layer curves of the measures
    words-<key>-l<L>.png    the sample's image with each patch's nearest word (SEA Figure 1 style) at the
                            projector output and the chosen --layers
    probe.jsonl, probe.md   with --probe N: BASIC's Figure-3 probe (``trainer/evaluate/probe.py``): what the
                            LLM generates when every visual token is replaced by its nearest token embedding

``trainer compare RUN_A RUN_B`` evaluates both on the same samples and writes the side-by-side word pictures,
``metrics.md``/``metrics.png`` (one table) and overlaid curves. Definitions and choices: docs/eval.md.
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

from trainer.evaluate.measure import eval_inputs, evaluate_batches, first_samples
from visalign.config import ConfigError
from visalign.shards import read_manifest, read_wordlist


@dataclasses.dataclass
class EvalConfig:
    run: str
    """a run folder written by `trainer run` (config.yaml + checkpoints/), or one checkpoint folder"""
    shards: str
    """a finished `pipeline label` output to evaluate on, a folder or its URL (its word list and labels are
    the reference)"""
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
    probe: int = 0
    """BASIC's Figure-3 probe on this many of the samples (0 = off): every visual token replaced by the input
    embedding of its nearest vocabulary token (cosine), then the LLM generates; written to probe.jsonl/.md"""
    probe_prompt: str = "Describe the image."
    """the probe's instruction (chat formats; the plain format has none and continues from the image)"""
    probe_tokens: int = 32
    """tokens the probe generates per sample (greedy)"""

    def __post_init__(self):
        if self.probe < 0 or self.probe_tokens < 1:
            raise ConfigError(
                f"--probe {self.probe} --probe-tokens {self.probe_tokens}: give --probe >= 0 samples and "
                "--probe-tokens >= 1"
            )


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


def picture_layers(requested: Iterable[int], num_layers: int) -> list[int]:
    """Layer 0 always; then the requested layers, or the middle and the last by default."""
    chosen = list(requested) or [num_layers // 2, num_layers]
    for layer in chosen:
        if not 0 <= layer <= num_layers:
            raise ConfigError(f"--layers {layer}: the LLM has layers 0..{num_layers} (0 = projector output)")
    return sorted({0, *chosen})


def cell_status(nearest_P: list[int], labels_PK) -> list[str]:
    """Per patch: 'hit' if its nearest word is one of its kept labels, 'miss' if not, 'none' if unlabelled."""
    from visalign.pictures import HIT, MISS, UNLABELLED

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
    from visalign.pictures import encoder_view, view_geometry, word_grid_image

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


def _resolve_format(train_cfg: Any) -> Any:
    from trainer.data.conversations import text_format

    return text_format(train_cfg.data, train_cfg.stage)


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
    from trainer.models.build import check_manifest_against, load_trained

    manifest = read_manifest(cfg.shards)
    run = load_trained(cfg.run, cfg.checkpoint, shards=cfg.shards, device=_device(cfg.device))
    check_manifest_against(run.state["manifest"], manifest, f"the run {cfg.run}")
    train_cfg = run.train_cfg
    samples = samples if samples is not None else first_samples(cfg.shards, cfg.samples)
    inputs = eval_inputs(
        cfg.shards,
        run.tokenizer,
        _resolve_format(train_cfg),
        train_cfg.data.max_length,
        len(samples),
        cfg.batch_size,
        train_cfg.model.cache_dir,
        samples,
    )
    result = evaluate_batches(
        run.vlm,
        run.module.objectives,
        **inputs,
        lens=cfg.lens,
        consistency_top=cfg.consistency_top,
        keep_nearest=cfg.pictures,
    )
    if cfg.probe:
        result["probe"] = probe_records(cfg, run, samples[: cfg.probe], manifest)
    num_layers = int(run.vlm.llm.config.get_text_config().num_hidden_layers)
    return Evaluation(Path(cfg.run).name, run.step, result, num_layers), samples, manifest


def probe_records(
    cfg: EvalConfig, run: Any, samples: list[dict[str, Any]], manifest: Any
) -> list[dict[str, Any]]:
    """BASIC's Figure-3 probe on ``samples`` with the run's own text format."""
    from trainer.data.collate import Collator, SampleTransform
    from trainer.data.conversations import Formatter
    from trainer.evaluate.probe import probe_sample

    train_cfg = run.train_cfg
    formatter = Formatter(
        run.tokenizer, manifest.num_patches, _resolve_format(train_cfg), train_cfg.data.max_length
    )
    transform, collate = SampleTransform(formatter), Collator(formatter.pad_id, manifest)
    return [
        probe_sample(run.vlm, run.tokenizer, sample, transform, collate, cfg.probe_prompt, cfg.probe_tokens)
        for sample in samples
    ]


def _payload(cfg: EvalConfig, ev: Evaluation, pictures: list[str]) -> dict[str, Any]:
    return {
        "run": str(cfg.run),
        "checkpoint_step": ev.step,
        "shards": str(cfg.shards),
        "lens": cfg.lens,
        "consistency_top": cfg.consistency_top,
        "num_layers": ev.num_layers,
        "per_layer": ev.result["per_layer"],
        "objectives": ev.result["objectives"],
        "counts": ev.result["counts"],
        "pictures": pictures,
    }


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """`trainer eval`: metrics.json, curves.png and the word pictures; returns the payload"""
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
    if "probe" in ev.result:
        from trainer.evaluate.probe import write_probe

        payload["probe"] = write_probe(out, ev.result["probe"], tuple(manifest.encoder.patch_grid), title)
    write_metrics(out / "metrics.json", payload)
    return payload


def _curves(result: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    for layer, row in result["per_layer"].items():
        for name, value in row.items():
            curves[name][int(layer)] = value
    return dict(curves)


def table_rows(evals: list[Evaluation], layers: list[int]) -> list[list]:
    """``[measure@layer, value per run...]`` rows for the chosen layers, then the objectives' measures."""
    rows = []
    measures = list(evals[0].result["per_layer"][0])
    for layer in layers:
        for m in measures:
            rows.append(
                [f"{m} @ l{layer}"]
                + [ev.result["per_layer"].get(layer, {}).get(m, float("nan")) for ev in evals]
            )
    names = sorted({name for ev in evals for name in ev.result["objectives"]})
    for name in names:
        rows.append([name] + [ev.result["objectives"].get(name, float("nan")) for ev in evals])
    return rows


def run_compare(cfg_a: EvalConfig, cfg_b: EvalConfig) -> dict[str, Any]:
    """`trainer compare`: both runs on the same samples; side-by-side words, one table, overlaid curves."""
    from trainer.evaluate.pictures import markdown_table, plot_layer_curves, side_by_side, table_png

    if cfg_a.probe:
        raise ConfigError("--probe is a `trainer eval` option: run trainer eval on each run for the probe")
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
