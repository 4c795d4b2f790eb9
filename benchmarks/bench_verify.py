"""What verified reading costs: checking shards against their manifest vs just reading them.

Writes ``--samples`` CLIP-L/336-sized samples (features 576 x 1024 float16 = 1.18 MB, labels and scores
576 x 10) through the one writer, ``visalign.shards.ShardWriter``, then times on the same files:

* ``read``: what the trainer's loader does with every sample once (``iter_raw`` + ``decode_checked``), one
  process, one thread: the cost that training pays anyway;
* ``sha256``: ``visalign.hashing.sha256_file`` over every tar, one thread: the floor of a full check;
* ``verify full``: ``trainer.data.verify.verify_shards(mode="full")`` with ``--threads`` threads, no stamp;
* ``verify full, stamped``: the same a second time with the stamps of the first (a rerun, a resume);
* ``verify size``: ``mode="size"`` (file size + tar headers only).

``cold`` rows first drop the shards from the page cache (``posix_fadvise(DONTNEED)``, no root needed), so the
disk is read; ``warm`` rows read from memory. Ratios are against ``read`` of the same temperature.

    .venv/bin/python benchmarks/bench_verify.py                      # 2,000 samples, 250 per shard
    .venv/bin/python benchmarks/bench_verify.py --samples 2000 --samples-per-shard 1000 --threads 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

P, D, K = 576, 1024, 10


def write_root(root: Path, num_samples: int, per_shard: int) -> None:
    from visalign import shards as S

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(1000)]
    S.write_wordlist(words, root / S.WORDLIST)
    feat = rng.standard_normal((P, D)).astype(np.float16)
    infos = []
    for first in range(0, num_samples, per_shard):
        with S.ShardWriter(root, len(infos)) as writer:
            for i in range(first, min(first + per_shard, num_samples)):
                feat[i % P] = rng.standard_normal(D)  # every sample different, without drawing 590k numbers
                labels = rng.integers(0, len(words), (P, K)).astype(np.int32)
                scores = -np.sort(-rng.random((P, K)), axis=1).astype(np.float16)
                meta = {
                    "id": f"s{i:06d}",
                    "source": f"{i}.jpg",
                    "orig_size": [336, 336],
                    "caption": "a photo",
                }
                writer.write(f"s{i:06d}", feat, labels, scores, meta)
            stats = writer.close()
        num_bytes = (root / stats["name"]).stat().st_size
        infos.append(S.ShardInfo(stats["name"], stats["num_samples"], stats["sha256"], num_bytes=num_bytes))
    manifest = S.Manifest(
        encoder=S.EncoderInfo("clip-l-336", "hf", "0" * 64, 336, -2, [24, 24], D, 768),
        wordlist=S.WordlistInfo("bench", S.wordlist_sha256(words), len(words)),
        templates=[],
        score_sign="cos",
        top_k=K,
        shards=infos,
        num_samples=num_samples,
        num_rejects=0,
    )
    S.write_manifest(root, manifest)


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn, paths: list[Path], cold: bool) -> float:
    if cold:
        drop_cache(paths)
    else:
        fn()  # one untimed pass: the files are in memory for the timed one
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--samples-per-shard", type=int, default=250)
    parser.add_argument("--threads", type=int, default=0, help="verification threads (0 = min(8, cores))")
    parser.add_argument("--dir", default=None, help="where to write the shards (default: a temporary folder)")
    args = parser.parse_args()

    from trainer.data.verify import verify_shards
    from visalign import shards as S
    from visalign.hashing import sha256_file

    work = Path(tempfile.mkdtemp(prefix="bench-verify-", dir=args.dir))
    try:
        root = work / "shards"
        root.mkdir()
        start = time.perf_counter()
        write_root(root, args.samples, args.samples_per_shard)
        write_s = time.perf_counter() - start
        manifest = S.read_manifest(root)
        paths = manifest.shard_paths(root)
        total = sum(p.stat().st_size for p in paths)
        layout = S.sample_layout(manifest)
        threads = args.threads or min(8, os.cpu_count() or 1)
        stamps = work / "cache"

        def read():
            for path in paths:
                for raw in S.iter_raw(path):
                    S.decode_checked(raw, layout)

        def sha():
            for path in paths:
                sha256_file(path)

        def verify(mode):
            return lambda: verify_shards(root, manifest, mode, threads=threads, stamps=False)

        def verify_stamped():
            verify_shards(root, manifest, "full", cache_dir=stamps, threads=threads)

        print(
            f"{args.samples} samples of {P}x{D} float16 features in {len(paths)} shards, {total / 1e9:.2f} GB "
            f"(written in {write_s:.1f} s); {os.cpu_count()} cores, verification threads {threads}"
        )
        verify_shards(root, manifest, "full", cache_dir=stamps, threads=threads)  # the stamps for the row
        rows = []
        for cold in (True, False):
            base = timed(read, paths, cold)
            rows.append(("read (what training pays anyway)", cold, base, base))
            for name, fn in [
                ("sha256 only, 1 thread", sha),
                ("verify full", verify("full")),
                ("verify full, stamped (rerun/resume)", verify_stamped),
                ("verify size", verify("size")),
            ]:
                rows.append((name, cold, timed(fn, paths, cold), base))
        print(f"| {'what':38s} | cache | seconds | GB/s  | / read |")
        print(f"|{'-' * 40}|-------|---------|-------|--------|")
        for name, cold, seconds, base in rows:
            rate = total / 1e9 / seconds if seconds > 0 else float("inf")
            print(
                f"| {name:38s} | {'cold' if cold else 'warm'}  | {seconds:7.2f} | {rate:5.2f} | {seconds / base:6.3f} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
