"""Where shards live: a local folder or a URL; one way to open, size and name what is inside either.

Input: a shard root as the user gave it (``--shards``): a local path, or a URL of the folder that holds
``manifest.json`` and the ``shard-*.tar`` files:

* ``http://`` and ``https://``: read with the standard library (``urllib``), one streaming GET per shard
  read; a seek forward is a ``Range`` request when the server honours ranges (``206``), else the bytes in
  between are read and dropped. No extra package, any static file server works;
* every other ``protocol://`` (``s3://``, ``gs://``, ``az://``, ``file://``, ``memory://``, ...): through
  fsspec, with the protocol's own package (``s3fs``, ``gcsfs``, ``adlfs``, ...) imported only when such a URL
  is used. Files are opened with a large read-ahead block, so a sequential read of a shard is a few big
  requests rather than one per tar member.

Output: ``join`` (the location of a file of the root), ``open_input`` (a binary, readable, forward-seekable
file object), ``size`` (bytes, or None when the server does not say), ``read_text``. Failures a user can fix
are ``ShardAccessError``s naming the URL and the fix (a package to install, a server that cannot be reached
or refuses access); a file that is not there stays a ``FileNotFoundError`` for the caller, which knows what
the file was for (a missing manifest means an unfinished or wrong root). Webdataset's ``pipe:`` commands are
not accepted: the trainer needs the folder (the manifest next to the shards), which a command stream does
not name.

Only the standard library at import time: the trainer imports this on nodes without fsspec's extras.
"""

from __future__ import annotations

import http.client
import io
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from visalign.errors import VisalignError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

HTTP_TIMEOUT = 60.0
"""seconds a connect or a read of an http(s) shard may stall before it counts as failed"""
HTTP_RETRIES = 3
"""times a broken http(s) stream is reopened at the byte it stopped at before the read fails"""
HTTP_DISCARD = 4 << 20
"""a seek forward up to this many bytes reads and drops them; further, it opens a ``Range`` request"""
FSSPEC_BLOCK = 16 << 20
"""fsspec read-ahead block: one request per this many bytes of a sequential read"""
STREAM_BUFFER = 1 << 20
"""buffer of an http(s) stream, so the 512-byte tar headers do not each reach the socket"""

PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "adl": "adlfs",
    "sftp": "paramiko",
    "ssh": "paramiko",
    "hf": "huggingface_hub",
    "webdav": "webdav4",
}
"""protocol -> the package whose fsspec filesystem reads it (named in the error when it is missing)"""


class ShardAccessError(VisalignError):
    """A shard root or file that cannot be reached: a missing package, an unreachable server, no access."""


def is_url(location: str | Path) -> bool:
    """True for ``protocol://...`` strings (a ``Path`` is always local)."""
    return isinstance(location, str) and _URL.match(location) is not None


def protocol(url: str) -> str:
    match = _URL.match(url)
    return match.group(1).lower() if match else ""


def join(root: str | Path, name: str) -> str | Path:
    """The location of file ``name`` of root ``root``: a URL under a URL root, else a ``Path``."""
    if is_url(root):
        return str(root).rstrip("/") + "/" + name
    return Path(root) / name


# ---- opening -----------------------------------------------------------------------------------------------
def open_input(location: str | Path) -> IO[bytes]:
    """A binary file object reading ``location`` from its start; seekable forward (a URL's backward seeks
    may cost a new request). ``FileNotFoundError`` when it does not exist; ``ShardAccessError`` when it
    cannot be reached."""
    if not is_url(location):
        return open(location, "rb")
    url = str(location)
    if protocol(url) in ("http", "https"):
        return io.BufferedReader(HTTPStream(url), STREAM_BUFFER)
    fs, path = _fsspec(url)
    try:
        return fs.open(path, "rb", block_size=FSSPEC_BLOCK, cache_type="readahead")
    except FileNotFoundError:
        raise
    except OSError as err:
        raise unreachable(url, err) from None


def size(location: str | Path) -> int | None:
    """Bytes of the file at ``location`` (one metadata request for a URL); None when the server does not
    say. ``FileNotFoundError`` when it does not exist."""
    if not is_url(location):
        return Path(location).stat().st_size
    url = str(location)
    if protocol(url) in ("http", "https"):
        return _http_size(url)
    fs, path = _fsspec(url)
    try:
        value = fs.size(path)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise unreachable(url, err) from None
    return None if value is None else int(value)


def read_text(location: str | Path) -> str:
    """The whole file as UTF-8 text with universal newlines (what ``open(path, encoding="utf-8")`` reads)."""
    with io.TextIOWrapper(open_input(location), encoding="utf-8") as f:
        return f.read()


def unreachable(url: str, err: BaseException) -> ShardAccessError:
    reason = f"{type(err).__name__}: {err}".strip()
    return ShardAccessError(
        f"cannot read {url} ({reason}): check the address, that the server is running and that this machine "
        "may read it, or copy the shards to a local folder and pass that"
    )


def _fsspec(url: str):
    """(filesystem, path) for a non-http URL; the clear error when fsspec or the protocol's package is
    missing, or the protocol is unknown."""
    name = protocol(url)
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise ShardAccessError(
            f"{url}: reading {name}:// URLs needs fsspec (pip install fsspec"
            + (f" {PACKAGES[name]}" if name in PACKAGES else "")
            + ")"
        ) from None
    try:
        return url_to_fs(url)
    except ImportError as err:
        package = PACKAGES.get(name)
        hint = f"pip install {package}" if package else str(err)
        raise ShardAccessError(
            f"{url}: reading {name}:// URLs needs a package that is not installed ({hint})"
        ) from None
    except ValueError as err:
        if "protocol not known" in str(err).lower():
            raise ShardAccessError(
                f"{url}: unknown protocol {name!r}; use a local folder, http(s)://, or a protocol fsspec "
                "reads (s3://, gs://, az://, file://, ...)"
            ) from None
        raise


# ---- http(s) without extra packages ------------------------------------------------------------------------
def _request(url: str, start: int = 0, end: int | None = None):
    headers = {}
    if start or end is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end}"
    req = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(req, timeout=HTTP_TIMEOUT)  # noqa: S310 (the user's own URL)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code in (404, 410):
            raise FileNotFoundError(f"{url} (HTTP {err.code})") from None
        if err.code == 416:  # a range at or past the end: the caller sees an empty read
            return None
        raise ShardAccessError(
            f"cannot read {url}: the server answers HTTP {err.code} {err.reason}; check the URL and that this "
            "machine may read it"
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise unreachable(url, reason if isinstance(reason, BaseException) else err) from None


def _http_size(url: str) -> int | None:
    """From a GET of the first byte (not HEAD, which some servers and signed URLs refuse): the total in
    ``Content-Range`` when the server honours the range, else the whole file's ``Content-Length`` (the
    body is not read: the connection is closed)."""
    resp = _request(url, start=0, end=0)
    if resp is None:  # 416: not even byte 0 exists
        return 0
    with resp:
        if resp.status == 206:
            total = resp.headers.get("Content-Range", "").rpartition("/")[2]
            return int(total) if total.isdigit() else None
        length = resp.headers.get("Content-Length")
        return int(length) if length is not None and length.isdigit() else None


class HTTPStream(io.RawIOBase):
    """One http(s) file as a raw, forward-seekable stream: a single GET streamed from the current byte;
    a broken connection is reopened at the byte it stopped at (``HTTP_RETRIES`` times)."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.pos = 0
        self.ranges = True  # until a server answers a range request with the whole file
        self._resp = None
        self._open(0)

    def _open(self, pos: int) -> None:
        if self._resp is not None:
            self._resp.close()
        resp = _request(self.url, start=pos)
        self._resp, self.pos = resp, pos
        if resp is not None and pos and resp.status != 206:
            self.ranges = False  # the server ignores Range: it sends from byte 0, so read up to pos
            self.pos = 0
            self._discard(pos)

    def _discard(self, target: int) -> None:
        buf = bytearray(min(STREAM_BUFFER, max(target - self.pos, 1)))
        while self.pos < target:
            n = self.readinto(memoryview(buf)[: min(len(buf), target - self.pos)])
            if not n:
                break

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        if self._resp is None:
            return 0
        for attempt in range(HTTP_RETRIES + 1):
            try:
                n = self._resp.readinto(buf)
                if not n and len(buf) and self._resp.length:
                    # http.client ends a body cut short quietly; its Content-Length says it was
                    raise http.client.IncompleteRead(b"", self._resp.length)
                self.pos += n
                return n
            except (OSError, http.client.HTTPException) as err:  # reset, timeout, a body cut short
                if attempt == HTTP_RETRIES:
                    raise ShardAccessError(
                        f"reading {self.url} failed at byte {self.pos:,} after {HTTP_RETRIES} retries "
                        f"({type(err).__name__}: {err}): check the server and the network, then rerun "
                        "(with --resume: nothing before the last checkpoint is lost)"
                    ) from None
                time.sleep(0.5 * 2**attempt)
                self._open(self.pos)
        return 0

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: pos, io.SEEK_CUR: self.pos + pos}.get(whence)
        if target is None:
            raise OSError("an http(s) stream seeks from the start or the current position only")
        if target == self.pos:
            return self.pos
        if self.pos < target <= self.pos + HTTP_DISCARD or (target > self.pos and not self.ranges):
            self._discard(target)
        else:
            self._open(target)
        return self.pos

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        super().close()
