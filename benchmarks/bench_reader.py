"""The streaming reader at real sizes: samples/s and MB/s of the trainer's reader and loader vs a raw read of
the same files, and the shuffle buffer's memory.

Writes ``--samples`` CLIP-L/336-sized samples through the one writer (``visalign.shards.ShardWriter``):
features 576 x 1024 float16 (1.18 MB), labels (int32) and scores (float16) 576 x 10, a caption: 1.22 MB of
tar per sample. Then, on the same files:

* ``disk: raw read, one buffer``: every tar read once into one reused buffer (``readinto``, 4 MiB): what
  storage delivers to one reading thread. The files are WARM (read once, untimed, before): the page cache
  cannot be dropped on the machines this was measured on, so this is a memory-speed ceiling (into a buffer
  that stays in the CPU cache), stricter than a disk would be;
* ``disk: raw read, N samples kept``: the same files read in sample-sized chunks, each into new memory, the
  last N (the default shuffle buffer, 256) kept alive: the floor of any reader that holds samples;
* ``reader``: one slot's stream, what one loader worker does before tokenising: ``ShardStream.iter_slot``
  (``iter_raw`` + the strict ``decode_checked``), one process, one thread, shuffle buffer 1 (none) and 256
  (the default);
* ``loader, W workers``: what ``trainer run`` iterates for W = each of ``--workers``: ``build_stream`` with the
  tiny-llm tokenizer in the stage-1 ``plain`` format, ``make_loader``, micro-batches of ``--batch-size``
  with float32 features received in the main process (the default shuffle buffer, 256), and the same with
  float16 batches (``--data.host_dtype float16``, what a GPU run gets by default: the stored values, converted
  to float32 on the device, so no conversion is timed here). Timed from the first batch (worker start-up is
  printed apart as ``first batch s``);
* shuffle buffer memory: the peak resident memory of a fresh process streaming one slot with a buffer of
  each size in ``--buffers``, minus that process's own before it starts (``VmHWM - VmRSS``).

MB/s counts tar bytes. Ratios are against ``disk`` of the same run. With ``--runs N`` each row is measured N
times and printed as min / median / max. Goals (docs/shards.md): loader >= 5 x what one 8-GPU node consumes
in LLaVA-1.5 stage 1 (~44 samples/s per 8 x A100, so 220 samples/s), reader >= 0.80 of ``disk`` per worker.

    python benchmarks/bench_reader.py                       # 2,000 samples, 250 per shard, workers 0,2,4
    python benchmarks/bench_reader.py --samples 500 --runs 3 --json reader.json
    python benchmarks/bench_reader.py --shards /data/out    # an existing root (local, or a URL)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STAGE1_NODE = 44.0
"""samples/s one 8 x A100 node consumes in LLaVA-1.5 stage 1 (558k samples in ~3.5 h)"""
GOAL_NODES = 5
GOAL_DISK = 0.80


def write_root(root: Path, num_samples: int, per_shard: int, P: int, D: int, K: int) -> None:
    """``num_samples`` samples of ``P x D`` float16 features through the one writer, plus the manifest."""
    from visalign import shards as S

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(1000)]
    S.write_wordlist(words, root / S.WORDLIST)
    feat = rng.standard_normal((P, D)).astype(np.float16)
    infos = []
    for first in range(0, num_samples, per_shard):
        with S.ShardWriter(root, len(infos)) as writer:
            for i in range(first, min(first + per_shard, num_samples)):
                feat[i % P] = rng.standard_normal(D)  # every sample differs, without drawing P x D numbers
                labels = rng.integers(0, len(words), (P, K)).astype(np.int32)
                scores = -np.sort(-rng.random((P, K)), axis=1).astype(np.float16)
                meta = {
                    "id": f"s{i:06d}",
                    "source": f"{i}.jpg",
                    "orig_size": [336, 336],
                    "caption": "a photo",
                }
                writer.write(f"s{i:06d}", feat, labels, scores, meta)
            infos.append(S.shard_info(root, writer.close()))
    side = int(round(P**0.5))
    manifest = S.Manifest(
        encoder=S.EncoderInfo("clip-l-336", "hf", "0" * 64, 336, -2, [side, P // side], D, 768),
        wordlist=S.WordlistInfo("bench", S.wordlist_sha256(words), len(words)),
        templates=[],
        score_sign="cos",
        top_k=K,
        shards=infos,
        num_samples=num_samples,
        num_rejects=0,
    )
    S.write_manifest(root, manifest)


def read_disk(paths: list[Path]) -> int:
    """Bytes of every file read once into one reused buffer."""
    view = memoryview(bytearray(1 << 22))
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def read_disk_kept(paths: list[Path], chunk: int, keep: int) -> int:
    """Bytes of every file read once in sample-sized chunks, each into new memory, the last ``keep`` kept
    alive (what any reader with a shuffle buffer must do with the bytes it reads)."""
    kept: collections.deque[bytes] = collections.deque(maxlen=keep)
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while data := f.read(chunk):
                kept.append(data)
                total += len(data)
    return total


def read_slot(root: str, num_samples: int, buffer: int) -> int:
    """Samples of one slot (read + strict decode, no tokenising), as one loader worker produces them."""
    from trainer.data.shards import ShardStream, StreamLayout

    stream = ShardStream(root, StreamLayout(1, 0, 0, batch_size=1, seed=0, shuffle_buffer=buffer))
    samples = stream.iter_slot(0)
    for _ in range(num_samples):
        if "skip" in next(samples):
            raise RuntimeError("the benchmark's own samples were refused")
    return num_samples


def read_loader(
    root: str, tokenizer, workers: int, batch_size: int, num_samples: int, float16: bool = False
) -> tuple[int, float, float]:
    """(samples received after the first batch, seconds for them, seconds to the first batch)."""
    import torch

    from trainer.config import DataConfig
    from trainer.data import StreamLayout, build_stream, make_loader
    from trainer.data.conversations import text_format
    from visalign.shards import read_manifest

    data = DataConfig(conv_template="plain")  # stage 1's format; the default shuffle buffer
    layout = StreamLayout(1, 0, workers, batch_size=batch_size, seed=0, shuffle_buffer=data.shuffle_buffer)
    fmt = text_format(data, "pretrain")
    stream = build_stream(root, read_manifest(root), tokenizer, fmt, 2048, layout, float16=float16)
    dtype = torch.float16 if float16 else torch.float32
    start = time.perf_counter()
    first = steady = None
    seen = 0
    for batch in make_loader(stream):
        feats = batch["feats_BPD"]
        if batch["skipped"] or feats.dtype != dtype:
            raise RuntimeError("the loader refused the benchmark's own samples")
        if first is None:
            first = time.perf_counter() - start
            steady = time.perf_counter()
            continue
        seen += feats.shape[0]
        if seen + 2 * batch_size > num_samples:
            break
    return seen, time.perf_counter() - steady, first


BUFFER_PROBE = """
import sys
sys.path[:0] = [{bench!r}, {repo!r}]
import trainer.data.shards  # the libraries are in the baseline: only the streamed data counts
from bench_reader import read_slot
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss('VmRSS:')
read_slot({root!r}, {num}, {buffer})
print(rss('VmHWM:') - base)
"""


def buffer_memory(root: str, num_samples: int, buffer: int) -> int | None:
    """Peak resident bytes a fresh process adds while streaming ``num_samples`` with this buffer (Linux)."""
    if not Path("/proc/self/status").exists():
        return None
    here = Path(__file__).resolve().parent
    code = BUFFER_PROBE.format(
        bench=str(here), repo=str(here.parent), root=root, num=num_samples, buffer=buffer
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def spread(values: list[float], fmt: str = "8.1f") -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000, help="samples to write (and read)")
    parser.add_argument("--samples-per-shard", type=int, default=250)
    parser.add_argument("--patches", type=int, default=576, help="P: patches per sample (CLIP-L/336: 576)")
    parser.add_argument("--dim", type=int, default=1024, help="D: feature width (CLIP-L: 1024)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--workers", default="0,2,4", help="loader worker counts to measure")
    parser.add_argument(
        "--host-dtypes", default="float32,float16", help="loader batch dtypes to measure (data.host_dtype)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--buffers", default="1,64,256", help="shuffle buffer sizes whose memory to measure")
    parser.add_argument(
        "--runs", type=int, default=1, help="measure every row this many times (min/median/max)"
    )
    parser.add_argument("--dir", default=None, help="where to write the shards (default: a temporary folder)")
    parser.add_argument("--shards", default=None, help="measure an existing root (a folder or a URL) instead")
    parser.add_argument("--json", default=None, help="also write every measurement to this file")
    parser.add_argument("--llm", default="tiny-llm", help="whose tokenizer the loader rows use")
    args = parser.parse_args(argv)

    import trainer.data.shards  # noqa: F401 (imported before any timing)
    from trainer.config import DataConfig
    from trainer.data.sample import load_tokenizer
    from visalign import shards as S

    work = Path(tempfile.mkdtemp(prefix="bench-reader-", dir=args.dir))
    try:
        if args.shards:
            root = args.shards
        else:
            (work / "shards").mkdir()
            root = str(work / "shards")
            start = time.perf_counter()
            write_root(Path(root), args.samples, args.samples_per_shard, args.patches, args.dim, args.top_k)
            print(f"wrote {args.samples} samples through ShardWriter in {time.perf_counter() - start:.1f} s")
        manifest = S.read_manifest(root)
        paths = manifest.shard_paths(root)
        local = "://" not in str(root)  # (a URL root has no files to read raw)
        num_samples = manifest.num_samples
        total = sum(s.num_bytes or 0 for s in manifest.shards) or sum(Path(p).stat().st_size for p in paths)
        per_sample = total / num_samples
        tokenizer = load_tokenizer(args.llm)
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
        print(
            f"{num_samples} samples of {manifest.num_patches} x {manifest.encoder.feature_dim} float16 features "
            f"in {len(paths)} shards: {total / 1e9:.3f} GB, {per_sample / 1e6:.3f} MB per sample; "
            f"{os.cpu_count()} cores; batch {args.batch_size}; {args.runs} run(s)"
        )
        if local:
            print("disk: the files are read warm (from the page cache), which cannot be dropped here")

        default_buffer = DataConfig().shuffle_buffer
        jobs = []  # (name, fn): fn() -> samples read, or (samples, seconds, seconds to the first batch)
        if local:
            jobs.append(("disk: raw read, one buffer", lambda: read_disk(paths) / per_sample))
            jobs.append(
                (
                    f"disk: raw read, {default_buffer} samples kept",
                    lambda: read_disk_kept(paths, round(per_sample), default_buffer) / per_sample,
                )
            )
        for buffer in (1, default_buffer):
            jobs.append(
                (
                    f"reader, 1 process, shuffle buffer {buffer}",
                    lambda b=buffer: read_slot(root, num_samples, b),
                )
            )
        for host in [h for h in args.host_dtypes.split(",") if h.strip()]:
            if host not in ("float32", "float16"):
                raise SystemExit(f"--host-dtypes: {host!r} is not float32 or float16")
            for w in workers:
                jobs.append(
                    (
                        f"loader, {w} workers ({host} batches)",
                        lambda w=w, h=host: read_loader(
                            root, tokenizer, w, args.batch_size, num_samples, float16=h == "float16"
                        ),
                    )
                )
        rows = [{"what": name, "samples_per_s": [], "mb_per_s": [], "first_batch_s": []} for name, _ in jobs]
        if local:
            read_disk(paths)  # untimed: the files are warm for every timed row
        for run in range(args.runs):  # every row once per run, so each run's ratios compare like with like
            for row, (_, fn) in zip(rows, jobs):
                start = time.perf_counter()
                done = fn()
                seconds = time.perf_counter() - start
                if isinstance(done, tuple):
                    samples, seconds, first = done
                    row["first_batch_s"].append(first)
                else:
                    samples = done
                row["samples_per_s"].append(samples / seconds)
                row["mb_per_s"].append(samples / seconds * per_sample / 1e6)
            if args.runs > 1:
                print(f"run {run + 1} of {args.runs} done")
        memory = []
        for buffer in [int(b) for b in args.buffers.split(",") if b.strip()]:
            used = buffer_memory(root, min(num_samples, max(2 * buffer, 64)), buffer)
            memory.append({"buffer": buffer, "bytes": used, "bytes_per_sample": per_sample})

        # ratios within each run (row / disk of the same run), then their min / median / max over runs
        disk = rows[0]["samples_per_s"] if local else None
        kept = rows[1]["samples_per_s"] if local else None
        goal = GOAL_NODES * STAGE1_NODE
        print(
            f"\n| what | samples/s | MB/s | / disk | / disk, kept | / goal ({goal:.0f}/s) | first batch s |"
            "\n|---|---|---|---|---|---|---|"
        )
        for row in rows:
            rates = row["samples_per_s"]
            row["ratio_disk"] = [r / d for r, d in zip(rates, disk)] if disk else None
            row["ratio_disk_kept"] = [r / k for r, k in zip(rates, kept)] if kept else None
            row["ratio_goal"] = [r / goal for r in rates]
            cells = [
                spread(rates),
                spread(row["mb_per_s"]),
                spread(row["ratio_disk"], ".2f") if disk else "-",
                spread(row["ratio_disk_kept"], ".2f") if kept else "-",
                spread(row["ratio_goal"], ".1f"),
                spread(row["first_batch_s"], ".2f") if row["first_batch_s"] else "-",
            ]
            print(f"| {row['what']} | " + " | ".join(cells) + " |")
        print("\n| shuffle buffer | peak MB | samples' worth |\n|---|---|---|")
        for m in memory:
            peak = m["bytes"]
            print(
                f"| {m['buffer']} | {peak / 1e6:.1f} | {peak / per_sample:.1f} |"
                if peak is not None
                else f"| {m['buffer']} | (no /proc here) | |"
            )
        print(
            f"\ngoals: loader >= {goal:.0f} samples/s ({GOAL_NODES} x {STAGE1_NODE:.0f}/s, what one 8-GPU node "
            f"consumes in LLaVA-1.5 stage 1; per rank of 8: {goal / 8:.1f}/s); reader >= {GOAL_DISK:.2f} of "
            "disk per worker"
        )
        result = {
            "samples": num_samples,
            "bytes": total,
            "cores": os.cpu_count(),
            "batch_size": args.batch_size,
            "runs": args.runs,
            "rows": rows,
            "buffer_memory": memory,
            "goal_samples_per_s": goal,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
