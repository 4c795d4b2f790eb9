"""The training loop: shards -> projector + LLM -> weighted objective losses -> AdamW -> checkpoints + logs.

Input: a ``TrainConfig`` (``trainer.config``). Output, in ``cfg.output`` (RUN): ``config.yaml`` (the resolved
config, written once the start is accepted), ``config-history.jsonl`` (one line per accepted start, with the
settings a ``--resume-with-changes`` changed), ``memory.json`` (the per-process memory estimate printed at
start), ``env.json`` (the environment of each start), ``log.jsonl`` (one record per --log-every steps and for
every skipped step, also sent under the same names to the ``--logging.report-to`` trackers,
``trainer.tracking``), and
``checkpoints/step-NNNNNN`` (``trainer.checkpoint``). Read top to bottom: ``Trainer.__init__`` takes the run
folder and builds, ``train`` -> ``train_step`` (one optimiser step = grad_accum micro-batches) ->
``forward_backward``.

One writer per run folder: the main process holds ``visalign.locks.FolderLock(RUN)`` from the first moment
to the end; a second ``trainer run`` on the same folder is refused, naming the holder.

Accelerate conventions: Accelerate launches the processes, places devices, logs, and prepares the optimizer
and scheduler. Under DDP the model (projector + LLM + objective modules, one ``TrainModule``) goes through
``prepare`` too; under FSDP the trainer shards it itself (``trainer.parallel``) and it never does. The
streaming loader never goes through ``prepare`` (it would be split twice): ``trainer.data.shards`` splits it
over ranks and workers itself. The scheduler is stepped by us once per optimiser step
(``step_scheduler_with_optimizer=False``), so its schedule is in optimiser steps whatever the process count.

Every micro-batch's forward gets a ``StepContext`` (step, micro-step, rank, world size, run seed, token
normaliser): objectives read what they need from the loop there, never from magic batch keys.

Loss normalisation. Every loss is divided by grad_accum before backward, uniformly. The ``lm`` objective
divides its summed token NLL by ``step.lm_normaliser``, which we set to (supervised tokens of the whole
accumulation window on all ranks) / world size / grad_accum, counted before the window's forward passes.
With DDP's (and FSDP's) gradient averaging the accumulated gradient is then exactly that of one big batch's
token mean (not a mean of micro-batch means), and each logged ``lm_loss`` (mean over micro-batches and ranks)
is the window's token mean. Auxiliary objectives return per-sample means, so they end up averaged over the
window too.

Non-finite guard. The rank-averaged losses and the global gradient norm are known on every rank before the
optimiser step; if any is not finite the step is skipped on every rank (weights and optimiser state keep
their values, the scheduler advances), recorded in log.jsonl (``skipped``), and after
``--optim.max_nonfinite_skips`` consecutive skips the run stops with an error. A checkpoint is never written
while a tensor it would hold is not finite.

Resume. ``--resume`` compares every setting that changes the computation with the checkpoint's recorded config
(``trainer.config.setting_changes``) and the shard set with its manifest; a difference is refused with one line
per setting (old -> new) unless ``--resume-with-changes``; settings no checkpoint can follow (another model or
data split) are always refused. The loop never branches on objective names: total = sum over ``*_loss`` keys of
weight x loss.

Letters: B batch, T sequence.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import time
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer import checkpoint as ckpt_io
from trainer import parallel, tracking
from trainer.config import TrainConfig, fixed_settings, setting_changes, upgrade_recorded
from trainer.data import StreamLayout, build_stream, make_loader, verify_shards
from trainer.data.collate import record_skipped
from trainer.data.conversations import text_format
from trainer.memory import MemoryPlan, estimate_memory, peak_mib, reset_peak
from trainer.models.build import build_train_module, check_manifest_against, init_projector
from trainer.objectives import objective_weights, parse_spec
from trainer.objectives.base import StepContext
from visalign.config import ConfigError, from_dict, to_dict, write_resolved
from visalign.errors import VisalignError
from visalign.locks import FolderBusyError, FolderLock
from visalign.shards import ShardFormatError, read_manifest

log = logging.getLogger("trainer")

LOG_FILE = "log.jsonl"
HISTORY_FILE = "config-history.jsonl"
MEMORY_FILE = "memory.json"
PROJECTOR_GROUP = "projector"
VISION_GROUP = "vision"


class NonFiniteError(VisalignError):
    """Training produced non-finite values that no weight update may take."""


def lr_lambda(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(
    module: nn.Module,
    weight_decay: float,
    lr: float,
    projector_lr: float | None = None,
    vision_lr: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices only (biases, norm weights and scalars such as temperatures never
    decay); with ``projector_lr`` the projector's parameters form groups of their own at that rate, with
    ``vision_lr`` the vision tower's (``--model.vision.mode train``). Empty groups are left out; each group
    carries a ``name``."""
    buckets: dict[str, list[nn.Parameter]] = defaultdict(list)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        part = PROJECTOR_GROUP if projector_lr is not None and name.startswith("vlm.projector.") else "model"
        if vision_lr is not None and name.startswith("vlm.vision."):
            part = VISION_GROUP
        buckets[f"{part}/{'decay' if p.dim() >= 2 else 'no_decay'}"].append(p)
    groups = []
    for part, rate in (("model", lr), (PROJECTOR_GROUP, projector_lr), (VISION_GROUP, vision_lr)):
        for kind, decay in (("decay", weight_decay), ("no_decay", 0.0)):
            params = buckets.get(f"{part}/{kind}")
            if params:
                groups.append({"params": params, "weight_decay": decay, "lr": rate, "name": f"{part}/{kind}"})
    return groups


def on_cpu() -> bool:
    """No GPU: tell Accelerate explicitly, else a multi-process launch silently runs unconnected processes
    (its CPU backend, gloo, is only chosen with ``cpu=True``)."""
    return not torch.cuda.is_available()


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def shard_set(manifest: dict[str, Any]) -> tuple[str, str]:
    """(a short description, a digest) of the shards a manifest lists: names, checksums and sample counts."""
    shards = sorted((s["name"], s.get("sha256"), s.get("num_samples")) for s in manifest.get("shards", []))
    digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:12]
    samples = sum(int(s[2] or 0) for s in shards)
    return f"{len(shards)} shards, {samples} samples (set {digest})", digest


class Trainer:
    """Builds everything from a ``TrainConfig``; ``train()`` runs until ``optim.max_steps``."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        self.run = Path(cfg.output)
        strategy = parallel.resolve_strategy(cfg.parallel.strategy)
        precision = resolve_mixed_precision(cfg.optim.mixed_precision)
        if strategy == "fsdp" and precision == "fp16":
            raise ConfigError(
                "--optim.mixed_precision fp16 with FSDP is not supported (it needs a sharded loss scaler); "
                "use bf16 or --parallel.strategy ddp"
            )
        trackers = tracking.make_trackers(cfg, tracking.tracker_names(cfg.logging))
        with parallel.accelerate_without_fsdp_plugin():
            self.accelerator = Accelerator(
                cpu=on_cpu(),
                # under FSDP, mixed precision is FSDP's own (gathered bf16 weights); no autocast on top
                mixed_precision="no" if strategy == "fsdp" else precision,
                log_with=trackers or None,
                project_dir=str(self.run),
                step_scheduler_with_optimizer=False,
                # gradients live in DDP's all-reduce buckets instead of a second copy
                kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
            )
        acc = self.accelerator
        self.fsdp = strategy == "fsdp" and acc.num_processes > 1
        self.strategy = "fsdp" if self.fsdp else "ddp"
        if strategy == "fsdp" and not self.fsdp:
            log.info("--parallel.strategy fsdp with one process: nothing to shard, training unsharded")
        self.compute_dtype = COMPUTE_DTYPES.get(precision) if self.fsdp else None
        self._lock: FolderLock | None = None
        self._take_run_folder()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -----------------------------------------------------------------------------------------------------
    # building
    # -----------------------------------------------------------------------------------------------------
    def _take_run_folder(self) -> None:
        """The main process locks RUN; every rank learns the verdict (a refused start stops all of them)."""
        acc = self.accelerator
        error: FolderBusyError | None = None
        if acc.is_main_process:
            try:
                self._lock = FolderLock(self.run, "trainer run").acquire()
                weakref.finalize(self, self._lock.release)
            except FolderBusyError as err:
                error = err
        if acc.num_processes > 1:
            refused = acc.reduce(torch.tensor([float(error is not None)], device=acc.device), "sum")
            if float(refused) > 0 and error is None:
                error = FolderBusyError(
                    f"{self.run} is in use by another `trainer run`; see the main process"
                )
        if error is not None:
            raise error

    def close(self) -> None:
        """Release the run folder (also done at the end of ``train`` and when the process exits)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _build(self) -> None:
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.accelerator
        set_seed(cfg.seed)  # same init on every rank; resume overwrites RNGs from the checkpoint
        self.manifest = read_manifest(cfg.shards)
        verify_shards(cfg.shards, self.manifest, cfg.data.verify_shards, acc.process_index, acc.num_processes,
                      cache_dir=cfg.model.cache_dir, progress=acc.is_main_process and cfg.logging.progress)  # fmt: skip
        self.step = 0
        self.num_batches = 0  # micro-batches this rank consumed from the stream (its loader position)
        self.skips = {"total": 0, "consecutive": 0}
        self._resumed_rng: dict[str, Any] | None = None

        ckpt = self._find_resume_checkpoint()
        changes = self._check_resume(ckpt) if ckpt is not None else {}

        module, self.tokenizer = build_train_module(
            cfg,
            self.manifest,
            cfg.shards,
            main_process_first=acc.main_process_first,
            apply_stage_to=cfg.stage,
        )
        self.vlm, self.objectives = module.vlm, module.objectives
        if cfg.model.init_projector and ckpt is None:
            init_projector(module, cfg.model.init_projector, cfg.model.projector, self.manifest)
        elif cfg.stage == "finetune" and ckpt is None:
            log.warning("finetune without --init-projector: the projector starts from random weights")
        self.weights = objective_weights(cfg.objectives, parse_spec(cfg.objective))
        self.vision_lr = cfg.model.vision.lr if cfg.model.vision.mode == "train" else None
        # checkpoints hold the trainable VisualLM parameters and the whole objective modules' state
        trainable = {f"vlm.{n}" for n, p in module.vlm.named_parameters() if p.requires_grad}
        self.keep = lambda name: name in trainable or name.startswith(ckpt_io.OBJECTIVES_PREFIX)
        self.report_memory(module)

        if self.fsdp:
            summary = parallel.apply_fsdp(
                module,
                acc.device,
                acc.num_processes,
                shard_frozen_llm=cfg.parallel.shard_frozen_llm,
                compute_dtype=self.compute_dtype,
            )
            log.info(
                "FSDP2 over %d processes: %d groups (decoder layers + root); this process holds %s of %s "
                "parameter elements (%s kept whole on every process)",
                acc.num_processes, summary.groups, f"{summary.local_elements:,}", f"{summary.total_elements:,}",
                f"{summary.replicated_elements:,}",
            )  # fmt: skip
        # the optimizer is built over the parameters training will really update: after sharding
        optimizer = torch.optim.AdamW(
            param_groups(
                module, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.projector_lr, self.vision_lr
            ),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
        )
        warmup = int(round(cfg.optim.warmup_ratio * cfg.optim.max_steps))
        self.schedule = functools.partial(
            lr_lambda, warmup_steps=warmup, max_steps=cfg.optim.max_steps, min_ratio=cfg.optim.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        if self.fsdp:
            self.model = module
            self.optimizer, self.scheduler = acc.prepare(optimizer, scheduler)
        else:
            self.model, self.optimizer, self.scheduler = acc.prepare(module, optimizer, scheduler)
        if ckpt is not None:
            self.load(ckpt)
        self._accept_start(ckpt, changes)

        self.layout = StreamLayout(
            world_size=acc.num_processes,
            rank=acc.process_index,
            num_workers=cfg.data.num_workers,
            batch_size=cfg.data.batch_size,
            seed=cfg.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
        )
        fmt = text_format(cfg.data, cfg.stage)
        stream = build_stream(
            cfg.shards, self.manifest, self.tokenizer, fmt, cfg.data.max_length, self.layout, self.num_batches,
            pixels=self.vlm.vision is not None, float16=self.float16_batches,
        )  # fmt: skip
        self.stream = stream
        self.batches = iter(make_loader(stream, pin_memory=self.accelerator.device.type == "cuda"))
        self.heldout = self.build_heldout(fmt)
        tracking.start_trackers(acc, cfg)
        if self._resumed_rng is not None:
            # last: creating the loader's iterator draws from the global RNG (its base seed), which the
            # uninterrupted run did before the state that was saved
            ckpt_io.restore_rng(self._resumed_rng)

    def _find_resume_checkpoint(self) -> Path | None:
        existing = ckpt_io.list_checkpoints(self.run)
        if self.cfg.resume:
            if not existing:
                raise ckpt_io.CheckpointError(
                    f"--resume: {self.run} has no complete checkpoint under {ckpt_io.CHECKPOINTS}/; "
                    "drop --resume to start a new run"
                )
            return existing[-1]
        if existing:
            raise ckpt_io.CheckpointError(
                f"{self.run} already holds checkpoints ({existing[-1].name}); pass --resume to continue "
                "that run or choose a new --output"
            )
        return None

    def _check_resume(self, ckpt: Path) -> dict[str, tuple[Any, Any]]:
        """Every difference between this start and the checkpoint that changes the computation; refused
        unless --resume-with-changes (always refused for what no checkpoint can follow)."""
        cfg, acc = self.cfg, self.accelerator
        state = ckpt_io.read_state(ckpt)
        check_manifest_against(state["manifest"], self.manifest, f"the run in {self.run}")
        recorded = state.get("config")
        changes: dict[str, tuple[Any, Any]] = {}
        if recorded is not None:
            changes = setting_changes(_with_defaults(recorded), to_dict(cfg))
        (old_set, old_digest), (new_set, new_digest) = (
            shard_set(state["manifest"]),
            shard_set(self.manifest.to_dict()),
        )
        if old_digest != new_digest:
            changes["shards (set)"] = (old_set, new_set)
        # the strategy that ran, not the setting: 'auto' follows the launch config
        ran = state.get("parallel", {}).get("strategy")
        if ran is not None:
            changes.pop("parallel.strategy", None)
            if ran != self.strategy:
                changes["parallel.strategy"] = (ran, self.strategy)
        saved_world = int(ckpt_io.read_data_state(ckpt, acc.process_index)["layout"]["world_size"])
        fixed = fixed_settings(changes)
        if saved_world != acc.num_processes:
            changes["processes"] = (saved_world, acc.num_processes)
            fixed.append("processes")
        lines = [
            f"{key}: {old!r} -> {new!r}{' (cannot change on resume)' if key in fixed else ''}"
            for key, (old, new) in changes.items()
        ]
        if fixed:
            raise ckpt_io.CheckpointError(
                f"--resume: {ckpt} cannot continue with {', '.join(fixed)} changed (another model, or the "
                "loader position would mean other samples); start a new run (--init-projector carries the "
                "projector over):\n" + "\n".join(lines)
            )
        if changes and not cfg.resume_with_changes:
            raise ckpt_io.CheckpointError(
                f"--resume: {len(changes)} setting(s) differ from {ckpt}, so the run would not continue "
                "exactly; restore them, or pass --resume-with-changes to continue with the new values:\n"
                + "\n".join(lines)
            )
        return changes

    def _accept_start(self, ckpt: Path | None, changes: dict[str, tuple[Any, Any]]) -> None:
        """The start is accepted: now (and only now) the run's config.yaml and history are written."""
        if not self.accelerator.is_main_process:
            return
        write_resolved(self.cfg, self.run / "config.yaml")
        tracking.write_env(self.run, self.accelerator, self.step)
        (self.run / MEMORY_FILE).write_text(json.dumps(self.memory_record, indent=1))
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": "resume" if ckpt is not None else "start",
            "step": self.step,
            "checkpoint": ckpt.name if ckpt is not None else None,
            "changes": {key: [old, new] for key, (old, new) in changes.items()},
        }
        with open(self.run / HISTORY_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if changes:
            log.warning(
                "resuming %s with changed settings: %s",
                ckpt,
                "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()),
            )

    def memory_plan(self) -> MemoryPlan:
        cfg = self.cfg
        compute = self.compute_dtype
        if not self.fsdp:
            compute = COMPUTE_DTYPES.get(resolve_mixed_precision(cfg.optim.mixed_precision))
        return MemoryPlan(
            strategy=self.strategy,
            world_size=self.accelerator.num_processes,
            shard_frozen_llm=cfg.parallel.shard_frozen_llm,
            compute_dtype=compute or torch.float32,
            reduce_every_micro_batch=cfg.parallel.reduce_every_micro_batch,
            grad_accum=cfg.optim.grad_accum,
            batch_size=cfg.data.batch_size,
            seq_len=cfg.data.max_length,
            checkpointing=cfg.model.gradient_checkpointing,
        )

    def report_memory(self, module: nn.Module) -> None:
        """Print what this configuration costs per process, before any step (RUN/memory.json once accepted)."""
        plan = self.memory_plan()
        estimate = estimate_memory(module, plan)
        self.memory_estimate = estimate
        self.memory_record = {"plan": {k: str(v) for k, v in vars(plan).items()}, "bytes": estimate.as_dict()}
        if self.accelerator.is_main_process:
            log.info(estimate.describe(plan))

    def build_heldout(self, fmt: str) -> dict[str, Any] | None:
        """The fixed held-out batches and word tables of the periodic evaluation (``cfg.eval``), or None."""
        ev = self.cfg.eval
        if not ev.shards or ev.every <= 0:
            return None
        from trainer.evaluate.measure import eval_inputs

        held = read_manifest(ev.shards)
        for name, train_value, held_value in [
            ("encoder fingerprint", self.manifest.encoder.fingerprint, held.encoder.fingerprint),
            ("word list sha256", self.manifest.wordlist.sha256, held.wordlist.sha256),
            ("feature width", self.manifest.encoder.feature_dim, held.encoder.feature_dim),
        ]:
            if train_value != held_value:
                raise ShardFormatError(
                    f"--eval.shards {ev.shards} has {name} {held_value} but --shards {self.cfg.shards} has "
                    f"{train_value}: label the held-out images with the same encoder and word list"
                )
        inputs = eval_inputs(
            ev.shards, self.tokenizer, fmt, self.cfg.data.max_length, ev.samples, ev.batch_size,
            cache_dir=self.cfg.model.cache_dir,
        )  # fmt: skip
        num_layers = int(self.vlm.llm.config.get_text_config().num_hidden_layers)
        inputs["layers"] = tuple(ev.layers) or (0, num_layers // 2, num_layers)
        return inputs

    def evaluate(self) -> dict[str, float]:
        """The `trainer eval` measures on the held-out batches, logged as ``eval/<measure>/l<layer>``.

        Under DDP every rank computes the same numbers on its own full model (no collective inside, so a rank
        never waits on another). Under FSDP the weights are gathered for it through the root's hooks, so
        every rank takes part with the same batches. In eval mode no RNG is drawn: a resumed run stays
        bit-exact. The main process writes the numbers.
        """
        from trainer.evaluate.measure import flat_report

        if self.fsdp:
            result = self.model.evaluate(self.heldout)
            self.model.reshard()  # the root keeps its gathered weights after a forward otherwise
        else:
            result = self.accelerator.unwrap_model(self.model).evaluate(self.heldout)
        report = flat_report(result)
        self.log_metrics(report)
        return report

    # -----------------------------------------------------------------------------------------------------
    # the loop
    # -----------------------------------------------------------------------------------------------------
    def train(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.optim.max_steps,
            initial=self.step,
            disable=not (acc.is_main_process and cfg.logging.progress),
            dynamic_ncols=True,
        )
        self.model.train()
        reset_peak()
        try:
            while self.step < cfg.optim.max_steps:
                start = time.perf_counter()
                micro_batches = [next(self.batches) for _ in range(cfg.optim.grad_accum)]
                self.num_batches += len(micro_batches)
                metrics = self.train_step(micro_batches)
                self.step += 1
                elapsed = max(time.perf_counter() - start, 1e-9)
                metrics["samples_per_s"] = metrics.pop("num_samples") / elapsed
                metrics["tokens_per_s"] = metrics.pop("num_tokens") / elapsed
                self.record_seen(micro_batches)
                record_skipped(self.run, acc.process_index, self.step, micro_batches)
                bar.update(1)
                bar.set_postfix(
                    {k: f"{v:.4g}" for k, v in metrics.items() if k.endswith("_loss") or "per_s" in k}
                )
                skipped = bool(metrics.get("skipped"))
                if self.step % cfg.logging.log_every == 0 or self.step == cfg.optim.max_steps or skipped:
                    metrics["peak_mem_mib"] = self.peak_memory()
                    self.log_metrics(metrics)
                if self.skips["consecutive"] >= cfg.optim.max_nonfinite_skips:
                    last = ckpt_io.list_checkpoints(self.run)
                    raise NonFiniteError(
                        f"steps {self.step - self.skips['consecutive'] + 1}-{self.step}: "
                        f"{self.skips['consecutive']} consecutive steps had a non-finite loss or gradient norm "
                        f"({_nonfinite_items(metrics)}); no update took them, the run stops (the last "
                        f"checkpoint is {last[-1].name if last else 'none'}). Check the shards these steps read "
                        "(--logging.seen_ids), or lower --lr, then --resume"
                    )
                if self.heldout is not None and (
                    self.step % cfg.eval.every == 0 or self.step == cfg.optim.max_steps
                ):
                    self.evaluate()
                if self.step % cfg.checkpoint.save_every == 0 or self.step == cfg.optim.max_steps:
                    self.save()
                if cfg.stop_after is not None and self.step >= cfg.stop_after:
                    if self.step % cfg.checkpoint.save_every != 0:
                        self.save()
                    break
        finally:
            bar.close()
            self.batches = iter(())  # shuts the loader's worker processes down now, not at garbage collection
            self.close()
        acc.end_training()

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; returns rank-averaged metrics."""
        acc, cfg = self.accelerator, self.cfg
        num_accum = len(micro_batches)
        # counted before any forward pass: the lm normaliser must cover the whole window on all ranks
        local = torch.tensor(
            [
                sum(b["num_target_tokens"] for b in micro_batches),
                sum(int(b["attention_mask_BT"].sum()) for b in micro_batches),
                sum(len(b["ids"]) for b in micro_batches),
                sum(len(b.get("skipped", ())) for b in micro_batches),
            ],
            dtype=torch.float64,
            device=acc.device,
        )
        num_targets, num_tokens, num_samples, num_skipped = acc.reduce(local, reduction="sum").tolist()
        normaliser = max(num_targets, 1.0) / acc.num_processes / num_accum

        # FSDP reduce-scatters after every micro-batch unless asked to hold full-size gradients until the last
        hold_sync = not self.fsdp or not cfg.parallel.reduce_every_micro_batch
        sums: dict[str, float] = defaultdict(float)
        for i, batch in enumerate(micro_batches):
            batch = self.to_device(batch)
            step = StepContext(
                step=self.step,
                micro_step=i,
                rank=acc.process_index,
                world_size=acc.num_processes,
                seed=cfg.seed,
                lm_normaliser=normaliser,
            )
            last = i == num_accum - 1
            sync_off = not last and hold_sync
            with parallel.without_gradient_sync(self.model, acc) if sync_off else contextlib.nullcontext():
                values = self.forward_backward(batch, step, num_accum)
            for key, value in values.items():
                sums[key] += value / num_accum

        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(acc.clip_grad_norm_(trainable, max_norm))  # global: the same on every rank
        keys = sorted(sums)  # identical on every rank: same objectives
        means = acc.reduce(
            torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=acc.device), "mean"
        )
        metrics = dict(zip(keys, means.tolist()))
        metrics["grad_norm"] = grad_norm
        self.record_learning_rates(metrics)  # the rates this step uses

        finite = math.isfinite(grad_norm) and all(
            math.isfinite(v) for k, v in metrics.items() if k.endswith("_loss")
        )
        scaler = getattr(acc, "scaler", None)
        if finite:
            self.optimizer.step()
            self.skips["consecutive"] = 0
        else:
            losses_finite = all(math.isfinite(v) for k, v in metrics.items() if k.endswith("_loss"))
            if scaler is not None:
                self.optimizer.step()  # the fp16 loss scaler skips the update itself and lowers its scale
            self.skips["total"] += 1
            if not (scaler is not None and losses_finite):  # a loss-scale overflow is the scaler's business
                self.skips["consecutive"] += 1
            metrics["skipped"] = 1.0
            metrics["skipped_steps"] = float(self.skips["total"])
            log.warning("step %d skipped: %s", self.step + 1, _nonfinite_items(metrics))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["num_samples"], metrics["num_tokens"] = num_samples, num_tokens
        metrics["skipped_samples"] = num_skipped  # unusable samples left out of this step, all ranks
        return metrics

    def record_learning_rates(self, metrics: dict[str, float]) -> None:
        names = [g.get("name", "") for g in self.raw_optimizer().param_groups]
        rates = self.scheduler.get_last_lr()
        model = [lr for lr, name in zip(rates, names) if name.startswith("model")]
        projector = [lr for lr, name in zip(rates, names) if name.startswith(PROJECTOR_GROUP)]
        vision = [lr for lr, name in zip(rates, names) if name.startswith(VISION_GROUP)]
        metrics["lr"] = model[0] if model else rates[0]
        if self.cfg.optim.projector_lr is not None and projector:
            metrics["projector_lr"] = projector[0]
        if vision:
            metrics["vision_lr"] = vision[0]

    def forward_backward(self, batch: dict[str, Any], step: StepContext, num_accum: int) -> dict[str, float]:
        """Forward, weighted sum of the ``*_loss`` terms, backward; returns detached losses + report."""
        losses, report = self.model(batch, step)
        unknown = sorted(set(losses) - set(self.weights))
        if unknown:
            raise KeyError(
                f"objective returned loss keys {unknown} without a configured weight ({self.weights})"
            )
        total = sum(self.weights[k] * v for k, v in losses.items())
        self.accelerator.backward(total / num_accum)
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["total_loss"] = float(total.detach())
        values.update({k: float(v) for k, v in report.items()})
        return values

    @property
    def float16_batches(self) -> bool:
        """Whether the loader hands over the stored float16 arrays (``data.host_dtype``)."""
        choice = self.cfg.data.host_dtype
        return choice == "float16" or (choice == "auto" and self.accelerator.device.type == "cuda")

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch on this process's device, every float tensor float32 (the objectives' contract; float16
        batches are converted here, on the device)."""
        device = self.accelerator.device

        def move(x):
            if isinstance(x, torch.Tensor):
                x = x.to(device, non_blocking=True)
                return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x

        return {k: move(v) for k, v in batch.items()}

    def peak_memory(self) -> float:
        """The highest peak memory of any process since training started (MiB; collective)."""
        peak = torch.tensor([peak_mib()], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.gather(peak).max())

    # -----------------------------------------------------------------------------------------------------
    # logging
    # -----------------------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float]) -> None:
        record = {"step": self.step, **metrics}
        if self.accelerator.is_main_process:
            with open(self.run / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log(dict(metrics), step=self.step)  # the trackers get log.jsonl's names

    def record_seen(self, micro_batches: list[dict[str, Any]]) -> None:
        """Debug (--logging.seen_ids): one line per consumed sample, for coverage checks across ranks."""
        if not self.cfg.logging.seen_ids:
            return
        rank = self.accelerator.process_index
        with open(self.run / f"seen-rank{rank}.jsonl", "a", encoding="utf-8") as f:
            for batch in micro_batches:
                for sample_id, slot, pass_index in zip(batch["ids"], batch["slots"], batch["passes"]):
                    f.write(
                        json.dumps({"step": self.step, "id": sample_id, "slot": slot, "pass": pass_index})
                        + "\n"
                    )

    # -----------------------------------------------------------------------------------------------------
    # checkpoints
    # -----------------------------------------------------------------------------------------------------
    def raw_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def raw_scheduler(self):
        return getattr(self.scheduler, "scheduler", self.scheduler)

    def meta(self) -> dict[str, Any]:
        return {
            "stage": self.cfg.stage,
            "objective": self.cfg.objective,
            "llm": self.cfg.model.llm,
            "projector": self.cfg.model.projector,
            "feature_dim": self.manifest.encoder.feature_dim,
            "shards": str(self.cfg.shards),
            "manifest": self.manifest.to_dict(),
            "config": to_dict(self.cfg),
            "parallel": {"strategy": self.strategy, "processes": self.accelerator.num_processes},
            "nonfinite_skips": dict(self.skips),
        }

    def save(self) -> Path:
        acc = self.accelerator
        start = time.perf_counter()
        tensors = parallel.model_state(self.model, self.keep)
        optimizer_tensors, optimizer_rest = {}, {}
        if self.raw_optimizer().state:  # none yet when every step so far was skipped: nothing to save
            optimizer_tensors, optimizer_rest = parallel.optimizer_state(self.model, self.raw_optimizer())
        tensors.update(optimizer_tensors)
        self._refuse_nonfinite(tensors)
        data_state = {
            "num_batches": self.num_batches,
            "layout": vars(self.layout),
            "slots": self.stream.position(self.num_batches),
        }
        path = ckpt_io.save_checkpoint(
            acc,
            self.run,
            self.step,
            ckpt_io.SHARDED_FORMAT if self.fsdp else ckpt_io.GATHERED,
            tensors,
            optimizer_rest,
            self.raw_scheduler().state_dict(),
            data_state,
            self.meta(),
            keep_last=self.cfg.checkpoint.keep_last,
        )
        if acc.is_main_process:
            log.info("saved %s in %.2f s", path, time.perf_counter() - start)
        return path

    def _refuse_nonfinite(self, tensors: dict[str, torch.Tensor]) -> None:
        """Collective: no checkpoint may hold a NaN or an infinity (a resume would carry it on)."""
        bad = [
            name
            for name, t in tensors.items()
            if t.is_floating_point() and not bool(torch.isfinite(parallel.local_tensor(t)).all())
        ]
        count = torch.tensor([float(len(bad))], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, "sum")
        if float(count) > 0:
            last = ckpt_io.list_checkpoints(self.run)
            raise NonFiniteError(
                f"step {self.step}: {int(float(count))} tensor(s) to checkpoint hold non-finite values "
                f"(e.g. {bad[:3]}); the checkpoint was not written and the run stops. Resume from "
                f"{last[-1].name if last else 'the start'} with a lower --lr or checked shards"
            )

    def load(self, ckpt: Path) -> None:
        acc = self.accelerator
        start = time.perf_counter()
        state = ckpt_io.read_state(ckpt)
        optimizer, scheduler = self.raw_optimizer(), self.raw_scheduler()
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        model_tensors = parallel.model_state(self.model, self.keep)
        if (ckpt / ckpt_io.OPTIMIZER).is_file() and not (ckpt / ckpt_io.OPTIMIZER_TENSORS).is_file():
            self._load_older(ckpt, model_tensors)
        else:
            self._check_saved_names(ckpt, set(model_tensors))
            optimizer_tensors: dict[str, torch.Tensor] | None = None
            if any(name.startswith("state.") for name in ckpt_io.saved_names(ckpt)):
                optimizer_tensors, _ = parallel.optimizer_state(self.model, optimizer)
            ckpt_io.load_into(ckpt, {**model_tensors, **(optimizer_tensors or {})})
            extra = ckpt_io.read_optimizer_json(ckpt)
            parallel.load_states(self.model, optimizer, model_tensors, optimizer_tensors, extra["optimizer"])
            scheduler.load_state_dict(extra["scheduler"])
        # this run's optimiser settings: equal to the checkpoint's on an exact resume, the new ones with
        # --resume-with-changes (the optimizer and scheduler states would otherwise restore the old ones)
        for group, settings in zip(optimizer.param_groups, fresh):
            for key in ("weight_decay", "betas", "eps", "initial_lr"):
                group[key] = settings[key]
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        rates = [
            base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)
        ]
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates

        rng, data = ckpt_io.load_rank_state(ckpt, acc.process_index)
        restore_step = int(state["step"])
        self.step, self.num_batches = restore_step, int(data["num_batches"])
        self.skips = dict(state.get("nonfinite_skips", self.skips))
        self._resumed_rng = rng  # restored once everything is built
        if acc.is_main_process:
            self._truncate_logs(restore_step)
            log.info("resumed from %s (step %d) in %.2f s", ckpt, restore_step, time.perf_counter() - start)
        acc.wait_for_everyone()

    def _check_saved_names(self, ckpt: Path, wanted: set[str]) -> None:
        saved = {n for n in ckpt_io.saved_names(ckpt) if n.startswith(("vlm.", "objectives."))}
        if saved != wanted:
            extra, missing = sorted(saved - wanted), sorted(wanted - saved)
            raise ckpt_io.CheckpointError(
                f"{ckpt} holds other trainable tensors than this run trains ({len(extra)} not trained here, e.g. "
                f"{extra[:2]}; {len(missing)} missing, e.g. {missing[:2]}): resume with the run's own settings"
            )

    def _load_older(self, ckpt: Path, model_tensors: dict[str, torch.Tensor]) -> None:
        """A checkpoint written before optimizer.safetensors existed (optimizer.pt / scheduler.pt)."""
        if self.fsdp:
            raise ckpt_io.CheckpointError(
                f"{ckpt} was written by an older version without a sharded optimizer state; resume it with "
                "--parallel.strategy ddp"
            )
        self._check_saved_names(ckpt, set(model_tensors))
        ckpt_io.load_into(ckpt, model_tensors)
        parallel.load_states(self.model, None, model_tensors, None, None)
        self.raw_optimizer().load_state_dict(ckpt_io.load_torch(ckpt, ckpt_io.OPTIMIZER))
        self.raw_scheduler().load_state_dict(ckpt_io.load_torch(ckpt, ckpt_io.SCHEDULER))

    def _truncate_logs(self, step: int) -> None:
        """Drop log records written after the checkpoint we resume from (a crash after it re-runs them)."""
        for path in [
            self.run / LOG_FILE,
            *self.run.glob("seen-rank*.jsonl"),
            *self.run.glob("skipped-rank*.jsonl"),
        ]:
            if path.is_file():
                lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
                path.write_text("".join(ln + "\n" for ln in lines))


def _nonfinite_items(metrics: dict[str, float]) -> str:
    bad = [
        f"{k}={v}"
        for k, v in metrics.items()
        if (k.endswith("_loss") or k == "grad_norm") and not math.isfinite(v)
    ]
    return ", ".join(bad) or "non-finite values"


def _with_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded config with the settings it predates at their defaults (so that a setting
    added later does not count as a change), or as recorded if it no longer parses."""
    try:
        return to_dict(from_dict(TrainConfig, upgrade_recorded(recorded)))
    except (VisalignError, TypeError, ValueError):
        return recorded


def run(cfg: TrainConfig) -> Path:
    """Train per ``cfg``; returns the run folder."""
    Trainer(cfg).train()
    return Path(cfg.output)


__all__ = ["NonFiniteError", "Trainer", "lr_lambda", "param_groups", "run"]
