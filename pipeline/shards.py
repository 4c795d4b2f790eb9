"""The on-disk contract between ``pipeline`` (writer) and ``trainer`` (reader). Documented in docs/shards.md.

Layout of an output root ``OUT/``::

    OUT/manifest.json        Manifest below; written last, atomically: a root without it is not finished
    OUT/wordlist.txt         the normalised word list the labels index into (line i = word id i)
    OUT/rejects.parquet      id, source, reason of every input that was skipped
    OUT/config.yaml          the resolved LabelConfig
    OUT/settings.json        the content-changing settings + digest (a rerun with others is refused)
    OUT/shard-000000.tar     WebDataset shards; written as .tar.tmp and renamed when complete
    OUT/shard-000000.json    per-shard stats sidecar (its presence + checksum marks the shard done)

Each sample in a shard (``__key__`` = sample id, made tar-safe):

    feat.npy     float16 [P, D]   LLM-input features (encoder hidden layer ``feature_layer``, patch tokens)
    labels.npy   int32   [P, K]   word ids into wordlist.txt, -1 = absent (score < 0 or fewer than K words)
    scores.npy   float16 [P, K]   label scores, descending per row (absent slots hold -inf)
    expert.<name>.npy  float16 [P_e, D_e]   optional features of extra expert encoders (distillation)
    json         {"id", "source", "orig_size": [w, h], "conversations": [...]} or {"caption": ...}

Letters: P patches, D feature width, K top-k slots.

Bump ``SCHEMA_VERSION`` on any change a reader must know about; readers refuse other versions with a message.
Only numpy/json here: the trainer imports this on nodes without Dask or FAISS. Never unpickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WORDLIST = "wordlist.txt"
REJECTS = "rejects.parquet"
CONFIG = "config.yaml"
SHARD_PATTERN = "shard-{:06d}.tar"

FEAT = "feat.npy"
LABELS = "labels.npy"
SCORES = "scores.npy"
META = "json"
EXPERT_PREFIX = "expert."  # expert.<name>.npy


class ShardFormatError(ValueError):
    """Shards this version cannot read, or a manifest that contradicts what a run expects."""


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass
class EncoderInfo:
    name: str
    backend: str
    fingerprint: str
    """sha256 over the encoder's config and weights: two roots with the same fingerprint used the same tower."""
    image_size: int
    feature_layer: int
    patch_grid: list[int]
    feature_dim: int
    joint_dim: int
    path: str | None = None
    feature_dtype: str = "float16"


@dataclasses.dataclass
class ExpertInfo:
    name: str
    backend: str
    fingerprint: str
    feature_layer: int
    patch_grid: list[int]
    feature_dim: int
    path: str | None = None


@dataclasses.dataclass
class WordlistInfo:
    source: str
    """the path the user gave (informational); the copy in OUT/wordlist.txt is what ids index into"""
    sha256: str
    """sha256 of the normalised list (OUT/wordlist.txt)"""
    count: int


@dataclasses.dataclass
class ShardInfo:
    name: str
    num_samples: int
    sha256: str
    num_rejects: int = 0


@dataclasses.dataclass
class Manifest:
    encoder: EncoderInfo
    wordlist: WordlistInfo
    templates: list[str]
    score_sign: str
    """'cos' or 'neg-cos' (SEA/CLIP Surgery negate the cosine for CLIP)"""
    top_k: int
    shards: list[ShardInfo]
    num_samples: int
    num_rejects: int
    experts: list[ExpertInfo] = dataclasses.field(default_factory=list)
    config_digest: str = ""
    """sha256 of the settings that change shard content; a rerun with another digest is refused"""
    tool_version: str = ""
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def num_patches(self) -> int:
        return int(self.encoder.patch_grid[0] * self.encoder.patch_grid[1])

    def shard_paths(self, root: str | Path) -> list[Path]:
        return [Path(root) / s.name for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ShardFormatError(
                f"shard schema version {version!r}, but this visalign reads version {SCHEMA_VERSION}: "
                "relabel with this version's `pipeline label`, or install the visalign that wrote them"
            )
        data = dict(data)
        data["encoder"] = EncoderInfo(**data["encoder"])
        data["wordlist"] = WordlistInfo(**data["wordlist"])
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        data["experts"] = [ExpertInfo(**e) for e in data.get("experts", [])]
        return cls(**data)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write-then-rename so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    path = Path(root) / MANIFEST
    write_json_atomic(path, manifest.to_dict())
    return path


def read_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ShardFormatError(
            f"{root} has no {MANIFEST}: it is not a finished `pipeline label` output "
            "(run or rerun `pipeline label --shards {root}` to complete it)"
        )
    with open(path, encoding="utf-8") as f:
        return Manifest.from_dict(json.load(f))


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


def iter_tar(path: str | Path) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard, in order; for tests, `pipeline info/show` and debugging.

    The trainer streams the same members through ``trainer.data.shards`` (sample-range reads for its split).
    """
    with tarfile.open(path, "r") as tar:
        current: dict[str, Any] | None = None
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current is not None and current["__key__"] != key:
                yield decode_sample(current)
                current = None
            if current is None:
                current = {"__key__": key}
            f = tar.extractfile(member)
            current[ext] = f.read() if f else b""
        if current is not None:
            yield decode_sample(current)
