"""Step time and peak memory of ``--model.vision.mode cached`` vs ``frozen`` vs ``train`` on the same batch.

Input: an encoder (``tiny-clip``, ``random-vit-b16`` = CLIP ViT-B/16 sizes, random init, or a local HF
CLIP/SigLIP folder) and an LLM (``tiny-llm``, ``smollm2-135m``, a folder). The bundled demo images
(``examples/demo``) are labelled once with ``pipeline label --store-images`` into a temporary folder; the
loader (``trainer.data.build_stream``, pixels decoded) gives one micro-batch of ``--batch`` samples, the same
for every mode. Each mode's model is built as ``trainer run`` builds it (``build_train_module``, stage 2 by
default: projector + LLM train, as in SEA-PRIME), with AdamW over the trainer's parameter groups (the tower's
at ``--vision-lr`` in mode ``train``).

One step = forward + the objectives' weighted losses + backward + AdamW step.

* time: the three models in one process, round-robin over ``--steps`` steps after a warm-up step each, min
  per mode (a shared machine's load drifts; interleaving puts every mode under the same drift);
* memory: each mode in a fresh process: the peak resident set while stepping (the high-water mark reset
  once model and batch are built, ``trainer.memory.reset_peak``), absolute and above the built state (CPU),
  or ``torch.cuda.max_memory_allocated`` (``--device cuda``); also the trainer's own estimate (memory.py);
* the loader's extra work in the online modes: decoding + preprocessing one stored image (ms), which runs
  in the loader workers, not in the step.

``--runs N`` repeats all of it N times and prints min / median / max of every number and of the ratios to
``cached`` (each ratio taken within one run).

    python benchmarks/bench_vision.py                                          # tiny-clip + tiny-llm
    python benchmarks/bench_vision.py --encoder random-vit-b16 --llm smollm2-135m --runs 3

Letters: B batch, T sequence, C S S pixels.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODES = ("cached", "frozen", "train")
DEMO = REPO / "examples" / "demo"


def label(encoder: str, work: Path) -> Path:
    """The demo images labelled with their files stored (once per benchmark run)."""
    from pipeline.config import LabelConfig
    from pipeline.driver import run_label

    shards = work / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    words = work / "words.txt"
    shipped = (REPO / "wordlists" / "english-41k.txt").read_text(encoding="utf-8").splitlines()
    words.write_text("\n".join(shipped[:500]) + "\n", encoding="utf-8")
    run_label(LabelConfig(
        encoder=encoder, input=str(DEMO / "llava.json"), images=str(DEMO / "images"), shards=str(shards),
        wordlist=str(words), scheduler="synchronous", samples_per_shard=16, batch_size=8, top_k=10,
        progress=False, store_images=True, image_aspect="pad",
    ))  # fmt: skip
    return shards


def config(args, shards: Path, mode: str):
    from trainer.cli import parse_run_args

    return parse_run_args([
        "--shards", str(shards), "--output", str(Path(args.work) / f"run-{mode}"), "--llm", args.llm,
        "--stage", args.stage, "--objective", args.objective, "--batch-size", str(args.batch),
        "--lr", str(args.lr), "--model.vision.mode", mode, "--model.vision.lr", str(args.vision_lr),
        "--model.dtype", "fp32",
    ])  # fmt: skip


def build(args, shards: Path, mode: str):
    """-> (step(batch) -> seconds, module, cfg): the model of ``mode`` and one training step on it."""
    import torch

    from trainer.models.build import build_train_module
    from trainer.objectives import objective_weights, parse_spec
    from trainer.objectives.base import StepContext
    from trainer.train import param_groups
    from visalign.shards import read_manifest

    cfg = config(args, shards, mode)
    module, _ = build_train_module(cfg, read_manifest(shards), shards, apply_stage_to=cfg.stage)
    module.to(args.device).train()
    vision_lr = cfg.model.vision.lr if mode == "train" else None
    optimizer = torch.optim.AdamW(param_groups(module, 0.0, cfg.optim.lr, None, vision_lr), lr=cfg.optim.lr)
    weights = objective_weights(cfg.objectives, parse_spec(cfg.objective))

    def step(batch) -> float:
        start = time.perf_counter()
        losses, _ = module(batch, StepContext())
        total = sum(weights[k] * v for k, v in losses.items())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step, module, cfg


def the_batch(args, shards: Path):
    """The first micro-batch of the loader, with pixels (the cached mode ignores them)."""
    import torch

    from trainer.data import StreamLayout, build_stream
    from trainer.data.conversations import text_format
    from trainer.models.llm import load_llm
    from visalign.shards import read_manifest

    cfg = config(args, shards, "frozen")
    manifest = read_manifest(shards)
    _, tokenizer = load_llm(args.llm)
    layout = StreamLayout(
        world_size=1, rank=0, num_workers=0, batch_size=args.batch, seed=0, shuffle_buffer=1
    )
    stream = build_stream(shards, manifest, tokenizer, text_format(cfg.data, cfg.stage), cfg.data.max_length,
                          layout, pixels=True)  # fmt: skip
    batch = next(iter(stream))
    return {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def decode_ms(shards: Path, repeats: int = 3) -> float:
    """Milliseconds to decode + preprocess one stored image (the loader's extra work per sample)."""
    from visalign import shards as S
    from visalign.images import Preprocess, load_image

    manifest = S.read_manifest(shards)
    preprocess = Preprocess.from_dict(manifest.encoder.preprocess)
    stored = [
        s["image_bytes"] for p in manifest.shard_paths(shards) for s in S.iter_tar(p) if "image_bytes" in s
    ]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for data in stored:
            preprocess(load_image(data)[0])
        best = min(best, (time.perf_counter() - start) / len(stored))
    return best * 1e3


def memory_one(args, shards: Path, mode: str) -> dict:
    """Peak memory of ``mode`` while stepping (run in a fresh process)."""
    import torch

    from trainer.memory import MemoryPlan, estimate_memory, peak_mib, reset_peak

    batch = the_batch(args, shards)
    step, module, cfg = build(args, shards, mode)
    plan = MemoryPlan(
        batch_size=batch["input_ids_BT"].shape[0],
        seq_len=batch["input_ids_BT"].shape[1],
        compute_dtype=torch.float32,
    )
    estimate = estimate_memory(module, plan)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        reset_peak()
        base = peak_mib()
    for _ in range(2):
        step(batch)
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else peak_mib()
    tower = module.vlm.vision
    return {
        "peak_mib": peak,
        "step_mib": peak - base,
        "estimate_mib": estimate.total / 2**20,
        "tower_params": sum(p.numel() for p in tower.parameters()) if tower is not None else 0,
        "tokens": list(batch["input_ids_BT"].shape),
    }


def time_all(args, shards: Path) -> dict[str, float]:
    batch = the_batch(args, shards)
    steps = {mode: build(args, shards, mode)[0] for mode in MODES}
    for mode in MODES:  # warm-up: allocators, kernels
        steps[mode](batch)
    best = {mode: float("inf") for mode in MODES}
    for _ in range(args.steps):
        for mode in MODES:
            best[mode] = min(best[mode], steps[mode](batch))
    return best


def child(args, what: str) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--work", args.work, "--encoder", args.encoder, "--llm",
           args.llm, "--batch", str(args.batch), "--steps", str(args.steps), "--stage", args.stage, "--objective",
           args.objective, "--lr", str(args.lr), "--vision-lr", str(args.vision_lr), "--device", args.device]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.split("RESULT ", 1)[1])


def spread(values: list[float], fmt: str = ".3f") -> str:
    return f"{min(values):{fmt}} / {statistics.median(values):{fmt}} / {max(values):{fmt}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="tiny-clip")
    parser.add_argument("--llm", default="tiny-llm")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed round-robin rounds (after a warm-up)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--stage", default="finetune", choices=["pretrain", "finetune"])
    parser.add_argument("--objective", default="lm")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--vision-lr", type=float, default=2e-6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shards = Path(args.work) / "shards"
        result = time_all(args, shards) if args.child == "time" else memory_one(args, shards, args.child)
        print("RESULT " + json.dumps(result))
        return

    args.work = tempfile.mkdtemp(prefix="bench-vision-")
    shards = label(args.encoder, Path(args.work))
    decode = decode_ms(shards)
    runs = []
    for run in range(args.runs):
        memory = {mode: child(args, mode) for mode in (MODES if run % 2 == 0 else MODES[::-1])}
        runs.append({"time": child(args, "time"), "memory": memory})
    first = runs[0]["memory"]
    print(
        f"{args.encoder} ({first['train']['tower_params']:,} tower parameters on the feature path) + {args.llm}, "
        f"stage {args.stage}, objective {args.objective}, micro-batch {first['cached']['tokens'][0]} x "
        f"{first['cached']['tokens'][1]} tokens, fp32, device {args.device}; {args.runs} run(s): "
        "min / median / max over runs"
    )
    print(f"loader: decode + preprocess one stored image {decode:.2f} ms (in the loader workers)")
    header = f"{'mode':>7} | {'step s':>23} | {'x cached':>20} | {'peak MiB':>20} | {'step MiB':>20} | "
    print(header + f"{'x cached (peak)':>20} | {'estimate MiB':>12}")
    for mode in MODES:
        secs = [r["time"][mode] for r in runs]
        ratio = [r["time"][mode] / r["time"]["cached"] for r in runs]
        peak = [r["memory"][mode]["peak_mib"] for r in runs]
        step_mib = [r["memory"][mode]["step_mib"] for r in runs]
        peak_ratio = [r["memory"][mode]["peak_mib"] / r["memory"]["cached"]["peak_mib"] for r in runs]
        estimate = runs[0]["memory"][mode]["estimate_mib"]
        print(
            f"{mode:>7} | {spread(secs):>23} | {spread(ratio, '.2f'):>20} | {spread(peak, '.0f'):>20} | "
            f"{spread(step_mib, '.0f'):>20} | {spread(peak_ratio, '.2f'):>20} | {estimate:>12.0f}"
        )


if __name__ == "__main__":
    main()
