"""Per-sample tokenisation hook and collation into the batch dict of ``trainer/objectives/base.py``.

Input: strictly decoded shard samples (``visalign.shards.decode_checked``: ``feat`` [P, D] float16,
``labels`` [P, K] int32, ``scores`` [P, K] float16, ``expert.<name>`` [P_e, D_e], ``meta``, ``has_image``;
a text-only sample has ``meta`` alone), or ``{"skip": reason}`` for a sample the reader could not use.
``SampleTransform`` adds what ``Formatter`` gives (``input_ids``, ``text_labels``, ``visual_start``), or
marks the sample unusable when its record fails ``visalign.samples.check_record`` or the formatter raises
``ConversationError``. Given the manifest's ``Preprocess`` (an online vision tower), it also decodes the
sample's stored image (``image_bytes``) into ``pixels`` [C, S, S] float32, in the loader worker; a sample
whose stored image is missing or cannot be decoded is unusable.

Output: the batch dict (right padding to the longest sequence of the micro-batch). It is dense, with a mask
for the samples without an image:

    feats_BPD float32, labels_BPK int64, scores_BPK float32, experts {name: float32 [B, P_e, D_e]}
    (float16, as stored, from a Collator built with ``float16=True``: the trainer then converts them on the
    device, ``Trainer.to_device``, so a GPU run copies half the bytes and the loader converts nothing),
    has_image_B bool (False = a text-only sample: zero features and expert features, labels -1, scores -inf,
    visual_start -1, and no visual slots in its token sequence),
    pixels_BCHW float32 (only from a Collator built with ``pixels=True``: the preprocessed stored images,
    zeros for text-only rows),
    input_ids_BT int64, labels_BT int64 (-100 = unsupervised), attention_mask_BT int64, visual_start_B int64,
    num_target_tokens int, ids [str], slots [int], passes [int] (one per row),
    skipped [{"id", "reason", "slot", "pass"}] (the unusable samples of this micro-batch's window)

Batch formation with unusable samples: a micro-batch is always formed from ``batch_size`` consecutive
samples of its slot's stream (``trainer/data/shards.py``); unusable ones are left out, so that micro-batch
is smaller. Stream positions therefore count samples read, not samples used, and stay a pure function of
the batches consumed: a resumed run skips exactly the same samples as an uninterrupted one. A window with no
usable sample at all gives a *blank* micro-batch: one row holding a single attended pad token, nothing
supervised, no image. It adds zero to every loss and zero gradient, and keeps every rank's collectives in
step. ``MAX_CONSECUTIVE_UNUSABLE`` unusable samples in a row stop the run: that is a setting (a format the
LLM cannot render, a --max-length too short for any sample), not a few bad records.

Letters: B batch, T sequence, P patches, D feature width, K top-k slots, C S S channels and side of pixels.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from trainer.data.conversations import IGNORE_INDEX, ConversationError, Formatter
from visalign.errors import VisalignError
from visalign.images import Preprocess, RejectError, load_image
from visalign.samples import check_record
from visalign.shards import EXPERT_PREFIX, FEAT, LABELS, SCORES, Manifest, has_image, sample_layout

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_UNUSABLE = 256
SERIAL_CHUNK = 32767
"""elements per copy when a batch is filled by a process with several torch threads: below torch's parallel
grain (32768), so no copy opens a parallel region. Measured on a busy 2-core machine: a parallel region per
row waits on threads that are not scheduled (4x slower than one thread); serial chunks are as fast as one
thread. A loader worker runs one thread and copies whole rows"""


class UnusableDataError(VisalignError):
    """Every sample for a long stretch was unusable: a setting is wrong, not a few records."""


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory (what the main process maps)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def skipped_sample(sample: dict[str, Any], reason: str) -> dict[str, Any]:
    """The marker of an unusable sample: what the skip record needs, nothing else."""
    meta = sample.get("meta") if isinstance(sample.get("meta"), dict) else {}
    ident = meta.get("id") if isinstance(meta.get("id"), str) and meta.get("id") else sample["__key__"]
    return {"__key__": sample["__key__"], "id": ident, "skip": reason, "slot": sample.get("slot"),
            "pass": sample.get("pass")}  # fmt: skip


class SampleTransform:
    """Decoded shard sample -> sample with token fields (and ``pixels`` with ``preprocess``), or an
    unusable-sample marker (runs in the worker)."""

    def __init__(self, formatter: Formatter, preprocess: Preprocess | None = None):
        self.formatter = formatter
        self.preprocess = preprocess

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if "skip" in sample:
            return sample
        meta = sample.get("meta") or {}
        meta.setdefault("id", sample["__key__"])
        image = bool(sample.get("has_image", has_image(meta)))
        reason = check_record(meta, image)
        if reason is not None:
            return skipped_sample(sample, reason)
        try:
            tokens = self.formatter(meta, has_image=image)
        except ConversationError as err:
            return skipped_sample(sample, str(err))
        out = dict(sample)
        if self.preprocess is not None and image:
            stored = out.pop("image_bytes", None)
            if stored is None:
                return skipped_sample(sample, "image sample without its stored image (image.<ext> member)")
            try:
                out["pixels"] = self.preprocess(load_image(stored)[0])
            except RejectError as err:
                return skipped_sample(sample, f"stored image {out.get('image_ext')!r}: {err}")
        out["has_image"] = image
        out["input_ids"], out["text_labels"] = tokens["input_ids"], tokens["labels"]
        start = tokens["visual_start"]
        out["visual_start"] = -1 if start is None else int(start)
        return out


def _shapes_from(samples: list[dict[str, Any]]) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """The array layout read off the first image sample (when the collator was built without a manifest)."""
    for s in samples:
        if s.get("has_image", FEAT[: -len(".npy")] in s):
            return {
                f"{key}.npy": (tuple(np.asarray(value).shape), str(np.asarray(value).dtype))
                for key, value in s.items()
                if key in ("feat", "labels", "scores") or key.startswith(EXPERT_PREFIX)
            }
    return None


class Collator:
    """List of transformed samples (and unusable markers) -> the batch dict (tensors on CPU).

    ``manifest`` gives the array shapes a text-only row is filled with; without it they are read off an
    image sample of the batch (a batch of text-only samples then needs the manifest).
    """

    def __init__(
        self, pad_id: int, manifest: Manifest | None = None, pixels: bool = False, float16: bool = False
    ):
        self.pad_id = pad_id
        self.float_dtype = torch.float16 if float16 else torch.float32  # of feats, scores, experts
        self.layout = sample_layout(manifest) if manifest is not None else None
        self.consecutive_unusable = 0
        self.pixel_shape: tuple[int, int, int] | None = None
        if pixels:
            if manifest is None or not manifest.encoder.preprocess:
                raise ValueError("a Collator with pixels needs the manifest (its encoder.preprocess)")
            side = int(manifest.encoder.preprocess["image_size"])
            self.pixel_shape = (3, side, side)

    def _guard(self, samples: list[dict[str, Any]]) -> None:
        for s in samples:
            if "skip" not in s:
                self.consecutive_unusable = 0
                continue
            self.consecutive_unusable += 1
            if self.consecutive_unusable >= MAX_CONSECUTIVE_UNUSABLE:
                raise UnusableDataError(
                    f"the last {self.consecutive_unusable} samples were all unusable (the latest, "
                    f"{s['id']!r}: {s['skip']}): a setting is wrong for these shards (--data.conv-template, "
                    "--max-length, the LLM), or they need relabelling with this version's `pipeline label`"
                )

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        self._guard(samples)
        skipped = [
            {"id": s["id"], "reason": s["skip"], "slot": s["slot"], "pass": s["pass"]}
            for s in samples
            if "skip" in s
        ]
        usable = [s for s in samples if "skip" not in s]
        layout = self.layout or _shapes_from(usable)
        if not usable:
            return self.blank(skipped)
        if layout is None:
            raise ValueError("a micro-batch of text-only samples needs the Collator built with the manifest")
        num_rows = len(usable)
        max_len = max(len(s["input_ids"]) for s in usable)
        input_ids_BT = torch.full((num_rows, max_len), self.pad_id, dtype=torch.long)
        labels_BT = torch.full((num_rows, max_len), IGNORE_INDEX, dtype=torch.long)
        attention_mask_BT = torch.zeros((num_rows, max_len), dtype=torch.long)
        for i, s in enumerate(usable):
            n = len(s["input_ids"])
            input_ids_BT[i, :n] = torch.tensor(s["input_ids"], dtype=torch.long)
            labels_BT[i, :n] = torch.tensor(s["text_labels"], dtype=torch.long)
            attention_mask_BT[i, :n] = 1
        image_B = [bool(s.get("has_image", True)) for s in usable]
        arrays = self.arrays(usable, image_B, layout, self.float_dtype)
        if self.pixel_shape is not None:
            arrays["pixels_BCHW"] = self.pixels(usable, image_B)
        return {
            **arrays,
            "has_image_B": torch.tensor(image_B, dtype=torch.bool),
            "input_ids_BT": input_ids_BT,
            "labels_BT": labels_BT,
            "attention_mask_BT": attention_mask_BT,
            "visual_start_B": torch.tensor(
                [s["visual_start"] if image else -1 for s, image in zip(usable, image_B)], dtype=torch.long
            ),
            "num_target_tokens": int((labels_BT != IGNORE_INDEX).sum()),
            "ids": [s["meta"].get("id", s["__key__"]) if s.get("meta") else s["__key__"] for s in usable],
            "slots": [int(s["slot"]) for s in usable],
            "passes": [int(s["pass"]) for s in usable],
            "skipped": skipped,
        }

    @staticmethod
    def arrays(
        samples: list[dict[str, Any]], image_B: list[bool], layout, float_dtype: torch.dtype = torch.float32
    ) -> dict[str, Any]:
        """feats / labels / scores / experts of the rows; text-only rows hold the documented fill values.
        ``float_dtype``: of the float arrays (float16 = the stored values, copied without conversion)."""

        def stack(key: str, fill: float, dtype: torch.dtype) -> torch.Tensor:
            # Each row is copied straight into the batch tensor by torch's vectorised kernel, converted on
            # the way when the batch is float32 (numpy's float16 -> float32 cast is several times slower),
            # with no stacked copy in between.
            # In a DataLoader worker the batch lives in shared memory (see _empty).
            shape, _ = layout[f"{key}.npy"]
            out = _empty((len(samples), *shape), dtype)
            chunk = max(math.prod(shape), 1) if torch.get_num_threads() == 1 else SERIAL_CHUNK
            with warnings.catch_warnings():
                # the rows are read-only views of the tar bytes; torch only reads them here
                warnings.simplefilter("ignore", UserWarning)
                for row, s, image in zip(out.view(len(samples), -1), samples, image_B):
                    if not image:
                        row.fill_(fill)
                        continue
                    src = torch.from_numpy(np.asarray(s[key])).reshape(-1)
                    for i in range(0, src.numel(), chunk):
                        row[i : i + chunk].copy_(src[i : i + chunk])
            return out

        expert_keys = sorted(k[: -len(".npy")] for k in layout if k.startswith(EXPERT_PREFIX))
        return {
            "feats_BPD": stack(FEAT[: -len(".npy")], 0.0, float_dtype),
            "labels_BPK": stack(LABELS[: -len(".npy")], -1, torch.int64),
            "scores_BPK": stack(SCORES[: -len(".npy")], -np.inf, float_dtype),
            "experts": {key[len(EXPERT_PREFIX) :]: stack(key, 0.0, float_dtype) for key in expert_keys},
        }

    def pixels(self, samples: list[dict[str, Any]], image_B: list[bool]) -> torch.Tensor:
        """[B, C, S, S]: the image rows' ``pixels``, zeros for text-only rows."""
        pixels_BCHW = torch.zeros((len(samples), *self.pixel_shape), dtype=torch.float32)
        for i, (s, image) in enumerate(zip(samples, image_B)):
            if image:
                pixels_BCHW[i] = s["pixels"]
        return pixels_BCHW

    def blank(self, skipped: list[dict[str, Any]]) -> dict[str, Any]:
        """The micro-batch of a window without a usable sample: one attended pad token, nothing else."""
        if self.layout is None:
            raise ValueError(
                "a micro-batch without usable samples needs the Collator built with the manifest"
            )
        extra = {"pixels_BCHW": self.pixels([{}], [False])} if self.pixel_shape is not None else {}
        return {
            **self.arrays([{}], [False], self.layout, self.float_dtype),
            **extra,
            "has_image_B": torch.zeros(1, dtype=torch.bool),
            "input_ids_BT": torch.full((1, 1), self.pad_id, dtype=torch.long),
            "labels_BT": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
            "attention_mask_BT": torch.ones((1, 1), dtype=torch.long),
            "visual_start_B": torch.full((1,), -1, dtype=torch.long),
            "num_target_tokens": 0,
            "ids": [],
            "slots": [],
            "passes": [],
            "skipped": skipped,
        }


SKIPPED_FILE = "skipped-rank{rank}.jsonl"
_WARNED = {"count": 0}


def record_skipped(run: str | Path, rank: int, step: int, micro_batches: list[dict[str, Any]]) -> int:
    """Append this rank's unusable samples of one optimiser step to ``RUN/skipped-rank{r}.jsonl`` (one line
    each: step, id, reason, slot, pass); returns how many. The first few are also logged as warnings."""
    records = [{"step": step, **s} for b in micro_batches for s in b.get("skipped", ())]
    if not records:
        return 0
    path = Path(run) / SKIPPED_FILE.format(rank=rank)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")  # ASCII: a lone surrogate in an id stays writable
    for record in records:
        if _WARNED["count"] < 20:
            _WARNED["count"] += 1
            log.warning("skipped sample %r: %s (recorded in %s)", record["id"], record["reason"], path)
    return len(records)
