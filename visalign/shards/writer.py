"""The one writer of the shard contract: every shard, sidecar, manifest, word list and rejects file on disk.

``pipeline label`` writes through it, and so do the test fixtures and the benchmarks: nothing else writes
shards. The rules it keeps (docs/shards.md):

* a shard is streamed into ``shard-NNNNNN.tar.tmp``, fsynced, renamed to its final name, and only then is its
  sidecar ``shard-NNNNNN.json`` (with the tar's sha256) written: a shard is complete iff both exist and the
  checksum matches, and a file with a final name is never half-written;
* tar headers are fixed (mtime 0, uid/gid 0, mode 644), so the same content always has the same bytes;
* a sample is encoded completely (arrays and JSON) before its first member is written, so a sample that
  cannot be serialised (``SampleEncodeError``, e.g. a lone surrogate in a caption, an id or a source) leaves
  the tar untouched and the caller records it as a reject;
* with ``image=(ext, data)`` an image sample also carries the image file's bytes as ``image.<ext>`` (schema 3,
  ``pipeline label --store-images``), written unchanged;
* a text-only sample (``write_text_only``) is its ``json`` member alone, with ``"has_image": false``; the
  sidecar counts them (``num_text_only``) and records the tar's size (``num_bytes``);
* JSON files and the manifest are written to a ``.tmp`` and renamed; the manifest is written last.

Letters: P patches, D feature width, K top-k slots.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from visalign.hashing import sha256_file
from visalign.shards.schema import (
    EXPERT_PREFIX,
    FEAT,
    IMAGE_PREFIX,
    LABELS,
    MANIFEST,
    META,
    REJECTS,
    SCORES,
    Manifest,
    ShardInfo,
    shard_name,
    sidecar_name,
)

COPY_BUFSIZE = 8 << 20


class SampleEncodeError(Exception):
    """A sample that cannot be serialised; ``str()`` is the reject reason."""


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def encode_json(data: Any) -> bytes:
    """UTF-8 JSON; text that UTF-8 cannot hold (lone surrogates) is a ``SampleEncodeError``."""
    try:
        return json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, TypeError, ValueError) as err:
        reason = err.reason if isinstance(err, UnicodeEncodeError) else str(err)
        raise SampleEncodeError(
            f"metadata cannot be written as UTF-8 JSON: {type(err).__name__}: {reason}"
        ) from None


def fsync_dir(path: str | Path) -> None:
    """Make a rename durable (the directory entry), where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) refuse fsync on directories; the rename itself still happened
    finally:
        os.close(fd)


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


# ---- sample keys ------------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(ident: str) -> str:
    """A tar-safe ``__key__`` for an id: no dots (WebDataset splits keys at the first dot) and no slashes.

    Ids that needed changing (or are long) get 8 hex chars of their sha1 appended, so two ids that map to
    the same safe text ("a.b", "a_b") still get distinct keys. The id itself is kept verbatim in the json.
    """
    safe = _UNSAFE.sub("_", ident)
    if safe == ident and len(ident) <= 120 and ident:
        return ident
    digest = hashlib.sha1(ident.encode("utf-8", errors="surrogatepass")).hexdigest()[:8]
    return f"{safe[:100]}_{digest}"


# ---- the word list -----------------------------------------------------------------------------------------
def wordlist_text(words: list[str]) -> str:
    """``wordlist.txt``: UTF-8, one word per line, ``\\n`` after every word (line i = word id i)."""
    return "".join(w + "\n" for w in words)


def wordlist_sha256(words: list[str]) -> str:
    """sha256 of ``wordlist.txt`` as written: the manifest's ``wordlist.sha256``."""
    return hashlib.sha256(wordlist_text(words).encode("utf-8")).hexdigest()


def write_wordlist(words: list[str], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(wordlist_text(words), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---- one shard ---------------------------------------------------------------------------------------------
def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed header fields: the same content gives the same bytes and sha256 on every run
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def encode_sample(
    key: str,
    feat_PD: np.ndarray,
    labels_PK: np.ndarray,
    scores_PK: np.ndarray,
    meta: dict[str, Any],
    experts: dict[str, np.ndarray] | None = None,
    image: tuple[str, bytes] | None = None,
) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in contract order: feat, labels, scores, experts, image, json.

    ``image``: ``(ext, data)``, the image file's own bytes and its extension (``jpg``, ``png``, ...)."""
    members = [
        (f"{key}.{FEAT}", encode_npy(np.asarray(feat_PD, dtype=np.float16))),
        (f"{key}.{LABELS}", encode_npy(np.asarray(labels_PK, dtype=np.int32))),
        (f"{key}.{SCORES}", encode_npy(np.asarray(scores_PK, dtype=np.float16))),
    ]
    for name, feats in (experts or {}).items():
        members.append((f"{key}.{EXPERT_PREFIX}{name}.npy", encode_npy(np.asarray(feats, dtype=np.float16))))
    if image is not None:
        ext, data = image
        if not re.fullmatch(r"[a-z0-9]+", ext):
            raise ValueError(f"image extension {ext!r}: lowercase letters and digits only (jpg, png, webp)")
        members.append((f"{key}.{IMAGE_PREFIX}{ext}", bytes(data)))
    members.append((f"{key}.{META}", encode_json(meta)))
    return members


def encode_text_only(key: str, meta: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The one member of a text-only sample: its json, with ``"has_image": false`` and no ``source``."""
    if "source" in meta:
        raise ValueError("a text-only sample has no 'source' (there is no image to point at)")
    return [(f"{key}.{META}", encode_json({**meta, "has_image": False}))]


class _HashingFile:
    """A write-only file that hashes (sha256) and counts what goes through it, so ``close`` never reads the
    shard back. ``tarfile`` needs only ``write`` and ``tell``."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)  # releases the GIL on large buffers, as does the write itself
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Streams samples into ``OUT/shard-NNNNNN.tar.tmp``; ``close(stats)`` publishes the tar, then the sidecar.

    Use as a context manager: leaving the block with an exception deletes the ``.tmp`` (nothing half-written
    keeps a final name); ``close`` must be called explicitly on success, with the stats for the sidecar.
    The tar's sha256 and size are computed while it is written. One thread at a time may use a writer (the
    labelling stage hands it to its writing thread).
    """

    def __init__(self, root: str | Path, index: int):
        self.root = Path(root)
        self.index = int(index)
        self.final = self.root / shard_name(self.index)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self.num_samples = 0
        self.num_text_only = 0
        self._raw = open(self.tmp, "wb")
        self._hashed = _HashingFile(self._raw)
        # copybufsize: a member's bytes go to the file (and the hash) in one piece, not in 16 KiB slices
        self._tar = tarfile.open(
            fileobj=self._hashed, mode="w", format=tarfile.PAX_FORMAT, copybufsize=COPY_BUFSIZE
        )
        self._closed = False

    def write(
        self,
        key: str,
        feat_PD: np.ndarray,
        labels_PK: np.ndarray,
        scores_PK: np.ndarray,
        meta: dict[str, Any],
        experts: dict[str, np.ndarray] | None = None,
        image: tuple[str, bytes] | None = None,
    ) -> None:
        """Append one sample; raises ``SampleEncodeError`` (nothing written) when it cannot be serialised.
        ``image``: ``(ext, data)`` to store the image file's bytes too (``image.<ext>``)."""
        members = encode_sample(key, feat_PD, labels_PK, scores_PK, meta, experts, image)
        for name, data in members:
            _add_member(self._tar, name, data)
        self.num_samples += 1

    def write_text_only(self, key: str, meta: dict[str, Any]) -> None:
        """Append one sample without an image (its ``json`` only, ``"has_image": false``); raises
        ``SampleEncodeError`` (nothing written) when it cannot be serialised."""
        for name, data in encode_text_only(key, meta):
            _add_member(self._tar, name, data)
        self.num_samples += 1
        self.num_text_only += 1

    def close(self, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """fsync + rename the tar, then write the sidecar (``stats`` + name, index, num_samples,
        num_text_only, num_bytes, sha256)."""
        self._tar.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        sha = self._hashed.sha.hexdigest()
        num_bytes = self._hashed.size
        os.replace(self.tmp, self.final)  # the final name only ever points at a complete, fsynced tar
        fsync_dir(self.root)
        sidecar = {
            "name": self.final.name,
            "index": self.index,
            "num_samples": self.num_samples,
            "num_text_only": self.num_text_only,
            **(stats or {}),
            "num_bytes": num_bytes,
            "sha256": sha,
        }
        write_json_atomic(self.root / sidecar_name(self.index), sidecar)
        self._closed = True
        return sidecar

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._tar.close()
        finally:
            self._raw.close()
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._closed:
            self.abort()


def shard_info(root: str | Path, sidecar: dict[str, Any]) -> ShardInfo:
    """The manifest's entry of a complete shard, from its sidecar (``num_bytes`` from the tar itself, so a
    sidecar written before sizes were recorded gives it too)."""
    return ShardInfo(
        name=sidecar["name"],
        num_samples=int(sidecar["num_samples"]),
        sha256=sidecar["sha256"],
        num_rejects=int(sidecar.get("num_rejects", 0)),
        num_text_only=int(sidecar.get("num_text_only", 0)),
        num_bytes=(Path(root) / sidecar["name"]).stat().st_size,
    )


def shard_is_complete(root: str | Path, index: int) -> dict[str, Any] | None:
    """The sidecar's stats if shard ``index`` is complete (tar present, sidecar present, checksum matches)."""
    final = Path(root) / shard_name(index)
    side = Path(root) / sidecar_name(index)
    if not (final.is_file() and side.is_file()):
        return None
    try:
        stats = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return None
    if not isinstance(stats, dict) or stats.get("sha256") != sha256_file(final):
        return None
    return stats


# ---- the root ----------------------------------------------------------------------------------------------
def write_rejects(root: str | Path, rejects: list[dict[str, str]]) -> Path:
    """``rejects.parquet``: one row per skipped input (id, source, reason), in input order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)

    def text(value: Any) -> str:
        # a reason or id may carry undecodable text from a broken input; parquet needs valid UTF-8
        return str(value).encode("utf-8", errors="backslashreplace").decode("utf-8")

    table = pa.table(
        {k: pa.array([text(r[k]) for r in rejects], type=pa.string()) for k in ("id", "source", "reason")}
    )
    tmp = root / (REJECTS + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(root / REJECTS)
    return root / REJECTS


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically. Call it last: its presence means the root is finished."""
    path = Path(root) / MANIFEST
    write_json_atomic(path, manifest.to_dict())
    return path
