"""Verified reading: every shard is compared with its manifest record before any of its samples is trained on.

Input: a shard root, its ``Manifest``, a mode (``--data.verify-shards``), this process's rank and the world
size. Output: nothing when every shard is as recorded; otherwise a ``ShardFormatError`` on every rank, one
line naming the damaged shard(s), what differs, and the fix.

Modes (the checks themselves are ``visalign.shards.check_shard``):

* ``full`` (default): size, tar structure, sample counts, and every byte read once for the sha256 and a
  strict decode of every sample (each member present, decodable, of the manifest's shape and dtype). Catches
  any change since labelling: flipped bytes of the same size, truncation, a missing sample, a member that no
  longer decodes.
* ``size``: size, tar structure and sample counts from the tar headers only (a seek per member, no data
  read). Catches truncation, missing samples and replaced files of another size, not bytes changed in place.

Where and when: at the start of ``trainer run``, before the loader starts, so no sample of a damaged shard
reaches an optimiser step. Rank r checks shards r, r + R, ... (each shard is read once per run, not once per
rank), several shards at a time in threads (hashing and file reads release the GIL); the ranks then exchange
their findings (one ``all_gather_object``), so every rank stops with the same message, or none does.

The stamp: a ``full`` check that passes writes ``<cache>/verified-shards/<digest of the path>.json`` holding
the shard's path, size, modification and status-change times (``st_mtime_ns``, ``st_ctime_ns``) and its
manifest record. A later run finds the stamp unchanged and skips the re-hash (a rerun or a resume starts in
seconds); any write to the file, even one that restores the modification time, changes ``st_ctime_ns`` and
so voids the stamp. What a stamp cannot see is a change that bypasses the file system (silent media
corruption): delete ``<cache>/verified-shards/`` to re-hash everything. Cost: docs/trainer.md
("Verified reading"), measured with ``benchmarks/bench_verify.py``.

Shards at a URL (``visalign.shards.remote``): ``size`` compares each shard's size from one metadata request
(its headers are not walked: that would read the whole file; a shard with fewer samples than recorded is
then named when the reader reaches its end); ``full`` streams every byte once, as locally. They are never
stamped: a URL has no status-change time to void a stamp with, so each start re-hashes them (nothing is
ever written next to remote shards; ``size`` starts in seconds).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from visalign.shards import (
    Manifest,
    ShardFormatError,
    ShardInfo,
    check_shard,
    damaged,
    sample_layout,
)
from visalign.shards.reader import repair
from visalign.shards.remote import is_url

log = logging.getLogger(__name__)

VerifyMode = Literal["full", "size"]
MODES = ("full", "size")
STAMP_DIR = "verified-shards"
RULES = "full-v1"
"""names the checks a ``full`` stamp vouches for; bump it when ``check_shard`` learns a new check"""


@dataclasses.dataclass
class VerifySummary:
    """What one process did: shards checked here, found stamped, bytes read, seconds."""

    checked: int = 0
    stamped: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


def _stamp_record(path: Path | str, info: ShardInfo, layout: dict[str, Any]) -> dict[str, Any] | None:
    if is_url(path):
        return None  # no change time to vouch with: remote shards are re-hashed on every start
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {
        "rules": RULES,
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "record": dataclasses.asdict(info),
        "layout": {name: [list(shape), dtype] for name, (shape, dtype) in sorted(layout.items())},
    }


def stamp_path(cache_dir: str | Path, shard: Path) -> Path:
    digest = hashlib.sha256(str(shard.resolve()).encode("utf-8", errors="surrogatepass")).hexdigest()
    return Path(cache_dir) / STAMP_DIR / f"{digest[:32]}.json"


def is_stamped(cache_dir: str | Path | None, shard: Path, record: dict[str, Any] | None) -> bool:
    if cache_dir is None or record is None:
        return False
    try:
        return json.loads(stamp_path(cache_dir, shard).read_text(encoding="utf-8")) == record
    except (OSError, ValueError):
        return False


def write_stamp(cache_dir: str | Path, shard: Path, record: dict[str, Any]) -> None:
    path = stamp_path(cache_dir, shard)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache only costs a re-hash next time
        log.warning("cannot record the verification of %s in %s (%s)", shard, path.parent, err)


def _check_one(
    path: Path | str, info: ShardInfo, layout, mode: str, cache_dir
) -> tuple[list[str], bool, int]:
    """(problems, found stamped, bytes read) for one shard."""
    full = mode == "full"
    record = _stamp_record(path, info, layout) if full else None
    if full and is_stamped(cache_dir, path, record):
        return [], True, 0
    problems = check_shard(path, info, layout, full=full)
    after = _stamp_record(path, info, layout) if full else None
    if full and not problems and cache_dir is not None and after == record and record is not None:
        write_stamp(cache_dir, path, record)  # only if the file did not change while it was read
    if not full:
        return problems, False, 0
    return problems, False, (record or {}).get("size", info.num_bytes or 0)


def _exchange(problems: dict[str, list[str]], world_size: int) -> dict[str, list[str]]:
    """Every rank's findings on every rank (one collective), so all stop together or none does."""
    if world_size <= 1:
        return problems
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return problems
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, problems)
    merged: dict[str, list[str]] = {}
    for part in gathered:
        merged.update(part or {})
    return merged


def verify_shards(
    root: str | Path,
    manifest: Manifest,
    mode: str = "full",
    rank: int = 0,
    world_size: int = 1,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    threads: int | None = None,
    indices: list[int] | None = None,
    stamps: bool = True,
) -> VerifySummary:
    """Check this rank's share of the shards (``indices``: all of them by default), then agree with the
    other ranks; raise ``ShardFormatError`` naming every damaged shard (the first in full).

    ``cache_dir``: where the stamps live (default: the model cache, ``$VISALIGN_CACHE``); ``stamps=False``
    neither reads nor writes them."""
    if mode not in MODES:
        raise ShardFormatError(f"--data.verify-shards {mode!r}: choose one of {', '.join(MODES)}")
    root = root if is_url(root) else Path(root)
    if stamps and mode == "full" and is_url(root):
        log.info("shards at %s are re-hashed on every start (a URL cannot be stamped as verified)", root)
    if stamps and cache_dir is None:
        from visalign.cache import default_cache_dir

        cache_dir = default_cache_dir()
    cache_dir = cache_dir if stamps else None
    layout = sample_layout(manifest)
    chosen = list(range(len(manifest.shards))) if indices is None else list(indices)
    mine = [i for n, i in enumerate(chosen) if n % max(world_size, 1) == rank]
    paths = manifest.shard_paths(root)
    threads = threads or min(8, os.cpu_count() or 1)
    summary = VerifySummary()
    start = time.perf_counter()
    found: dict[str, list[str]] = {}
    bar = None
    if progress and mine:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"verifying shards ({mode})", unit="shard", dynamic_ncols=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        futures = {
            pool.submit(_check_one, paths[i], manifest.shards[i], layout, mode, cache_dir): i for i in mine
        }
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            problems, stamped, num_bytes = future.result()
            summary.checked += 1
            summary.stamped += stamped
            summary.bytes_read += num_bytes
            if problems:
                found[str(paths[i])] = problems
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    summary.seconds = time.perf_counter() - start
    log.info(
        "verified %d shards (%s) in %.1f s: %d by their stamp, %.1f MB read",
        summary.checked, mode, summary.seconds, summary.stamped, summary.bytes_read / 1e6,
    )  # fmt: skip
    found = _exchange(found, world_size)
    if found:
        raise damaged_error(root, found, len(chosen))
    return summary


def damaged_error(root: Path | str, found: dict[str, list[str]], num_checked: int) -> ShardFormatError:
    """One line: the first damaged shard with its first problem and the fix, then the others by name."""
    names = sorted(found)
    first = names[0]
    problems = found[first]
    detail = problems[0]
    if len(problems) == 2:
        detail += f", and {problems[1]}"
    elif len(problems) > 2:
        detail += f", {problems[1]}, and {len(problems) - 2} more"
    if len(names) == 1:
        return damaged(first, detail)
    # (Path(...).name is also the last part of a URL)
    others = ", ".join(Path(n).name for n in names[1:6]) + (", ..." if len(names) > 6 else "")
    return ShardFormatError(
        f"{len(names)} of {num_checked} shards of {root} differ from its manifest: shard {first}: {detail}; "
        f"also {others}; " + repair(root)
    )
