"""Looking at a finished label output: ``pipeline info``, ``show`` and ``stats``.

Input: an OUT folder written by ``pipeline label`` (manifest, wordlist.txt, shards; schema 1, 2 or 3). Outputs:
text for ``info``/``stats`` and, for ``show``, a PNG of one sample's image as the encoder saw it (same
pad/resize/crop, from the manifest's ``encoder.preprocess``) with the top-1 word of every patch written on its
grid cell. Text-only samples have no patches: ``stats`` counts them apart, ``show`` refuses them.

Letters: P patches, K top-k slots, N words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from visalign import shards as S
from visalign.errors import InputError


def format_info(out: str | Path) -> str:
    m = S.read_manifest(out)
    e = m.encoder
    lines = [
        f"label output     {Path(out)}",
        f"schema           v{m.schema_version}, visalign {m.tool_version}, created {m.created}",
        f"encoder          {e.name} ({e.backend}{', ' + e.path if e.path else ''}), "
        f"fingerprint {e.fingerprint[:16]}",
        f"image size       {e.image_size} px, patch grid {e.patch_grid[0]}x{e.patch_grid[1]} "
        f"= {m.num_patches} patches",
        f"features         layer {e.feature_layer}, {e.feature_dim}-d {e.feature_dtype}; "
        f"joint space {e.joint_dim}-d{_dense_text(e)}",
        f"preprocessing    {_preprocess_text(e.preprocess)}",
        f"word list        {m.wordlist.count} words, sha256 {m.wordlist.sha256[:16]} "
        f"(from {m.wordlist.source})",
        f"labels           top-{m.top_k} by {m.score_sign}{_score_source_text(m.score_source)}"
        f"{', feature surgery' if m.feature_surgery else ''}, templates {m.templates or '(bare word)'}",
        f"samples          {m.num_samples} in {len(m.shards)} shards ({m.num_samples - m.num_text_only} "
        f"with an image, {m.num_text_only} text-only), {m.num_rejects} rejects",
        f"config digest    {m.config_digest[:16]}",
    ]
    if m.stores_images:
        lines.append("images           stored in the shards (image.<ext> members)")
    for x in m.experts:
        lines.append(
            f"expert           {x.name} ({x.backend}) layer {x.feature_layer}, {x.feature_dim}-d, "
            f"grid {x.patch_grid[0]}x{x.patch_grid[1]}"
            + (f", {x.model_type} from {x.path}" if x.model_type else "")
        )
    if m.shards:
        sizes = [s.num_samples for s in m.shards]
        lines.append(
            f"shard sizes      min {min(sizes)}, max {max(sizes)}; "
            f"first {m.shards[0].name}, last {m.shards[-1].name}"
        )
        num_bytes = [s.num_bytes for s in m.shards]
        if all(b is not None for b in num_bytes):
            total = sum(num_bytes)  # type: ignore[arg-type]
            per = total / max(m.num_samples - m.num_text_only, 1)
            lines.append(f"disk             {_size(total)} of shards ({_size(per)} per image sample)")
        else:
            lines.append("disk             (shard sizes not recorded: schema 1)")
    return "\n".join(lines)


def _dense_text(e: S.EncoderInfo) -> str:
    if e.dense == "surgery":
        return f" (CLIP Surgery path, last {e.surgery_depth} blocks)"
    if e.dense == "maskclip":
        return " (MaskCLIP value path in the last block)"
    return ""


def _score_source_text(source: str | None) -> str:
    return {"user": " (given)", "family-default": " (the encoder family's default)"}.get(source or "", "")


def _size(num_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes:.0f} B"


def _preprocess_text(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "(not recorded: schema 1; the encoder family's own)"
    aspect = spec.get("aspect", "crop")
    if aspect == "pad":
        aspect = f"pad with {tuple(spec.get('pad_color') or ())}"
    return (
        f"{aspect}, then {spec['resize_mode']} resize to {spec['image_size']} px "
        f"({spec.get('resample', 'bicubic')}, crop offset {spec['crop_rounding']})"
    )


def find_sample(out: str | Path, key: str) -> dict[str, Any]:
    """The decoded sample whose id (or tar key) is ``key``; raises ValueError naming the output if absent."""
    from visalign.shards import sample_key

    m = S.read_manifest(out)
    wanted = {key, sample_key(key)}
    for path in m.shard_paths(out):
        for sample in S.iter_tar(path):
            if sample["__key__"] in wanted or sample["meta"].get("id") == key:
                return sample
    raise InputError(f"no sample with id or key {key!r} in {out}; `pipeline stats {out}` lists the shards")


def show(out: str | Path, key: str, png: str | Path, cell: int = 64) -> Path:
    """The sample's top CLIP label drawn on each patch cell of the image as the encoder saw it."""
    from visalign.pictures import encoder_view, view_geometry, word_grid_image

    sample = find_sample(out, key)
    if "labels" not in sample:
        raise InputError(
            f"sample {key!r} in {out} is text-only (no image, no patch labels): there is nothing to draw; "
            "choose a sample with an image"
        )
    m = S.read_manifest(out)
    words = S.read_wordlist(out)
    labels_PK = sample["labels"]
    top1_P = labels_PK[:, 0]
    names = [words[i] if i >= 0 else "" for i in top1_P.tolist()]
    rows, cols = m.encoder.patch_grid
    source = sample["meta"]["source"]
    view, found = encoder_view(source, *view_geometry(m))
    if not found:
        raise InputError(f"the image {source} recorded for this sample is gone; show needs the original")
    words_HW = [names[r * cols : (r + 1) * cols] for r in range(rows)]
    img = word_grid_image(view, words_HW, cell_px=cell, dim=0.25)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    img.save(png)
    return png


def label_stats(out: str | Path, num_top: int = 20, num_bins: int = 2000) -> dict[str, Any]:
    """Word-list use and the distribution of kept scores over every shard of ``out``.

    Quantiles come from a fixed histogram over [0, 1] (kept scores lie there: cos or -cos, >= 0), so the
    memory is constant whatever the number of shards; their resolution is ``1 / num_bins``.
    """
    m = S.read_manifest(out)
    words = S.read_wordlist(out)
    num_words = len(words)
    top1_counts_N = np.zeros(num_words, dtype=np.int64)
    any_counts_N = np.zeros(num_words, dtype=np.int64)
    hist = np.zeros(num_bins, dtype=np.int64)
    num_slots = num_absent = num_patches = num_text_only = 0
    score_sum = 0.0
    for path in m.shard_paths(out):
        for sample in S.iter_tar(path):
            if "labels" not in sample:
                num_text_only += 1
                continue
            labels_PK, scores_PK = sample["labels"], sample["scores"].astype(np.float64)
            num_patches += labels_PK.shape[0]
            num_slots += labels_PK.size
            kept = labels_PK >= 0
            num_absent += int((~kept).sum())
            top1 = labels_PK[:, 0]
            top1_counts_N += np.bincount(top1[top1 >= 0], minlength=num_words)
            any_counts_N += np.bincount(labels_PK[kept], minlength=num_words)
            s = scores_PK[kept]
            score_sum += float(s.sum())
            hist += np.histogram(np.clip(s, 0, 1), bins=num_bins, range=(0.0, 1.0))[0]
    num_kept = int(hist.sum())
    quantiles = {}
    if num_kept:
        cdf = np.cumsum(hist) / num_kept
        for q in (0.05, 0.25, 0.5, 0.75, 0.95):
            quantiles[q] = float((np.searchsorted(cdf, q) + 0.5) / num_bins)
    order = np.argsort(-top1_counts_N, kind="stable")[:num_top]
    return {
        "num_samples": m.num_samples,
        "num_text_only": num_text_only,
        "num_patches": num_patches,
        "num_words": num_words,
        "top1_words_used": int((top1_counts_N > 0).sum()),
        "any_words_used": int((any_counts_N > 0).sum()),
        "absent_share": num_absent / max(num_slots, 1),
        "num_kept_scores": num_kept,
        "score_mean": score_sum / num_kept if num_kept else float("nan"),
        "score_quantiles": quantiles,
        "top_words": [(words[i], int(top1_counts_N[i])) for i in order if top1_counts_N[i] > 0],
        "score_sign": m.score_sign,
        "top_k": m.top_k,
    }


def format_stats(st: dict[str, Any]) -> str:
    n = max(st["num_words"], 1)
    q = ", ".join(f"q{int(k * 100):02d} {v:.3f}" for k, v in st["score_quantiles"].items()) or "(none kept)"
    lines = [
        f"samples {st['num_samples']} ({st['num_text_only']} text-only), patches {st['num_patches']}, "
        f"top-{st['top_k']} by {st['score_sign']}",
        f"word list use: {st['top1_words_used']} / {st['num_words']} words as a top-1 "
        f"({100 * st['top1_words_used'] / n:.2f}%), {st['any_words_used']} as any label "
        f"({100 * st['any_words_used'] / n:.2f}%)",
        f"absent label slots: {100 * st['absent_share']:.2f}%",
        f"kept scores: {st['num_kept_scores']}, mean {st['score_mean']:.4f}; {q}",
        "most frequent top-1 words: " + ", ".join(f"{w} ({c})" for w, c in st["top_words"]),
    ]
    return "\n".join(lines)


def dump_json(st: dict[str, Any]) -> str:
    return json.dumps(st, indent=1, default=str)
