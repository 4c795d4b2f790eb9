"""The one reader of the shard contract: manifest, word list, the samples of a shard, and their verification.

Every ``root`` / ``path`` below is a local path or a URL (``visalign.shards.remote``: http(s) with the
standard library, any other protocol through fsspec); a URL root's shards are ``<root>/<name>``.

* ``read_manifest(root)`` refuses roots that are unfinished (no manifest) or of another schema version;
* ``read_wordlist(root)``: the words label ids index into;
* ``iter_raw(path, first, end)``: the raw members (bytes) of samples ``first .. end-1`` of one tar, read in
  one front-to-back pass (``TarScan`` parses the headers; earlier samples' data is passed over by a seek
  where the file seeks, read and dropped where it streams). A tar that cannot be read, or ends before sample
  ``end - 1``, is a ``ShardFormatError`` naming it;
* ``decode_sample(raw)``: raw members -> arrays (``np.load(allow_pickle=False)``) + metadata, as they are
  (inspection); a stored image file (``image.<ext>``, schema 3 ``--store-images``) is handed on undecoded as
  ``image_bytes`` with its extension as ``image_ext`` (here and in ``decode_checked``);
* ``decode_checked(raw, layout)``: the same, strictly: every member the sample's kind needs (an image sample:
  feat, labels, scores, one array per expert, json; a text-only sample: json alone), each decodable and of
  the shape and dtype the manifest implies (``sample_layout``); anything else is a ``SampleError`` whose text
  is the reason (the trainer skips and records such a sample). Arrays are read-only views of the member
  bytes (no copy); each distinct ``.npy`` header is parsed once per process;
* ``iter_tar(path)``: decoded samples of a whole shard (inspection, tests);
* ``check_shard(path, info, layout, full)``: how one shard differs from its manifest record, as a list of
  problems (empty = as recorded). Always: the size (schema 2 records it), the tar structure read from its
  headers (a member that runs past the end of the file = truncation, the end-of-archive marker), the number
  of samples and of text-only samples, the members each sample has; a URL without ``full``: its size only.
  ``full`` also reads every byte once (a URL: streamed): the sha256, and every sample through
  ``decode_checked``.

Any WebDataset reader (``wds.WebDataset(urls).decode()``) reads the same shards; the trainer uses this one
because its rank x worker split needs "samples i..j of shard k" (``trainer/data/shards.py``).

Letters: P patches, D feature width, K top-k slots.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from visalign.shards.remote import is_url, join, open_input, read_text, unreachable
from visalign.shards.remote import size as file_size
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
    """The manifest of a finished root: a local folder, or the URL of one (``visalign.shards.remote``)."""
    url = is_url(root)
    root = root if url else Path(root)
    path = join(root, MANIFEST)
    try:
        if not url and not Path(path).is_file():
            raise FileNotFoundError(path)
        data = json.loads(read_text(path))
    except FileNotFoundError as err:
        if url:
            message = (
                f"{root} has no {MANIFEST} ({err}): point --shards at the URL of the folder that holds "
                f"{MANIFEST} and the shard-*.tar files, or upload the finished `pipeline label` output there"
            )
        else:
            message = (
                f"{root} has no {MANIFEST}: it is not a finished `pipeline label` output "
                f"(run or rerun `pipeline label --shards {root}` to complete it)"
            )
        raise ShardFormatError(message) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fix = (
            "the server sent something other than the file, or its copy there is damaged; upload it again"
            if url
            else f"the root is damaged; rerun `pipeline label --shards {root}`"
        )
        raise ShardFormatError(f"{path} is not valid JSON ({err}): {fix}") from None
    return Manifest.from_dict(data)


def read_wordlist(root: str | Path) -> list[str]:
    """The words the label ids index into (line i = id i)."""
    return read_text(join(root, WORDLIST)).split("\n")[:-1]


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


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype, int]] = {}
"""exact ``.npy`` header bytes -> (shape, fortran order, dtype, data offset): every sample of a root has the
same few headers, so each is parsed (a Python literal) once per process instead of once per member"""
_NPY_HEADERS_MAX = 256


def _npy_header(data: bytes, name: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of one ``.npy`` member; ``SampleError`` if unreadable."""
    key = None
    if data[:6] == _NPY_MAGIC and len(data) >= 12:
        width = 2 if data[6] == 1 else 4  # header length field: uint16 in version 1, uint32 in 2 and 3
        key = data[: 8 + width + int.from_bytes(data[8 : 8 + width], "little")]
        hit = _NPY_HEADERS.get(key)
        if hit is not None:
            return hit
    from numpy.lib import format as npy_format

    f = io.BytesIO(data)
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy_format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except (ValueError, EOFError, OSError, SyntaxError) as err:
        raise SampleError(f"{name} cannot be decoded ({type(err).__name__}: {err})") from None
    parsed = (tuple(shape), bool(fortran), dtype, f.tell())
    if key is not None and len(key) == parsed[3] and len(_NPY_HEADERS) < _NPY_HEADERS_MAX:
        _NPY_HEADERS[key] = parsed
    return parsed


def _npy_array(data: bytes, name: str, shape: tuple[int, ...], dtype: str, copy: bool) -> np.ndarray | None:
    """Check one ``.npy`` member against ``(shape, dtype)`` from its header and length; return the array
    (a read-only view of ``data``, no copy) or, with ``copy=False`` and no need for it, None. Never
    unpickles (an object dtype cannot match the manifest's)."""
    found_shape, fortran, found_dtype, offset = _npy_header(data, name)
    if found_shape != tuple(shape) or found_dtype != np.dtype(dtype):
        raise SampleError(
            f"{name} is {found_dtype} {list(found_shape)} but the manifest implies {dtype} {list(shape)}"
        )
    count = math.prod(shape)
    expected = count * found_dtype.itemsize
    if len(data) - offset != expected:
        raise SampleError(f"{name} holds {len(data) - offset} data bytes, not the {expected} of its header")
    if not copy:
        return None
    arr = np.frombuffer(data, dtype=found_dtype, count=count, offset=offset)
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
REPAIR_REMOTE = (
    "upload it again from the `pipeline label` output it was copied from (rerun that command there first if "
    "that copy is damaged too: it relabels every shard whose checksum no longer matches its record)"
)


def repair(root: str | Path) -> str:
    """The fix for damaged shards of ``root`` (a local folder, or a URL the shards were uploaded to)."""
    return REPAIR_REMOTE if is_url(root) else REPAIR.format(root=root)


def damaged(path: str | Path, problem: str) -> ShardFormatError:
    """The one-line error for a shard that differs from its manifest: the shard, the problem, the fix."""
    root = str(path).rpartition("/")[0] if is_url(path) else Path(path).parent
    return ShardFormatError(f"shard {path} differs from its manifest: {problem}; " + repair(root))


class TarReadError(ValueError):
    """The bytes are not a tar this reader can follow (bad first header, truncated member, bad pax record)."""


BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories: their size field is not data


class TarMember:
    """One regular file of a tar: its name, data size, and where its header and data start."""

    __slots__ = ("name", "offset", "offset_data", "size")

    def __init__(self, name: str, size: int, offset: int, offset_data: int):
        self.name, self.size, self.offset, self.offset_data = name, size, offset, offset_data


def _tar_number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (first byte 0x80 / 0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_records(data: bytes) -> dict[str, bytes]:
    """``"<length> <key>=<value>\n"`` records of a pax extended header."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos]:
        space = data.find(b" ", pos)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        if length <= space - pos or data[pos + length - 1 : pos + length] != b"\n":
            raise TarReadError(f"malformed pax record at byte {pos} of its header")
        key, eq, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not eq:
            raise TarReadError(f"malformed pax record at byte {pos} of its header")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return records


class TarScan:
    """The regular members of a tar, read front to back from a binary file object (a local file, an
    http(s) stream, an fsspec file, the checksumming reader of a full check).

    Headers are parsed here: ustar (with its name prefix), pax extended and global headers, GNU long names
    and base-256 numbers (what Python's tarfile, GNU tar and webdataset write). ``read()`` returns the data
    of the member just yielded as one ``bytes`` (one copy from the file); data that is not read is passed
    over before the next header, by a seek where ``seek`` is allowed, else by reading it. Nothing ever
    seeks backward.

    Where the member list ends: ``end`` (its offset) and ``stop``: ``"zero"`` (a zero block: the
    end-of-archive marker should start there), ``"eof"`` (the file ends at a block boundary),
    ``"truncated"`` (a partial header) or ``"invalid"`` (a header whose checksum fails). Like tarfile, a bad
    header after the first ends the list quietly; callers that count samples see what is missing.
    """

    def __init__(self, f, seek: bool = True):
        self.f = f
        self.seek = seek
        self.pos = 0
        self.end: int | None = None
        self.stop: str | None = None
        self._left = 0  # data bytes of the current member not consumed yet
        self._pad = 0  # its padding to the next block

    def _read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) < n:  # a raw stream may return less; only an empty read is the end
            parts, got = [data], len(data)
            while got < n:
                more = self.f.read(n - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.pos += len(data)
        return data

    def _pass_over(self, n: int) -> None:
        if n <= 0:
            return
        if self.seek:
            self.f.seek(self.pos + n)
            self.pos += n
            return
        while n > 0:
            chunk = self._read(min(n, 1 << 22))
            if not chunk:
                return
            n -= len(chunk)

    def read(self) -> bytes:
        """The data of the member just yielded (all of it, once)."""
        want = self._left
        data = self._read(want)
        if len(data) < want:
            raise TarReadError(f"the data of a member ends after {len(data)} of its {want} bytes")
        self._left = 0
        return data

    def __iter__(self) -> Iterator[TarMember]:
        pax_global: dict[str, bytes] = {}
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        while True:
            self._pass_over(self._left + self._pad)
            self._left = self._pad = 0
            offset = self.pos
            buf = self._read(BLOCK)
            if len(buf) < BLOCK or buf == _ZERO_BLOCK:
                self.end = offset
                self.stop = "zero" if buf == _ZERO_BLOCK else ("eof" if not buf else "truncated")
                return
            parsed = _parse_header(buf)
            if parsed is None:
                if offset == 0:
                    raise TarReadError("the first header is not a tar header (bad checksum)")
                self.end, self.stop = offset, "invalid"
                return
            name, size, kind = parsed
            blocks = -(-size // BLOCK) * BLOCK
            if kind in (b"x", b"g", b"X", b"L", b"K"):
                data = self._read(blocks)[:size]
                if len(data) < size:
                    raise TarReadError(f"an extended header at byte {offset} is cut off")
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0]
                elif kind == b"g":
                    pax_global.update(_pax_records(data))
                elif kind != b"K":
                    pax.update(_pax_records(data))
                continue
            if kind == b"S":
                raise TarReadError(
                    f"member {name} at byte {offset} is a sparse file, which shards never hold"
                )
            fields = {**pax_global, **pax}
            if long_name is not None:
                name = long_name.decode("utf-8", "surrogateescape")
            if "path" in fields:
                name = fields["path"].decode("utf-8", "surrogateescape")
            if "size" in fields:
                size = int(fields["size"])
                blocks = -(-size // BLOCK) * BLOCK
            pax, long_name = {}, None
            if kind in _NO_DATA:
                continue
            self._left, self._pad = size, blocks - size
            if kind in _REGULAR and not (kind == b"\0" and name.endswith("/")):
                yield TarMember(name, size, offset, self.pos)

    def end_marker(self) -> bool:
        """After iterating: whether the end-of-archive marker (two zero blocks) is where the list stopped."""
        return self.stop == "zero" and self._read(BLOCK) == _ZERO_BLOCK


def _parse_header(buf: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, type flag) of one 512-byte header, or None when its checksum does not match."""
    try:
        checksum = _tar_number(buf[148:156])
        size = _tar_number(buf[124:136])
    except ValueError:
        return None
    unsigned = 256 + sum(buf) - sum(buf[148:156])
    if checksum != unsigned:  # some old tars summed signed chars
        signed = unsigned - 256 * sum(1 for b in buf[:148] + buf[156:] if b > 127)
        if checksum != signed:
            return None
    name = buf[:100].split(b"\0", 1)[0]
    kind = buf[156:157]
    prefix = buf[345:500].split(b"\0", 1)[0]
    if prefix and kind not in (b"L", b"K", b"S"):  # ustar keeps long names as prefix "/" name
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, kind


def iter_raw(path: str | Path, first: int = 0, end: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw members (bytes) of samples ``first .. end-1`` of one tar (a path or a URL); the data of earlier
    samples is passed over unread (a seek) where the file seeks, read and dropped where it streams.

    Members of one sample are consecutive and share the key before the first dot (``key.feat.npy``).
    """
    index = -1
    current: dict[str, Any] | None = None
    try:
        with open_input(path) as f:
            scan = TarScan(f)
            for member in scan:
                key, _, ext = member.name.partition(".")
                if current is None or current["__key__"] != key:
                    if current is not None and index >= first:
                        yield current
                    index += 1
                    current = {"__key__": key}
                    if end is not None and index >= end:
                        return
                if index >= first:
                    current[ext] = scan.read()
            if current is not None and index >= first and (end is None or index < end):
                yield current
    except TarReadError as err:
        raise damaged(path, f"it cannot be read as a tar ({err})") from None
    except OSError as err:
        if not is_url(path):
            raise
        raise unreachable(str(path), err) from None
    if end is not None and index + 1 < end:
        # a tar cut off at a header ends the member list quietly: the samples never seen are the evidence
        raise damaged(path, f"it ends after {index + 1} samples, but sample {end - 1} was expected")


def iter_tar(path: str | Path) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard, in order (inspection, tests, debugging)."""
    for raw in iter_raw(path):
        yield decode_sample(raw)


# ---- verification ------------------------------------------------------------------------------------------
class _HashingReader(io.RawIOBase):
    """A read-only file object that feeds every byte it passes over into a sha256, so one sequential pass
    both parses the tar and checksums it."""

    def __init__(self, f, chunk: int):
        self.f = f
        self.chunk = chunk
        self.sha = hashlib.sha256()
        self.pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        self.pos += len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

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
    """How shard ``path`` (a path or a URL) differs from its manifest record ``info`` (empty list: it does
    not).

    Without ``full``: the size, and for a local file the tar headers too (cheap: a seek per member); a URL
    is checked by its size alone (one metadata request: walking its headers would read the whole file).
    With ``full`` every byte is read once, sequentially (streamed for a URL), for the sha256 and a strict
    decode of every sample.
    """
    url = is_url(path)
    path = path if url else Path(path)
    try:
        size = file_size(path)
    except OSError as err:
        return [f"it cannot be opened ({getattr(err, 'strerror', None) or err})"]
    if info.num_bytes is not None and size is not None and size != info.num_bytes:
        return [f"it is {size:,} bytes but the manifest records {info.num_bytes:,} (truncated or replaced?)"]
    if url and not full:
        return []
    problems: list[str] = []
    samples: list[tuple[str, list[str]]] = []  # (key, member extensions) in order
    reader = None
    try:
        with open_input(path) as raw_file:
            reader = _HashingReader(raw_file, chunk) if full else None
            scan = TarScan(reader or raw_file, seek=reader is None)
            current: dict[str, Any] | None = None
            for member in scan:
                if size is not None and member.offset_data + member.size > size:
                    raise TarReadError(f"member {member.name} runs past the end of the file")
                key, _, ext = member.name.partition(".")
                if current is None or current["__key__"] != key:
                    if current is not None and full:
                        problems += _decode_problem(current, layout)
                    current = {"__key__": key}
                    samples.append((key, []))
                samples[-1][1].append(ext)
                if full:
                    current[ext] = scan.read()
            if current is not None and full:
                problems += _decode_problem(current, layout)
            # a whole archive ends in two zero blocks: a header cut off or garbled ends the list before them
            if not scan.end_marker():
                where = f"at byte {scan.end:,}" + (f" of {size:,}" if size is not None else "")
                return [f"it is truncated or damaged: no end-of-archive marker {where}"]
            if reader is not None:
                reader.drain()
    except TarReadError as err:
        return [f"it is truncated or is not a tar ({err})"]
    except OSError as err:
        if url:
            raise unreachable(str(path), err) from None
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
