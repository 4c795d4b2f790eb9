"""One writer per folder: a second holder is refused with the first one named; a dead holder never blocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from visalign.locks import LOCK_FILE, FolderBusyError, FolderLock


def test_second_holder_is_refused_and_named(tmp_path):
    with FolderLock(tmp_path, "pipeline label"):
        # another process asks for the same folder (flock is per open file: a child process is a real rival)
        code = (
            "import sys; from visalign.locks import FolderLock\n"
            f"try:\n    FolderLock({str(tmp_path)!r}, 'pipeline label').acquire()\n"
            "except Exception as err:\n    print(type(err).__name__, err); sys.exit(3)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 3, out.stderr
        assert out.stdout.startswith("FolderBusyError") and f"pid {os.getpid()}" in out.stdout
    FolderLock(tmp_path, "pipeline label").acquire().release()  # free again once released


def test_a_killed_holder_never_blocks(tmp_path):
    code = f"from visalign.locks import FolderLock\nFolderLock({str(tmp_path)!r}, 'x').acquire()\nprint('held', flush=True)\nimport time; time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusyError, match=f"pid {proc.pid}"):
            FolderLock(tmp_path, "x").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (tmp_path / LOCK_FILE).is_file()  # the file stays behind ...
    FolderLock(tmp_path, "x").acquire().release()  # ... but its lock died with the process
