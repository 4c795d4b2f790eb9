"""Labelling time against the number of images: does `pipeline label` stay linear up to thousands of shards?

Input: an encoder, a list of sizes and a shard size. The photos of the scikit-image / scikit-learn wheels,
cycled and saved as 512 px JPEGs, listed in a LLaVA JSON of the first N records for each size N. After one
warm-up run, each size is labelled into a fresh folder by the whole command (``run_label``: plan, settings,
the shard tasks, then ``rejects.parquet`` and ``manifest.json`` from every sidecar), and the script prints
per size: wall time, time in the shard tasks, time writing rejects + manifest, seconds per image; then a
least-squares line ``wall = a + b * N`` with each size's deviation from it (linear = small deviations, and
per-image time that does not grow with N).

``--samples-per-shard 1`` (the default) makes one shard per image, so 1,600 images are 1,600 shards and as
many sidecars for the manifest to read: the case where anything quadratic in the number of shards shows.

    python benchmarks/bench_label_scaling.py --encoder tiny-clip --sizes 100,200,400,800,1600
    python benchmarks/bench_label_scaling.py --encoder random-vit-b16 --sizes 25,50,100 --samples-per-shard 25
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="tiny-clip")
    ap.add_argument("--sizes", default="100,200,400,800,1600")
    ap.add_argument("--samples-per-shard", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-words", type=int, default=2000, help="the first N words of the shipped list")
    ap.add_argument("--text-context", type=int, default=None)
    ap.add_argument("--scheduler", default="synchronous")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", default=None, help="also write the measurements to this file")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]

    import numpy as np
    from bench_label import write_images

    import pipeline.driver as driver
    from pipeline.config import LabelConfig
    from pipeline.wordlist import load_wordlist
    from visalign.cache import default_cache_dir

    cache_dir = args.cache_dir or str(default_cache_dir())
    finish_s: list[float] = []
    real_finish = driver.finish

    def timed_finish(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real_finish(*a, **kw)
        finally:
            finish_s.append(time.perf_counter() - t0)

    driver.finish = timed_finish
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-label-scaling-") as tmp:
        tmp = Path(tmp)
        words = load_wordlist(None)[: args.num_words]
        (tmp / "words.txt").write_text("".join(w + "\n" for w in words), encoding="utf-8")
        images = write_images(tmp / "images", max(sizes))
        conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A photo."}]
        records = [
            {"id": f"{i:06d}", "image": f"{i:06d}.jpg", "conversations": conv} for i in range(max(sizes))
        ]

        def run(num: int, out: Path) -> dict:
            listing = tmp / f"llava-{num}.json"
            listing.write_text(json.dumps(records[:num]))
            cfg = LabelConfig(
                encoder=args.encoder,
                input=str(listing),
                images=str(images),
                shards=str(out),
                wordlist=str(tmp / "words.txt"),
                scheduler=args.scheduler,
                workers=args.workers,
                samples_per_shard=args.samples_per_shard,
                batch_size=args.batch_size,
                device=args.device,
                text_context=args.text_context,
                cache_dir=cache_dir,
                progress=False,
            )
            t0 = time.perf_counter()
            summary = driver.run_label(cfg)
            summary["measured_wall_s"] = time.perf_counter() - t0
            assert summary["num_images"] == num, summary
            return summary

        run(min(sizes), tmp / "warm")  # model + word embeddings loaded and cached, first batch paid
        for num in sizes:
            summary = run(num, tmp / f"out-{num}")
            rows.append(
                {
                    "images": num,
                    "shards": summary["num_shards"],
                    "wall_s": summary["measured_wall_s"],
                    "tasks_s": summary["work_s"],
                    "finish_s": finish_s[-1],
                    "loadavg": os.getloadavg()[0],
                }
            )
            r = rows[-1]
            print(
                f"{num:6d} images, {r['shards']:5d} shards: wall {r['wall_s']:7.2f} s, tasks {r['tasks_s']:7.2f} s, "
                f"rejects + manifest {r['finish_s']:.3f} s, {1000 * r['wall_s'] / num:6.1f} ms/image "
                f"(load average {r['loadavg']:.1f})",
                flush=True,
            )
    n = np.array([r["images"] for r in rows], dtype=float)
    t = np.array([r["wall_s"] for r in rows])
    slope, intercept = np.polyfit(n, t, 1)
    print(f"least squares: wall = {intercept:.2f} s + {1000 * slope:.2f} ms x images")
    for r in rows:
        fit = intercept + slope * r["images"]
        print(
            f"  {r['images']:6d}: measured {r['wall_s']:7.2f} s, line {fit:7.2f} s, deviation {r['wall_s'] / fit - 1:+.1%}"
        )
    per_image = t / n
    print(
        f"ms/image at the largest size / at the smallest: {per_image[-1] / per_image[0]:.2f} "
        f"(words: {args.num_words}, encoder {args.encoder}, scheduler {args.scheduler}, "
        f"{args.samples_per_shard} samples per shard)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
