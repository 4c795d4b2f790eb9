"""The pure per-shard labelling function: one input partition -> one output shard.

``label_shard(task, cfg) -> stats`` turns one input partition (a list of ``pipeline.sources`` items) into one
output shard ``OUT/shard-NNNNNN.tar`` plus its stats sidecar ``OUT/shard-NNNNNN.json``, written through the
contract's one writer (``visalign.shards.ShardWriter``). It is what Dask maps (``pipeline.driver``), what
``--scheduler synchronous`` calls in-process, and what tests call directly.

Per shard: each record is checked first with the shared validator (``visalign.samples.check_record``: what
the trainer could not use is a reject, with the validator's reason) and its json encoded once (a lone
surrogate in an id, a caption, a source or a sidecar is a reject, never an aborted run); then images are
decoded, validated and preprocessed (``--image-aspect``, ``visalign.images.Preprocess``) in a thread pool that
runs ahead of the model (bounded prefetch), so the forward pass does not wait on JPEG decoding; each batch goes
through ONE encoder forward giving the LLaVA features (hidden layer ``feature_layer``) and the joint-space
patch embeddings; the latter are searched against the cached word embeddings (``pipeline.search``; with
feature surgery, per image with the image embedding too). Optional experts (registry towers or ``hf:``
backbones, each with its own preprocessing) add their own features. With ``store_images`` the image file's
bytes, read once and decoded from those same bytes, are written next to them (``image.<ext>``). Text-only records (a LLaVA record without ``image``) skip the
forward and are written as text-only samples, in input order among the others. Caption files and ``.json``
sidecars that are not valid UTF-8 / JSON make their sample a reject (the text is what the LM is trained on;
nothing is changed or dropped silently). The shard is complete only once the writer has renamed it and
written its sidecar (sha256, size, counts, rejects, timings).

Models and the word index are loaded once per process (``_CACHE``), keyed by their spec: tasks carry only
paths and settings, never weights.

Letters: B batch, P patches, D feature width, E joint width, K top-k slots, N words.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import LabelConfig
from pipeline.sources import stable_reason
from visalign import shards as S
from visalign.config import ConfigError
from visalign.errors import InputError
from visalign.images import RejectError


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible here; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r}: use auto, cpu or cuda")
    return device


def worker_device(device: str) -> str:
    """Spread LocalCluster workers over the GPUs: worker ``i`` (Dask names them 0..n-1) gets ``cuda:i % n``.

    Only for a bare ``cuda`` with several visible GPUs inside a Dask worker; an explicit ``cuda:1``, one GPU,
    or workers pinned with ``CUDA_VISIBLE_DEVICES`` (each then sees one GPU) are left alone.
    """
    if device != "cuda":
        return device
    import torch

    num_gpus = torch.cuda.device_count()
    if num_gpus <= 1:
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not inside a Dask worker (synchronous scheduler)
        return device
    return f"cuda:{int(name) % num_gpus}" if isinstance(name, int) or str(name).isdigit() else device


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: taskset, cgroup cpusets, Slurm)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def task_threads(task: dict[str, Any]) -> int | None:
    """The compute threads a task asks for: ``threads``, else this machine's cores shared out among the
    cluster's worker processes on it (``workers_per_host``), else None (keep the process's setting)."""
    if task.get("threads"):
        return int(task["threads"])
    per_host = task.get("workers_per_host")
    if not per_host:
        return None
    try:
        from distributed import get_worker
        from distributed.comm import get_address_host

        host = get_address_host(get_worker().address)
    except (ImportError, ValueError):
        return None
    return max(1, available_cores() // max(1, per_host.get(host, 1)))


def set_threads(num: int) -> None:
    """torch's (and FAISS's, when loaded) compute threads in this process."""
    import sys

    import torch

    if torch.get_num_threads() != num:
        torch.set_num_threads(num)
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        faiss.omp_set_num_threads(num)


# ---- per-process caches: one model / index per worker process, whatever the number of tasks ----------
_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def get_encoder(
    name: str, backend: str | None, path: str | None, device: str, cache_dir: str | None, **options
):
    """Load (once per process) and return the encoder, in eval mode on ``device``."""
    key = ("encoder", name, backend, path, device, cache_dir, tuple(sorted(options.items())))
    with _CACHE_LOCK:
        if key not in _CACHE:
            from pipeline.encoders import load_encoder

            enc = load_encoder(name, backend=backend, path=path, cache_dir=cache_dir, **options)
            enc.fingerprint()  # computed before any device move, as the driver computed it
            _CACHE[key] = enc.to(device).eval()
        return _CACHE[key]


def get_expert(name: str, source: str, device: str, cache_dir: str | None):
    """Load (once per process) and return an expert (registry tower or ``hf:`` backbone) on ``device``."""
    from pipeline.encoders import ExpertSpec

    key = ("expert", name, source, device, cache_dir)
    with _CACHE_LOCK:
        if key not in _CACHE:
            from pipeline.encoders import load_expert

            model = load_expert(ExpertSpec(name=name, source=source), cache_dir=cache_dir)
            model.fingerprint()
            _CACHE[key] = model.to(device).eval()
        return _CACHE[key]


def get_index(emb_path: str, score: str, search_backend: str, device: str, feature_surgery: bool = False):
    """The word index of a run: ``WordIndex`` (one fixed matrix), or ``FeatureSurgeryIndex`` (per image)."""
    from pipeline.search import FeatureSurgeryIndex, WordIndex
    from pipeline.wordlist import load_word_embeddings

    key = ("index", emb_path, score, search_backend, device, feature_surgery)
    with _CACHE_LOCK:
        if key not in _CACHE:
            words_NE = load_word_embeddings(emb_path)
            _CACHE[key] = (
                FeatureSurgeryIndex(words_NE, score=score, device=device)
                if feature_surgery
                else WordIndex(words_NE, score=score, backend=search_backend, device=device)
            )
        return _CACHE[key]


FAMILY_SCORE = {"clip": "neg-cos", "siglip": "cos"}
"""the label score when --score is unset: SEA ranks CLIP patches by -cos (following CLIP Surgery's finding
that raw CLIP similarity maps are inverted); SEA is silent on SigLIP, where the plain cosine is kept"""


def resolve_defaults(cfg: LabelConfig, enc) -> tuple[LabelConfig, str]:
    """``cfg`` with the settings left unset decided for the tower ``enc``: the score (the family's default)
    and feature surgery (on with ``--dense surgery``); and where the score came from (``user`` or
    ``family-default``)."""
    import dataclasses

    score = cfg.score or FAMILY_SCORE[enc.family]
    feature_surgery = cfg.dense == "surgery" if cfg.feature_surgery is None else bool(cfg.feature_surgery)
    source = "user" if cfg.score else "family-default"
    return dataclasses.replace(cfg, score=score, feature_surgery=feature_surgery), source


def encoder_options(cfg: LabelConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"dense": cfg.dense, "text_context": cfg.text_context}
    if cfg.dense == "surgery":
        options["surgery_depth"] = cfg.surgery_depth
    return options


IMAGE_EXTS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
}
"""PIL format -> the extension of the stored image member (others: the format's name, lowercased)"""


def image_member(data: bytes | None, image) -> tuple[str, bytes]:
    """``(ext, bytes)`` of the ``image.<ext>`` member: the file's own bytes with the extension of the format
    PIL found in them; an image without encoded bytes (decoded from an array) is stored as PNG."""
    import io
    import re

    from PIL import Image

    if data is not None:
        with Image.open(io.BytesIO(data)) as probe:  # the header only
            fmt = probe.format
        if fmt:
            return IMAGE_EXTS.get(fmt, re.sub(r"[^a-z0-9]", "", fmt.lower()) or "bin"), data
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "png", buf.getvalue()


# ---- decoding ahead of the model ------------------------------------------------------------------------
def _text_of(data: bytes, what: str) -> str:
    """Strict UTF-8 (a leading byte-order mark, as Windows editors write, is not text)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RejectError(
            f"{what} is not valid UTF-8 ({err.reason} at byte {err.start}): re-save it as UTF-8"
        ) from None


def _record(item: dict[str, Any], tar_bytes: dict[str, bytes]) -> dict[str, Any]:
    """The sample's json (without the image fields): id + conversations, or id + caption [+ meta]."""
    meta: dict[str, Any] = {"id": item["id"]}
    if "conversations" in item:
        meta["conversations"] = item["conversations"]
        return meta
    caption = ""
    if "caption_path" in item:
        caption = _text_of(Path(item["caption_path"]).read_bytes(), "the caption file").strip()
    elif "caption_member" in item:
        data = tar_bytes.get(item["caption_member"])
        if data is None:
            raise RejectError(f"caption member {item['caption_member']!r} could not be read from the tar")
        caption = _text_of(data, "the caption member").strip()
    meta["caption"] = caption
    extra = None
    if "meta_path" in item:
        extra = Path(item["meta_path"]).read_bytes()
    elif "meta_member" in item:
        extra = tar_bytes.get(item["meta_member"])
        if extra is None:
            raise RejectError(f"metadata member {item['meta_member']!r} could not be read from the tar")
    if extra:
        try:
            meta["meta"] = json.loads(_text_of(extra, "the .json metadata"))
        except json.JSONDecodeError as err:
            raise RejectError(
                f"the .json metadata is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): "
                "fix or delete it"
            ) from None
    return meta


def _decode_item(
    item: dict[str, Any],
    tar_bytes: dict[str, bytes],
    preprocessors: list,
    max_pixels: int,
    keep_bytes: bool = False,
):
    """One item -> ``(item, [pixels per encoder] | [] for text only, meta, stored image)`` or
    ``(item, None, reason, None)``. With ``keep_bytes`` the stored image is ``image_member``'s ``(ext, bytes)``
    of the very bytes that were decoded; else None.

    Runs in a thread. The record is validated (``check_record``) and its json encoded once before the image
    is decoded, so a record the trainer could not use, or one that cannot be written (a lone surrogate in
    an id, a caption, a source or a sidecar), costs no decode and no forward.
    """
    from visalign.images import TAR_SEP, load_image
    from visalign.samples import check_record

    if item.get("reject"):
        return item, None, item["reject"], None
    try:
        meta = _record(item, tar_bytes)
        has_image = not item.get("text_only")
        problem = check_record(meta, has_image)
        if problem:
            return item, None, problem, None
        if not has_image:
            S.encode_json({**meta, "has_image": False})  # SampleEncodeError: nothing is written for it
            return item, [], meta, None
        source = item["source"]
        meta = {"id": meta["id"], "source": source, "orig_size": [0, 0], **meta}
        S.encode_json(meta)
        if TAR_SEP in source:
            data: Any = tar_bytes.get(source.split(TAR_SEP, 1)[1])
            if data is None:
                raise RejectError(
                    f"image member {source.split(TAR_SEP, 1)[1]!r} could not be read from the tar"
                )
        else:
            data = source
            if keep_bytes and Path(source).is_file():
                data = Path(source).read_bytes()  # read once: the stored bytes are the decoded bytes
        image, orig_size = load_image(data, max_pixels=max_pixels)
        pixels = [pre(image) for pre in preprocessors]
        meta["orig_size"] = list(orig_size)
        stored = image_member(data if isinstance(data, bytes) else None, image) if keep_bytes else None
        return item, pixels, meta, stored
    except (RejectError, S.SampleEncodeError) as err:
        return item, None, stable_reason(str(err)), None
    except OSError as err:  # unreadable caption sidecar, permission errors
        return item, None, stable_reason(f"unreadable input: {type(err).__name__}: {err}"), None
    except Exception as err:  # noqa: BLE001 - one odd file (a decoder bug, an exotic mode) must not stop a run
        return item, None, stable_reason(f"could not decode/preprocess: {type(err).__name__}: {err}"), None


def _prefetch(fn, items: list, num_threads: int, window: int) -> Iterator:
    """``map(fn, items)`` in order, running up to ``window`` calls ahead on ``num_threads`` threads."""
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield result


def preprocessors_for(cfg: LabelConfig, encoders: list) -> list:
    """Each encoder's own preprocessing with the run's ``--image-aspect`` (pad: each with its mean colour)."""
    return [enc.preprocess_spec.with_aspect(cfg.image_aspect) for enc in encoders]


def label_shard(task: dict[str, Any], cfg: LabelConfig) -> dict[str, Any]:
    """Label one input partition into ``OUT/shard-NNNNNN.tar`` + sidecar; return the sidecar's stats.

    ``task``: ``{"index", "items", "out", "word_emb_path", "fingerprint", "expert_fingerprints"}`` (paths
    and strings only). Safe to rerun: it always rewrites the shard from scratch through a ``.tmp`` file.
    Samples are written in input order (text-only ones among the image ones), whatever the batch size.
    """
    import torch

    from visalign.images import TAR_SEP, read_tar_members

    t_start = time.perf_counter()
    out = Path(task["out"])
    index = int(task["index"])
    device = worker_device(resolve_device(cfg.device))
    opts = encoder_options(cfg)
    enc = get_encoder(cfg.encoder, cfg.backend, cfg.encoder_path, device, cfg.cache_dir, **opts)
    if task.get("fingerprint") and enc.fingerprint() != task["fingerprint"]:
        raise InputError(
            f"worker loaded {cfg.encoder} with fingerprint {enc.fingerprint()[:12]}, the driver has "
            f"{task['fingerprint'][:12]}: workers must see the same weights/cache as the driver"
        )
    from pipeline.encoders import parse_expert

    cfg, _ = resolve_defaults(cfg, enc)  # the driver has resolved them already; a direct call may not
    specs = [parse_expert(x) for x in cfg.experts]
    experts = [get_expert(x.name, x.source, device, cfg.cache_dir) for x in specs]
    feature_surgery = bool(cfg.feature_surgery)
    index_ = get_index(task["word_emb_path"], cfg.score, cfg.search_backend, device, feature_surgery)
    threads = task_threads(task)
    if threads:
        set_threads(threads)
    items = task["items"]

    # tar inputs: read every needed member of each source tar in one pass, up front; what a damaged tar
    # does not give becomes a reject of its sample
    tar_bytes: dict[str, bytes] = {}
    wanted: dict[str, set[str]] = {}
    for item in items:
        if TAR_SEP in item["source"] and not item.get("reject"):
            tar_path, member = item["source"].split(TAR_SEP, 1)
            names = wanted.setdefault(tar_path, set())
            names.update(x for x in (member, item.get("caption_member"), item.get("meta_member")) if x)
    for tar_path, names in wanted.items():
        tar_bytes.update(read_tar_members(tar_path, names))

    preprocessors = preprocessors_for(cfg, [enc, *experts])
    position = {id(item): i for i, item in enumerate(items)}
    rejects: list[dict[str, Any]] = []  # found on this thread (decoding)
    write_rejects: list[dict[str, Any]] = []  # found on the writing thread (serialisation)
    timing = {"forward_s": 0.0, "search_s": 0.0, "wait_s": 0.0, "write_s": 0.0, "writer_wait_s": 0.0}
    on_cuda = device.startswith("cuda")
    search_on_writer = SEARCH_ON_WRITER if SEARCH_ON_WRITER is not None else on_cuda

    def reject(into: list, item: dict[str, Any], reason: str) -> None:
        into.append(
            {"id": item["id"], "source": item["source"], "reason": reason, "_position": position[id(item)]}
        )

    def forward(images: list) -> tuple[Any, Any, list]:
        """ONE encoder forward (and one per expert) over the batch's images, on this thread. The joint part is
        the patches, or (patches, image embeddings) with feature surgery."""
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=on_cuda):
            main = enc(_to_device([b[1][0] for b in images], device), feature_layer=cfg.feature_layer)
            expert_feats = [
                e(
                    _to_device([b[1][j] for b in images], device), feature_layer=cfg.expert_feature_layer
                ).feats_BPD
                for j, e in enumerate(experts, start=1)
            ]
            joint = (main.joint_BPE, main.image_BE) if feature_surgery else main.joint_BPE
            return main.feats_BPD, joint, expert_feats

    def search(joint) -> tuple[np.ndarray, np.ndarray]:
        if feature_surgery:
            joint_BPE, image_BE = joint
            return index_.search(joint_BPE.float(), image_BE.float(), cfg.top_k)
        joint_BPE = joint
        num_b, num_p, num_e = joint_BPE.shape
        labels, scores = index_.search(joint_BPE.float().reshape(num_b * num_p, num_e), cfg.top_k)
        return labels.reshape(num_b, num_p, cfg.top_k), scores.reshape(num_b, num_p, cfg.top_k)

    def write(job: tuple) -> None:
        with torch.inference_mode():
            write_batch(job)

    def write_batch(job: tuple) -> None:
        """Runs on the writing thread: (search), features to float16 on the host, every entry of the batch
        serialised and appended to the tar in input order."""
        batch, feats, joint_or_labels, expert_feats = job
        rows: dict[int, int] = {id(b[0]): r for r, b in enumerate(x for x in batch if x[1])}
        if rows:
            if search_on_writer:
                t0 = time.perf_counter()
                labels_BPK, scores_BPK = search(joint_or_labels)
                timing["search_s"] += time.perf_counter() - t0
            else:
                labels_BPK, scores_BPK = joint_or_labels
            t0 = time.perf_counter()
            feats_BPD = _host_float16(feats)
            experts_host = [_host_float16(f) for f in expert_feats]
        else:
            t0 = time.perf_counter()
        for item, pixels, meta, stored in batch:
            key = S.sample_key(meta["id"])
            try:
                if not pixels:
                    writer.write_text_only(key, meta)
                    continue
                b = rows[id(item)]
                experts_b = {spec.name: ef[b] for spec, ef in zip(specs, experts_host)}
                writer.write(key, feats_BPD[b], labels_BPK[b], scores_BPK[b], meta, experts_b, stored)
            except S.SampleEncodeError as err:
                reject(write_rejects, item, stable_reason(str(err)))
        timing["write_s"] += time.perf_counter() - t0

    def flush(batch: list[tuple[dict, list, dict, Any]], writing: _WritingThread) -> None:
        """The forward (and, on a CPU, the search) here; the rest on the writing thread."""
        images = [b for b in batch if b[1]]
        feats = joint = None
        expert_feats: list = []
        if images:
            t0 = time.perf_counter()
            feats, joint, expert_feats = forward(images)
            t1 = time.perf_counter()
            timing["forward_s"] += t1 - t0
            if not search_on_writer:
                # on a CPU the search's matmul wants every core, as the forward does: run them in turn
                with torch.inference_mode():
                    joint = search(joint)
                timing["search_s"] += time.perf_counter() - t1
        t0 = time.perf_counter()
        writing.put((batch, feats, joint, expert_feats))
        timing["writer_wait_s"] += time.perf_counter() - t0

    window = max(2 * cfg.batch_size, 2 * cfg.decode_threads)
    with S.ShardWriter(out, index) as writer:
        writing = _WritingThread(write, name=f"label-write-{index}")
        try:
            batch: list = []
            num_images = 0
            decoded = _prefetch(
                lambda it: _decode_item(it, tar_bytes, preprocessors, cfg.max_image_pixels, cfg.store_images),
                items,
                cfg.decode_threads,
                window,
            )
            while True:
                t0 = time.perf_counter()
                result = next(decoded, None)
                timing["wait_s"] += time.perf_counter() - t0
                if result is None:
                    break
                item, pixels, meta_or_reason, stored = result
                if pixels is None:
                    reject(rejects, item, meta_or_reason)
                    continue
                batch.append((item, pixels, meta_or_reason, stored))
                num_images += bool(pixels)
                if num_images == cfg.batch_size:
                    flush(batch, writing)
                    batch, num_images = [], 0
            if batch:
                flush(batch, writing)
            writing.finish()
        finally:
            writing.stop()
        timing_s = {k: round(v, 4) for k, v in timing.items()}
        timing_s["wall_s"] = round(time.perf_counter() - t_start, 4)
        timing_s["threads"] = torch.get_num_threads()
        # rejects are listed in input order whatever the moment they were found (decode vs serialisation)
        rejects = sorted(rejects + write_rejects, key=lambda r: r["_position"])
        for r in rejects:
            del r["_position"]
        return writer.close(
            {"num_items": len(items), "num_rejects": len(rejects), "rejects": rejects, "timing": timing_s}
        )


SEARCH_ON_WRITER: bool | None = None
"""Where the word search runs: ``None`` = on the writing thread on CUDA (the GPU computes it while this
thread launches the next forward) and on the main thread on a CPU (the search's matmul, like the forward,
wants every core: overlapping the two only makes them wait for each other). Tests set it to run both."""


def _to_device(pixels: list, device: str):
    import torch

    stacked = torch.stack(pixels)
    if device.startswith("cuda"):  # page-locked, so the copy overlaps the GPU's work on the last batch
        return stacked.pin_memory().to(device, non_blocking=True)
    return stacked.to(device)


def _host_float16(feats) -> np.ndarray:
    """Features as stored: float16 on the host (via float32 and numpy, as shards always were)."""
    return feats.float().cpu().numpy().astype(np.float16)


class _WritingThread:
    """One thread that consumes jobs in order; a bounded queue, so the main thread stays at most ``depth``
    batches ahead. The first error stops the work and is raised on the main thread at its next ``put`` or
    at ``finish``."""

    def __init__(self, fn, name: str, depth: int = 2):
        import queue

        self._fn = fn
        self._queue: Any = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None or self._cancelled:
                continue  # drain: the main thread must never block on a full queue
            try:
                self._fn(job)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                self._error = err

    def put(self, job) -> None:
        import queue

        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(job, timeout=0.05)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait for every job; raise the first error."""
        self.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """After a failure on the main thread: drop pending jobs and wait for the thread to end."""
        if not self._thread.is_alive():
            return
        self._cancelled = True
        self._queue.put(None)
        self._thread.join()
