"""The driver of ``pipeline label``: validate, prepare OUT, map ``label_shard`` over partitions, manifest.

Input: a ``LabelConfig``. Output: a finished ``OUT/`` (layout in ``pipeline.shards`` / docs/shards.md) and a
summary dict (images, rejects, shards, images/s, wall time).

Order of work, chosen so that any interruption can be resumed exactly once:

1. fail fast on unusable input (bad path, unknown encoder, empty word list) before anything is written;
2. compare the content-changing settings with those recorded in ``OUT/settings.json`` by an earlier run and
   refuse (listing ``field: old -> new``) unless ``--overwrite``, which clears the old outputs;
3. write ``config.yaml``, ``settings.json``, ``wordlist.txt``; compute the word embeddings once (disk cache);
4. skip shards that are complete (tar + sidecar with matching sha256), delete stale ``.tmp`` files, and
   run the rest: ``synchronous`` in-process, ``local`` on a LocalCluster, or on an existing ``tcp://``
   scheduler. Tasks carry paths and settings only; each worker loads the models once;
5. from ALL sidecars (old and new) write ``rejects.parquet`` and, last, ``manifest.json``.

Heavy imports (dask, faiss, the encoders) happen inside functions: ``pipeline --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline import shards as S
from pipeline.config import write_resolved
from pipeline.label import (
    LabelConfig,
    config_digest,
    encoder_options,
    label_shard,
    resolve_device,
    shard_is_complete,
    sidecar_path,
)

SETTINGS = "settings.json"
"""the content-changing settings of the run that made OUT, and their digest (compared on reruns)"""


class SettingsMismatchError(ValueError):
    """OUT was made with other content-changing settings."""


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            lines.append(f"  {key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}")
    return lines


def _clear_outputs(out: Path) -> None:
    for p in out.iterdir():
        if p.name.startswith("shard-") or p.name in (S.MANIFEST, S.REJECTS, S.WORDLIST, SETTINGS, S.CONFIG):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def _check_settings(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    path = out / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
    elif any(out.glob("shard-*")) or (out / S.MANIFEST).exists():
        old = {"(unknown)": "shards without settings.json"}
    else:
        return
    if old == settings:
        return
    if overwrite:
        _clear_outputs(out)
        return
    raise SettingsMismatchError(
        f"{out} holds shards made with different settings; rerun with --overwrite to replace them, "
        "or choose another --shards folder. Differences (field: old -> new):\n"
        + "\n".join(_diff(old, settings))
    )


def _write_rejects(out: Path, rejects: list[dict[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {k: pa.array([r[k] for r in rejects], type=pa.string()) for k in ("id", "source", "reason")}
    )
    tmp = out / (S.REJECTS + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out / S.REJECTS)


def _run_tasks(tasks: list[dict], cfg: LabelConfig, on_done) -> None:
    """Run ``label_shard`` over tasks on the configured scheduler, calling ``on_done(stats)`` as each ends."""
    if cfg.scheduler == "synchronous":
        for task in tasks:
            on_done(label_shard(task, cfg))
        return
    from dask.distributed import Client, LocalCluster, as_completed

    if cfg.scheduler == "local":
        if cfg.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {cfg.workers}")
        cluster = LocalCluster(
            n_workers=cfg.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
        client = Client(cluster)
    elif cfg.scheduler.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        cluster = None
        client = Client(cfg.scheduler, timeout="30s")
    else:
        raise ValueError(
            f"--scheduler {cfg.scheduler!r}: use synchronous, local or a tcp://host:port address"
        )
    try:
        # pure=False: a rerun of a task must really run; retries=1 survives one lost worker
        futures = [
            client.submit(label_shard, t, cfg, pure=False, retries=1, key=f"label-{t['index']}")
            for t in tasks
        ]
        for fut in as_completed(futures):
            on_done(fut.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_label(cfg: LabelConfig) -> dict[str, Any]:
    """Run the whole stage; return the end-of-run summary. Raises ValueError subclasses on unusable input."""
    from pipeline.search import SCORE_SIGNS
    from pipeline.sources import list_inputs, listing_digest, partition
    from pipeline.wordlist import cached_word_embeddings, load_wordlist, wordlist_sha256, write_wordlist

    t_start = time.perf_counter()
    if cfg.score not in SCORE_SIGNS:
        raise ValueError(f"--score {cfg.score!r}: use one of {list(SCORE_SIGNS)}")
    if cfg.top_k < 1 or cfg.batch_size < 1:
        raise ValueError("--top-k and --batch-size must be >= 1")
    if cfg.scheduler not in ("synchronous", "local") and "://" not in cfg.scheduler:
        raise ValueError(
            f"--scheduler {cfg.scheduler!r}: use synchronous, local or a tcp://host:port address"
        )
    from pipeline.encoders import ENCODERS

    for name in [cfg.encoder, *cfg.experts]:
        if name not in ENCODERS and not Path(name).is_dir():
            ENCODERS[name]  # raises UnknownNameError listing the valid names, before any slow work
    out = Path(cfg.shards)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--shards {out} exists and is not a folder")
    input_path = Path(cfg.input).resolve()
    images_root = str(Path(cfg.images).resolve()) if cfg.images else None
    kind, items = list_inputs(input_path, images_root)
    if not items:
        raise ValueError(f"--input {cfg.input} holds no samples")
    words = load_wordlist(cfg.wordlist, lowercase=cfg.lowercase)
    words_sha = wordlist_sha256(words)
    device = resolve_device(cfg.device)
    from pipeline.encoders import default_cache_dir

    cache_dir = cfg.cache_dir or str(default_cache_dir())
    cfg = dataclasses.replace(cfg, cache_dir=cache_dir)

    from pipeline.label import get_encoder

    enc = get_encoder(
        cfg.encoder, cfg.backend, cfg.encoder_path, device, cfg.cache_dir, **encoder_options(cfg)
    )
    enc_info = enc.info(cfg.feature_layer)
    experts = [get_encoder(n, None, None, device, cfg.cache_dir) for n in cfg.experts]
    expert_infos = []
    for name, e in zip(cfg.experts, experts):
        info = e.info(cfg.expert_feature_layer)
        expert_infos.append(
            S.ExpertInfo(
                name=name,
                backend=info["backend"],
                fingerprint=info["fingerprint"],
                feature_layer=info["feature_layer"],
                patch_grid=info["patch_grid"],
                feature_dim=info["feature_dim"],
                path=info.get("path"),
            )
        )
    settings = {
        "encoder": enc_info["name"],
        "fingerprint": enc_info["fingerprint"],
        "backend": enc_info["backend"],
        "feature_layer": cfg.feature_layer,
        "dense": cfg.dense,
        "text_context": cfg.text_context,
        "wordlist_sha256": words_sha,
        "templates": list(cfg.templates),
        "score": cfg.score,
        "top_k": cfg.top_k,
        "samples_per_shard": cfg.samples_per_shard,
        "input": str(input_path),
        "images": images_root,
        "input_digest": listing_digest(items),
        "experts": [[x.name, x.fingerprint, x.feature_layer] for x in expert_infos],
        "max_image_pixels": cfg.max_image_pixels,
    }
    digest = config_digest(settings)
    tasks_items = partition(items, cfg.samples_per_shard)

    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings, cfg.overwrite)
    write_resolved(cfg, out / S.CONFIG)
    S.write_json_atomic(out / SETTINGS, {"digest": digest, "settings": settings})
    write_wordlist(words, out / S.WORDLIST)
    emb_path = cached_word_embeddings(
        enc, words, cfg.templates, cache_dir, text_context=cfg.text_context, progress=cfg.progress
    )
    (out / S.MANIFEST).unlink(missing_ok=True)  # a root without a manifest is unfinished until we finish

    # any .tmp is a leftover of an interrupted writer (one run per OUT at a time): never a finished file
    for stale in out.glob("shard-*.tmp"):
        stale.unlink(missing_ok=True)
    done: dict[int, dict[str, Any]] = {}
    tasks = []
    for index, part in enumerate(tasks_items):
        stats = shard_is_complete(out, index)
        if stats is not None and stats.get("num_items") == len(part):
            done[index] = stats
            continue
        sidecar_path(out, index).unlink(missing_ok=True)
        tasks.append(
            {
                "index": index,
                "items": part,
                "out": str(out.resolve()),
                "word_emb_path": str(emb_path),
                "fingerprint": enc_info["fingerprint"],
            }
        )
    num_skipped = len(done)

    from tqdm.auto import tqdm

    num_todo_items = sum(len(t["items"]) for t in tasks)
    bar = tqdm(total=num_todo_items, desc="label", unit="img", disable=not cfg.progress)
    t_work = time.perf_counter()
    num_new_images = num_new_rejects = 0  # this run only (resumed shards are not counted)

    def on_done(stats: dict[str, Any]) -> None:
        nonlocal num_new_images, num_new_rejects
        done[stats["index"]] = stats
        num_new_images += stats["num_samples"]
        num_new_rejects += stats["num_rejects"]
        bar.update(stats["num_items"])
        elapsed = time.perf_counter() - t_work
        bar.set_postfix(images_per_s=f"{num_new_images / max(elapsed, 1e-9):.2f}", rejects=num_new_rejects)

    try:
        _run_tasks(tasks, cfg, on_done)
    finally:
        bar.close()
    work_s = time.perf_counter() - t_work

    ordered = [done[i] for i in range(len(tasks_items))]
    rejects = [r for s in ordered for r in s["rejects"]]
    _write_rejects(out, rejects)
    manifest = S.Manifest(
        encoder=S.EncoderInfo(**enc_info),
        wordlist=S.WordlistInfo(
            source=str(cfg.wordlist or "default:english-41k.txt"), sha256=words_sha, count=len(words)
        ),
        templates=list(cfg.templates),
        score_sign=cfg.score,
        top_k=cfg.top_k,
        shards=[
            S.ShardInfo(
                name=s["name"], num_samples=s["num_samples"], sha256=s["sha256"], num_rejects=s["num_rejects"]
            )
            for s in ordered
        ],
        num_samples=sum(s["num_samples"] for s in ordered),
        num_rejects=len(rejects),
        experts=expert_infos,
        config_digest=digest,
        tool_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    S.write_manifest(out, manifest)  # last: its presence means the root is finished
    wall_s = time.perf_counter() - t_start
    return {
        "out": str(out),
        "input_kind": kind,
        "num_images": manifest.num_samples,
        "num_rejects": manifest.num_rejects,
        "num_shards": len(ordered),
        "num_shards_skipped": num_skipped,
        "num_images_this_run": num_new_images,
        "images_per_s": num_new_images / max(work_s, 1e-9),
        "work_s": work_s,
        "wall_s": wall_s,
    }


def format_summary(summary: dict[str, Any]) -> str:
    return (
        f"labelled {summary['num_images']} images into {summary['num_shards']} shards "
        f"({summary['num_shards_skipped']} already complete), {summary['num_rejects']} rejects "
        f"-> {summary['out']}\n"
        f"this run: {summary['num_images_this_run']} images in {summary['work_s']:.1f} s "
        f"({summary['images_per_s']:.2f} images/s), wall time {summary['wall_s']:.1f} s"
    )
