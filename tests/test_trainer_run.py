"""``trainer run`` end to end on tiny synthetic shards + tiny-llm: which parameters each stage trains, exact
resume, token-count-correct gradient accumulation, clear refusals, and the dask/faiss-free import."""

from __future__ import annotations

import dataclasses
import json
import os
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
from trainer.train import Trainer
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
    assert read_log(tmp_path / "big")[0]["lm_loss"] == pytest.approx(
        read_log(tmp_path / "acc")[0]["lm_loss"], rel=1e-5
    )


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


def test_trainer_imports_no_dask_or_faiss(cache_dir):
    """Every module of ``trainer`` and ``visalign``, imported in a fresh interpreter, loads no Dask, FAISS or
    open_clip (third-party imports at module level; ``test_layout.py`` checks our own import statements)."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import trainer, visalign\n"
        "for pkg in (trainer, visalign):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "heavy = ('dask', 'distributed', 'faiss', 'open_clip', 'pipeline')\n"
        "print(len(sys.modules), sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    env = {**os.environ, "VISALIGN_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    num_modules, heavy = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert heavy == "[]" and int(num_modules) > 500  # the trainer's modules (and torch) were really imported


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
    assert "run" in out and "export" in out
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
    assert records[0] != records[1]  # the projector moved between the two evaluations
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
