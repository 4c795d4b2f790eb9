"""Memory per GPU of LLaVA-sized configurations (the table of docs/scaling.md), and measured peaks on CPU.

    python benchmarks/bench_memory.py table                 # the docs table: estimates, no weights needed
    python benchmarks/bench_memory.py measure [--layers 24]  # 2-process DDP vs FSDP runs of a 0.5B-shaped
                                                             # random Llama: measured peak RSS vs the estimate

``table`` builds each LLM on the meta device from its real shape (no weights), applies the stage (and LoRA)
exactly as ``trainer run`` does, and asks ``trainer.memory.estimate_memory`` (the function ``trainer run``
prints at start) for the bytes per process on 8 processes. ``tests/test_fsdp.py`` checks that the table in
docs/scaling.md is this output, so the two cannot drift.

``measure`` launches ``trainer run`` (``accelerate launch``, 2 processes, gloo) with
``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``: without them glibc keeps freed all-gather buffers on
its heap and resident memory shows what was cached, not what is live. It reports the peak resident set of the
steps (``peak_mem_mib`` in log.jsonl, the high-water mark reset before the first step) next to the estimate
(RUN/memory.json). The resident set also holds the framework (~0.5 GiB of libraries), the loader and
allocator slack, which the estimate leaves out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

TABLE_BEGIN = "<!-- memory table: python benchmarks/bench_memory.py table -->"
TABLE_END = "<!-- end of memory table -->"
GPU_BYTES = 80 * 10**9
USABLE = 0.9  # CUDA context, allocator fragmentation, NCCL buffers
PROCESSES = 8
FEATURE_DIM = 1024  # CLIP ViT-L/14-336, LLaVA-1.5's tower

# (family, config): the LLMs the papers train (SEA / BASIC: Vicuna-7B/13B; distillation: Qwen2-7B; LLaVA-
# OneVision 0.5B: Qwen2-0.5B)
SHAPES = {
    "Qwen2-0.5B": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                 tie_word_embeddings=True)),
    "Vicuna-7B": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                tie_word_embeddings=False)),
    "Qwen2-7B": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                               tie_word_embeddings=False)),
    "Vicuna-13B": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                                 tie_word_embeddings=False)),
}  # fmt: skip

# (stage label, setup label, stage, strategy, checkpointing, LoRA rank, micro-batch, tokens): LLaVA-1.5's
# per-GPU batches (pretrain 32, finetune 16 on 8 GPUs) at 576 visual tokens + text (stage 2 at the full
# --max-length 2048: the worst case a batch can reach)
SETUPS = [
    ("1 pretrain", "DDP", "pretrain", "ddp", False, 0, 32, 640),
    ("1 pretrain", "DDP + checkpointing", "pretrain", "ddp", True, 0, 32, 640),
    ("1 pretrain", "FSDP + checkpointing", "pretrain", "fsdp", True, 0, 32, 640),
    ("2 finetune", "DDP", "finetune", "ddp", False, 0, 16, 2048),
    ("2 finetune", "DDP + checkpointing", "finetune", "ddp", True, 0, 16, 2048),
    ("2 finetune", "FSDP", "finetune", "fsdp", False, 0, 16, 2048),
    ("2 finetune", "FSDP + checkpointing", "finetune", "fsdp", True, 0, 16, 2048),
    ("2 finetune", "LoRA r128 + checkpointing (DDP)", "finetune", "ddp", True, 128, 16, 2048),
    ("2 finetune", "LoRA r128 + checkpointing (FSDP)", "finetune", "fsdp", True, 128, 16, 2048),
]


@functools.cache
def meta_module(shape: str, stage: str, lora_rank: int):
    """A TrainModule of ``shape`` on the meta device, what trains set as ``trainer run`` sets it; frozen LLM
    weights in bf16 (``--model.dtype auto`` on a GPU), trainable ones float32."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from trainer.models.build import TrainModule
    from trainer.models.lora import add_adapters, train_adapters_only
    from trainer.models.projector import build_projector
    from trainer.models.vlm import VisualLM, apply_stage

    family, kwargs = SHAPES[shape]
    config_cls, model_cls = (
        (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    with torch.device("meta"):
        llm = model_cls(config_cls(**kwargs))
        full_finetune = stage == "finetune" and not lora_rank
        llm.to(torch.float32 if full_finetune else torch.bfloat16)
        projector = build_projector("mlp2x_gelu", FEATURE_DIM, kwargs["hidden_size"])
        vlm = VisualLM(llm, projector)
        if lora_rank:
            add_adapters(
                llm,
                lora_rank,
                2.0 * lora_rank,
                0.05,
                ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            )
    logging_off()
    if lora_rank:
        train_adapters_only(vlm)
    else:
        apply_stage(vlm, stage)
    return TrainModule(vlm, torch.nn.ModuleDict())


def logging_off() -> None:
    import logging

    for name in ("trainer", "trainer.models.vlm", "trainer.models.lora"):
        logging.getLogger(name).setLevel(logging.WARNING)


def memory_table() -> str:
    from trainer.memory import GIB, MemoryPlan, estimate_memory

    rows = [
        "| LLM | stage | setup (8 GPUs, bf16) | micro-batch x tokens | trainable | parameters | gradients | "
        "optimizer | compute copies | activations | total GiB | fits 80 GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in SHAPES:
        for stage_label, setup, stage, strategy, ckpt, rank, batch, tokens in SETUPS:
            module = meta_module(shape, stage, rank)
            plan = MemoryPlan(strategy=strategy, world_size=PROCESSES, compute_dtype=torch.bfloat16,
                              batch_size=batch, seq_len=tokens, checkpointing=ckpt)  # fmt: skip
            est = estimate_memory(module, plan)
            gib = [f"{x / GIB:.1f}" for x in (est.parameters, est.gradients, est.optimizer,
                                             est.compute_copies, est.activations, est.total)]  # fmt: skip
            fits = "yes" if est.total <= USABLE * GPU_BYTES else "no"
            trainable = f"{est.trainable / 1e6:,.0f}M"
            rows.append(f"| {shape} | {stage_label} | {setup} | {batch} x {tokens} | {trainable} | "
                        + " | ".join(gib) + f" | {fits} |")  # fmt: skip
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------------------------
# measure
# ---------------------------------------------------------------------------------------------------------


def write_llm(folder: Path, layers: int) -> None:
    """A random-init Llama with Qwen2-0.5B's widths (tied, 151,936 vocabulary) and the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.models.llm import load_llm

    _, tokenizer = load_llm("tiny-llm")
    config = LlamaConfig(hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def measure(args) -> None:
    from tests.conftest import write_tiny_shards
    from tests.launching import accelerate, launch_env

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-memory-"))
    shards, cache = work / "shards", work / "cache"
    os.environ["VISALIGN_CACHE"] = str(cache)
    if not shards.exists():
        write_tiny_shards(shards, num_samples=8, samples_per_shard=4, P=16, D=FEATURE_DIM)
    rows = []
    for stage, layers, dtype in (("pretrain", args.layers, "fp32"), ("pretrain", args.layers, "bf16"),
                                 ("finetune", args.finetune_layers, "fp32")):  # fmt: skip
        llm = work / f"llm-{layers}"
        if not llm.exists():
            write_llm(llm, layers)
        for strategy in ("ddp", "fsdp"):
            run = work / f"run-{stage}-{dtype}-{strategy}-{layers}"
            cmd = [*accelerate(), "-m", "trainer.cli", "run", "--shards", str(shards), "--output", str(run),
                   "--llm", str(llm), "--stage", stage, "--model.dtype", dtype, "--parallel.strategy", strategy,
                   "--max-steps", str(args.steps), "--batch-size", "1", "--max-length", "80",
                   "--save-every", "1000", "--logging.progress", "false", "--logging.tensorboard", "false",
                   "--optim.warmup_ratio", "0"]  # fmt: skip
            env = launch_env(cache, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            if out.returncode:
                print(out.stderr[-3000:])
                raise SystemExit(f"{run.name} failed")
            records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
            estimate = json.loads((run / "memory.json").read_text())["bytes"]
            mib = {k: v / 2**20 for k, v in estimate.items() if isinstance(v, int)}
            rows.append((stage, layers, dtype, strategy, max(r["peak_mem_mib"] for r in records), mib,
                         [r["total_loss"] for r in records]))  # fmt: skip
            print(json.dumps(rows[-1][:5]), flush=True)
    print(
        "\n| stage | layers | frozen dtype | strategy | measured peak RSS MiB | estimate MiB (params + grads + "
        "optimizer + compute copies + activations) | losses |"
    )
    print("|---|---|---|---|---|---|---|")
    for stage, layers, dtype, strategy, peak, mib, losses in rows:
        parts = " + ".join(f"{mib[k]:.0f}" for k in ("parameters", "gradients", "optimizer", "compute_copies",
                                                     "activations"))  # fmt: skip
        print(
            f"| {stage} | {layers} | {dtype} | {strategy} | {peak:.0f} | {parts} = {mib['total']:.0f} | "
            f"{', '.join(f'{x:.6f}' for x in losses)} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("table", help="print the docs/scaling.md table")
    m = sub.add_parser("measure", help="2-process DDP vs FSDP runs of a 0.5B-shaped random Llama")
    m.add_argument(
        "--layers", type=int, default=24, help="decoder layers of the stage-1 model (Qwen2-0.5B: 24)"
    )
    m.add_argument("--finetune-layers", type=int, default=8, help="decoder layers of the stage-2 model")
    m.add_argument("--steps", type=int, default=3)
    m.add_argument("--work", default=None, help="folder for the model, shards and runs (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cmd == "table":
        sys.stdout.write(memory_table())
    else:
        measure(args)


if __name__ == "__main__":
    main()
