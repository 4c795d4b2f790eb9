"""Where models are cached and how a cached build is published: one rule for encoders and LLMs alike.

* ``default_cache_dir()``: ``$VISALIGN_CACHE`` or ``~/.cache/visalign``. Tiny encoders live under
  ``<cache>/encoders/``, LLM folders under ``<cache>/llms/``, tokenised word lists under ``<cache>/sea_words/``.
* ``build_once(target, build)``: build into a private temporary folder and rename it into place, so concurrent
  builders (Dask workers, ranks, parallel tests) never see half a model; a folder without the ``.complete``
  marker is a crashed build and is replaced.

Only the standard library: both halves import this.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

COMPLETE = ".complete"


def default_cache_dir() -> Path:
    """``$VISALIGN_CACHE`` or ``~/.cache/visalign``."""
    env = os.environ.get("VISALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "visalign"


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` unless ``target`` already holds a finished build; publish it by rename.

    Two processes may build at once: each writes into its own temporary sibling folder and renames it into
    place; the loser of the rename race deletes its copy and uses the winner's.
    """
    target = Path(target)
    if (target / COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        if target.exists() and not (target / COMPLETE).is_file():
            shutil.rmtree(target, ignore_errors=True)  # leftover of a crashed build
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / COMPLETE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
