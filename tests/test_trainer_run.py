"""``trainer run`` end to end on tiny synthetic shards + tiny-llm: which parameters each stage trains, exact
resume, token-count-correct gradient accumulation, clear refusals, and the dask/faiss-free import."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer import checkpoint as ckpt_io
from trainer.cli import main
from trainer.config import TrainConfig
from trainer.objectives import parse_spec
from trainer.train import NonFiniteError, Trainer
from visalign.config import parse, resolve
from visalign.shards import ShardFormatError, read_manifest

BASE = [
    "--llm",
    "tiny-llm",
    "--batch-size",
    "2",
    "--logging.progress",
    "false",
    "--logging.tensorboard",
    "false",
]


def config(shards, run, *extra) -> TrainConfig:
    from trainer.cli import parse_run_args

    return parse_run_args(["--shards", str(shards), "--output", str(run), *BASE, *extra])


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def shards(tiny_shards, cache_dir):
    return tiny_shards(num_samples=8, samples_per_shard=3)


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_stage_decides_what_changes(shards, tmp_path, stage):
    trainer = Trainer(config(shards, tmp_path / stage, "--stage", stage, "--max-steps", "1", "--lr", "1e-2"))
    before = params(trainer.vlm)
    trainer.train()
    after = params(trainer.vlm)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    projector = {n for n in before if n.startswith("projector.")}
    llm = {n for n in before if n.startswith("llm.")}
    assert projector and llm and projector | llm == set(before)
    if stage == "pretrain":
        assert changed == projector
    else:
        assert changed == projector | llm


@pytest.mark.parametrize("objective,stage", [("lm", "pretrain"), ("sea+basic+distill", "finetune")])
def test_resume_is_bit_exact(shards, tmp_path, objective, stage):
    """6 steps in one go == 3 steps, stop, --resume: same per-step losses, samples, weights, optimizer
    state (the second case adds objectives that sample (SEA) and learn (temperature, reverse projector)
    and trains the LLM)."""
    common = ["--shards", str(shards), *BASE, "--max-steps", "6", "--save-every", "3", "--lr", "1e-2"]
    common += ["--objective", objective, "--stage", stage]
    common += ["--num-workers", "1", "--data.shuffle_buffer", "3", "--logging.seen_ids", "true"]
    assert main(["run", *common, "--output", str(tmp_path / "whole")]) == 0
    assert main(["run", *common, "--output", str(tmp_path / "parts"), "--stop-after", "3"]) == 0
    assert [r["step"] for r in read_log(tmp_path / "parts")] == [1, 2, 3]
    assert main(["run", *common, "--output", str(tmp_path / "parts"), "--resume"]) == 0

    timing = ("samples_per_s", "tokens_per_s", "peak_mem_mib")
    whole = [{k: v for k, v in r.items() if k not in timing} for r in read_log(tmp_path / "whole")]
    parts = [{k: v for k, v in r.items() if k not in timing} for r in read_log(tmp_path / "parts")]
    assert {"lm_loss", "total_loss", "lr", "grad_norm"} <= set(whole[0])
    assert len(whole) == 6 and parts == whole  # exact float equality, step by step
    seen_whole = (tmp_path / "whole" / "seen-rank0.jsonl").read_text()
    assert (tmp_path / "parts" / "seen-rank0.jsonl").read_text() == seen_whole  # same samples, same order
    w = load_file(ckpt_io.step_dir(tmp_path / "whole", 6) / ckpt_io.MODEL)
    p = load_file(ckpt_io.step_dir(tmp_path / "parts", 6) / ckpt_io.MODEL)
    assert w.keys() == p.keys() and all(torch.equal(w[k], p[k]) for k in w)
    assert any(k.startswith("llm.") for k in w) == (stage == "finetune")
    ow = load_file(ckpt_io.step_dir(tmp_path / "whole", 6) / ckpt_io.OBJECTIVES)
    op = load_file(ckpt_io.step_dir(tmp_path / "parts", 6) / ckpt_io.OBJECTIVES)
    assert ow.keys() == op.keys() and all(torch.equal(ow[k], op[k]) for k in ow)
    sw = load_file(ckpt_io.step_dir(tmp_path / "whole", 6) / ckpt_io.OPTIMIZER_TENSORS)
    sp = load_file(ckpt_io.step_dir(tmp_path / "parts", 6) / ckpt_io.OPTIMIZER_TENSORS)
    assert any(k.endswith(".exp_avg_sq") for k in sw)
    assert sw.keys() == sp.keys() and all(torch.equal(sw[k], sp[k]) for k in sw)
    # keep-last 2 (default) pruned step 3 in the uninterrupted run
    assert [c.name for c in ckpt_io.list_checkpoints(tmp_path / "whole")] == ["step-000003", "step-000006"]


def test_grad_accum_matches_one_big_batch(shards, tmp_path):
    """B=2 x A=1 and B=1 x A=2 see the same two samples; token-normalised accumulation: the same update."""
    common = ["--max-steps", "1", "--lr", "1e-2", "--data.shuffle_buffer", "1"]
    big = Trainer(config(shards, tmp_path / "big", *common, "--batch-size", "2", "--grad-accum", "1"))
    big.train()
    acc = Trainer(config(shards, tmp_path / "acc", *common, "--batch-size", "1", "--grad-accum", "2"))
    acc.train()
    a, b = params(big.vlm.projector), params(acc.vlm.projector)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)
    big_log, acc_log = read_log(tmp_path / "big")[0], read_log(tmp_path / "acc")[0]
    assert big_log["lm_loss"] == pytest.approx(acc_log["lm_loss"], rel=1e-5)
    # Adam's first update is ~lr * sign(g): only the logged pre-clip norm sees a wrong gradient scale
    assert big_log["grad_norm"] == pytest.approx(acc_log["grad_norm"], rel=1e-5)


def test_refusals_are_one_clear_line(shards, tiny_shards, tmp_path, capsys):
    run = tmp_path / "r"
    common = ["run", "--shards", str(shards), *BASE, "--max-steps", "1", "--output", str(run)]
    assert main([*common, "--resume"]) == 3
    assert "has no complete checkpoint" in capsys.readouterr().err
    assert main(common) == 0
    written = (run / "config.yaml").read_text()
    assert resolve(TrainConfig, {"config": str(run / "config.yaml")}).output == str(run)
    assert main([*common, "--lr", "0.5"]) == 3  # a second fresh start into the same run folder
    assert "pass --resume" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == written  # the refused start left the run's config alone

    other = tiny_shards(num_samples=8, samples_per_shard=3, fingerprint="another-encoder")
    assert main([*common[:2], str(other), *common[3:], "--resume"]) == 3
    msg = capsys.readouterr().err
    assert "encoder fingerprint enc-fp" in msg and "another-encoder" in msg

    other_words = tiny_shards(num_samples=8, samples_per_shard=3, words=[f"other{i}" for i in range(20)])
    assert main([*common[:2], str(other_words), *common[3:], "--resume"]) == 3
    msg = capsys.readouterr().err
    assert "word list sha256" in msg and read_manifest(other_words).wordlist.sha256 in msg

    wider = tiny_shards(num_samples=8, samples_per_shard=3, D=48)
    finetune = ["run", "--shards", str(wider), *BASE, "--stage", "finetune", "--output", str(tmp_path / "ft")]
    assert main([*finetune, "--init-projector", str(run)]) == 3
    msg = capsys.readouterr().err
    errors = [line for line in msg.splitlines() if "error:" in line]
    assert len(errors) == 1 and "feature width 32" in errors[0] and "feature width 48" in errors[0]

    assert (
        main(["run", "--shards", str(shards), "--output", str(tmp_path / "x"), "--llm", "no-such-llm-xyz"])
        == 3
    )
    assert "no-such-llm-xyz" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_update(shards, tmp_path):
    common = ["--stage", "finetune", "--max-steps", "1", "--lr", "1e-2"]
    plain = Trainer(config(shards, tmp_path / "plain", *common))
    init = params(plain.vlm)
    plain.train()
    ckpt = Trainer(config(shards, tmp_path / "ckpt", *common, "--gradient-checkpointing"))
    assert ckpt.vlm.llm.is_gradient_checkpointing
    ckpt.train()
    a, b = params(plain.vlm), params(ckpt.vlm)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.equal(a[k], init[k]) for k in a)  # the step did change the weights
    # the weights after one Adam step are blind to the gradient's scale; the logged norm is not
    assert read_log(tmp_path / "plain")[0]["grad_norm"] == pytest.approx(
        read_log(tmp_path / "ckpt")[0]["grad_norm"], rel=1e-5
    )


def test_finetune_starts_from_the_stage1_projector(shards, tmp_path):
    assert (
        main(["run", "--shards", str(shards), *BASE, "--max-steps", "1", "--output", str(tmp_path / "s1")])
        == 0
    )
    stage1 = load_file(ckpt_io.resolve_checkpoint(tmp_path / "s1") / ckpt_io.MODEL)
    cfg = config(shards, tmp_path / "s2", "--stage", "finetune", "--init-projector", str(tmp_path / "s1"))
    trainer = Trainer(cfg)
    assert all(
        torch.equal(p, stage1[f"projector.{n}"]) for n, p in trainer.vlm.projector.state_dict().items()
    )


def test_every_documented_flag_reaches_the_config(tmp_path):
    cfg = config(
        "S", "R", "--projector", "linear", "--init-projector", "I", "--gradient-checkpointing",
        "--grad-accum", "3", "--lr", "2e-5", "--mixed-precision", "no", "--max-length", "99",
        "--num-workers", "2", "--save-every", "7",
        "--keep-last", "1", "--log-every", "5", "--seed", "4", "--stage", "finetune", "--resume",
    )  # fmt: skip
    assert (cfg.model.projector, cfg.model.init_projector, cfg.model.gradient_checkpointing) == (
        "linear",
        "I",
        True,
    )
    assert (cfg.optim.grad_accum, cfg.optim.lr, cfg.optim.mixed_precision) == (3, 2e-5, "no")
    assert (cfg.data.max_length, cfg.data.num_workers, cfg.data.batch_size) == (99, 2, 2)
    assert (cfg.checkpoint.save_every, cfg.checkpoint.keep_last, cfg.logging.log_every) == (7, 1, 5)
    assert (cfg.seed, cfg.stage, cfg.resume) == (4, "finetune", True)
    assert parse(TrainConfig, ["--shards", "S", "--output", "R"]).model.llm is None


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("run", "export", "eval", "compare", "sample"):
        assert re.search(rf"^  {cmd} +\S", out, re.M), cmd  # each listed with its one-line description
    assert main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err
    assert main(["run", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--optim.lr" in help_text and "--max-steps" in help_text and "peak learning rate" in help_text


PRESETS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize(
    "preset",
    [p for p in PRESETS if p.name.startswith(("pretrain-", "finetune-", "demo-train"))],
    ids=lambda p: p.name,
)
def test_training_presets_follow_the_paper_settings(preset):
    """Every training preset resolves and names valid objectives; the paper presets give LLaVA's lr and
    global batch (batch_size x grad_accum x 8 GPUs) and train what their file name says."""
    cfg = resolve(TrainConfig, {"config": str(preset), "shards": "S", "output": "R"})
    names = parse_spec(cfg.objective)
    assert all(dataclasses.is_dataclass(getattr(cfg.objectives, name)) for name in names)
    global_batch = cfg.data.batch_size * cfg.optim.grad_accum * 8
    if preset.name.startswith("pretrain-"):
        assert (cfg.stage, cfg.optim.lr, global_batch) == ("pretrain", 1e-3, 256)
        assert names == parse_spec(preset.stem.removeprefix("pretrain-").replace("-", "+"))
    elif preset.name.startswith("finetune-") and cfg.model.lora.rank:
        # LLaVA-1.5's LoRA recipe: r 128, alpha 256, dropout 0.05, lr 2e-4, projector 2e-5
        lora = cfg.model.lora
        assert (lora.rank, lora.alpha, lora.dropout) == (128, 256, 0.05)
        assert (cfg.stage, cfg.optim.lr, cfg.optim.projector_lr, global_batch) == (
            "finetune",
            2e-4,
            2e-5,
            128,
        )
    elif preset.name.startswith("finetune-"):
        assert (cfg.stage, cfg.optim.lr, global_batch) == ("finetune", 2e-5, 128)


def test_periodic_heldout_eval_equals_trainer_eval(shards, tiny_shards, tmp_path):
    """--eval.every logs the `trainer eval` measures of the held-out samples at that step: the record of the
    last step equals a separate `trainer eval` of the final checkpoint on the same samples."""
    from trainer.evaluate.report import EvalConfig, run_eval

    heldout = tiny_shards(num_samples=5, samples_per_shard=2)  # same fingerprint and words, other samples
    run = tmp_path / "run"
    flags = ["--max-steps", "4", "--lr", "1e-2", "--objective", "sea+distill", "--eval.shards", str(heldout)]
    flags += ["--eval.every", "2", "--eval.samples", "3", "--eval.batch_size", "2", "--eval.layers", "0,2"]
    Trainer(config(shards, run, *flags)).train()
    records = [r for r in read_log(run) if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in records] == [2, 4]
    # the projector moved between the two evaluations
    assert records[0]["eval/consistency/l0"] != records[1]["eval/consistency/l0"]
    last = records[-1]
    assert {"eval/hit@1/l0", "eval/meaningful_share/l2", "eval/consistency/l0"} <= set(last)
    assert "eval/distill/reverse_cos/encoder" in last and not any(k.endswith("/l1") for k in last)

    cfg = EvalConfig(run=str(run), shards=str(heldout), out=str(tmp_path / "ev"), samples=3, pictures=0)
    payload = run_eval(dataclasses.replace(cfg, device="cpu"))
    for layer in (0, 2):
        for name, value in payload["per_layer"][layer].items():
            assert last[f"eval/{name}/l{layer}"] == pytest.approx(value, abs=1e-6), (name, layer)
    name = "distill/reverse_cos/encoder"
    assert last[f"eval/{name}"] == pytest.approx(payload["objectives"][name], abs=1e-6)


def test_heldout_shards_from_another_encoder_are_refused(shards, tiny_shards, tmp_path):
    other = tiny_shards(num_samples=4, samples_per_shard=2, fingerprint="another-encoder")
    flags = ["--eval.shards", str(other), "--eval.every", "1", "--max-steps", "1"]
    with pytest.raises(ShardFormatError, match="another-encoder.*same encoder"):
        Trainer(config(shards, tmp_path / "r", *flags))


def test_initialisation_does_not_depend_on_a_cold_model_cache(shards, tmp_path, monkeypatch):
    """The first load of a registry LLM builds it into the cache, and building a model draws from the global
    RNG (smollm2's conversion does); a later run finds it built. Both must start from the same projector and
    objective modules: simulated by a load that draws random numbers once."""
    import trainer.models.llm as llm_module

    real_load = llm_module.load_llm
    cold_cache = {"cold": True}

    def load_llm(*args, **kwargs):
        if cold_cache.pop("cold", False):
            torch.rand(1000)  # what a build into an empty cache does to the global RNG
        return real_load(*args, **kwargs)

    monkeypatch.setattr(llm_module, "load_llm", load_llm)
    cold = Trainer(config(shards, tmp_path / "a", "--objective", "distill"))
    warm = Trainer(config(shards, tmp_path / "b", "--objective", "distill"))
    assert not cold_cache  # the first load was the "cold" one
    for a, b in [(cold.vlm.projector, warm.vlm.projector), (cold.objectives, warm.objectives)]:
        pa, pb = params(a), params(b)
        assert pa.keys() == pb.keys() and pa
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


# ---------------------------------------------------------------------------------------------------------
# numeric settings, one writer per run folder, non-finite steps, exact-or-refused resume
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--max-steps", "0"], "--optim.max_steps (--max-steps) must be >= 1, got 0"),
        (["--save-every", "0"], "--checkpoint.save_every (--save-every) must be >= 1, got 0"),
        (["--batch-size", "0"], "--data.batch_size (--batch-size) must be >= 1, got 0"),
        (["--grad-accum", "0"], "--optim.grad_accum (--grad-accum) must be >= 1, got 0"),
        (["--optim.betas", "0.9"], "--optim.betas must be two numbers in [0, 1)"),
        (["--optim.betas", "0.9,1.5"], "--optim.betas must be two numbers in [0, 1)"),
        (["--lr=-1e-3"], "--optim.lr (--lr) must be a finite number > 0"),
        (["--lr", "nan"], "--optim.lr (--lr) must be a finite number > 0"),
        (["--optim.warmup_ratio", "1.5"], "--optim.warmup_ratio must be a finite number >= 0 and <= 1"),
        (["--keep-last=-1"], "--checkpoint.keep_last (--keep-last) must be >= 0"),
        (["--seed=-3"], "--seed must be in 0..4294967295"),
        (["--log-every", "0"], "--logging.log_every (--log-every) must be >= 1"),
        (["--optim.max_nonfinite_skips", "0"], "--optim.max_nonfinite_skips must be >= 1"),
        (["--model.lora.rank", "8"], "--model.lora.rank 8 needs --stage finetune"),
        (["--model.lora.dropout", "1"], "--model.lora.dropout must be a finite number >= 0 and < 1"),
        (["--objectives.sea.window", "0"], "--objectives.sea.window must be >= 1"),
        (
            ["--objectives.distill.layer", "4,0"],
            "--objectives.distill.layer must be -1 (last) or layers >= 1",
        ),
        (["--resume-with-changes"], "--resume_with_changes needs --resume"),
    ],
)
def test_numeric_settings_are_checked_when_parsed(tmp_path, capsys, flags, named):
    """Each bad value is one error line naming the flag, before anything is built or written."""
    run = tmp_path / "r"
    assert main(["run", "--shards", str(tmp_path / "S"), "--output", str(run), *BASE, *flags]) == 3
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], err
    assert not run.exists()


def test_a_broken_preset_is_one_line(tmp_path, capsys):
    preset = tmp_path / "bad.yaml"
    preset.write_text("optim:\n  lr: [1e-3\n")
    assert main(["run", "--config", str(preset), "--shards", "S", "--output", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not valid YAML (line" in err[0]


def test_a_held_run_folder_is_refused_naming_the_holder(shards, tmp_path, capsys):
    from visalign.locks import FolderLock

    run = tmp_path / "r"
    with FolderLock(run, "trainer run"):
        assert main(["run", "--shards", str(shards), "--output", str(run), *BASE, "--max-steps", "1"]) == 3
    err = capsys.readouterr().err
    assert "is in use by" in err and f"pid {os.getpid()}" in err
    assert not (run / "config.yaml").exists() and not (run / "log.jsonl").exists()
    # released: the same command now runs
    assert main(["run", "--shards", str(shards), "--output", str(run), *BASE, "--max-steps", "1"]) == 0


def test_two_runs_started_at_once_one_refused_the_other_exact(shards, tmp_path, cache_dir):
    """Two `trainer run` processes on one --output at the same moment: one exits 3 naming the other, the
    other's log and checkpoint equal those of a lone run."""
    args = ["--shards", str(shards), *BASE, "--max-steps", "2", "--lr", "1e-2"]
    env = {**os.environ, "VISALIGN_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "trainer.cli", "run", *args, "--output"]
    # the lone run in a process of its own too: the same thread count, hence the same float summation order
    outputs = [tmp_path / "shared", tmp_path / "shared", tmp_path / "lone"]
    procs = [subprocess.Popen([*cmd, str(o)], env=env, stderr=subprocess.PIPE, text=True) for o in outputs]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert results[2][0] == 0, results[2][1][-2000:]
    assert sorted(code for code, _ in results[:2]) == [0, 3], results
    refused = next(err for code, err in results if code == 3)
    assert "is in use by `" in refused and "trainer" in refused
    volatile = ("samples_per_s", "tokens_per_s", "peak_mem_mib")
    shared = [{k: v for k, v in r.items() if k not in volatile} for r in read_log(tmp_path / "shared")]
    lone = [{k: v for k, v in r.items() if k not in volatile} for r in read_log(tmp_path / "lone")]
    assert shared == lone and len(lone) == 2
    a = load_file(ckpt_io.step_dir(tmp_path / "shared", 2) / ckpt_io.MODEL)
    b = load_file(ckpt_io.step_dir(tmp_path / "lone", 2) / ckpt_io.MODEL)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def poisoned(tiny_shards, monkeypatch, bad_ids, **kw):
    """Shards (checksums consistent: written by the one writer) whose samples ``bad_ids`` hold inf features."""
    import numpy as np

    from visalign import shards as S

    real = S.ShardWriter.write

    def write(self, key, feat_PD, *args, **kwargs):
        if key in bad_ids or bad_ids == "all":
            feat_PD = np.full_like(feat_PD, np.inf)
        return real(self, key, feat_PD, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(S.ShardWriter, "write", write)
        return tiny_shards(**kw)


def all_finite(path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(path).values())


def test_nonfinite_steps_are_skipped_recorded_and_stop_the_run(tiny_shards, monkeypatch, tmp_path, capsys):
    """Every sample's features are inf: every step's loss is NaN. No update happens (the step-2 checkpoint
    equals the initial weights and is finite), each step is a log record with ``skipped``, and the run stops
    after --optim.max_nonfinite_skips consecutive skips with one error line."""
    shards = poisoned(tiny_shards, monkeypatch, "all", num_samples=6, samples_per_shard=3)
    run = tmp_path / "r"
    cfg = config(shards, run, "--max-steps", "10", "--save-every", "2", "--optim.max_nonfinite_skips", "3")
    trainer = Trainer(cfg)
    initial = {k: v.detach().clone() for k, v in trainer.vlm.projector.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"steps 1-3: 3 consecutive steps had a non-finite loss"):
        trainer.train()
    records = read_log(run)
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["skipped"] == 1.0 for r in records)
    assert [r["skipped_steps"] for r in records] == [1.0, 2.0, 3.0]
    assert all(math.isnan(r["lm_loss"]) for r in records)
    assert [c.name for c in ckpt_io.list_checkpoints(run)] == ["step-000002"]
    saved = load_file(ckpt_io.step_dir(run, 2) / ckpt_io.MODEL)
    assert all(torch.equal(saved[f"projector.{k}"], v) for k, v in initial.items())
    assert all_finite(ckpt_io.step_dir(run, 2) / ckpt_io.OPTIMIZER_TENSORS)

    # through the command line: one line, exit 3
    other = tmp_path / "cli"
    flags = ["--max-steps", "10", "--optim.max_nonfinite_skips", "2"]
    assert main(["run", "--shards", str(shards), "--output", str(other), *BASE, *flags]) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "2 consecutive steps had a non-finite loss" in err[0]


def test_one_bad_sample_costs_one_skipped_step(tiny_shards, monkeypatch, tmp_path):
    """One inf sample among 8: its step is skipped and recorded, the run finishes, its checkpoint is finite,
    and the steps before it equal those of a run on clean shards."""
    clean = tiny_shards(num_samples=8, samples_per_shard=4)
    bad = poisoned(tiny_shards, monkeypatch, {"s0003"}, num_samples=8, samples_per_shard=4)
    # one pass: every sample once, so the bad one is met exactly once
    flags = ["--max-steps", "8", "--batch-size", "1", "--data.shuffle_buffer", "1", "--lr", "1e-2"]
    Trainer(config(bad, tmp_path / "bad", *flags)).train()
    Trainer(config(clean, tmp_path / "clean", *flags)).train()
    bad_log, clean_log = read_log(tmp_path / "bad"), read_log(tmp_path / "clean")
    skipped = [r["step"] for r in bad_log if r.get("skipped")]
    assert len(skipped) == 1 and len(bad_log) == 8
    first = skipped[0]
    assert [r["lm_loss"] for r in bad_log[: first - 1]] == [r["lm_loss"] for r in clean_log[: first - 1]]
    ckpt = ckpt_io.resolve_checkpoint(tmp_path / "bad")
    assert all_finite(ckpt / ckpt_io.MODEL) and all_finite(ckpt / ckpt_io.OPTIMIZER_TENSORS)
    consecutive = 1 if first == 8 else 0  # the counter a resume carries on with
    assert ckpt_io.read_state(ckpt)["nonfinite_skips"] == {"total": 1, "consecutive": consecutive}


def test_a_checkpoint_never_holds_a_nonfinite_tensor(shards, tmp_path):
    trainer = Trainer(config(shards, tmp_path / "r", "--max-steps", "1"))
    with torch.no_grad():
        trainer.vlm.projector[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="vlm.projector.0.weight"):
        trainer.save()
    assert ckpt_io.list_checkpoints(tmp_path / "r") == []
    trainer.close()


@pytest.fixture
def stopped_run(shards, tmp_path):
    """A run stopped after 2 of 6 steps (lr 1e-2, seed 0): the starting point of every resume case."""
    run = tmp_path / "run"
    args = ["run", "--shards", str(shards), *BASE, "--max-steps", "6", "--lr", "1e-2", "--output", str(run)]
    assert main([*args, "--stop-after", "2"]) == 0
    return run, args


def other_llm(tmp_path) -> Path:
    """An LLM folder of another width, with tiny-llm's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.models.llm import load_llm

    _, tokenizer = load_llm("tiny-llm")
    folder = tmp_path / "other-llm"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


RESUME_CASES = [
    # (flags, the changed setting as reported, follows with --resume-with-changes)
    (["--lr", "0.05"], "optim.lr: 0.01 -> 0.05", True),
    (["--max-steps", "8"], "optim.max_steps: 6 -> 8", True),
    (["--grad-accum", "2"], "optim.grad_accum: 1 -> 2", True),
    (["--max-length", "512"], "data.max_length: 2048 -> 512", True),
    (["--objectives.lm.weight", "0.5"], "objectives.lm.weight: 1.0 -> 0.5", True),
    (["--objective", "sea"], "objective: 'lm' -> 'sea' (cannot change on resume)", False),
    (["--seed", "3"], "seed: 0 -> 3 (cannot change on resume)", False),
    (["--batch-size", "1"], "data.batch_size: 2 -> 1 (cannot change on resume)", False),
]


@pytest.mark.parametrize("flags,line,follows", RESUME_CASES, ids=lambda x: str(x))
def test_resume_is_exact_or_refused(stopped_run, flags, line, follows, capsys):
    """A changed setting is refused with one line old -> new and config.yaml left untouched; with
    --resume-with-changes the run continues with it (recorded in config-history.jsonl) unless no checkpoint
    can follow it (another model or data split), which stays refused."""
    run, args = stopped_run
    written = (run / "config.yaml").read_bytes()
    assert main([*args, "--resume", *flags]) == 3
    err = capsys.readouterr().err
    assert "error: --resume:" in err and line in err and "Traceback" not in err
    assert (run / "config.yaml").read_bytes() == written
    code = main([*args, "--resume", "--resume-with-changes", *flags])
    err = capsys.readouterr().err
    if not follows:
        assert code == 3 and line in err and (run / "config.yaml").read_bytes() == written
        return
    assert code == 0, err
    history = [json.loads(x) for x in (run / "config-history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "resume"]
    key = line.split(":")[0]
    assert key in history[-1]["changes"] and history[-1]["step"] == 2
    assert (run / "config.yaml").read_bytes() != written
    assert resolve(TrainConfig, {"config": str(run / "config.yaml")}) == parse_run_args_of(args, flags)


def parse_run_args_of(args, flags):
    from trainer.cli import parse_run_args

    return parse_run_args([*args[1:], "--resume", "--resume-with-changes", *flags])


def test_resume_with_a_new_lr_uses_it(stopped_run):
    """The new peak rate really drives the steps after the resume (the restored optimizer and scheduler
    states would otherwise keep the old one)."""
    run, args = stopped_run
    assert main([*args, "--resume", "--resume-with-changes", "--lr", "0.05"]) == 0
    lrs = [r["lr"] for r in read_log(run)]
    from trainer.train import lr_lambda

    warmup = int(round(0.03 * 6))
    expected = [0.01 * lr_lambda(s, warmup, 6, 0.0) for s in range(2)]
    expected += [0.05 * lr_lambda(s, warmup, 6, 0.0) for s in range(2, 6)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_resume_refuses_another_llm_and_other_shards(stopped_run, tiny_shards, tmp_path, capsys):
    run, args = stopped_run
    written = (run / "config.yaml").read_bytes()
    llm = other_llm(tmp_path)
    flags = ["--resume", "--resume-with-changes", "--llm", str(llm)]
    assert main([*args, *flags]) == 3
    err = capsys.readouterr().err
    assert f"model.llm: 'tiny-llm' -> '{llm}' (cannot change on resume)" in err and "Traceback" not in err

    more = tiny_shards(num_samples=10, samples_per_shard=3)  # same encoder and words, another shard set
    moved = [*args[:2], str(more), *args[3:]]
    assert main([*moved, "--resume"]) == 3
    err = capsys.readouterr().err
    assert "shards (set): '3 shards, 8 samples" in err and "-> '4 shards, 10 samples" in err
    assert (run / "config.yaml").read_bytes() == written
    assert main([*moved, "--resume", "--resume-with-changes"]) == 0  # continues on the new set
