"""The one place a trainable model is built: from a config for training, from a checkpoint for everything else.

* ``build_train_module(cfg, manifest, shards_root)``: LLM + projector + objective modules (+ LoRA adapters)
  as one ``TrainModule``, the stage applied (what trains), for ``trainer run``;
* ``init_projector(module, source, ...)``: ``--init-projector`` (a stage-1 projector into a stage-2 run);
* ``load_trained(run_or_ckpt, ...)``: a run's model rebuilt from its checkpoint (the resolved config it records)
  for ``trainer eval``, ``trainer export`` and the tests, optionally with its objective modules; LoRA
  adapters are merged into the LLM, so what comes back is always a plain LLM.

Checkpoint tensors (``trainer/checkpoint.py``, gathered or sharded, read whole by ``read_weights``): the
trainable ``VisualLM`` parameters (``projector.*``; ``llm.*`` after a finetune stage, only the adapters with
LoRA; ``vision.*`` with ``--model.vision.mode train``) and the objective modules' state (SEA's temperature,
the reverse projectors).

The vision tower (``--model.vision.mode frozen|train``, ``trainer.models.vision.build_vision_tower``) is
loaded from where the manifest (or ``--model.vision.path``) says and checked by fingerprint; a frozen one is
stored in ``--model.dtype`` like a frozen LLM, a trained one in float32. ``load_trained`` rebuilds it for a
run that trained it (its tuned weights come from the checkpoint) and leaves it out otherwise (a frozen
tower's features are the shards' cached ones).

Weights dtype (``--model.dtype``): the LLM is loaded in that dtype when none of its weights train in full
(stage 1; LoRA's base weights), in float32 otherwise: trainable weights always keep float32 master copies.
``load_trained`` always loads float32 (evaluation and export of exactly the trained values).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer import checkpoint as ckpt_io
from trainer.objectives import ObjectiveContext, build_objectives, union_needs
from trainer.objectives.base import StepContext
from visalign.config import ConfigError, from_dict
from visalign.shards import Manifest, ShardFormatError, read_manifest

log = logging.getLogger(__name__)

LORA_SEED_OFFSET = 7919
"""the LoRA adapters are drawn from seed + this: not the projector's stream"""


class TrainModule(nn.Module):
    """VisualLM + objective modules as one module, so DDP/FSDP wrap and synchronise both."""

    def __init__(self, vlm: nn.Module, objectives: nn.ModuleDict):
        super().__init__()
        self.vlm = vlm
        self.objectives = objectives
        self.needs = union_needs(objectives)

    def forward(
        self, batch: dict[str, Any], step: StepContext
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        out = self.vlm(batch, self.needs)
        losses: dict[str, torch.Tensor] = {}
        report: dict[str, float] = {}
        for objective in self.objectives.values():
            obj_losses, obj_report = objective(batch, out, step)
            losses.update(obj_losses)
            report.update(obj_report)
        return losses, report

    def evaluate(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The `trainer eval` measures (``evaluate_batches``) on this module's current weights. A method of the
        module (not a call into ``self.vlm`` from outside) so that a sharded module can gather its weights
        for it exactly as for ``forward`` (``trainer.parallel`` registers it with FSDP)."""
        from trainer.evaluate.measure import evaluate_batches

        return evaluate_batches(self.vlm, self.objectives, **inputs)


def check_manifest_against(recorded: dict[str, Any], manifest: Manifest, what: str) -> None:
    """Refuse shards from another encoder / word list / feature width than ``recorded`` (a checkpoint's)."""
    pairs = [
        ("encoder fingerprint", recorded.get("encoder", {}).get("fingerprint"), manifest.encoder.fingerprint),
        ("word list sha256", recorded.get("wordlist", {}).get("sha256"), manifest.wordlist.sha256),
        ("feature width", recorded.get("encoder", {}).get("feature_dim"), manifest.encoder.feature_dim),
    ]
    for name, theirs, ours in pairs:
        if theirs is not None and theirs != ours:
            raise ShardFormatError(
                f"{what} was trained on shards with {name} {theirs}, but the shards given have {name} {ours}: "
                "point --shards at shards of the same encoder and word list (or start a new run)"
            )


def llm_dtype(cfg: Any, training: bool) -> torch.dtype:
    """The dtype the LLM is loaded in: ``--model.dtype`` when no LLM weight trains in full (stage 1, LoRA's
    base), float32 when they do (master weights) and outside training (exact evaluation / export)."""
    from trainer.models.llm import resolve_dtype

    full_finetune = cfg.stage == "finetune" and not cfg.model.lora.rank
    if not training or full_finetune:
        return torch.float32
    return resolve_dtype(cfg.model.dtype)


def load_llm_checked(cfg: Any, dtype: torch.dtype = torch.float32):
    """``load_llm`` for a TrainConfig, with a one-line error for an LLM that cannot be loaded."""
    from trainer.models.llm import load_llm

    if not cfg.model.llm:
        raise ConfigError("no LLM given: pass --llm NAME_OR_PATH (tiny-llm, smollm2-135m or a HF folder)")
    try:
        return load_llm(
            cfg.model.llm,
            dtype=dtype,
            attn_implementation=cfg.model.attn_implementation,
            cache_dir=cfg.model.cache_dir,
        )
    except OSError as err:  # a hub id that is not cached offline, a broken folder
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"cannot load --llm {cfg.model.llm!r} ({first}); give a registry name "
            "(tiny-llm, smollm2-135m) or a local HF model folder"
        ) from err


def objective_context(
    cfg: Any, llm: nn.Module, tokenizer: Any, manifest: Manifest, shards_root
) -> ObjectiveContext:
    """What the objectives may read at build time; the same for training, evaluation and export."""
    return ObjectiveContext(
        llm_config=llm.config.get_text_config(),
        projector=cfg.model.projector,
        feature_dim=manifest.encoder.feature_dim,
        manifest=manifest,
        shards_root=str(shards_root) if shards_root is not None else None,
        tokenizer=tokenizer,
        embed_Nd=llm.get_input_embeddings().weight,
        cache_dir=cfg.model.cache_dir,
    )


def build_train_module(
    cfg: Any,
    manifest: Manifest,
    shards_root: str | Path | None,
    main_process_first: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    with_objectives: bool = True,
    apply_stage_to: str | None = None,
    vision_path: str | None = None,
    vision_manifest: Manifest | None = None,
) -> tuple[TrainModule, Any]:
    """``(TrainModule, tokenizer)`` for a ``TrainConfig`` over shards described by ``manifest``.

    The vision tower is built first (before the seed is set: it draws nothing) when ``cfg.model.vision.mode``
    is ``train``, or ``frozen`` in training; ``vision_path`` overrides where its weights are read from
    (``trainer export --encoder-path``), else ``--model.vision.path``, else the record of
    ``vision_manifest`` (default ``manifest``: a run's training manifest when ``manifest`` is evaluation's).

    The random initialisation (projector, then the objective modules, then LoRA adapters) is drawn right after
    the LLM is loaded, from ``cfg.seed``: the same on every rank and whether the model cache was cold or warm.
    ``apply_stage_to`` sets what trains (``trainer run``) and the LLM's dtype (``llm_dtype``); None leaves
    every parameter as loaded, in float32 (evaluation, export).
    """
    from accelerate.utils import set_seed

    from trainer.models.projector import build_projector
    from trainer.models.vlm import VisualLM, apply_stage

    training = apply_stage_to is not None
    mode = cfg.model.vision.mode
    vision = None
    if training:
        from trainer.models.vision import require_stored_images

        require_stored_images(manifest, shards_root, mode)
    if mode == "train" or (training and mode == "frozen"):
        vision = build_vision_tower_for(cfg, vision_manifest or manifest, training, vision_path)
    with main_process_first():  # the first call may build a tiny model into the cache
        llm, tokenizer = load_llm_checked(cfg, llm_dtype(cfg, training=training))
    # building a registry model draws random numbers (or seeds its own): re-seed so the modules below start
    # the same whether the cache was cold or warm, on every rank
    set_seed(cfg.seed)
    hidden = llm.config.get_text_config().hidden_size
    projector = build_projector(cfg.model.projector, manifest.encoder.feature_dim, hidden)
    vlm = VisualLM(llm, projector, gradient_checkpointing=cfg.model.gradient_checkpointing, vision=vision)
    lora = cfg.model.lora
    if apply_stage_to is not None and not lora.rank:
        apply_stage(vlm, apply_stage_to)  # logs the trainable / frozen counts
    objectives = nn.ModuleDict()
    if with_objectives:
        objectives = build_objectives(
            cfg.objective, cfg.objectives, objective_context(cfg, llm, tokenizer, manifest, shards_root)
        )
    if lora.rank:
        from trainer.models.lora import add_adapters, train_adapters_only

        # a stream of their own (from the run seed), so the adapters start the same whichever objectives
        # were built before them, and the global RNG is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + LORA_SEED_OFFSET)
            add_adapters(llm, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        if apply_stage_to is not None:
            train_adapters_only(vlm)
    return TrainModule(vlm, objectives), tokenizer


def build_vision_tower_for(cfg: Any, manifest: Manifest, training: bool, path: str | None = None):
    """The ``VisionTower`` a config asks for: trained (float32) with mode ``train``, else frozen in
    ``--model.dtype`` (training) or float32 (evaluation, export)."""
    from trainer.models.llm import resolve_dtype
    from trainer.models.vision import build_vision_tower

    tuned = cfg.model.vision.mode == "train"
    dtype = resolve_dtype(cfg.model.dtype) if training and not tuned else torch.float32
    return build_vision_tower(
        manifest.encoder,
        tuned=tuned,
        path=path or cfg.model.vision.path,
        dtype=dtype,
        gradient_checkpointing=cfg.model.gradient_checkpointing and training,
        num_patches=manifest.num_patches,
    )


def init_projector(module: TrainModule, source: str | Path, projector_name: str, manifest: Manifest) -> Path:
    """``--init-projector``: a stage-1 run's projector (same architecture, shards of the same encoder)."""
    ckpt = ckpt_io.resolve_checkpoint(source)
    state = ckpt_io.read_state(ckpt)
    if state.get("projector") != projector_name:
        raise ConfigError(
            f"--init-projector {ckpt} holds a {state.get('projector')!r} projector but this run builds "
            f"{projector_name!r}; pass --projector {state.get('projector')}"
        )
    check_manifest_against(state["manifest"], manifest, f"--init-projector {ckpt}")
    tensors, _ = ckpt_io.read_weights(ckpt)  # either format: a stage-1 run under DDP or FSDP
    weights = {k[len("projector.") :]: v for k, v in tensors.items() if k.startswith("projector.")}
    module.vlm.projector.load_state_dict(weights, strict=True)
    log.info("projector initialised from %s", ckpt)
    carry_objective_state(module, ckpt)
    return ckpt


def carry_objective_state(module: TrainModule, ckpt: Path) -> dict[str, list[str]]:
    """The learned objective state an earlier run's checkpoint hands on (the reverse projectors of ``distill``,
    ``Objective.carry_over``): ``{objective: [what it took]}``. A resume overwrites it again afterwards."""
    if not len(module.objectives):
        return {}
    _, tensors = ckpt_io.read_weights(ckpt)  # either format
    carried = {}
    for name, objective in module.objectives.items():
        own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        carried[name] = objective.carry_over(own)
    return carried


@dataclasses.dataclass
class LoadedRun:
    """A run's model rebuilt from one of its checkpoints, in eval mode."""

    module: TrainModule
    """the VisualLM (``module.vlm``) with the checkpoint's weights, and the objectives if asked for"""
    tokenizer: Any
    train_cfg: Any
    """the resolved TrainConfig the checkpoint was trained with"""
    step: int
    checkpoint: Path
    state: dict[str, Any]
    """the checkpoint's trainer_state.json"""
    manifest: Manifest
    """the manifest of the shards the objectives were built on (``shards`` if given, else the training one)"""

    @property
    def vlm(self):
        return self.module.vlm


def train_config_of(ckpt: Path, state: dict[str, Any]):
    """The resolved TrainConfig recorded in a checkpoint (else the run's config.yaml)."""
    import yaml

    from trainer.config import TrainConfig, upgrade_recorded

    if "config" in state:
        return from_dict(TrainConfig, upgrade_recorded(state["config"]))
    config_path = ckpt.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise ckpt_io.CheckpointError(f"{ckpt} records no config and {config_path} is missing")
    return from_dict(TrainConfig, upgrade_recorded(yaml.safe_load(config_path.read_text())))


def load_trained(
    run_or_ckpt: str | Path,
    step: int | None = None,
    shards: str | Path | None = None,
    device: str | torch.device = "cpu",
    with_objectives: bool = True,
    merge_lora: bool = True,
    encoder_path: str | None = None,
) -> LoadedRun:
    """Rebuild a run's model from its checkpoint (latest, or ``step``) exactly as ``trainer run`` built it.

    Either checkpoint format (a DDP or an FSDP run) is read whole in this process. A LoRA run's adapters are
    merged into the LLM's weights (``merge_lora=False`` keeps them as adapters: tests compare both).

    ``shards`` (e.g. held-out shards for ``trainer eval``) stands in for the training shards wherever an
    objective reads a manifest or word list, so a run can be evaluated on another machine; it must come from
    the same encoder (feature width). Without it the training manifest recorded in the checkpoint is used
    (objectives that read files from the shard root are then not built).

    A run that trained its vision tower (``--model.vision.mode train``) gets it back with its tuned weights:
    the architecture and the untrained parts come from the tower the manifest names (``encoder_path``
    overrides where it is read from, as ``trainer export --encoder-path``).
    """
    ckpt = ckpt_io.resolve_checkpoint(run_or_ckpt, step)
    state = ckpt_io.read_state(ckpt)
    train_cfg = train_config_of(ckpt, state)
    if shards is not None and train_cfg.model.vision.mode == "train":
        raise ConfigError(
            f"{ckpt} trained its vision tower (--model.vision.mode train): the cached features of {shards} are "
            "not its features, so it cannot be evaluated from shards; evaluate its HF export (`trainer export`)"
        )
    recorded = Manifest.from_dict(state["manifest"])
    manifest = read_manifest(shards) if shards is not None else recorded
    if manifest.encoder.feature_dim != recorded.encoder.feature_dim:
        raise ckpt_io.CheckpointError(
            f"{ckpt} was trained on {recorded.encoder.feature_dim}-d features but {shards} holds "
            f"{manifest.encoder.feature_dim}-d ones: evaluate on shards of the run's encoder"
        )
    module, tokenizer = build_train_module(
        train_cfg,
        manifest,
        shards,
        with_objectives=with_objectives and shards is not None,
        vision_path=encoder_path,
        vision_manifest=recorded,
    )
    model_tensors, objective_tensors = ckpt_io.read_weights(ckpt)
    loaded = module.vlm.load_state_dict(model_tensors, strict=False)
    trained = ("projector.", "vision.") if train_cfg.model.vision.mode == "train" else ("projector.",)
    missing_trained = [k for k in loaded.missing_keys if k.startswith(trained) or "lora_" in k]
    if loaded.unexpected_keys or missing_trained:
        raise ckpt_io.CheckpointError(
            f"checkpoint {ckpt} does not fit the model rebuilt from its config: unexpected "
            f"{loaded.unexpected_keys[:5]}, missing {missing_trained[:5]}"
        )
    if len(module.objectives) and objective_tensors:
        module.objectives.load_state_dict(objective_tensors, strict=True)
    if merge_lora and train_cfg.model.lora.rank:
        from trainer.models.lora import merge_adapters

        merge_adapters(module.vlm.llm)
    module.to(device).eval().requires_grad_(False)
    return LoadedRun(module, tokenizer, train_cfg, int(state["step"]), ckpt, state, manifest)
