"""Two processes (gloo, CPU) where one rank's micro-batches are text-only, with ``sea+basic+distill``, under
DDP and under FSDP2: the run neither hangs nor differs from the rule, and every rank refuses a damaged shard
that only one of them read.

The reference is a single-process recomputation of the same micro-batches: the same ``TrainModule`` built
from the same config, each rank's micro-batch forwarded with that rank's ``StepContext``, gradients averaged
as DDP does, AdamW stepped with the loop's parameter groups and schedule. Per rank and step the losses must
match, rank 1's auxiliary losses must be exactly zero, and the synchronised gradients of both ranks must
equal the reference average (so rank 1 did take part in every gradient's all-reduce).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import dist_text_only as D
from tests.test_trainer_distributed import free_port, launch_env

pytestmark = pytest.mark.slow
AUX = ("sea_loss", "basic_das_loss", "basic_sds_loss", "distill_loss")


def run_flags(shards, run):
    return ["--shards", str(shards), "--output", str(run), "--llm", "tiny-llm", "--objective", "sea+basic+distill",
            "--stage", "finetune", "--max-steps", str(D.STEPS), "--lr", "1e-2", "--optim.max_grad_norm", "0",
            "--batch-size", "2", "--logging.progress", "false", "--logging.tensorboard", "false"]  # fmt: skip


def launch(cache_dir, *args, check=True):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), *args]  # fmt: skip
    return subprocess.run(cmd, env=launch_env(cache_dir), check=check, timeout=300, capture_output=not check,
                          text=True)  # fmt: skip


def reference(shards: Path, run: Path):
    """Per rank and step the losses, and per step the averaged gradients, computed in this process."""
    from trainer.cli import parse_run_args
    from trainer.models.build import build_train_module
    from trainer.objectives import objective_weights, parse_spec
    from trainer.objectives.base import StepContext
    from trainer.train import lr_lambda, param_groups
    from visalign.shards import read_manifest

    cfg = parse_run_args(run_flags(shards, run))
    manifest = read_manifest(shards)
    module, tok = build_train_module(cfg, manifest, shards, apply_stage_to=cfg.stage)
    module.train()
    weights = objective_weights(cfg.objectives, parse_spec(cfg.objective))
    optimizer = torch.optim.AdamW(param_groups(module, cfg.optim.weight_decay, cfg.optim.lr), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)  # fmt: skip
    warmup = int(round(cfg.optim.warmup_ratio * cfg.optim.max_steps))
    schedule = functools.partial(lr_lambda, warmup_steps=warmup, max_steps=cfg.optim.max_steps,
                                 min_ratio=cfg.optim.min_lr_ratio)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = {rank: D.micro_batches(shards, tok, rank) for rank in (0, 1)}
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    losses, grads = {0: [], 1: []}, []
    for step in range(D.STEPS):
        targets = sum(batches[r][step]["num_target_tokens"] for r in (0, 1))
        normaliser = max(targets, 1) / 2
        per_rank = []
        for rank in (0, 1):
            ctx = StepContext(step=step, rank=rank, world_size=2, seed=cfg.seed, lm_normaliser=normaliser)
            out, _ = module(batches[rank][step], ctx)
            losses[rank].append({k: float(v.detach()) for k, v in out.items()})
            total = sum(weights[k] * v for k, v in out.items())
            per_rank.append(torch.autograd.grad(total, params))  # allow_unused=False: every parameter reached
        mean = [(a + b) / 2 for a, b in zip(*per_rank)]
        grads.append(dict(zip(names, mean)))
        for p, g in zip(params, mean):
            p.grad = g.clone()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_text_only_rank_follows_the_rule(cache_dir, tmp_path, strategy):
    shards = D.write_shards(tmp_path / "shards")
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    flags = [*run_flags(shards, run), "--parallel.strategy", strategy]
    launch(cache_dir, str(Path(D.__file__)), str(out), "--", *flags)
    got = {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}
    want_losses, want_grads = reference(shards, run)
    for rank in (0, 1):
        assert [g["step"] for g in got[rank]] == list(range(D.STEPS))
        for step in range(D.STEPS):
            record = got[rank][step]
            for key, value in want_losses[rank][step].items():
                assert record[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (rank, step, key)
            if rank == 1:  # only text on this rank: the rule's exact zeros, and a real LM loss
                assert all(record[k] == 0.0 for k in AUX) and record["lm_loss"] > 0
                assert record["sea/pairs"] == 0.0
            else:
                assert all(record[k] > 0 for k in AUX), record
    for step in range(D.STEPS):
        synced = [load_file(out / f"grads-rank{r}-step{step}.safetensors") for r in (0, 1)]
        assert synced[0].keys() == synced[1].keys() == {f"{k}" for k in want_grads[step]}
        for name, want in want_grads[step].items():
            assert torch.equal(synced[0][name], synced[1][name]), name  # the same all-reduced gradient
            # relative to the tensor's scale: the two processes sum in other orders (1 thread vs several), and
            # AdamW's first update turns ulp-level gradient differences into ~1e-5 ones by step 2
            diff = float((synced[0][name] - want).abs().max())
            assert diff <= 1e-4 * float(want.abs().max()) + 1e-10, (step, name, diff)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    print(f"\n2-process text-only run ({strategy}), rank 1 all text:")
    for rank in (0, 1):
        for record in got[rank]:
            print(f"  rank {rank} step {record['step']}: " + ", ".join(
                f"{k} {record[k]:.6g}" for k in ("lm_loss", *AUX)))  # fmt: skip


def test_every_rank_refuses_a_shard_only_one_rank_checked(tiny_shards, cache_dir, tmp_path):
    from tests.test_shard_verify import flip_feat_bytes
    from visalign.shards import shard_name

    shards = tiny_shards(num_samples=9, samples_per_shard=3)
    flip_feat_bytes(shards / shard_name(1))  # shards 0 and 2 are rank 0's to check, shard 1 is rank 1's
    args = ["-m", "trainer.cli", "run", "--shards", str(shards), "--output", str(tmp_path / "run"), "--llm",
            "tiny-llm", "--max-steps", "2", "--logging.progress", "false"]  # fmt: skip
    result = launch(cache_dir, *args, check=False)
    assert result.returncode != 0
    expected = f"trainer run: error: shard {shards / shard_name(1)} differs from its manifest: its sha256"
    assert result.stderr.count(expected) == 2, result.stderr[-3000:]  # the same line from both ranks
    assert not (tmp_path / "run" / "log.jsonl").exists()
