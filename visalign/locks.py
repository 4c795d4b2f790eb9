"""One writer per output folder: an exclusive lock that a second process is refused, naming the holder.

``FolderLock(folder, what)`` takes an advisory ``flock`` on ``folder/.visalign.lock`` for the life of the
``with`` block (``pipeline label`` on ``--shards``, ``trainer run`` on ``--output``). A second process that asks
for the same folder gets ``FolderBusyError`` at once (no waiting): one line naming the holder's command, pid,
host and start time, read from the lock file.

Stale locks never block: the kernel drops a ``flock`` when its process exits, however it exits (kill -9
included), so a lock file left behind by a dead process is simply taken over. On Linux, ``flock`` also works
across NFS clients (it is emulated with byte-range locks); on filesystems without working locks the lock is
advisory only, which the error message cannot detect. Only the standard library.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from visalign.errors import VisalignError

LOCK_FILE = ".visalign.lock"


class FolderBusyError(VisalignError):
    """Another live process holds the folder."""


class FolderLock:
    def __init__(self, folder: str | Path, what: str):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return (
                f"`{info.get('command', '?')}` (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
                f"since {info.get('since', '?')})"
            )
        except (OSError, ValueError):
            return "another process"

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(
                f"{self.folder} is in use by {self._holder()}: one {self.what} per folder at a time; wait for it "
                "to finish or choose another folder"
            ) from None
        info = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
