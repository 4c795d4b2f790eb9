"""The training loop: shards -> projector + LLM -> weighted objective losses -> AdamW -> checkpoints + logs.

Input: a ``TrainConfig`` (``trainer.config``). Output, in ``cfg.output`` (RUN): ``config.yaml`` and ``env.json``
(written before any model is loaded), ``log.jsonl`` (one record per --log-every steps, also sent under the
same names to the ``--logging.report-to`` trackers, ``trainer.tracking``), and
``checkpoints/step-NNNNNN`` (``trainer.checkpoint``). Read top to bottom: ``Trainer.__init__`` builds,
``train`` -> ``train_step`` (one optimiser step = grad_accum micro-batches) -> ``forward_backward``.

Accelerate conventions: only the model (projector + LLM + objective modules, one ``TrainModule``), optimizer
and scheduler go through ``accelerator.prepare``; the streaming loader does not (it would be split twice):
``trainer.data.shards`` splits it over ranks and workers itself. The scheduler is stepped by us once per
optimiser step (``step_scheduler_with_optimizer=False``), so its schedule is in optimiser steps whatever the
process count.

Every micro-batch's forward gets a ``StepContext`` (step, micro-step, rank, world size, run seed, token
normaliser): objectives read what they need from the loop there, never from magic batch keys.

Loss normalisation. Every loss is divided by grad_accum before backward, uniformly. The ``lm`` objective
divides its summed token NLL by ``step.lm_normaliser``, which we set to (supervised tokens of the whole
accumulation window on all ranks) / world size / grad_accum, counted before the window's forward passes.
With DDP's gradient averaging the accumulated gradient is then exactly that of one big batch's token mean
(not a mean of micro-batch means), and each logged ``lm_loss`` (mean over micro-batches and ranks) is the
window's token mean.
Auxiliary objectives return per-sample means, so they end up averaged over the window too.

The loop never branches on objective names: total = sum over ``*_loss`` keys of weight x loss.

Letters: B batch, T sequence.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn

from trainer import checkpoint as ckpt_io
from trainer import tracking
from trainer.config import TrainConfig
from trainer.data import StreamLayout, build_stream, make_loader, verify_shards
from trainer.data.collate import record_skipped
from trainer.data.conversations import text_format
from trainer.models.build import (
    build_train_module,
    check_manifest_against,
    init_projector,
    load_checkpoint_weights,
)
from trainer.objectives import objective_weights, parse_spec
from trainer.objectives.base import StepContext
from visalign.config import to_dict, write_resolved
from visalign.shards import ShardFormatError, read_manifest

log = logging.getLogger("trainer")

LOG_FILE = "log.jsonl"


def lr_lambda(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices only; biases, norm weights and scalars (temperatures) never decay."""
    decay, no_decay = [], []
    for _name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def on_cpu() -> bool:
    """No GPU: tell Accelerate explicitly, else a multi-process launch silently runs unconnected processes
    (its CPU backend, gloo, is only chosen with ``cpu=True``)."""
    return not torch.cuda.is_available()


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


class Trainer:
    """Builds everything from a ``TrainConfig``; ``train()`` runs until ``optim.max_steps``."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.run = Path(cfg.output)
        trackers = tracking.make_trackers(cfg, tracking.tracker_names(cfg.logging))
        self.accelerator = Accelerator(
            cpu=on_cpu(),
            mixed_precision=resolve_mixed_precision(cfg.optim.mixed_precision),
            log_with=trackers or None,
            project_dir=str(self.run),
            step_scheduler_with_optimizer=False,
        )
        acc = self.accelerator
        if acc.is_main_process:
            self.run.mkdir(parents=True, exist_ok=True)
        set_seed(cfg.seed)  # same init on every rank; resume overwrites RNGs from the checkpoint
        self.manifest = read_manifest(cfg.shards)
        verify_shards(cfg.shards, self.manifest, cfg.data.verify_shards, acc.process_index, acc.num_processes,
                      cache_dir=cfg.model.cache_dir, progress=acc.is_main_process and cfg.logging.progress)  # fmt: skip
        self.step = 0
        self.num_batches = 0  # micro-batches this rank consumed from the stream (its loader position)

        ckpt = self._find_resume_checkpoint()
        if ckpt is not None:
            check_manifest_against(
                ckpt_io.read_state(ckpt)["manifest"], self.manifest, f"the run in {self.run}"
            )
        if acc.is_main_process:  # after the checks above (a refused start must not clobber a run's file)
            write_resolved(cfg, self.run / "config.yaml")
            tracking.write_env(self.run, acc, int(ckpt_io.read_state(ckpt)["step"]) if ckpt else 0)

        module, self.tokenizer = build_train_module(
            cfg,
            self.manifest,
            cfg.shards,
            main_process_first=acc.main_process_first,
            apply_stage_to=cfg.stage,
        )
        self.vlm, self.objectives = module.vlm, module.objectives
        if cfg.model.init_projector:
            init_projector(module, cfg.model.init_projector, cfg.model.projector, self.manifest)
        elif cfg.stage == "finetune" and ckpt is None:
            log.warning("finetune without --init-projector: the projector starts from random weights")
        self.weights = objective_weights(cfg.objectives, parse_spec(cfg.objective))
        self.optimizer = torch.optim.AdamW(
            param_groups(module, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
        )  # fmt: skip
        warmup = int(round(cfg.optim.warmup_ratio * cfg.optim.max_steps))
        schedule = functools.partial(
            lr_lambda, warmup_steps=warmup, max_steps=cfg.optim.max_steps, min_ratio=cfg.optim.min_lr_ratio
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.model, self.optimizer, self.scheduler = acc.prepare(module, self.optimizer, self.scheduler)
        if ckpt is not None:
            self.load(ckpt)
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
            cfg.shards, self.manifest, self.tokenizer, fmt, cfg.data.max_length, self.layout, self.num_batches
        )
        self.stream = stream
        self.batches = iter(make_loader(stream))
        self.heldout = self.build_heldout(fmt)
        tracking.start_trackers(acc, cfg)

    # -----------------------------------------------------------------------------------------------------
    # building
    # -----------------------------------------------------------------------------------------------------
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

        Every rank computes the same numbers on the unwrapped model (no collective inside, so a rank never
        waits on another); the main process writes them. In eval mode no RNG is drawn, so a resumed run
        stays bit-exact. FSDP shards the parameters and is not supported here (see docs/trainer.md).
        """
        from trainer.evaluate.measure import evaluate_batches, flat_report

        module = self.accelerator.unwrap_model(self.model)
        result = evaluate_batches(module.vlm, module.objectives, **self.heldout)
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
            if self.step % cfg.logging.log_every == 0 or self.step == cfg.optim.max_steps:
                self.log_metrics(metrics)
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
        bar.close()
        self.batches = iter(())  # shuts the loader's worker processes down now, not at garbage collection
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
            # no gradient all-reduce until the window's last micro-batch
            with acc.no_sync(self.model) if not last else contextlib.nullcontext():
                values = self.forward_backward(batch, step, num_accum)
            for key, value in values.items():
                sums[key] += value / num_accum

        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)  # only here: the sync step
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        keys = sorted(sums)  # identical on every rank: same objectives
        means = acc.reduce(
            torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=acc.device), "mean"
        )
        metrics = dict(zip(keys, means.tolist()))
        metrics["lr"] = lr
        metrics["grad_norm"] = float(grad_norm)
        metrics["num_samples"], metrics["num_tokens"] = num_samples, num_tokens
        metrics["skipped_samples"] = num_skipped  # unusable samples left out of this step, all ranks
        return metrics

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

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = self.accelerator.device

        def move(x):
            if isinstance(x, torch.Tensor):
                return x.to(device, non_blocking=True)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x

        return {k: move(v) for k, v in batch.items()}

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
        }

    def save(self) -> Path:
        acc = self.accelerator
        module = acc.unwrap_model(self.model)
        full = acc.get_state_dict(self.model)  # gathers FSDP shards on the main process
        trainable = {f"vlm.{_clean(n)}" for n, p in module.vlm.named_parameters() if p.requires_grad}
        # FSDP shards the optimizer state across ranks; saving one rank's shard would resume wrongly, so an
        # FSDP checkpoint holds weights only (export / --init-projector), and resuming it is refused.
        fsdp = acc.distributed_type == DistributedType.FSDP
        model_state = {k[len("vlm.") :]: v for k, v in full.items() if k in trainable}
        objectives_state = {
            k[len("objectives.") :]: v for k, v in full.items() if k.startswith("objectives.")
        }
        data_state = {
            "num_batches": self.num_batches,
            "layout": vars(self.layout),
            "slots": self.stream.position(self.num_batches),
        }
        path = ckpt_io.save_checkpoint(
            acc,
            self.run,
            self.step,
            model_state,
            objectives_state,
            {} if fsdp else self.optimizer.state_dict(),
            self.scheduler.state_dict(),
            data_state,
            {**self.meta(), "resumable": not fsdp},
            keep_last=self.cfg.checkpoint.keep_last,
        )
        if acc.is_main_process:
            log.info("saved %s", path)
        return path

    def load(self, ckpt: Path) -> None:
        acc = self.accelerator
        module = acc.unwrap_model(self.model)
        state = ckpt_io.read_state(ckpt)
        if not state.get("resumable", True) or acc.distributed_type == DistributedType.FSDP:
            raise ckpt_io.CheckpointError(
                f"resuming under FSDP is not supported ({ckpt}): its sharded optimizer state is not saved; "
                "export the checkpoint or start a new run from it with --init-projector"
            )
        load_checkpoint_weights(module, ckpt, self.cfg.stage)
        self.optimizer.load_state_dict(ckpt_io.load_torch(ckpt, ckpt_io.OPTIMIZER))
        self.scheduler.load_state_dict(ckpt_io.load_torch(ckpt, ckpt_io.SCHEDULER))
        rng, data = ckpt_io.load_rank_state(ckpt, acc.process_index)
        layout_now = {
            "world_size": acc.num_processes,
            "num_workers": self.cfg.data.num_workers,
            "batch_size": self.cfg.data.batch_size,
            "seed": self.cfg.seed,
            "shuffle_buffer": self.cfg.data.shuffle_buffer,
        }
        saved = {k: data["layout"][k] for k in layout_now}
        if saved != layout_now:
            raise ckpt_io.CheckpointError(
                f"{ckpt} was written with data layout {saved} but this run has {layout_now}; an exact resume "
                "needs the same processes, --num-workers, --batch-size, --seed and shuffle buffer"
            )
        restore_step = int(state["step"])
        self.step, self.num_batches = restore_step, int(data["num_batches"])
        ckpt_io.restore_rng(rng)
        if acc.is_main_process:
            self._truncate_logs(restore_step)
            log.info("resumed from %s (step %d)", ckpt, restore_step)
        acc.wait_for_everyone()

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


def _clean(name: str) -> str:
    """Parameter name without FSDP / activation-checkpoint wrapper levels (as in the gathered state dict)."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def run(cfg: TrainConfig) -> Path:
    """Train per ``cfg``; returns the run folder."""
    Trainer(cfg).train()
    return Path(cfg.output)


__all__ = ["Trainer", "lr_lambda", "param_groups", "run"]
