"""The one reader of the shard contract: manifest, word list, the samples of a shard, and their verification.

* ``read_manifest(root)`` refuses roots that are unfinished (no manifest) or of another schema version;
* ``read_wordlist(root)``: the words label ids index into;
* ``iter_raw(path, first, end)``: the raw members (bytes) of samples ``first .. end-1`` of one tar; earlier
  samples are skipped without reading their data (tarfile seeks over members it does not extract). A tar
  that cannot be read, or ends before sample ``end - 1``, is a ``ShardFormatError`` naming it;
* ``decode_sample(raw)``: raw members -> arrays (``np.load(allow_pickle=False)``) + metadata, as they are
  (inspection); a stored image file (``image.<ext>``, schema 3 ``--store-images``) is handed on undecoded as
  ``image_bytes`` with its extension as ``image_ext`` (here and in ``decode_checked``);
* ``decode_checked(raw, layout)``: the same, strictly: every member the sample's kind needs (an image sample:
  feat, labels, scores, one array per expert, json; a text-only sample: json alone), each decodable and of
  the shape and dtype the manifest implies (``sample_layout``); anything else is a ``SampleError`` whose text
  is the reason (the trainer skips and records such a sample);
* ``iter_tar(path)``: decoded samples of a whole shard (inspection, tests);
* ``check_shard(path, info, layout, full)``: how one shard differs from its manifest record, as a list of
  problems (empty = as recorded). Always: the size (schema 2 records it), the tar structure read from its
  headers (a member that runs past the end of the file = truncation), the number of samples and of text-only
  samples, the members each sample has. ``full`` also reads every byte once: the sha256, and every sample
  through ``decode_checked``.

Any WebDataset reader (``wds.WebDataset(urls).decode()``) reads the same shards; the trainer uses this one
because its rank x worker split needs "samples i..j of shard k" (``trainer/data/shards.py``).

Letters: P patches, D feature width, K top-k slots.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from visalign.shards.schema import (
    EXPERT_PREFIX,
    FEAT,
    IMAGE_PREFIX,
    LABELS,
    MANIFEST,
    META,
    SCORES,
    WORDLIST,
    Manifest,
    ShardFormatError,
    ShardInfo,
)

ARRAY_DTYPES = {FEAT: "float16", LABELS: "int32", SCORES: "float16"}
"""the dtype of each array member (expert arrays are float16 too)"""


class SampleError(Exception):
    """One sample that cannot be used as the manifest describes it; ``str()`` is the reason (one line)."""


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


def has_image(meta: dict[str, Any]) -> bool:
    """A sample is text-only iff its json says ``"has_image": false`` (schema 2); schema 1 has images only."""
    return meta.get("has_image", True) is not False


def stored_image(raw: dict[str, Any]) -> dict[str, Any]:
    """``{"image_bytes", "image_ext"}`` of a sample that carries its image file (``image.<ext>``), else ``{}``."""
    for key, value in raw.items():
        if key.startswith(IMAGE_PREFIX):
            return {"image_bytes": value, "image_ext": key[len(IMAGE_PREFIX) :]}
    return {}


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members (bytes) -> arrays + metadata. Keys keep their contract names without extension; a
    stored image file is ``image_bytes`` (undecoded) + ``image_ext``."""
    out: dict[str, Any] = {"__key__": raw["__key__"]}
    for key, value in raw.items():
        if key.endswith(".npy"):
            out[key[: -len(".npy")]] = decode_npy(value)
        elif key == META:
            out["meta"] = json.loads(value)
    out.update(stored_image(raw))
    return out


# ---- strict decoding ---------------------------------------------------------------------------------------
def sample_layout(manifest: Manifest) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{member: (shape, dtype)}`` of an image sample's arrays, as the manifest implies them."""
    num_patches, width, top_k = manifest.num_patches, manifest.encoder.feature_dim, manifest.top_k
    layout = {
        FEAT: ((num_patches, width), ARRAY_DTYPES[FEAT]),
        LABELS: ((num_patches, top_k), ARRAY_DTYPES[LABELS]),
        SCORES: ((num_patches, top_k), ARRAY_DTYPES[SCORES]),
    }
    for expert in manifest.experts:
        grid = expert.patch_grid
        layout[f"{EXPERT_PREFIX}{expert.name}.npy"] = (
            (int(grid[0] * grid[1]), expert.feature_dim),
            "float16",
        )
    return layout


def _decode_meta(raw: dict[str, Any]) -> dict[str, Any]:
    if META not in raw:
        raise SampleError(f"no {META} member")
    try:
        meta = json.loads(raw[META])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SampleError(f"its {META} member is not valid UTF-8 JSON ({err})") from None
    if not isinstance(meta, dict):
        raise SampleError(f"its {META} member is not a JSON object")
    return meta


def _npy_array(data: bytes, name: str, shape: tuple[int, ...], dtype: str, copy: bool) -> np.ndarray | None:
    """Check one ``.npy`` member against ``(shape, dtype)`` from its header and length; return the array
    (a read-only view of ``data``) or, with ``copy=False`` and no need for it, None. Never unpickles."""
    from numpy.lib import format as npy_format

    f = io.BytesIO(data)
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            found_shape, fortran, found_dtype = npy_format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            found_shape, fortran, found_dtype = npy_format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except (ValueError, EOFError, OSError, SyntaxError) as err:
        raise SampleError(f"{name} cannot be decoded ({type(err).__name__}: {err})") from None
    if tuple(found_shape) != tuple(shape) or found_dtype != np.dtype(dtype):
        raise SampleError(
            f"{name} is {found_dtype} {list(found_shape)} but the manifest implies {dtype} {list(shape)}"
        )
    offset = f.tell()
    expected = int(np.prod(shape)) * found_dtype.itemsize
    if len(data) - offset != expected:
        raise SampleError(f"{name} holds {len(data) - offset} data bytes, not the {expected} of its header")
    if not copy:
        return None
    arr = np.frombuffer(data, dtype=found_dtype, count=int(np.prod(shape)), offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C")


def decode_checked(
    raw: dict[str, Any], layout: dict[str, tuple[tuple[int, ...], str]], arrays: bool = True
) -> dict[str, Any]:
    """``decode_sample`` with every check of the contract; raises ``SampleError`` (the reason) otherwise.

    The result also holds ``has_image`` (False for a text-only sample, which has ``meta`` only). Arrays are
    read-only views of the member bytes; ``arrays=False`` checks them without building them (verification).
    """
    meta = _decode_meta(raw)
    out: dict[str, Any] = {"__key__": raw["__key__"], "meta": meta, "has_image": has_image(meta)}
    members = sorted(k for k in raw if k.endswith(".npy"))
    if not out["has_image"]:
        if members:
            raise SampleError(f"text-only sample (has_image false) with array members {members}")
        return out
    missing = [name for name in layout if name not in raw]
    if missing:
        raise SampleError(f"image sample without {', '.join(missing)}")
    for name, (shape, dtype) in layout.items():
        arr = _npy_array(raw[name], name, shape, dtype, copy=arrays)
        if arrays:
            out[name[: -len(".npy")]] = arr
    out.update(stored_image(raw))
    return out


# ---- iterating a tar ---------------------------------------------------------------------------------------
REPAIR = (
    "restore the file from a copy, or rerun the `pipeline label` command that wrote {root}: it relabels every "
    "shard whose checksum no longer matches its record and rewrites the manifest"
)


def damaged(path: str | Path, problem: str) -> ShardFormatError:
    """The one-line error for a shard that differs from its manifest: the shard, the problem, the fix."""
    path = Path(path)
    return ShardFormatError(
        f"shard {path} differs from its manifest: {problem}; " + REPAIR.format(root=path.parent)
    )


def iter_raw(path: str | Path, first: int = 0, end: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw members (bytes) of samples ``first .. end-1`` of one tar; earlier samples are skipped unread.

    Members of one sample are consecutive and share the key before the first dot (``key.feat.npy``).
    """
    index = -1
    current: dict[str, Any] | None = None
    try:
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
    except (tarfile.TarError, EOFError) as err:
        raise damaged(path, f"it cannot be read as a tar ({type(err).__name__}: {err})") from None
    if end is not None and index + 1 < end:
        # tarfile ends quietly at a header cut off by truncation: the samples it never saw are the evidence
        raise damaged(path, f"it ends after {index + 1} samples, but sample {end - 1} was expected")


def iter_tar(path: str | Path) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard, in order (inspection, tests, debugging)."""
    for raw in iter_raw(path):
        yield decode_sample(raw)


# ---- verification ------------------------------------------------------------------------------------------
class _HashingReader(io.RawIOBase):
    """A read-only file object that feeds every byte it passes over into a sha256, so one sequential pass
    both parses the tar and checksums it. Seeking forward reads (and hashes) the gap; backward is refused
    (tarfile never needs it when every member is extracted in order)."""

    def __init__(self, f, chunk: int):
        self.f = f
        self.chunk = chunk
        self.sha = hashlib.sha256()
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        self.pos += len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or pos < self.pos:
            raise OSError(f"a checksumming read cannot seek back (to {pos} from {self.pos})")
        while self.pos < pos and self.read(min(self.chunk, pos - self.pos)):
            pass
        return self.pos

    def drain(self) -> None:
        """Hash everything left (the end-of-archive blocks belong to the checksum too)."""
        while self.read(self.chunk):
            pass


def _sample_kinds(members: list[str]) -> str:
    """'text' for a json-only sample, 'image' otherwise (what its member names say)."""
    return "text" if members == [META] else "image"


def _check_members(key: str, members: list[str], layout) -> str | None:
    if META not in members:
        return f"sample {key} has no {META} member"
    if _sample_kinds(members) == "image":
        missing = [name for name in layout if name not in members]
        if missing:
            return f"sample {key} lacks {', '.join(missing)}"
    return None


def check_shard(
    path: str | Path,
    info: ShardInfo,
    layout: dict[str, tuple[tuple[int, ...], str]],
    full: bool = True,
    chunk: int = 1 << 22,
) -> list[str]:
    """How shard ``path`` differs from its manifest record ``info`` (empty list: it does not).

    Without ``full`` only the file size and the tar headers are read (cheap: a seek per member); with
    ``full`` every byte is read once, sequentially, for the sha256 and a strict decode of every sample.
    """
    path = Path(path)
    try:
        size = os.stat(path).st_size
    except OSError as err:
        return [f"it cannot be opened ({err.strerror or err})"]
    if info.num_bytes is not None and size != info.num_bytes:
        return [f"it is {size:,} bytes but the manifest records {info.num_bytes:,} (truncated or replaced?)"]
    problems: list[str] = []
    samples: list[tuple[str, list[str]]] = []  # (key, member extensions) in order
    reader = None
    try:
        with open(path, "rb") as raw_file:
            reader = _HashingReader(raw_file, chunk) if full else None
            tar = tarfile.open(fileobj=reader or raw_file, mode="r:")
            with tar:
                current: dict[str, Any] | None = None
                for member in tar:
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > size:
                        raise tarfile.ReadError(f"member {member.name} runs past the end of the file")
                    key, _, ext = member.name.partition(".")
                    if current is None or current["__key__"] != key:
                        if current is not None and full:
                            problems += _decode_problem(current, layout)
                        current = {"__key__": key}
                        samples.append((key, []))
                    samples[-1][1].append(ext)
                    if full:
                        f = tar.extractfile(member)
                        current[ext] = f.read() if f else b""
                if current is not None and full:
                    problems += _decode_problem(current, layout)
                end = tar.offset
            # tarfile also stops quietly at a header cut off or garbled: a whole archive ends in zero blocks
            marker = os.pread(raw_file.fileno(), 2 * tarfile.BLOCKSIZE, end)
            if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
                return [f"it is truncated or damaged: no end-of-archive marker at byte {end:,} of {size:,}"]
            if reader is not None:
                reader.drain()
    except (tarfile.TarError, EOFError, OSError) as err:
        return [f"it is truncated or is not a tar ({type(err).__name__}: {err})"]
    if not full:  # (a full check decoded every sample, which covers its members)
        for key, members in samples:
            problem = _check_members(key, members, layout)
            if problem:
                problems.append(problem)
    # the most telling first: counts, then the checksum, then what is wrong inside samples
    head = []
    if len(samples) != info.num_samples:
        head.append(f"it holds {len(samples)} samples but the manifest records {info.num_samples}")
    num_text = sum(_sample_kinds(m) == "text" for _, m in samples)
    if num_text != info.num_text_only:
        head.append(f"it holds {num_text} text-only samples but the manifest records {info.num_text_only}")
    if reader is not None:
        digest = reader.sha.hexdigest()
        if digest != info.sha256:
            head.append(f"its sha256 is {digest[:16]}... but the manifest records {info.sha256[:16]}...")
    return head + problems


def _decode_problem(raw: dict[str, Any], layout) -> list[str]:
    try:
        decode_checked(raw, layout, arrays=False)
    except SampleError as err:
        return [f"sample {raw['__key__']}: {err}"]
    return []
