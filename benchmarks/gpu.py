"""One GPU benchmark run: the numbers a user needs to plan a cluster, in one JSON + Markdown report.

On one GPU, sized for 8 minutes on an H100/H200 (``--budget-s``, default 450 s, stops starting new pieces
and reports what it skipped), with random-init models of the real architectures (speed does not depend on
the weights, and nothing is downloaded):

* ``label``: ``pipeline label`` images/s against the bare encoder forward on the same images, for the ``clip``
  (CLIP ViT-L/14-336, LLaVA-1.5's tower) and ``siglip`` (SigLIP-SO400M/14-384) architectures: HF
  ``CLIPModel`` / ``SiglipModel`` from the real configs, random init, saved as an HF folder with an offline
  tokenizer and loaded back through the pipeline's own loader. The stage runs in one process (synchronous
  scheduler, the stage's defaults otherwise: its float16 autocast on CUDA, its decode threads), over JPEG
  photos from the scikit-image / scikit-learn wheels, against the shipped 41k-word list, once per search
  backend (``bf16`` and ``torch`` screens, ``faiss`` when importable); the word search alone per backend too.
  The bare forward is ``enc(pixels)`` on the already preprocessed images, same batch size, same autocast,
  features brought to the host as float16 as the stage does.
* ``trainer``: the real ``trainer.train.Trainer`` (``trainer run``'s code: Accelerate, bf16 autocast on a
  GPU, the loader in the main process, logging every step) with Qwen2-0.5B- and Qwen2-1.5B-shaped random
  LLMs (``Qwen2ForCausalLM`` from the real configs, 151,936-token tied vocabulary) on CLIP-L-sized synthetic
  shards; stage 1 (``pretrain``: projector trains, LLM frozen in bf16) on ~40-word captions, stage 2
  (``finetune``: all train, float32 master weights) on three-turn conversations. Step time = the time between
  two iterations of the trainer's loop (steady state, after warm-up), so data, logging and every host sync
  are in it. Tokens/s and MFU = model FLOPs / step time / the GPU's bf16 dense peak (``PEAK_TFLOPS`` by
  device name, or ``--peak-tflops``). Model FLOPs per sequence of T tokens with M supervised:
  decoder layers 2·N·T per pass (N = their parameters), causal attention 2·L·d·T² per pass, the output head
  2·d·V·M per pass, the projector 2·n·P; passes: stage 1 = forward + input gradients (2; attention 3, as its
  backward has two activation operands), stage 2 = 3 (forward, input and weight gradients).
* ``objectives``: stage-1 step time of ``sea``, ``basic``, ``distill`` against ``lm`` on the stage-1 model
  of each size: the trainer's own ``TrainModule`` and objective modules over its batches, under bf16
  autocast, round-robin, min per objective (a time ratio; the shards carry one 16x16x768 expert for distill,
  labels into the 41k-word list for sea and basic).
* ``reader``: the streaming reader (``trainer.data``: tar -> strict decode -> tokenise -> collate) over ~2,000
  CLIP-L-sized samples (576 x 1024 float16, 1.2 MB) with 0, 2 and 4 loader workers, samples/s and MB/s,
  against a raw read of the same files (page cache dropped, and warm), and against what 8 GPUs consume in
  stage 1 (8 x the 0.5B stage-1 samples/s measured above).

What cannot be measured is said, with the reason, in the report and the JSON (``{"skipped": reason}``).
``--device cpu --tiny`` runs every section through with tiny sizes in seconds (a check of the script, not a
measurement).

    python benchmarks/gpu.py                                   # writes gpu-bench.json + gpu-bench.md to $OUT
    python benchmarks/gpu.py --device cpu --tiny --out /tmp/x

Letters: B batch, T sequence, P patches, D feature width, d LLM width, V vocabulary, M supervised tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

PEAK_TFLOPS = [  # bf16 dense tensor-core peak (vendor data sheets); the first match of the device name wins
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("h200", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("l40s", 362.0),
]

# Real architectures (HF configs of openai/clip-vit-large-patch14-336 and google/siglip-so400m-patch14-384)
TOWERS = {
    "clip": {"family": "clip", "image": 336, "patch": 14, "width": 1024, "layers": 24, "heads": 16, "mlp": 4096,
             "text_width": 768, "text_layers": 12, "text_heads": 12, "text_mlp": 3072, "context": 77,
             "joint": 768, "vocab": 49408},
    "siglip": {"family": "siglip", "image": 384, "patch": 14, "width": 1152, "layers": 27, "heads": 16,
               "mlp": 4304, "text_width": 1152, "text_layers": 27, "text_heads": 16, "text_mlp": 4304,
               "context": 64, "joint": 1152, "vocab": 32000},
}  # fmt: skip
TINY_TOWERS = {
    "clip": {"family": "clip", "image": 64, "patch": 8, "width": 64, "layers": 3, "heads": 2, "mlp": 128,
             "text_width": 32, "text_layers": 1, "text_heads": 2, "text_mlp": 64, "context": 16, "joint": 32,
             "vocab": 1000},
    "siglip": {"family": "siglip", "image": 64, "patch": 8, "width": 64, "layers": 3, "heads": 2, "mlp": 128,
               "text_width": 64, "text_layers": 1, "text_heads": 2, "text_mlp": 64, "context": 16, "joint": 64,
               "vocab": 1000},
}  # fmt: skip
# Qwen2-0.5B / Qwen2-1.5B (their HF configs), and two tiny shapes of the same class for --tiny
LLMS = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936},
}  # fmt: skip
TINY_LLMS = {
    "tiny-a": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 2048},
    "tiny-b": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 2048},
}  # fmt: skip
EXPERT = ("expert", 256, 768)  # one 16 x 16 x 768 expert (a DINOv2-B/14-224-sized tower) for distill
SPECS = ["lm", "sea", "basic", "distill"]


class OutOfTime(Exception):
    """The run's time budget is spent: what is left is skipped, with this as the reason."""


class Run:
    """Settings, the deadline and the report under construction."""

    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.budget_s
        self.report: dict = {"label": {}, "trainer": {}, "objectives": {}, "reader": {}, "notes": []}
        self.tmp = Path(tempfile.mkdtemp(prefix="visalign-gpu-bench-"))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def need(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise OutOfTime(f"time budget: {self.left():.0f} s left, {what} needs ~{seconds:.0f} s")

    def say(self, text: str) -> None:
        print(text, flush=True)

    def skip(self, section: str, key: str, reason: str) -> None:
        self.report[section][key] = {"skipped": reason}
        self.say(f"[{section}] {key}: skipped: {reason}")


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# ---------------------------------------------------------------------------------------------------------
# label
# ---------------------------------------------------------------------------------------------------------


def write_tokenizer(folder: Path, words: list[str], vocab: int, context: int) -> dict:
    """A BPE tokenizer trained offline on the word list (the real ones cannot be downloaded here): every word
    gets its own short id sequence, so the word index has no duplicate rows. Returns the special ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(words, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials))
    ids = {name: tok.token_to_id(name) for name in specials}
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=context,
    )  # fmt: skip
    fast.save_pretrained(folder)
    return ids


def build_tower(arch: dict, words: list[str], folder: Path, device: str) -> Path:
    """A random-init HF CLIP / SigLIP folder of the given architecture (weights in bf16 to halve the files;
    the pipeline loads them as float32, as it loads every checkpoint)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from visalign.images import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD

    folder.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(folder, words, arch["vocab"], arch["context"])
    text = dict(vocab_size=arch["vocab"], hidden_size=arch["text_width"], intermediate_size=arch["text_mlp"],
                num_hidden_layers=arch["text_layers"], num_attention_heads=arch["text_heads"],
                max_position_embeddings=arch["context"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                pad_token_id=ids["<pad>"])  # fmt: skip
    vision = dict(hidden_size=arch["width"], intermediate_size=arch["mlp"], num_hidden_layers=arch["layers"],
                  num_attention_heads=arch["heads"], image_size=arch["image"], patch_size=arch["patch"])  # fmt: skip
    torch.manual_seed(0)
    build_on = device if device.startswith("cuda") else "cpu"  # random init of ~0.9B parameters: on the GPU
    with torch.device(build_on):
        if arch["family"] == "clip":
            model = CLIPModel(
                CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch["joint"])
            )
            size = {"shortest_edge": arch["image"]}
            mean, std = CLIP_MEAN, CLIP_STD
        else:
            text["projection_size"] = arch["joint"]
            model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
            size = {"height": arch["image"], "width": arch["image"]}
            mean, std = SIGLIP_MEAN, SIGLIP_STD
    model.to(torch.bfloat16).save_pretrained(folder)
    processor = {"size": size, "image_mean": list(mean), "image_std": list(std), "resample": 3}
    if arch["family"] == "clip":
        processor["crop_size"] = {"height": arch["image"], "width": arch["image"]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    del model
    free_memory()
    return folder


def label_section(run: Run) -> None:
    args = run.args
    try:
        from bench_label import write_images

        from pipeline.wordlist import load_wordlist
    except Exception as err:  # noqa: BLE001 - a missing dependency is reported, not fatal
        for name in TOWERS:
            run.skip("label", name, f"pipeline not importable: {type(err).__name__}: {err}")
        return
    words = load_wordlist(None)[: args.num_words]
    (run.tmp / "words.txt").write_text("".join(w + "\n" for w in words), encoding="utf-8")
    images = write_images(run.tmp / "images", args.images)
    warm = write_images(run.tmp / "warm", args.label_batch)
    towers = TINY_TOWERS if args.tiny else TOWERS
    for name in args.towers:
        try:
            run.need(20 if args.tiny else 90, f"the {name} label stage")
            run.report["label"][name] = label_one(run, name, towers[name], words, images, warm)
        except OutOfTime as err:
            run.skip("label", name, str(err))
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            run.skip("label", name, f"failed: {type(err).__name__}: {err}")
        finally:
            import pipeline.task as task

            task._CACHE.clear()  # the encoder and word index of this tower (GPU memory)
            free_memory()


def label_one(run: Run, name: str, arch: dict, words: list[str], images: Path, warm: Path) -> dict:
    import torch

    from pipeline.config import LabelConfig
    from pipeline.driver import run_label
    from pipeline.search import faiss_available
    from pipeline.task import get_encoder, get_index
    from pipeline.wordlist import cached_word_embeddings
    from visalign.images import load_image

    args, device = run.args, run.args.device
    cache_dir = str(run.tmp / "cache")
    t0 = time.perf_counter()
    folder = build_tower(arch, words, run.tmp / f"tower-{name}", device)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    enc = get_encoder(str(folder), None, None, device, cache_dir, dense="none", text_context=None)
    load_s = time.perf_counter() - t0
    on_cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    # once per tower and word list; bf16 on a GPU (the SO400M text tower over 41k padded words)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
        emb_path = cached_word_embeddings(enc, words, [], cache_dir, text_context=None, progress=False)
    words_s = time.perf_counter() - t0
    run.say(
        f"[label] {name}: {sum(p.numel() for p in enc.model.vision_model.parameters()) / 1e6:.0f}M vision "
        f"parameters, {enc.num_patches} patches x {enc.feature_dim}; built {build_s:.1f} s, loaded "
        f"{load_s:.1f} s, {len(words)} word embeddings {words_s:.1f} s"
    )
    paths = sorted(images.glob("*.jpg"))
    pixels = torch.stack([enc.preprocess(load_image(p)[0]) for p in paths])
    batch = args.label_batch

    def bare_forward() -> tuple[float, list]:
        joints = []
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=on_cuda):
            for first in range(0, len(pixels), batch):
                out = enc(pixels[first : first + batch].to(device), feature_layer=-2)
                out.feats_BPD.float().cpu().numpy().astype("float16")
                joints.append(out.joint_BPE)
        sync(device)
        return time.perf_counter() - start, joints

    def config(backend: str, input_dir: Path, out: Path) -> LabelConfig:
        return LabelConfig(
            encoder=str(folder), input=str(input_dir), shards=str(out), wordlist=str(run.tmp / "words.txt"),
            scheduler="synchronous", samples_per_shard=max(args.images, 1), batch_size=batch, device=device,
            search_backend=backend, cache_dir=cache_dir, progress=False,
        )  # fmt: skip

    bare_forward()  # warm: kernels, autotuning
    result: dict = {
        "architecture": {k: v for k, v in arch.items() if k != "family"},
        "images": args.images,
        "batch_size": batch,
        "words": len(words),
        "word_embeddings_s": words_s,
        "autocast": "float16 (the stage's)" if on_cuda else "none (float32)",
        "backends": {},
        "search_alone_ms_per_image": {},
    }
    joints: list = []
    for backend in args.search_backends:
        if backend == "faiss" and not faiss_available():
            result["backends"][backend] = {
                "skipped": "faiss not importable here (install faiss-gpu where its CUDA runtime matches torch's)"
            }
            run.say(f"[label] {name} / faiss: skipped: faiss not importable here")
            continue
        try:
            run.need(10 if args.tiny else 30, f"the {name} stage with the {backend} search")
        except OutOfTime as err:
            result["backends"][backend] = {"skipped": str(err)}
            run.say(f"[label] {name} / {backend}: skipped: {err}")
            continue
        run_label(config(backend, warm, run.tmp / f"warm-{name}-{backend}"))  # loads this backend's index
        rows = []
        for r in range(args.repeats):
            out = run.tmp / f"out-{name}-{backend}-{r}"
            if r % 2 == 0:
                forward_s, joints = bare_forward()
                summary = run_label(config(backend, images, out))
            else:
                summary = run_label(config(backend, images, out))
                forward_s, joints = bare_forward()
            assert summary["num_images"] == args.images, summary
            inside: dict[str, float] = {}
            for side in sorted(out.glob("shard-*.json")):
                for key, value in json.loads(side.read_text())["timing"].items():
                    if key.endswith("_s"):
                        inside[key] = inside.get(key, 0.0) + value
            rows.append({"stage_ips": args.images / summary["work_s"], "forward_ips": args.images / forward_s,
                         "ratio": forward_s / summary["work_s"], "inside": inside})  # fmt: skip
        entry = {key: spread([row[key] for row in rows]) for key in ("stage_ips", "forward_ips", "ratio")}
        # where the stage's time went (its shards' sidecars): forward, search, waiting on decoding, writing
        entry["inside_stage_s"] = {
            key: statistics.median(row["inside"].get(key, 0.0) for row in rows)
            for key in sorted({k for row in rows for k in row["inside"]})
        }
        result["backends"][backend] = entry
        run.say(
            f"[label] {name} / {backend}: stage {entry['stage_ips']['median']:.1f} img/s, bare forward "
            f"{entry['forward_ips']['median']:.1f} img/s, ratio {entry['ratio']['median']:.3f} "
            f"(min {entry['ratio']['min']:.3f}, max {entry['ratio']['max']:.3f}, {args.repeats} repeats)"
        )
    joint_QE = torch.cat([j.float().reshape(-1, j.shape[-1]) for j in joints]) if joints else None
    for backend in args.search_backends:
        if joint_QE is None or "skipped" in result["backends"].get(backend, {}):
            continue
        index = get_index(str(emb_path), "cos", backend, device)
        index.search(joint_QE[: 4 * enc.num_patches], 10)
        times = []
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            index.search(joint_QE, 10)
            sync(device)
            times.append(1000 * (time.perf_counter() - start) / args.images)
        result["search_alone_ms_per_image"][backend] = spread(times)
    return result


# ---------------------------------------------------------------------------------------------------------
# trainer + objectives
# ---------------------------------------------------------------------------------------------------------


def shipped_words(limit: int | None) -> list[str]:
    """The shipped 41k-word list (the labels of the synthetic shards index into it, as real labels do)."""
    path = HERE.parent / "wordlists" / "english-41k.txt"
    return [w for w in path.read_text(encoding="utf-8").split("\n") if w.strip()][:limit]


def build_llm(shape: dict, folder: Path, device: str) -> Path:
    """A random-init ``Qwen2ForCausalLM`` of ``shape`` (tied embeddings) with the tiny LLM's tokenizer (the
    Qwen2 tokenizer cannot be downloaded here; the token count, not the ids, sets the cost)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trainer.models.llm import load_llm

    _, tokenizer = load_llm("tiny-llm")
    config = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device if device.startswith("cuda") else "cpu"):
        model = Qwen2ForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    free_memory()
    return folder


def forward_flops(vlm, batch: dict) -> dict[str, float]:
    """FLOPs of one forward pass on ``batch`` by part: the decoder layers' weight matrices (2 N T), causal
    attention (2 L d T^2: half of the full QK^T and AV products), the output head on the supervised rows
    (2 d V M) and the projector (2 n P)."""
    config = vlm.llm.config.get_text_config()
    body = sum(p.numel() for p in vlm.llm.base_model.layers.parameters() if p.dim() > 1)  # matrices
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    lengths_B = batch["attention_mask_BT"].sum(1).double()
    feats_BPD = batch["feats_BPD"]
    return {
        "linear": 2.0 * body * float(lengths_B.sum()),
        "attention": 2.0 * config.num_hidden_layers * config.num_attention_heads * head_dim
        * float((lengths_B**2).sum()),
        "head": 2.0 * config.hidden_size * config.vocab_size * float(batch["num_target_tokens"]),
        "projector": 2.0 * sum(p.numel() for p in vlm.projector.parameters() if p.dim() > 1)
        * feats_BPD.shape[0] * feats_BPD.shape[1],
    }  # fmt: skip


def model_flops(vlm, batch: dict, stage: str) -> float:
    """Model FLOPs of one optimiser step on ``batch``: stage 1 = forward + gradients into the activations
    (attention: + two products per product, both operands being activations), the projector always trains;
    stage 2 also the weight gradients of every linear map."""
    part = forward_flops(vlm, batch)
    passes = 2 if stage == "pretrain" else 3
    return passes * (part["linear"] + part["head"]) + 3 * part["attention"] + 3 * part["projector"]


def peak_tflops(args) -> tuple[float | None, str]:
    import torch

    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if not args.device.startswith("cuda"):
        return None, "no GPU: MFU needs --peak-tflops"
    name = torch.cuda.get_device_name().lower()
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value, f"table entry {key!r} for {torch.cuda.get_device_name()!r}"
    return None, f"no peak known for {torch.cuda.get_device_name()!r}: pass --peak-tflops"


def trainer_one(
    run: Run, size: str, stage: str, llm: Path, shards: Path, batch: int, keep: bool, workers: int = 0
):
    """One ``Trainer`` run of ``warmup + steps`` steps (``workers`` loader processes); returns (result,
    trainer if ``keep``)."""
    import torch
    from accelerate.state import AcceleratorState

    from trainer.cli import parse_run_args
    from trainer.train import Trainer

    args = run.args
    AcceleratorState._reset_state(reset_partial_state=False)  # one Accelerator per Trainer in this process
    total = args.warmup_steps + args.steps + 1
    argv = ["--shards", str(shards), "--output", str(run.tmp / f"run-{size}-{stage}"), "--llm", str(llm),
            "--stage", stage, "--objective", "lm", "--batch-size", str(batch), "--max-steps", str(total),
            "--logging.progress", "false", "--data.verify-shards", "size", "--num-workers", str(workers)]  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(parse_run_args(argv))
    build_s = time.perf_counter() - t0
    trainer.save = lambda: None  # checkpoints are not part of a step
    real_step, vlm = trainer.train_step, trainer.vlm
    entries, inside, flops, tokens, samples = [], [], [], [], []

    def timed_step(micro_batches):
        entries.append(time.perf_counter())
        batch_ = micro_batches[0]
        flops.append(model_flops(vlm, batch_, stage))
        tokens.append(int(batch_["attention_mask_BT"].sum()))
        samples.append(len(batch_["ids"]))
        start = time.perf_counter()
        metrics = real_step(micro_batches)
        inside.append(time.perf_counter() - start)
        return metrics

    trainer.train_step = timed_step
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    sync(args.device)
    timed = range(args.warmup_steps, len(entries) - 1)
    step_s = [entries[k + 1] - entries[k] for k in timed]
    median = statistics.median(step_s)
    k_med = list(timed)[step_s.index(min(step_s, key=lambda s: abs(s - median)))]
    peak, peak_from = peak_tflops(args)
    achieved = statistics.median(flops[k] / (entries[k + 1] - entries[k]) for k in timed) / 1e12
    result = {
        "loader_workers": workers,
        "batch_size": batch,
        "tokens_per_step": tokens[k_med],
        "step_s": spread(step_s),
        "train_step_share": statistics.median(inside[k] / (entries[k + 1] - entries[k]) for k in timed),
        "tokens_per_s": statistics.median(tokens[k] / (entries[k + 1] - entries[k]) for k in timed),
        "samples_per_s": statistics.median(samples[k] / (entries[k + 1] - entries[k]) for k in timed),
        "model_tflop_per_step": flops[k_med] / 1e12,
        "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else {"skipped": peak_from},
        "peak_tflops": peak or {"skipped": peak_from},
        "trainable_parameters": sum(p.numel() for p in trainer.vlm.parameters() if p.requires_grad),
        "build_s": build_s,
    }
    if args.device.startswith("cuda"):
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    mfu = result["mfu"]
    run.say(
        f"[trainer] {size} {stage}: batch {batch} x ~{tokens[k_med] // batch} tokens, step "
        f"{result['step_s']['median'] * 1000:.1f} ms (min {result['step_s']['min'] * 1000:.1f}), "
        f"{result['tokens_per_s']:,.0f} tokens/s, {result['samples_per_s']:.1f} samples/s, "
        f"{achieved:.1f} TFLOP/s"
        + (f", MFU {mfu:.1%}" if isinstance(mfu, float) else f", MFU skipped ({peak_from})")
        + f"; train_step {result['train_step_share']:.1%} of the loop iteration"
    )
    if keep:
        return result, trainer
    del trainer
    free_memory()
    return result, None


def objectives_one(run: Run, trainer) -> dict:
    """Stage-1 step time of each objective vs ``lm`` on the trainer's own model and batches."""
    import torch

    from trainer.data import make_loader
    from trainer.models.build import TrainModule, objective_context
    from trainer.objectives import build_objectives, objective_weights, parse_spec
    from trainer.objectives.base import StepContext

    args, device = run.args, run.args.device
    cfg = trainer.cfg
    vlm = trainer.vlm
    ctx = objective_context(cfg, vlm.llm, trainer.tokenizer, trainer.manifest, cfg.shards)
    loader = iter(make_loader(trainer.stream))
    batches = [trainer.to_device(next(loader)) for _ in range(args.objective_rounds + 1)]
    steps = {}
    for spec in SPECS:
        objectives = build_objectives(spec, cfg.objectives, ctx).to(trainer.accelerator.device)
        module = TrainModule(vlm, objectives).train()
        weights = objective_weights(cfg.objectives, parse_spec(spec))
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def step(batch, module=module, weights=weights, optimizer=optimizer) -> float:
            sync(device)
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                losses, _ = module(batch, StepContext())
                total = sum(weights[k] * v for k, v in losses.items())
            total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            return time.perf_counter() - start

        steps[spec] = step
    for spec in SPECS:  # warm-up: kernels, SEA's word table
        steps[spec](batches[0])
    best = {spec: math.inf for spec in SPECS}
    for r, batch in enumerate(batches[1:]):
        for i in range(len(SPECS)):  # each round starts at another objective
            spec = SPECS[(r + i) % len(SPECS)]
            best[spec] = min(best[spec], steps[spec](batch))
    result = {spec: {"step_s": best[spec], "time_vs_lm": best[spec] / best["lm"]} for spec in SPECS}
    return result


def trainer_section(run: Run) -> None:
    from bench_overhead import write_shards

    args = run.args
    shapes = TINY_LLMS if args.tiny else LLMS
    num_patches, feature_dim = (16, 32) if args.tiny else (576, 1024)
    expert = (EXPERT[0], 16, 24) if args.tiny else EXPERT
    words = shipped_words(500 if args.tiny else None)
    need = {"pretrain": args.batch_stage1, "finetune": args.batch_stage2}
    per_run = args.warmup_steps + args.steps + 2
    t0 = time.perf_counter()
    shards = {
        "pretrain": write_shards(run.tmp / "shards-s1", args.batch_stage1 * per_run, num_patches, feature_dim,
                                 turns=1, words_per_reply=40, words=words, expert=expert),
        "finetune": write_shards(run.tmp / "shards-s2", args.batch_stage2 * per_run, num_patches, feature_dim,
                                 turns=3, words_per_reply=60, words=words, expert=expert),
    }  # fmt: skip
    run.say(f"[trainer] synthetic shards written in {time.perf_counter() - t0:.1f} s")
    for size in args.llm_sizes:
        shape = shapes[size]
        try:
            run.need(15 if args.tiny else 60, f"the {size} LLM")
            llm = build_llm(shape, run.tmp / f"llm-{size}", args.device)
        except Exception as err:  # noqa: BLE001
            if not isinstance(err, OutOfTime):
                traceback.print_exc()
            for stage in ("pretrain", "finetune"):
                run.skip("trainer", f"{size} {stage}", str(err))
            run.skip("objectives", size, str(err))
            continue
        for stage in ("finetune", "pretrain"):  # stage 1 last: its model stays for the objectives
            key = f"{size} {stage}"
            trainer = None
            try:
                run.need(10 if args.tiny else 45, f"{key} steps")
                result, trainer = trainer_one(run, size, stage, llm, shards[stage], need[stage],
                                              keep=stage == "pretrain")  # fmt: skip
                run.report["trainer"][key] = result
            except Exception as err:  # noqa: BLE001
                if not isinstance(err, OutOfTime):
                    traceback.print_exc()
                run.skip("trainer", key, str(err) if isinstance(err, OutOfTime) else f"failed: {err!r}")
                if stage == "pretrain":
                    run.skip("objectives", size, f"no stage-1 model: {err}")
                continue
            if stage == "pretrain":
                try:
                    run.need(10 if args.tiny else 40, f"the {size} objectives")
                    objectives = objectives_one(run, trainer)
                    run.report["objectives"][size] = objectives
                    run.say(
                        f"[objectives] {size} stage 1: "
                        + ", ".join(f"{s} {v['time_vs_lm']:.3f}" for s, v in objectives.items() if s != "lm")
                        + f" x lm ({objectives['lm']['step_s'] * 1000:.1f} ms)"
                    )
                except Exception as err:  # noqa: BLE001
                    if not isinstance(err, OutOfTime):
                        traceback.print_exc()
                    run.skip(
                        "objectives", size, str(err) if isinstance(err, OutOfTime) else f"failed: {err!r}"
                    )
            del trainer
            free_memory()
        if args.loader_workers and size == args.llm_sizes[0]:
            # the default loader runs in the main process, serially with the step: the same run with workers
            key = f"{size} pretrain+{args.loader_workers}workers"
            try:
                run.need(45, f"{key} steps")
                result, _ = trainer_one(run, size, "pretrain", llm, shards["pretrain"], need["pretrain"],
                                        keep=False, workers=args.loader_workers)  # fmt: skip
                run.report["trainer"][key] = result
            except Exception as err:  # noqa: BLE001
                if not isinstance(err, OutOfTime):
                    traceback.print_exc()
                run.skip("trainer", key, str(err) if isinstance(err, OutOfTime) else f"failed: {err!r}")


# ---------------------------------------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------------------------------------


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass
    return time.perf_counter() - start


def reader_section(run: Run) -> None:
    from bench_overhead import write_shards

    from trainer.config import DataConfig
    from trainer.data import StreamLayout, build_stream, make_loader
    from trainer.data.conversations import text_format
    from trainer.models.llm import load_llm
    from visalign import shards as S

    args = run.args
    num_patches, feature_dim = (16, 32) if args.tiny else (576, 1024)
    try:
        run.need(10 if args.tiny else 60, "the reader")
    except OutOfTime as err:
        run.skip("reader", "reader", str(err))
        return
    t0 = time.perf_counter()
    root = write_shards(run.tmp / "reader", args.reader_samples, num_patches, feature_dim, turns=1,
                        words_per_reply=40, samples_per_shard=250)  # fmt: skip
    write_s = time.perf_counter() - t0
    manifest = S.read_manifest(root)
    paths = manifest.shard_paths(root)
    total = sum(p.stat().st_size for p in paths)
    per_sample = total / manifest.num_samples
    _, tokenizer = load_llm("tiny-llm")
    fmt = text_format(DataConfig(), "pretrain")
    drop_cache(paths)
    cold = raw_read(paths)
    warm = raw_read(paths)
    report = run.report["reader"]
    report["samples"] = manifest.num_samples
    report["mb_per_sample"] = per_sample / 1e6
    report["written_s"] = write_s
    report["raw_read_cold_mb_s"] = total / 1e6 / cold
    report["raw_read_warm_mb_s"] = total / 1e6 / warm
    batch = args.reader_batch
    num_batches = max(1, manifest.num_samples // batch - 2)
    for workers in args.reader_workers:
        key = f"workers={workers}"
        try:
            run.need(5 if args.tiny else 30, f"the reader with {workers} workers")
            layout = StreamLayout(world_size=1, rank=0, num_workers=workers, batch_size=batch, seed=0,
                                  shuffle_buffer=256)  # fmt: skip
            # what `trainer run` builds on this device: float16 pinned batches on a GPU (data.host_dtype auto)
            on_cuda = args.device.startswith("cuda")
            stream = build_stream(root, manifest, tokenizer, fmt, 2048, layout, float16=on_cuda)
            drop_cache(paths)
            loader = iter(make_loader(stream, pin_memory=on_cuda))
            next(loader)  # worker start-up
            start = time.perf_counter()
            for _ in range(num_batches):
                next(loader)
            seconds = time.perf_counter() - start
            del loader
            samples_s = num_batches * batch / seconds
            report[key] = {"samples_per_s": samples_s, "mb_per_s": samples_s * per_sample / 1e6,
                           "vs_raw_cold": samples_s * per_sample / (total / cold),
                           "host_dtype": "float16" if on_cuda else "float32"}  # fmt: skip
            run.say(
                f"[reader] {workers} workers: {samples_s:.0f} samples/s, {samples_s * per_sample / 1e6:.0f} MB/s "
                f"(raw read {total / 1e6 / cold:.0f} MB/s cold, {total / 1e6 / warm:.0f} MB/s warm)"
            )
        except OutOfTime as err:
            run.skip("reader", key, str(err))
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            run.skip("reader", key, f"failed: {err!r}")
    # what one GPU consumes in stage 1 at the smallest LLM (the most demanding), best loader setting
    size = args.llm_sizes[0]
    consumed = [r["samples_per_s"] for key, r in run.report["trainer"].items()
                if key.startswith(f"{size} pretrain") and "samples_per_s" in r]  # fmt: skip
    if consumed and "samples_per_s" in report.get("workers=0", {}):
        report["stage1_gpu_samples_per_s"] = max(consumed)
        report["vs_8_gpus_stage1"] = report["workers=0"]["samples_per_s"] / (8 * max(consumed))
    else:
        report["vs_8_gpus_stage1"] = {"skipped": "no stage-1 trainer measurement in this run"}


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------


def fmt(value, spec: str = ".3f") -> str:
    if isinstance(value, dict) and "skipped" in value:
        return f"skipped ({value['skipped']})"
    if isinstance(value, dict) and "median" in value:
        return f"{value['median']:{spec}} ({value['min']:{spec}}-{value['max']:{spec}})"
    if isinstance(value, (int, float)):
        return f"{value:{spec}}"
    return str(value)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# visalign GPU benchmark",
        "",
        f"{env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"{'tiny sizes (a check of the script, not a measurement)' if env['tiny'] else 'real sizes'}, "
        f"{env['wall_s']:.0f} s. Values: median (min-max) over repeats.",
        "",
        "## Label stage vs bare encoder forward",
        "",
        "| tower | search | stage img/s | bare forward img/s | stage / forward | search alone ms/img |",
        "|---|---|---|---|---|---|",
    ]
    for tower, entry in report["label"].items():
        if "skipped" in entry:
            lines.append(f"| {tower} | | {fmt(entry)} | | | |")
            continue
        for backend, row in entry["backends"].items():
            search = entry["search_alone_ms_per_image"].get(backend, {"skipped": "not timed"})
            if "skipped" in row:
                lines.append(f"| {tower} | {backend} | {fmt(row)} | | | |")
            else:
                lines.append(f"| {tower} | {backend} | {fmt(row['stage_ips'], '.1f')} | "
                             f"{fmt(row['forward_ips'], '.1f')} | {fmt(row['ratio'])} | {fmt(search)} |")  # fmt: skip
    lines += [
        "",
        "## Trainer step (the real Trainer loop; bf16 autocast on a GPU)",
        "",
        "| LLM | stage | batch x tokens | step ms | tokens/s | samples/s | TFLOP/s | MFU | train_step share | "
        "peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in report["trainer"].items():
        size, stage = key.split(" ", 1)
        if "skipped" in r:
            lines.append(f"| {size} | {stage} | {fmt(r)} | | | | | | | |")
            continue
        step_ms = {k: v * 1000 for k, v in r["step_s"].items()}
        mfu = r["mfu"]
        lines.append(
            f"| {size} | {stage} | {r['batch_size']} x {r['tokens_per_step'] // r['batch_size']} | "
            f"{fmt(step_ms, '.1f')} | {r['tokens_per_s']:,.0f} | {r['samples_per_s']:.1f} | "
            f"{r['achieved_tflops']:.3g} | {f'{mfu:.1%}' if isinstance(mfu, float) else fmt(mfu)} | "
            f"{r['train_step_share']:.1%} | {fmt(r.get('peak_memory_gib', {'skipped': 'CPU'}), '.1f')} |"
        )
    lines += ["", "## Objective step time vs lm (stage 1)", "", "| LLM | lm ms | " + " | ".join(
        s for s in SPECS if s != "lm") + " |", "|---|---|" + "---|" * (len(SPECS) - 1)]  # fmt: skip
    for size, r in report["objectives"].items():
        if "skipped" in r:
            lines.append(f"| {size} | {fmt(r)} |" + " |" * (len(SPECS) - 1))
            continue
        lines.append(f"| {size} | {r['lm']['step_s'] * 1000:.1f} | "
                     + " | ".join(f"{r[s]['time_vs_lm']:.3f}" for s in SPECS if s != "lm") + " |")  # fmt: skip
    rd = report["reader"]
    lines += ["", "## Streaming reader (CLIP-L-sized samples)", ""]
    if "samples" in rd:
        lines += [
            f"{rd['samples']} samples of {rd['mb_per_sample']:.2f} MB; raw read {rd['raw_read_cold_mb_s']:.0f} "
            f"MB/s cold, {rd['raw_read_warm_mb_s']:.0f} MB/s warm; reader with 0 workers / 8 GPUs' stage-1 "
            f"consumption (0.5B): {fmt(rd['vs_8_gpus_stage1'], '.1f')}",
            "",
            "| loader workers | samples/s | MB/s | vs raw cold read |",
            "|---|---|---|---|",
        ]
        for key, r in rd.items():
            if key.startswith("workers="):
                if "skipped" in r:
                    lines.append(f"| {key[8:]} | {fmt(r)} | | |")
                else:
                    lines.append(f"| {key[8:]} | {r['samples_per_s']:.0f} | {r['mb_per_s']:.0f} | "
                                 f"{r['vs_raw_cold']:.2f} |")  # fmt: skip
    else:
        lines += [fmt(rd.get("reader", {"skipped": "not run"}))]
    if report["notes"]:
        lines += ["", "## Not measured", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def collect_skips(report: dict) -> list[str]:
    """One line per reason: what was not measured, and where."""
    where_by_reason: dict[str, list[str]] = {}

    def walk(node, where):
        if isinstance(node, dict):
            if "skipped" in node and len(node) == 1:
                where_by_reason.setdefault(node["skipped"], []).append(where)
                return
            for key, value in node.items():
                walk(value, f"{where} / {key}")

    for section in ("label", "trainer", "objectives", "reader"):
        walk(report[section], section)
    return [f"{reason}: {', '.join(where)}" for reason, where in where_by_reason.items()]


def environment(args, wall_s: float) -> dict:
    import torch
    import transformers

    on_cuda = args.device.startswith("cuda")
    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if on_cuda else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "tiny": args.tiny,
        "wall_s": wall_s,
        "loadavg": os.getloadavg(),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when visible), cuda or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a check of the script in seconds")
    parser.add_argument("--out", default=None, help="report folder (default: $OUT, else ./gpu-bench)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 dense peak")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting new pieces after this")
    parser.add_argument("--sections", nargs="+", default=["label", "trainer", "reader"],
                        choices=["label", "trainer", "reader"], help="trainer includes the objectives")  # fmt: skip
    parser.add_argument("--towers", nargs="+", default=list(TOWERS), choices=list(TOWERS))
    parser.add_argument("--llm-sizes", nargs="+", default=None, help="default: 0.5b 1.5b (tiny-a tiny-b)")
    parser.add_argument("--search-backends", nargs="+", default=["bf16", "torch", "faiss"])
    parser.add_argument("--images", type=int, default=None, help="images per label-stage repeat")
    parser.add_argument("--label-batch", type=int, default=None)
    parser.add_argument("--num-words", type=int, default=None, help="first N words of the 41k list")
    parser.add_argument("--repeats", type=int, default=None, help="label-stage repeats per backend")
    parser.add_argument("--batch-stage1", type=int, default=None)
    parser.add_argument("--batch-stage2", type=int, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed trainer steps")
    parser.add_argument("--objective-rounds", type=int, default=None)
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="also run the first size's stage 1 with this many loader workers (0: no)")  # fmt: skip
    parser.add_argument("--reader-samples", type=int, default=None)
    parser.add_argument("--reader-batch", type=int, default=16)
    parser.add_argument("--reader-workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (--tiny: 1)")
    args = parser.parse_args(argv)
    # (real, tiny) defaults
    defaults = {"images": (512, 8), "label_batch": (64, 4), "num_words": (None, 300), "repeats": (3, 1),
                "batch_stage1": (16, 2), "batch_stage2": (8, 2), "warmup_steps": (3, 1), "steps": (5, 2),
                "objective_rounds": (3, 1), "reader_samples": (2000, 48), "loader_workers": (4, 0)}  # fmt: skip
    for key, (real, tiny) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else real)
    if args.threads is None and args.tiny:
        args.threads = 1  # tiny ops: a second thread only adds waiting, the more so on a busy machine
    if args.llm_sizes is None:
        args.llm_sizes = list(TINY_LLMS if args.tiny else LLMS)
    if args.tiny:
        args.reader_workers = [w for w in args.reader_workers if w <= 1] or [0]
    return args


def main(argv=None) -> Path:
    import torch

    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_all(args)
    finally:
        torch.set_num_threads(threads)  # called in-process (the tests): leave the caller's setting


def run_all(args) -> Path:
    import torch

    out = Path(args.out or os.environ.get("OUT") or "gpu-bench")
    out.mkdir(parents=True, exist_ok=True)
    run = Run(args)
    start = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu (with --tiny)")
    if not args.device.startswith("cuda"):
        run.report["notes"].append(f"device {args.device}: no GPU numbers in this run")
    run.say(f"visalign GPU benchmark on {args.device} ({'tiny' if args.tiny else 'real'} sizes), "
            f"budget {args.budget_s:.0f} s, work folder {run.tmp}")  # fmt: skip
    sections = {"label": label_section, "trainer": trainer_section, "reader": reader_section}
    for name in ("label", "trainer", "reader"):
        if name not in args.sections:
            keys = {"label": args.towers, "trainer": [], "reader": ["reader"]}[name]
            for key in keys:
                run.skip(name, key, "section not asked for (--sections)")
            if name == "trainer":
                for size in args.llm_sizes:
                    run.skip("trainer", f"{size} pretrain", "section not asked for (--sections)")
                    run.skip("objectives", size, "section not asked for (--sections)")
            continue
        try:
            sections[name](run)
        except Exception as err:  # noqa: BLE001 - one broken section must not lose the others
            traceback.print_exc()
            run.report[name]["error"] = {"skipped": f"section failed: {type(err).__name__}: {err}"}
    for section in ("label", "trainer", "objectives", "reader"):
        if not run.report[section]:
            run.report[section]["none"] = {"skipped": "nothing measured"}
    run.report["notes"] += collect_skips(run.report)
    run.report["environment"] = environment(args, time.perf_counter() - start)
    (out / "gpu-bench.json").write_text(json.dumps(run.report, indent=1, default=float) + "\n")
    (out / "gpu-bench.md").write_text(markdown(run.report))
    run.say(
        f"\nwrote {out / 'gpu-bench.json'} and {out / 'gpu-bench.md'} in {time.perf_counter() - start:.0f} s"
    )
    if run.report["notes"]:
        run.say("not measured:\n  " + "\n  ".join(run.report["notes"]))
    with contextlib.suppress(OSError):
        import shutil

        shutil.rmtree(run.tmp)
    return out


if __name__ == "__main__":
    main()
