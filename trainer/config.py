"""``TrainConfig``: every setting of ``trainer run``, as nested dataclasses parsed by ``visalign.config``.

Input: defaults < ``--config jobs/*.yaml`` < flags (``--optim.lr 2e-5`` or the short aliases that
``trainer.cli`` defines, e.g. ``--lr``). Output: a ``TrainConfig``, checked on construction (every numeric
setting in range, one ``ConfigError`` line naming the flag otherwise); ``trainer run`` writes it to
``RUN/config.yaml`` once the start is accepted. Each field's docstring is its ``--help`` text.

Resume rules (``trainer.train``): ``RESUME_IGNORED`` lists the settings that never change the computation
(a resume may change them freely); ``RESUME_FIXED`` those a checkpoint cannot follow (a different model or
data split: always refused); any other difference is refused unless ``--resume-with-changes``.

Batch arithmetic (documented once, used by the presets): the global batch of one optimiser step is
``data.batch_size x optim.grad_accum x number of processes`` (all nodes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from trainer.objectives import ObjectivesConfig
from visalign.config import ConfigError


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
    host_dtype: Literal["auto", "float32", "float16"] = "auto"
    """dtype of the features, expert features and label scores in the batches the loader hands over:
    'float16' = as stored in the shards, converted to float32 on the device (half the host copies and
    host-to-device bytes; the same values), 'float32' = converted by the loader; 'auto' = float16 on GPUs,
    float32 on CPU (where the device is the training process itself)"""
    verify_shards: Literal["full", "size"] = "full"
    """compare every shard with its manifest before training: 'full' reads every byte once (sha256 + a
    strict decode; a passing shard is stamped in the model cache so later runs skip it), 'size' checks size,
    tar headers and sample counts only (seconds, but misses bytes changed in place)"""


@dataclasses.dataclass
class LoraConfig:
    rank: int = 0
    """LoRA rank r: with --stage finetune the LLM stays frozen and rank-r adapters on target_modules train
    with the projector (PEFT); 0 = full fine-tuning. LLaVA-1.5's recipe: 128"""
    alpha: float = 16.0
    """LoRA alpha: the adapter output is scaled by alpha / rank (LLaVA-1.5: 256)"""
    dropout: float = 0.05
    """dropout on the adapter input during training (LLaVA-1.5: 0.05)"""
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    """names of the LLM's linear layers that get adapters (default: every linear layer of the decoder, as
    LLaVA-1.5; never the LM head)"""


@dataclasses.dataclass
class VisionConfig:
    mode: Literal["cached", "frozen", "train"] = "cached"
    """where the projector's input features come from: 'cached' = the shards' feat.npy (no tower loaded);
    'frozen' = the labelling tower run on the stored images every step, no weight of it trains (no_grad);
    'train' = the same tower, its weights trained at --model.vision.lr (SEA-PRIME's stage 2). frozen and
    train need shards labelled with `pipeline label --store-images`; labels and the distill target stay the
    shards' (docs/trainer.md)"""
    lr: float = 2e-6
    """peak learning rate of the tower's weights with mode 'train' (their own AdamW groups, same schedule;
    SEA-PRIME: 2e-6)"""
    path: str | None = None
    """where the tower's weights are read from (an HF folder); None = the folder or hub id the shards'
    manifest records. Its fingerprint must equal the manifest's (like `trainer export --encoder-path`)"""


@dataclasses.dataclass
class ModelConfig:
    llm: str | None = None
    """LLM: a registry name (tiny-llm, smollm2-135m) or a local HF folder"""
    projector: str = "mlp2x_gelu"
    """projector architecture (registry name: linear, mlp2x_gelu)"""
    init_projector: str | None = None
    """finetune: a stage-1 run folder or checkpoint folder whose projector initialises this run"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in the backward pass (activation checkpointing: less
    memory, ~30% slower, the same updates; under ddp and fsdp)"""
    attn_implementation: str = "sdpa"
    """LLM attention kernel; objectives that need attention probabilities ask the model wrapper for them"""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """storage dtype of the frozen LLM weights (stage 1: the whole LLM; LoRA: its base weights), which then
    also compute in it; trainable weights always keep float32 master copies. 'auto' = bf16 on a GPU that
    supports it, else fp32"""
    cache_dir: str | None = None
    """model cache (default $VISALIGN_CACHE or ~/.cache/visalign)"""
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    """LoRA adapters for --stage finetune (docs/scaling.md)"""
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    """the vision tower: cached features (default), or run online, frozen or trained (docs/trainer.md)"""


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
    """compute precision of the trainable weights (ddp: autocast; fsdp: gathered in this dtype, gradients
    reduced in fp32); 'auto' = bf16 on a GPU that supports it, else fp32 (bf16 is slow on CPU)"""
    projector_lr: float | None = None
    """peak learning rate of the projector; None = lr (LLaVA-1.5 LoRA: lr 2e-4, projector 2e-5)"""
    max_nonfinite_skips: int = 5
    """a step whose loss or gradient norm is not finite is skipped (weights and optimiser state untouched,
    recorded in log.jsonl); the run stops with an error after this many consecutive skipped steps"""


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
class ParallelConfig:
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """how processes share the model: 'ddp' = every process holds all of it; 'fsdp' = parameters, gradients
    and optimiser state sharded over the processes (FSDP2: one group per decoder layer + one for the rest);
    'auto' = fsdp when started with an Accelerate FSDP config (jobs/accelerate/fsdp.yaml), else ddp"""
    shard_frozen_llm: bool = True
    """fsdp with a frozen LLM (stage 1, LoRA's base weights): shard it too (1/N of its memory per process,
    gathered layer by layer every step) or keep a full copy on every process (no communication for it)"""
    reduce_every_micro_batch: bool = True
    """fsdp with --grad-accum > 1: reduce-scatter gradients after every micro-batch (sharded gradient
    memory) instead of keeping full-size gradients on every process until the window's last micro-batch
    (the same update up to rounding; false is bitwise equal to ddp but defeats gradient sharding)"""


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
    """continue the run in --output from its latest complete checkpoint; refused if a setting that changes
    the computation differs from the checkpoint's (each one listed, old -> new)"""
    resume_with_changes: bool = False
    """with --resume: continue although settings differ from the checkpoint's (new lr, schedule, weights,
    ...); the differences are logged and appended to RUN/config-history.jsonl"""
    stop_after: int | None = None
    """checkpoint and stop at this step although the schedule runs to max_steps (time-limited jobs;
    continue later with --resume)"""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    eval: HeldoutEvalConfig = dataclasses.field(default_factory=HeldoutEvalConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    objectives: ObjectivesConfig = dataclasses.field(default_factory=ObjectivesConfig)

    def __post_init__(self) -> None:
        validate(self)


# ---------------------------------------------------------------------------------------------------------
# validation: every numeric setting, at parse time, one line each
# ---------------------------------------------------------------------------------------------------------

_INT_RANGES: dict[str, tuple[int, int | None]] = {
    "seed": (0, 2**32 - 1),  # numpy's seed range
    "data.batch_size": (1, None),
    "data.num_workers": (0, None),
    "data.shuffle_buffer": (1, None),
    "data.max_length": (2, None),
    "optim.max_steps": (1, None),
    "optim.grad_accum": (1, None),
    "optim.max_nonfinite_skips": (1, None),
    "checkpoint.save_every": (1, None),
    "checkpoint.keep_last": (0, None),
    "logging.log_every": (1, None),
    "eval.every": (0, None),
    "eval.samples": (1, None),
    "eval.batch_size": (1, None),
    "model.lora.rank": (0, None),
    "objectives.sea.top_k": (0, None),
    "objectives.sea.window": (1, None),
    "objectives.basic.num_layers": (0, None),
    "objectives.basic.sds_chunk_size": (0, None),
}

# (low, high, low inclusive, high inclusive); None = unbounded
_FLOAT_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "optim.lr": (0.0, None, False, False),
    "optim.projector_lr": (0.0, None, False, False),
    "optim.weight_decay": (0.0, None, True, False),
    "optim.eps": (0.0, None, False, False),
    "optim.warmup_ratio": (0.0, 1.0, True, True),
    "optim.min_lr_ratio": (0.0, 1.0, True, True),
    "optim.max_grad_norm": (0.0, None, True, False),
    "model.lora.alpha": (0.0, None, False, False),
    "model.lora.dropout": (0.0, 1.0, True, False),
    "model.vision.lr": (0.0, None, False, False),
    "objectives.lm.weight": (0.0, None, True, False),
    "objectives.sea.weight": (0.0, None, True, False),
    "objectives.sea.init_temperature": (0.0, None, False, False),
    "objectives.sea.max_logit_scale": (0.0, None, False, False),
    "objectives.basic.das_weight": (0.0, None, True, False),
    "objectives.basic.sds_weight": (0.0, None, True, False),
    "objectives.distill.weight": (0.0, None, True, False),
}

_ALIAS = {
    "data.batch_size": "--batch-size",
    "data.max_length": "--max-length",
    "data.num_workers": "--num-workers",
    "optim.max_steps": "--max-steps",
    "optim.lr": "--lr",
    "optim.grad_accum": "--grad-accum",
    "checkpoint.save_every": "--save-every",
    "checkpoint.keep_last": "--keep-last",
    "logging.log_every": "--log-every",
}


def _get(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part, None)
    return value


def _flag(dotted: str) -> str:
    return f"--{dotted}" + (f" ({_ALIAS[dotted]})" if dotted in _ALIAS else "")


def validate(cfg: TrainConfig) -> None:
    """Raise ``ConfigError`` (one line naming the flag, the value and the valid range) for a setting that
    would give a traceback or a silent no-op later."""
    for dotted, (low, high) in _INT_RANGES.items():
        value = _get(cfg, dotted)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_flag(dotted)} must be an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            valid = f">= {low}" if high is None else f"in {low}..{high}"
            raise ConfigError(f"{_flag(dotted)} must be {valid}, got {value}")
    for dotted, (low, high, low_in, high_in) in _FLOAT_RANGES.items():
        value = _get(cfg, dotted)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and low is not None:
            ok = value >= low if low_in else value > low
        if ok and high is not None:
            ok = value <= high if high_in else value < high
        if not ok:
            lo = "" if low is None else f"{'>=' if low_in else '>'} {low:g}"
            hi = "" if high is None else f"{'<=' if high_in else '<'} {high:g}"
            raise ConfigError(
                f"{_flag(dotted)} must be a finite number {' and '.join(x for x in (lo, hi) if x)}, got {value!r}"
            )
    betas = tuple(cfg.optim.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"--optim.betas must be two numbers in [0, 1) (e.g. 0.9,0.999), got {list(betas)}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise ConfigError(f"--stop_after must be >= 1 (a step to stop at), got {cfg.stop_after}")
    if cfg.eval.layers and min(cfg.eval.layers) < 0:
        raise ConfigError(
            f"--eval.layers must be layer numbers >= 0 (0 = projector output), got {cfg.eval.layers}"
        )
    for distill_layer in cfg.objectives.distill.layer:  # the range against the LLM's depth: distill.py
        if isinstance(distill_layer, bool) or not isinstance(distill_layer, int):
            raise ConfigError(f"--objectives.distill.layer must be layer numbers, got {distill_layer!r}")
        if distill_layer != -1 and distill_layer < 1:
            raise ConfigError(
                f"--objectives.distill.layer must be -1 (last) or layers >= 1, got {distill_layer}"
            )
    lora = cfg.model.lora
    if lora.rank > 0:
        if cfg.stage != "finetune":
            raise ConfigError(
                f"--model.lora.rank {lora.rank} needs --stage finetune (stage 1 trains no LLM weights)"
            )
        if not lora.target_modules:
            raise ConfigError(
                "--model.lora.target_modules is empty; name the LLM's linear layers (q_proj,...)"
            )
    if cfg.model.vision.mode == "train" and cfg.eval.shards and cfg.eval.every > 0:
        raise ConfigError(
            "--eval.every with --model.vision.mode train: the periodic evaluation reads the held-out shards' "
            "cached features, which the tuned tower no longer gives; drop --eval.every (evaluate the HF export)"
        )
    if cfg.resume_with_changes and not cfg.resume:
        raise ConfigError("--resume_with_changes needs --resume")


# ---------------------------------------------------------------------------------------------------------
# resume rules
# ---------------------------------------------------------------------------------------------------------

RESUME_IGNORED = (
    "output",
    "shards",  # the shard *set* is compared by content (the manifest), not by path
    "resume",
    "resume_with_changes",
    "stop_after",
    "model.init_projector",  # only read at a run's first start; the checkpoint's projector wins
    "model.cache_dir",
    "model.vision.path",  # where the tower is read from; its fingerprint is checked
    "model.gradient_checkpointing",  # recomputation: the same numbers, less memory
    "data.host_dtype",  # where float16 -> float32 happens: the same numbers
    "optim.max_nonfinite_skips",
    "checkpoint.",
    "logging.",
    "eval.",
    "parallel.shard_frozen_llm",  # the same numbers, another memory / communication trade
    "data.verify_shards",  # how thoroughly the shards are checked before training, not what is trained
)
"""settings that never change what is computed: a resume may change them without being refused"""

RESUME_FIXED = (
    "stage",
    "objective",
    "seed",
    "model.llm",
    "model.projector",
    "model.lora.",
    "model.vision.mode",
    "data.batch_size",
    "data.num_workers",
    "data.shuffle_buffer",
)
"""settings a checkpoint cannot follow (other trainable tensors, or another data split so the loader position
means other samples): refused even with --resume-with-changes; start a new run (--init-projector)"""


def _matches(dotted: str, rules: tuple[str, ...]) -> bool:
    return any(dotted == r or (r.endswith(".") and dotted.startswith(r)) for r in rules)


def flat_settings(cfg_dict: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 1e-3, ...}`` from a nested config dict (``visalign.config.to_dict``)."""
    flat: dict[str, Any] = {}
    for key, value in cfg_dict.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def setting_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted: (old, new)}`` for every setting that changes the computation (not in ``RESUME_IGNORED``)."""
    flat_old, flat_new = flat_settings(old), flat_settings(new)
    changes = {}
    for key in sorted(set(flat_old) | set(flat_new)):
        if _matches(key, RESUME_IGNORED):
            continue
        a, b = flat_old.get(key), flat_new.get(key)
        if a != b:
            changes[key] = (a, b)
    return changes


def fixed_settings(changes: dict[str, Any]) -> list[str]:
    """The changed settings no checkpoint can follow (``RESUME_FIXED``)."""
    return [key for key in changes if _matches(key, RESUME_FIXED)]


# data.format (plain | chat | auto) became data.conv_template; chat meant the tokenizer's own template
_OLD_FORMATS = {"plain": "plain", "chat": "tokenizer", "auto": "auto"}


def upgrade_recorded(recorded: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig dict recorded by an older version, in today's keys (checkpoints and config.yaml of runs
    made before ``data.format`` became ``data.conv_template``); a current dict is returned unchanged."""
    data = recorded.get("data")
    if not isinstance(data, dict) or "format" not in data:
        return recorded
    data = dict(data)
    old = data.pop("format")
    data.setdefault("conv_template", _OLD_FORMATS.get(old, old))
    return {**recorded, "data": data}
