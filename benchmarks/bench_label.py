"""Throughput of `pipeline label` against a bare forward of the same encoder, warm, repeated, optionally under
a deliberate background load.

Input: an encoder name and a number of images (real photos from the scikit-image / scikit-learn wheels,
cycled, saved as 512 px JPEGs in a temporary folder input, so JPEG decoding is part of the stage).

Both sides are timed the same way and only once warm: before the first timed repeat, one batch goes through
the whole stage (the process then holds the encoder and the word index, as a worker does after its first
shard) and through the bare forward. Each repeat then times

* the stage: ``run_label`` (synchronous scheduler, one process) over all images into a fresh folder, its
  labelling time (``work_s``: decode + preprocess + forward + search + serialise + tar + sha256 + fsync); and
* the bare forward: ``enc(pixels)`` over the same images, already decoded and preprocessed, with the same
  batch size and device, features brought to the host as the stage does,

in alternating order (forward first on even repeats), and prints images/s of both and their ratio
(1.0 = the stage costs nothing beyond the forward) as min / median / max over the repeats, plus where the
stage's time went (from the shards' sidecars) and the word search alone per image for each backend asked
for (``--search-backends``), on the joint embeddings of these images.

``--arch clip|siglip`` labels with a random-init tower of the real architecture instead of ``--encoder``: the
vision tower of CLIP ViT-L/14-336 (LLaVA-1.5's) or SigLIP-SO400M/14-384 from their HF configs (as
``benchmarks/gpu.py`` builds them) with a one-layer text tower, since only the word embeddings' width and
number matter to the stage, not how they were computed. The forward then has its real cost relative to the
41k-word search (the search is ~23% of ViT-B/16's FLOPs but ~10% of CLIP-L/336's).

The printed ``ceiling`` is ``forward / (forward + search alone)``: what the stage would reach if decoding,
preprocessing, copies and writing cost nothing and the search could not overlap the forward (on a CPU both
want every core).

``--busy-cores N`` starts N busy-loop processes for the timed part (a machine shared with other work);
they are ended before the script exits. The word embeddings are computed (and cached) before timing: a
once-per-encoder cost, reported on its own line; ``--num-words`` limits the list for big text towers on a
CPU, ``--cache-dir`` keeps them between invocations.

    python benchmarks/bench_label.py --encoder tiny-clip --images 64 --batch-size 16
    python benchmarks/bench_label.py --encoder random-vit-b16 --images 48 --batch-size 16 --text-context 16 \\
        --repeats 3 --busy-cores 1 --search-backends faiss,torch,bf16
    python benchmarks/bench_label.py --arch clip --images 32 --batch-size 16 --repeats 3 --search-backends bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _photos() -> list:
    import numpy as np
    from PIL import Image

    arrays = []
    try:
        import skimage.data as d

        for name in ("astronaut", "chelsea", "coffee", "rocket"):
            arrays.append(getattr(d, name)())
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_image

        arrays += [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    except ImportError:
        pass
    if not arrays:  # no photo wheels: noise images still exercise decode + forward
        rng = np.random.default_rng(0)
        arrays = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(4)]
    out = []
    for a in arrays:
        img = Image.fromarray(a).convert("RGB")
        img.thumbnail((512, 512))
        out.append(img)
    return out


def write_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    photos = _photos()
    for i in range(count):
        photos[i % len(photos)].save(folder / f"{i:06d}.jpg", quality=90)
    return folder


def start_busy(count: int) -> list[subprocess.Popen]:
    """Busy-loop processes (a deliberate background load), ended by ``stop_busy``."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def real_tower(arch: str, words: list[str], cache_dir: Path) -> Path:
    """A random-init HF folder with the vision tower of ``arch``'s real configuration and a one-layer text
    tower of the same joint width (built once per cache folder and word list)."""
    import hashlib

    from gpu import TOWERS, build_tower

    small_text = {"text_width": 64, "text_layers": 1, "text_heads": 2, "text_mlp": 128, "context": 16,
                  "vocab": 8000}  # fmt: skip
    spec = {**TOWERS[arch], **small_text}
    digest = hashlib.sha256(json.dumps([spec, words], sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir / "bench-towers" / f"{arch}-{digest}"
    if not (folder / "config.json").is_file():
        t0 = time.perf_counter()
        build_tower(spec, words, folder, "cpu")
        print(f"built a random-init {arch} tower in {time.perf_counter() - t0:.1f} s: {folder}", flush=True)
    return folder


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="tiny-clip")
    ap.add_argument(
        "--arch", choices=("clip", "siglip"), default=None,
        help="a random-init tower of the real architecture (CLIP-L/14-336 or SigLIP-SO400M/14-384) instead of "
        "--encoder",
    )  # fmt: skip
    ap.add_argument("--backend", default=None)
    ap.add_argument("--images", type=int, default=48, help="number of images to label")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--wordlist", default=None, help="default: the shipped list")
    ap.add_argument("--num-words", type=int, default=None, help="use only the first N words of the list")
    ap.add_argument("--text-context", type=int, default=None)
    ap.add_argument("--decode-threads", type=int, default=4)
    ap.add_argument("--search-backend", default="auto", help="the stage's --search-backend")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--busy-cores", type=int, default=0, help="busy-loop processes during the timed part")
    ap.add_argument(
        "--search-backends", default="", help="comma-separated backends to time the search alone with"
    )
    ap.add_argument("--cache-dir", default=None, help="model + word-embedding cache (default: the user's)")
    ap.add_argument("--json", default=None, help="also write the measurements to this file")
    args = ap.parse_args()

    import torch

    from pipeline.config import LabelConfig
    from pipeline.driver import run_label
    from pipeline.task import get_encoder, get_index, resolve_device
    from pipeline.wordlist import cached_word_embeddings, load_wordlist
    from visalign import shards as S
    from visalign.cache import default_cache_dir
    from visalign.images import load_image

    device = resolve_device(args.device)
    cache_dir = args.cache_dir or str(default_cache_dir())
    report: dict = {"args": vars(args), "loadavg_start": os.getloadavg()}
    busy: list = []
    with tempfile.TemporaryDirectory(prefix="bench-label-") as tmp:
        tmp = Path(tmp)
        words = load_wordlist(args.wordlist)[: args.num_words]
        (tmp / "words.txt").write_text("".join(w + "\n" for w in words), encoding="utf-8")
        images_dir = write_images(tmp / "images", args.images)
        warm_dir = write_images(tmp / "warm", args.batch_size)

        if args.arch:
            args.encoder, args.backend = str(real_tower(args.arch, words, Path(cache_dir))), None
        options = {"dense": "none", "text_context": args.text_context}
        enc = get_encoder(args.encoder, args.backend, None, device, cache_dir, **options)
        t0 = time.perf_counter()
        emb_path = cached_word_embeddings(enc, words, [], cache_dir, text_context=args.text_context)
        emb_s = time.perf_counter() - t0

        def cfg_for(input_dir: Path, out: Path) -> LabelConfig:
            return LabelConfig(
                encoder=args.encoder,
                backend=args.backend,
                input=str(input_dir),
                shards=str(out),
                wordlist=str(tmp / "words.txt"),
                scheduler="synchronous",
                samples_per_shard=max(args.images, 1),
                batch_size=args.batch_size,
                device=device,
                text_context=args.text_context,
                decode_threads=args.decode_threads,
                search_backend=args.search_backend,
                cache_dir=cache_dir,
                progress=False,
            )

        pixels = torch.stack([enc.preprocess(load_image(p)[0]) for p in sorted(images_dir.glob("*.jpg"))])
        autocast = device.startswith("cuda")

        def bare_forward() -> tuple[float, list]:
            joints = []
            if autocast:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
                for start in range(0, len(pixels), args.batch_size):
                    out = enc(pixels[start : start + args.batch_size].to(device), feature_layer=-2)
                    out.feats_BPD.float().cpu().numpy().astype("float16")
                    joints.append(out.joint_BPE)
            if autocast:
                torch.cuda.synchronize()
            return time.perf_counter() - t0, joints

        # warm-up: the stage loads the word index and the encoder's first batch pays its one-off costs
        run_label(cfg_for(warm_dir, tmp / "warm-out"))
        bare_forward()

        busy = start_busy(args.busy_cores)
        try:
            time.sleep(0.5 if busy else 0)
            rows = []
            for r in range(args.repeats):
                out = tmp / f"out-{r}"

                def stage(out: Path = out) -> dict:
                    summary = run_label(cfg_for(images_dir, out))
                    assert summary["num_images"] == args.images, summary
                    return summary

                if r % 2 == 0:
                    forward_s, joints = bare_forward()
                    summary = stage()
                else:
                    summary = stage()
                    forward_s, joints = bare_forward()
                inside: dict[str, float] = {}
                for side in sorted(out.glob("shard-*.json")):
                    for key, value in json.loads(side.read_text())["timing"].items():
                        inside[key] = inside.get(key, 0.0) + value
                rows.append(
                    {
                        "stage_s": summary["work_s"],
                        "forward_s": forward_s,
                        "stage_ips": args.images / summary["work_s"],
                        "forward_ips": args.images / forward_s,
                        "ratio": forward_s / summary["work_s"],
                        "inside": inside,
                    }
                )
                print(
                    f"repeat {r}: stage {rows[-1]['stage_ips']:.2f} img/s, forward "
                    f"{rows[-1]['forward_ips']:.2f} img/s, ratio {rows[-1]['ratio']:.3f}",
                    flush=True,
                )

            search_rows = {}
            joint_QE = torch.cat([j.float().reshape(-1, j.shape[-1]) for j in joints])
            for name in [b for b in args.search_backends.split(",") if b]:
                index = get_index(str(emb_path), "cos", name, device)
                index.search(joint_QE[: 4 * enc.num_patches], 10)  # warm
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    index.search(joint_QE, 10)
                    times.append(time.perf_counter() - t0)
                search_rows[name] = {
                    "ms_per_image": [1000 * t / args.images for t in times],
                    "stats": dict(getattr(index, "stats", {})),
                }
        finally:
            stop_busy(busy)

    report.update(
        {
            "encoder": args.encoder,
            "device": device,
            "words": len(words),
            "torch_threads": torch.get_num_threads(),
            "word_embeddings_s": emb_s,
            "repeats": rows,
            "search_alone": search_rows,
            "loadavg_end": os.getloadavg(),
            "schema_version": S.SCHEMA_VERSION,
        }
    )
    print(
        f"encoder {args.encoder} ({enc.backend}) on {device}, {args.images} images, batch {args.batch_size}, "
        f"{len(words)} words, search {args.search_backend}, torch threads {torch.get_num_threads()}, "
        f"busy-loop processes {args.busy_cores}, load average {report['loadavg_start'][0]:.1f} -> "
        f"{report['loadavg_end'][0]:.1f}"
    )
    print(f"word embeddings (once per encoder, cached): {emb_s:.1f} s")
    print(f"                        min / median / max over {args.repeats} repeats")
    print(f"label stage images/s:   {spread([r['stage_ips'] for r in rows])}")
    print(f"bare forward images/s:  {spread([r['forward_ips'] for r in rows])}")
    print(f"ratio stage / forward:  {spread([r['ratio'] for r in rows])}")
    for name, row in search_rows.items():
        forward_ms = [1000 * r["forward_s"] / args.images for r in rows]
        search_ms = statistics.median(row["ms_per_image"])
        ceiling = [f / (f + search_ms) for f in forward_ms]  # per repeat, with the median search
        report.setdefault("ceiling", {})[name] = ceiling
        print(f"ceiling ({name} search): {spread(ceiling)}  (forward / (forward + search alone))")
    keys = sorted({k for r in rows for k in r["inside"]})
    median_inside = {k: statistics.median(r["inside"].get(k, 0.0) for r in rows) for k in keys}
    print(
        "inside the stage (median s): "
        + ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in median_inside.items())
    )
    for name, row in search_rows.items():
        stats = row["stats"]
        extra = ""
        if stats.get("queries"):
            extra = (
                f", {stats['pairs'] / stats['queries']:.1f} re-scored candidates per patch, "
                f"{stats['row_route'] / stats['queries']:.1%} patches by the whole-row route"
            )
        print(f"search alone, {name}: {spread(row['ms_per_image'])} ms/image ({len(words)} words){extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
