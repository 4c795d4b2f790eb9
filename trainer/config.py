"""``TrainConfig``: every setting of ``trainer run``, as nested dataclasses parsed by ``visalign.config``.

Input: defaults < ``--config jobs/*.yaml`` < flags (``--optim.lr 2e-5`` or the short aliases that
``trainer.cli`` defines, e.g. ``--lr``). Output: a ``TrainConfig``; ``trainer run`` writes it to
``RUN/config.yaml`` before it starts. Each field's docstring is its ``--help`` text.

Batch arithmetic (documented once, used by the presets): the global batch of one optimiser step is
``data.batch_size x optim.grad_accum x number of processes`` (all nodes).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from trainer.objectives import ObjectivesConfig


@dataclasses.dataclass
class DataConfig:
    batch_size: int = 4
    """micro-batch size per process (global batch = batch_size x grad_accum x processes)"""
    num_workers: int = 0
    """dataloader worker processes per rank; each worker reads its own disjoint slice of the samples"""
    shuffle_buffer: int = 256
    """samples held in each worker's shuffle buffer (memory ~ buffer x one sample's features); 1 = none"""
    max_length: int = 2048
    """longest token sequence (text + visual tokens); longer texts are truncated, never the visual block"""
    conv_template: Literal["auto", "plain", "vicuna_v1", "llama_3", "chatml", "qwen_2", "tokenizer"] = "auto"
    """conversation format (docs/conversations.md): 'plain' (LLaVA-1.5 stage 1: <image>, caption, newline),
    'vicuna_v1' (LLaVA-1.5 stage 2: system prompt, USER:/ASSISTANT:, the LLM's eos after each reply),
    'llama_3', 'chatml' (= 'qwen_2'), 'tokenizer' (the LLM's own chat template); 'auto' = plain for
    --stage pretrain, tokenizer for finetune. Only assistant replies and their end marker are supervised"""
    image_position: Literal["auto", "keep", "first"] = "auto"
    """where the visual tokens go in a turn with <image>: 'first' moves the mark to the start of its turn
    followed by a newline (LLaVA's preprocess_multimodal), 'keep' leaves it where the record has it; 'auto' =
    first for the named templates, keep for 'tokenizer'. A record without the mark gets it at the start of
    its first user turn either way"""
    system_prompt: str | None = None
    """system prompt of samples that have none: None = the template's own (LLaVA's for the named templates,
    whatever the LLM's chat template inserts for 'tokenizer'), '' = none (drops e.g. SmolLM2's default),
    else this text"""
    verify_shards: Literal["full", "size"] = "full"
    """compare every shard with its manifest before training: 'full' reads every byte once (sha256 + a
    strict decode; a passing shard is stamped in the model cache so later runs skip it), 'size' checks size,
    tar headers and sample counts only (seconds, but misses bytes changed in place)"""


@dataclasses.dataclass
class ModelConfig:
    llm: str | None = None
    """LLM: a registry name (tiny-llm, smollm2-135m) or a local HF folder"""
    projector: str = "mlp2x_gelu"
    """projector architecture (registry name: linear, mlp2x_gelu)"""
    init_projector: str | None = None
    """finetune: a stage-1 run folder or checkpoint folder whose projector initialises this run"""
    gradient_checkpointing: bool = False
    """recompute LLM activations in the backward pass (less memory, ~30% slower)"""
    attn_implementation: str = "sdpa"
    """LLM attention kernel; objectives that need attention probabilities ask the model wrapper for them"""
    cache_dir: str | None = None
    """model cache (default $VISALIGN_CACHE or ~/.cache/visalign)"""


@dataclasses.dataclass
class OptimConfig:
    max_steps: int = 100
    """optimiser steps of the whole run; every rank runs exactly this many (the stream starts new passes)"""
    lr: float = 1e-3
    """peak learning rate (LLaVA: 1e-3 stage 1, 2e-5 stage 2)"""
    weight_decay: float = 0.0
    """AdamW weight decay; never applied to biases and norm weights"""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas"""
    eps: float = 1e-8
    """AdamW epsilon"""
    warmup_ratio: float = 0.03
    """linear warm-up over this fraction of max_steps, then cosine decay"""
    min_lr_ratio: float = 0.0
    """the cosine decays to lr x min_lr_ratio"""
    grad_accum: int = 1
    """micro-batches per optimiser step"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm on every optimiser step (0 = no clipping)"""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """autocast precision; 'auto' = bf16 on a GPU that supports it, else fp32 (bf16 is slow on CPU)"""


@dataclasses.dataclass
class CheckpointConfig:
    save_every: int = 500
    """write RUN/checkpoints/step-NNNNNN every this many steps (and at the end)"""
    keep_last: int = 2
    """keep only the newest this many checkpoints (0 = keep all)"""


@dataclasses.dataclass
class LoggingConfig:
    log_every: int = 1
    """write a log.jsonl record (and send it to the trackers) every this many steps"""
    report_to: tuple[str, ...] = ("tensorboard",)
    """trackers (Accelerate's) that get every log.jsonl scalar under the same name: tensorboard, wandb,
    mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio, comma-separated; 'none' = log.jsonl only.
    They write inside RUN/ and need no network (W&B runs offline without credentials; docs/trainer.md)"""
    project: str = "visalign"
    """the W&B project / MLflow experiment the run is logged under (the run is named after --output)"""
    tensorboard: bool | None = None
    """deprecated, use --logging.report-to: false removes tensorboard from it, true adds it"""
    progress: bool = True
    """show a tqdm progress bar on the main process"""
    seen_ids: bool = False
    """debug: append every consumed sample id to RUN/seen-rank{r}.jsonl (coverage checks)"""


@dataclasses.dataclass
class HeldoutEvalConfig:
    shards: str | None = None
    """a `pipeline label` output of held-out images (same encoder and word list as --shards; a folder or a
    URL), evaluated with the `trainer eval` measures during training; None = no periodic evaluation"""
    every: int = 0
    """evaluate every this many steps (and at the last step); 0 = never"""
    samples: int = 32
    """held-out samples, taken in manifest order from the first shards (the same ones every time)"""
    batch_size: int = 8
    """samples per evaluation forward pass"""
    layers: tuple[int, ...] = ()
    """layers measured (0 = projector output); default: 0, the middle and the last (all: `trainer eval`)"""


@dataclasses.dataclass
class TrainConfig:
    shards: str
    """a finished `pipeline label` output folder (manifest.json + shard-*.tar), or its URL: https://,
    s3://, gs://, ... (streamed, never copied; docs/shards.md)"""
    output: str
    """the run folder: config.yaml, env.json, log.jsonl, tracker files (tensorboard/, ...), checkpoints/"""
    objective: str = "lm"
    """objectives, '+'-separated: lm, sea, basic, distill (lm is always included)"""
    stage: Literal["pretrain", "finetune"] = "pretrain"
    """pretrain: train the projector (+ objective modules); finetune: projector + LLM"""
    seed: int = 0
    """seed of initialisation, shuffling and objective sampling"""
    resume: bool = False
    """continue the run in --output from its latest complete checkpoint"""
    stop_after: int | None = None
    """checkpoint and stop at this step although the schedule runs to max_steps (time-limited jobs;
    continue later with --resume)"""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    eval: HeldoutEvalConfig = dataclasses.field(default_factory=HeldoutEvalConfig)
    objectives: ObjectivesConfig = dataclasses.field(default_factory=ObjectivesConfig)
