"""The one reader of the shard contract: manifest, word list, and the samples of a shard.

* ``read_manifest(root)`` refuses roots that are unfinished (no manifest) or of another schema version;
* ``read_wordlist(root)``: the words label ids index into;
* ``iter_raw(path, first, end)``: the raw members (bytes) of samples ``first .. end-1`` of one tar; earlier
  samples are skipped without reading their data (tarfile seeks over members it does not extract);
* ``decode_sample(raw)``: raw members -> arrays (``np.load(allow_pickle=False)``) + metadata;
* ``iter_tar(path)``: decoded samples of a whole shard (inspection, tests).

Any WebDataset reader (``wds.WebDataset(urls).decode()``) reads the same shards; the trainer uses this one
because its rank x worker split needs "samples i..j of shard k" (``trainer/data/shards.py``).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from visalign.shards.schema import MANIFEST, META, WORDLIST, Manifest, ShardFormatError


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ShardFormatError(
            f"{root} has no {MANIFEST}: it is not a finished `pipeline label` output "
            f"(run or rerun `pipeline label --shards {root}` to complete it)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardFormatError(
            f"{path} is not valid JSON ({err}): the root is damaged; rerun `pipeline label --shards {root}`"
        ) from None
    return Manifest.from_dict(data)


def read_wordlist(root: str | Path) -> list[str]:
    """The words the label ids index into (line i = id i)."""
    with open(Path(root) / WORDLIST, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members (bytes) -> arrays + metadata. Keys keep their contract names without extension."""
    out: dict[str, Any] = {"__key__": raw["__key__"]}
    for key, value in raw.items():
        if key.endswith(".npy"):
            out[key[: -len(".npy")]] = decode_npy(value)
        elif key == META:
            out["meta"] = json.loads(value)
    return out


def iter_raw(path: str | Path, first: int = 0, end: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw members (bytes) of samples ``first .. end-1`` of one tar; earlier samples are skipped unread.

    Members of one sample are consecutive and share the key before the first dot (``key.feat.npy``).
    """
    index = -1
    current: dict[str, Any] | None = None
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current is None or current["__key__"] != key:
                if current is not None and index >= first:
                    yield current
                index += 1
                current = {"__key__": key}
                if end is not None and index >= end:
                    return
            if index >= first:  # tarfile seeks over the data of members we never extract
                f = tar.extractfile(member)
                current[ext] = f.read() if f else b""
        if current is not None and index >= first and (end is None or index < end):
            yield current


def iter_tar(path: str | Path) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard, in order (inspection, tests, debugging)."""
    for raw in iter_raw(path):
        yield decode_sample(raw)
