"""The driver of ``pipeline label``: plan, prepare OUT, map ``label_shard`` over partitions, write the manifest.

Input: a ``LabelConfig``. Output: a finished ``OUT/`` (layout in ``visalign.shards`` / docs/shards.md) and a
summary dict (images, rejects, shards, images/s, wall time). ``run_label`` reads as the order of work, chosen
so that any interruption can be resumed exactly:

1. ``check_config``: fail fast on unusable settings before anything is written; then the run holds
   ``visalign.locks.FolderLock`` on OUT for the rest of its life (a second ``pipeline label`` on the same
   folder is refused, naming this one);
2. ``plan``: list the inputs, load the word list and the encoders, decide what was left unset for this tower
   (the score: the encoder family's default; feature surgery: on with ``--dense surgery``), fix the
   content-changing settings (resolved values) and the partitions (input position ``i`` always goes to shard
   ``i // samples_per_shard``);
3. ``prepare_out``: compare the settings with those recorded in ``OUT/settings.json`` by an earlier run (a
   schema-2 record read as schema 3 states it) and refuse (listing ``field: old -> new``, with a note when a
   family default replaced the old default score) unless ``--overwrite``; write ``config.yaml``, ``settings.json``,
   ``wordlist.txt``; compute the word embeddings once (disk cache);
4. ``pending_tasks``: keep complete shards (tar + sidecar with matching sha256), delete stale ``.tmp`` files;
5. ``run_tasks``: run the rest ``synchronous`` in-process, on a LocalCluster (``local``) or on an existing
   ``tcp://`` scheduler. Tasks carry paths and settings only; each worker loads the models once;
6. ``finish``: from ALL sidecars (old and new) write ``rejects.parquet`` and, last, ``manifest.json``.

Heavy imports (dask, faiss, the encoders) happen inside functions: ``pipeline --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.config import LabelConfig
from visalign import __version__
from visalign import shards as S
from visalign.config import ConfigError, write_resolved
from visalign.errors import InputError, VisalignError
from visalign.hashing import digest_of
from visalign.registry import UnknownNameError

LOCAL_SCHEDULERS = ("synchronous", "local")
REMOTE_PREFIXES = ("tcp://", "tls://", "ucx://", "inproc://")


class SettingsMismatchError(VisalignError):
    """OUT was made with other content-changing settings."""


@dataclasses.dataclass
class LabelPlan:
    """Everything ``run_label`` decides before it writes anything."""

    cfg: LabelConfig
    out: Path
    input_kind: str
    partitions: list[list[dict[str, Any]]]
    words: list[str]
    encoder: Any
    encoder_info: dict[str, Any]
    expert_infos: list[S.ExpertInfo]
    settings: dict[str, Any]
    """the content-changing settings: a rerun with other values is refused (or --overwrite)"""
    score_source: str = "user"
    """'user' (--score given) or 'family-default'"""

    @property
    def digest(self) -> str:
        return digest_of(self.settings)


SCORE_DEFAULT_BEFORE_3 = "cos"
"""the default of --score for every tower before schema 3 (roots written then record no score source)"""

POSITIVE = ("top_k", "batch_size", "samples_per_shard", "workers", "decode_threads", "max_image_pixels")
"""integer settings that must be >= 1"""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(cfg: LabelConfig) -> None:
    """One-line errors for settings that cannot work, before any slow step (and before OUT is touched)."""
    from pipeline.encoders import DENSE_MODES
    from pipeline.search import BACKENDS, SCORE_SIGNS
    from visalign.images import ASPECTS

    if cfg.score is not None and cfg.score not in SCORE_SIGNS:
        raise ConfigError(f"--score {cfg.score!r}: use one of {list(SCORE_SIGNS)} (or leave it unset)")
    if cfg.image_aspect not in ASPECTS:
        raise ConfigError(f"--image-aspect {cfg.image_aspect!r}: use one of {list(ASPECTS)}")
    if cfg.dense not in DENSE_MODES:
        raise ConfigError(f"--dense {cfg.dense!r}: use one of {list(DENSE_MODES)}")
    if cfg.search_backend not in BACKENDS:
        raise ConfigError(f"--search-backend {cfg.search_backend!r}: use auto, faiss, torch or bf16")
    numbers = {
        name: getattr(cfg, name)
        for name in (*POSITIVE, "feature_layer", "expert_feature_layer", "surgery_depth")
    }
    if cfg.text_context is not None:
        numbers["text_context"] = cfg.text_context
    if cfg.threads is not None:
        numbers["threads"] = cfg.threads
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_flag(name)} must be an integer, got {value!r}")
    for name in POSITIVE + ("surgery_depth",) + (("threads",) if cfg.threads is not None else ()):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{_flag(name)} must be >= 1, got {getattr(cfg, name)}")
    if cfg.text_context is not None and cfg.text_context < 3:
        raise ConfigError(
            f"--text-context must be >= 3 (start, word and end tokens) or unset, got {cfg.text_context}"
        )
    if cfg.feature_surgery and cfg.dense != "surgery":
        raise ConfigError(
            f"--feature-surgery true needs --dense surgery (it weighs the words with the image embedding of "
            f"CLIP Surgery's path); got --dense {cfg.dense}"
        )
    if cfg.scheduler not in LOCAL_SCHEDULERS and not cfg.scheduler.startswith(REMOTE_PREFIXES):
        raise ConfigError(
            f"--scheduler {cfg.scheduler!r}: use synchronous, local or a tcp://host:port address"
        )
    from pipeline.encoders import ENCODERS, encoder_family

    if cfg.encoder not in ENCODERS and not Path(cfg.encoder).is_dir():
        ENCODERS[cfg.encoder]  # raises UnknownNameError listing the valid names, before any slow work
    if cfg.dense != "none" and encoder_family(cfg.encoder) != "clip":
        raise ConfigError(
            f"--dense {cfg.dense}: {'CLIP Surgery' if cfg.dense == 'surgery' else 'MaskCLIP'} is defined for "
            f"CLIP towers (a class token and q-k attention to replace); {cfg.encoder} is a SigLIP tower: "
            "use --dense none"
        )
    expert_specs(cfg)
    out = Path(cfg.shards)
    if out.exists() and not out.is_dir():
        raise InputError(f"--shards {out} exists and is not a folder")


def expert_specs(cfg: LabelConfig) -> list:
    """``--experts`` parsed (``[NAME=]SOURCE``), checked without loading: names unique, registry names known,
    local ``hf:`` folders present."""
    from pipeline.encoders import ENCODERS, parse_expert
    from pipeline.encoders.backbone import HF_PREFIX, _looks_local

    specs = [parse_expert(x) for x in cfg.experts]
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--experts: the name(s) {repeated} appear twice; name them with NAME=SOURCE")
    for spec in specs:
        if spec.is_backbone:
            target = spec.source[len(HF_PREFIX) :]
            if _looks_local(target) and not Path(target).expanduser().is_dir():
                raise InputError(
                    f"--experts {spec.source}: {target} does not exist; pass a folder written with "
                    "save_pretrained (model + preprocessor_config.json) or a hub id (hf:org/name)"
                )
        elif spec.source not in ENCODERS and not Path(spec.source).is_dir():
            try:
                ENCODERS[spec.source]
            except UnknownNameError as err:
                raise UnknownNameError(
                    f"--experts {spec.source}: {err}; or a local HF CLIP/SigLIP folder, or hf:<folder or hub "
                    "id> for any HF vision backbone"
                ) from None
    return specs


def plan(cfg: LabelConfig) -> LabelPlan:
    """Inputs, word list, encoders and settings: everything that decides the content of OUT."""
    from pipeline.sources import list_inputs, listing_digest, partition
    from pipeline.task import encoder_options, get_encoder, get_expert, resolve_defaults, resolve_device
    from pipeline.wordlist import load_wordlist
    from visalign.cache import default_cache_dir

    input_path = Path(cfg.input).resolve()
    images_root = str(Path(cfg.images).resolve()) if cfg.images else None
    kind, items = list_inputs(input_path, images_root, cfg.allow_outside_images)
    if not items:
        raise InputError(f"--input {cfg.input} holds no samples")
    words = load_wordlist(cfg.wordlist, lowercase=cfg.lowercase)
    if cfg.top_k > len(words):
        raise ConfigError(
            f"--top-k {cfg.top_k} is more than the {len(words)} words of the word list "
            f"({cfg.wordlist or 'the default list'}): use --top-k {len(words)} or fewer, or a longer list"
        )
    cfg = dataclasses.replace(cfg, cache_dir=cfg.cache_dir or str(default_cache_dir()))
    device = resolve_device(cfg.device)
    enc = get_encoder(
        cfg.encoder, cfg.backend, cfg.encoder_path, device, cfg.cache_dir, **encoder_options(cfg)
    )
    enc_info = enc.info(cfg.feature_layer)
    # what the encoder saw, aspect step included: pictures and exports redraw it from the manifest
    enc_info["preprocess"] = enc.preprocess_spec.with_aspect(cfg.image_aspect).to_dict()
    cfg, score_source = resolve_defaults(cfg, enc)
    score, feature_surgery = cfg.score, cfg.feature_surgery
    expert_infos = []
    for spec in expert_specs(cfg):
        model = get_expert(spec.name, spec.source, device, cfg.cache_dir)
        expert_infos.append(S.ExpertInfo(name=spec.name, **expert_info(model, cfg)))
    settings = {
        "schema_version": S.SCHEMA_VERSION,
        "encoder": enc_info["name"],
        "fingerprint": enc_info["fingerprint"],
        "backend": enc_info["backend"],
        "feature_layer": cfg.feature_layer,
        "image_aspect": cfg.image_aspect,
        "dense": cfg.dense,
        "surgery_depth": enc.surgery_depth,
        "feature_surgery": feature_surgery,
        "text_context": cfg.text_context,
        "wordlist_sha256": S.wordlist_sha256(words),
        "templates": list(cfg.templates),
        "score": score,
        "top_k": cfg.top_k,
        "samples_per_shard": cfg.samples_per_shard,
        "input": str(input_path),
        "images": images_root,
        "allow_outside_images": cfg.allow_outside_images,
        "input_digest": listing_digest(items),
        "experts": [[x.name, x.fingerprint, x.feature_layer] for x in expert_infos],
        "max_image_pixels": cfg.max_image_pixels,
        "store_images": cfg.store_images,
    }
    return LabelPlan(
        cfg=cfg,
        out=Path(cfg.shards),
        input_kind=kind,
        partitions=partition(items, cfg.samples_per_shard),
        words=words,
        encoder=enc,
        encoder_info=enc_info,
        expert_infos=expert_infos,
        settings=settings,
        score_source=score_source,
    )


def expert_info(model, cfg: LabelConfig) -> dict[str, Any]:
    """The manifest's ``ExpertInfo`` fields (minus the name) of a loaded expert: a registry tower or an
    ``hf:`` backbone, each with its own preprocessing after the run's aspect step."""
    if hasattr(model, "expert_info"):
        return model.expert_info(cfg.expert_feature_layer, cfg.image_aspect)
    info = model.info(cfg.expert_feature_layer)
    return {
        "backend": info["backend"],
        "fingerprint": info["fingerprint"],
        "feature_layer": info["feature_layer"],
        "patch_grid": info["patch_grid"],
        "feature_dim": info["feature_dim"],
        "path": info.get("path"),
        "preprocess": model.preprocess_spec.with_aspect(cfg.image_aspect).to_dict(),
        "prefix_tokens": int(getattr(model, "num_prefix", 0)),
    }


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            lines.append(f"  {key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}")
    return lines


def _clear_outputs(out: Path) -> None:
    for p in out.iterdir():
        if p.name.startswith("shard-") or p.name in (S.MANIFEST, S.REJECTS, S.WORDLIST, S.SETTINGS, S.CONFIG):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def upgrade_settings(old: dict[str, Any]) -> dict[str, Any]:
    """Settings recorded by a schema-2 run, as schema 3 states the same content: shards without image bytes,
    no CLIP Surgery. A schema-2 root therefore resumes under schema 3 when nothing else changed (its shards
    are byte for byte what schema 3 writes with those settings)."""
    if old.get("schema_version") == 2:
        return {
            **old,
            "schema_version": 3,
            "surgery_depth": None,
            "feature_surgery": False,
            "store_images": False,
        }
    return old


def _score_hint(
    old: dict[str, Any], new: dict[str, Any], old_source: str | None, new_source: str
) -> list[str]:
    """Why the score differs when the new one is a family default: defaults changed, name the flag."""
    if old.get("score") == new.get("score") or new_source != "family-default" or old.get("score") is None:
        return []
    before = (
        f"the default of every tower before schema 3 ({SCORE_DEFAULT_BEFORE_3})"
        if old_source is None and old.get("score") == SCORE_DEFAULT_BEFORE_3
        else ("a default then" if old_source == "family-default" else "given with --score")
    )
    return [
        f"note: --score was not given, so the encoder family's default applies ({new['score']}: CLIP towers "
        f"rank by neg-cos as SEA does, SigLIP towers by cos); this folder was labelled with {old['score']}, "
        f"{before}. Pass --score {old['score']} to resume it, or --overwrite to relabel with {new['score']}"
    ]


def check_settings(out: Path, settings: dict[str, Any], overwrite: bool, score_source: str = "user") -> None:
    """Refuse an OUT made with other content-changing settings (or clear it with ``overwrite``)."""
    path = out / S.SETTINGS
    old_source = None
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        old = upgrade_settings(recorded.get("settings", {}))
        old_source = recorded.get("score_source")
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
        + "\n".join(_diff(old, settings) + _score_hint(old, settings, old_source, score_source))
    )


def prepare_out(p: LabelPlan) -> Path:
    """Settings check, config.yaml, settings.json, wordlist.txt; returns the cached word-embeddings file."""
    from pipeline.wordlist import cached_word_embeddings

    cfg, out = p.cfg, p.out
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, p.settings, cfg.overwrite, p.score_source)
    write_resolved(cfg, out / S.CONFIG)
    S.write_json_atomic(
        out / S.SETTINGS, {"digest": p.digest, "settings": p.settings, "score_source": p.score_source}
    )
    S.write_wordlist(p.words, out / S.WORDLIST)
    emb_path = cached_word_embeddings(
        p.encoder, p.words, cfg.templates, cfg.cache_dir, text_context=cfg.text_context, progress=cfg.progress
    )
    (out / S.MANIFEST).unlink(missing_ok=True)  # a root without a manifest is unfinished until we finish
    return emb_path


def pending_tasks(p: LabelPlan, emb_path: Path) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """``(tasks to run, {index: stats} of shards already complete)``; stale ``.tmp`` files are deleted."""
    out = p.out
    # any .tmp is a leftover of an interrupted writer (one run per OUT at a time): never a finished file
    for stale in out.glob("shard-*.tmp"):
        stale.unlink(missing_ok=True)
    done: dict[int, dict[str, Any]] = {}
    tasks = []
    for index, part in enumerate(p.partitions):
        stats = S.shard_is_complete(out, index)
        if stats is not None and stats.get("num_items") == len(part):
            done[index] = stats
            continue
        (out / S.sidecar_name(index)).unlink(missing_ok=True)
        tasks.append(
            {
                "index": index,
                "items": part,
                "out": str(out.resolve()),
                "word_emb_path": str(emb_path),
                "fingerprint": p.encoder_info["fingerprint"],
            }
        )
    return tasks, done


def local_threads(cfg: LabelConfig) -> int:
    """Compute threads of each LocalCluster worker: ``--threads``, else the cores shared out."""
    from pipeline.task import available_cores

    return cfg.threads or max(1, available_cores() // cfg.workers)


def run_tasks(tasks: list[dict], cfg: LabelConfig, on_done) -> None:
    """Run ``label_shard`` over tasks on the configured scheduler, calling ``on_done(stats)`` as each ends.

    Threads: Dask's nanny starts every worker with ``OMP_NUM_THREADS=1`` (one thread per worker for torch,
    oneDNN, MKL and FAISS). A LocalCluster's workers are started with the cores shared out among them
    (``local_threads``) instead, and every task sets its process's torch/FAISS threads again (``threads`` or
    ``workers_per_host`` in the task), which also covers workers started by hand for a tcp:// cluster.
    """
    from pipeline.task import label_shard

    if cfg.scheduler == "synchronous":
        for task in tasks:
            on_done(label_shard({**task, "threads": cfg.threads}, cfg))
        return
    import dask
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if cfg.scheduler == "local":
        threads = local_threads(cfg)
        # replaces Dask's whole default (OMP/MKL/OpenBLAS = 1 and MALLOC_TRIM_THRESHOLD_=65536): with a fixed
        # trim threshold glibc stops raising its mmap threshold, and every large tensor of every batch is
        # then a fresh mmap paying page faults
        env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
            cluster = LocalCluster(
                n_workers=cfg.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
        client = Client(cluster)
        extra: dict[str, Any] = {"threads": threads}
    else:
        client = Client(cfg.scheduler, timeout="30s")
        extra = {"threads": cfg.threads, "workers_per_host": workers_per_host(client)}
    try:
        # pure=False: a rerun of a task must really run; retries=1 survives one lost worker
        futures = [
            client.submit(label_shard, {**t, **extra}, cfg, pure=False, retries=1, key=f"label-{t['index']}")
            for t in tasks
        ]
        for fut in as_completed(futures):
            on_done(fut.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def workers_per_host(client) -> dict[str, int]:
    """Worker processes of a running cluster on each host (their cores are shared out among them)."""
    from distributed.comm import get_address_host

    counts: dict[str, int] = {}
    for address in client.scheduler_info(n_workers=-1)["workers"]:
        host = get_address_host(address)
        counts[host] = counts.get(host, 0) + 1
    return counts


def finish(p: LabelPlan, done: dict[int, dict[str, Any]]) -> S.Manifest:
    """rejects.parquet from every sidecar, then the manifest (last: its presence means finished)."""
    cfg = p.cfg
    ordered = [done[i] for i in range(len(p.partitions))]
    rejects = [r for s in ordered for r in s["rejects"]]
    S.write_rejects(p.out, rejects)
    shards = [S.shard_info(p.out, s) for s in ordered]
    manifest = S.Manifest(
        encoder=S.EncoderInfo(**p.encoder_info),
        wordlist=S.WordlistInfo(
            source=str(cfg.wordlist or "default:english-41k.txt"),
            sha256=S.wordlist_sha256(p.words),
            count=len(p.words),
        ),
        templates=list(cfg.templates),
        score_sign=cfg.score,
        score_source=p.score_source,
        feature_surgery=bool(cfg.feature_surgery),
        stores_images=bool(cfg.store_images),
        top_k=cfg.top_k,
        shards=shards,
        num_samples=sum(s.num_samples for s in shards),
        num_rejects=len(rejects),
        num_text_only=sum(s.num_text_only for s in shards),
        experts=p.expert_infos,
        config_digest=p.digest,
        tool_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    S.write_manifest(p.out, manifest)
    return manifest


def run_label(cfg: LabelConfig) -> dict[str, Any]:
    """Run the whole stage; return the end-of-run summary. Raises ``VisalignError`` on unusable input,
    ``FolderBusyError`` when another process is labelling into the same OUT."""
    from visalign.locks import FolderLock

    t_start = time.perf_counter()
    check_config(cfg)
    lock = FolderLock(cfg.shards, "pipeline label")
    try:
        lock.acquire()
    except OSError as err:  # an unwritable parent, a read-only filesystem
        raise InputError(
            f"--shards {cfg.shards}: cannot create or lock the folder ({err.strerror or err}); "
            "choose a folder you can write to"
        ) from None
    try:
        return _run_locked(cfg, t_start)
    finally:
        lock.release()


def _run_locked(cfg: LabelConfig, t_start: float) -> dict[str, Any]:
    from tqdm.auto import tqdm

    p = plan(cfg)
    emb_path = prepare_out(p)
    tasks, done = pending_tasks(p, emb_path)
    num_skipped = len(done)

    bar = tqdm(total=sum(len(t["items"]) for t in tasks), desc="label", unit="img", disable=not cfg.progress)
    t_work = time.perf_counter()
    num_new_images = num_new_rejects = 0  # this run only (resumed shards are not counted)

    def on_done(stats: dict[str, Any]) -> None:
        nonlocal num_new_images, num_new_rejects
        done[stats["index"]] = stats
        num_new_images += stats["num_samples"] - stats.get("num_text_only", 0)
        num_new_rejects += stats["num_rejects"]
        bar.update(stats["num_items"])
        elapsed = time.perf_counter() - t_work
        bar.set_postfix(images_per_s=f"{num_new_images / max(elapsed, 1e-9):.2f}", rejects=num_new_rejects)

    try:
        run_tasks(tasks, p.cfg, on_done)
    finally:
        bar.close()
    work_s = time.perf_counter() - t_work
    manifest = finish(p, done)
    return {
        "out": str(p.out),
        "input_kind": p.input_kind,
        "num_samples": manifest.num_samples,
        "num_images": manifest.num_samples - manifest.num_text_only,
        "num_text_only": manifest.num_text_only,
        "num_rejects": manifest.num_rejects,
        "num_shards": len(manifest.shards),
        "num_shards_skipped": num_skipped,
        "num_images_this_run": num_new_images,
        "images_per_s": num_new_images / max(work_s, 1e-9),
        "work_s": work_s,
        "wall_s": time.perf_counter() - t_start,
    }


def format_summary(summary: dict[str, Any]) -> str:
    return (
        f"labelled {summary['num_samples']} samples ({summary['num_images']} with an image, "
        f"{summary['num_text_only']} text-only) into {summary['num_shards']} shards "
        f"({summary['num_shards_skipped']} already complete), {summary['num_rejects']} rejects "
        f"-> {summary['out']}\n"
        f"this run: {summary['num_images_this_run']} images in {summary['work_s']:.1f} s "
        f"({summary['images_per_s']:.2f} images/s), wall time {summary['wall_s']:.1f} s"
    )
