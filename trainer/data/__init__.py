"""Training data: shard streaming (``shards``), verification (``verify``), text formatting
(``conversations``), batching (``collate``).

``build_stream`` wires them for one rank: manifest root + tokenizer + layout -> an endless ``ShardStream`` of
batch dicts (fields in ``trainer/data/collate.py``), to be wrapped by ``make_loader``. ``verify_shards``
compares every shard with its manifest first (``--data.verify-shards``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.data.collate import Collator, SampleTransform, UnusableDataError
from trainer.data.conversations import IMAGE_TOKEN, ConversationError, Formatter
from trainer.data.shards import ShardStream, StreamLayout, make_loader, split_range
from trainer.data.verify import verify_shards
from visalign.images import Preprocess
from visalign.shards import Manifest


def build_stream(
    root: str | Path,
    manifest: Manifest,
    tokenizer: Any,
    fmt: str,
    max_length: int,
    layout: StreamLayout,
    start_batches: int = 0,
    pixels: bool = False,
    float16: bool = False,
) -> ShardStream:
    """``pixels``: decode every stored image with the manifest's preprocessing (an online vision tower);
    ``float16``: batches carry the stored float16 features and scores (converted on the device)."""
    formatter = Formatter(tokenizer, manifest.num_patches, fmt, max_length)  # type: ignore[arg-type]
    preprocess = Preprocess.from_dict(manifest.encoder.preprocess) if pixels else None
    return ShardStream(
        root,
        layout,
        transform=SampleTransform(formatter, preprocess),
        collate=Collator(formatter.pad_id, manifest, pixels=pixels, float16=float16),
        start_batches=start_batches,
        manifest=manifest,
    )


__all__ = [
    "IMAGE_TOKEN",
    "Collator",
    "ConversationError",
    "Formatter",
    "SampleTransform",
    "ShardStream",
    "StreamLayout",
    "UnusableDataError",
    "build_stream",
    "make_loader",
    "split_range",
    "verify_shards",
]
