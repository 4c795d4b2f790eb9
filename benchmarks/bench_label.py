"""Throughput of `pipeline label` against a bare forward of the same encoder, from one invocation.

Input: an encoder name and a number of images (real photos from the scikit-image / scikit-learn wheels,
cycled, saved as 512 px JPEGs in a temporary folder input, so JPEG decoding is part of the stage).
Output (stdout): images/s of the whole labelling stage (decode + preprocess + forward + search + tar write,
synchronous scheduler, one process), images/s of a bare ``enc(pixels)`` over the same preprocessed images
with the same batch size and device, and their ratio (1.0 = the stage costs nothing beyond the forward).

The word embeddings are computed (and cached) before timing: they are a once-per-encoder cost, reported
on its own line. ``--num-words`` limits the list for big text towers on a CPU.

    python benchmarks/bench_label.py --encoder tiny-clip --images 64 --batch-size 16
    python benchmarks/bench_label.py --encoder random-vit-b16 --images 16 --batch-size 8 --num-words 2000
"""

from __future__ import annotations

import argparse
import os
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="tiny-clip")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--images", type=int, default=32, help="number of images to label")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--wordlist", default=None, help="default: the shipped list")
    ap.add_argument("--num-words", type=int, default=None, help="use only the first N words of the list")
    ap.add_argument("--text-context", type=int, default=None)
    ap.add_argument("--decode-threads", type=int, default=4)
    args = ap.parse_args()

    import torch

    from pipeline.config import LabelConfig
    from pipeline.driver import run_label
    from pipeline.task import get_encoder, resolve_device
    from pipeline.wordlist import cached_word_embeddings, load_wordlist

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-label-") as tmp:
        tmp = Path(tmp)
        words = load_wordlist(args.wordlist)[: args.num_words]
        (tmp / "words.txt").write_text("".join(w + "\n" for w in words), encoding="utf-8")
        images_dir = tmp / "images"
        images_dir.mkdir()
        photos = _photos()
        for i in range(args.images):
            photos[i % len(photos)].save(images_dir / f"{i:06d}.jpg", quality=90)

        from visalign.cache import default_cache_dir

        cache_dir = str(default_cache_dir())
        options = {"dense": "none", "text_context": args.text_context}
        enc = get_encoder(args.encoder, args.backend, None, device, cache_dir, **options)
        t0 = time.perf_counter()
        cached_word_embeddings(enc, words, [], cache_dir, text_context=args.text_context)
        emb_s = time.perf_counter() - t0

        cfg = LabelConfig(
            encoder=args.encoder,
            backend=args.backend,
            input=str(images_dir),
            shards=str(tmp / "out"),
            wordlist=str(tmp / "words.txt"),
            scheduler="synchronous",
            samples_per_shard=max(args.images, 1),
            batch_size=args.batch_size,
            device=device,
            text_context=args.text_context,
            decode_threads=args.decode_threads,
            cache_dir=cache_dir,
            progress=False,
        )
        t0 = time.perf_counter()
        summary = run_label(cfg)
        stage_s = time.perf_counter() - t0
        assert summary["num_images"] == args.images, summary

        from visalign.images import load_image

        pixels = torch.stack([enc.preprocess(load_image(p)[0]) for p in sorted(images_dir.glob("*.jpg"))])
        autocast = device.startswith("cuda")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            enc(pixels[: args.batch_size].to(device))  # warm-up, as the stage's first batch pays it too
            if autocast:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for start in range(0, len(pixels), args.batch_size):
                out = enc(pixels[start : start + args.batch_size].to(device))
                out.feats_BPD.float().cpu()
            if autocast:
                torch.cuda.synchronize()
            forward_s = time.perf_counter() - t0

    stage_ips = args.images / summary["work_s"]
    forward_ips = args.images / forward_s
    print(
        f"encoder {args.encoder} ({enc.backend}) on {device}, {args.images} images, batch {args.batch_size}, "
        f"{len(words)} words, torch threads {torch.get_num_threads()}"
    )
    print(f"word embeddings (once per encoder, cached): {emb_s:.1f} s")
    print(
        f"label stage: {stage_ips:.2f} images/s  "
        f"({summary['work_s']:.2f} s labelling; {stage_s:.2f} s with setup)"
    )
    print(f"bare forward: {forward_ips:.2f} images/s  ({forward_s:.2f} s)")
    print(f"ratio stage / forward: {stage_ips / forward_ips:.2f}")


if __name__ == "__main__":
    main()
