"""Data-parallel runs on CPU through the real launcher (gloo): 2 processes on one machine, and the multi-node
code path as 2 'machines' (two `accelerate launch` commands) on localhost, under DDP and FSDP. Every sample is
consumed exactly once per pass across ranks x workers, every rank runs the same steps, checkpoints are
written, resume is exact, and a checkpoint of one strategy resumes under the other."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest
import torch

from tests.launching import FSDP_CONFIG, accelerate, free_port, launch_env, read_log, run_trainer
from trainer import checkpoint as ckpt_io
from visalign.shards import iter_tar, read_manifest

pytestmark = pytest.mark.slow


def train_args(shards, run, steps):
    return [
        "--shards", str(shards), "--output", str(run), "--llm", "tiny-llm",
        "--max-steps", str(steps), "--batch-size", "1", "--num-workers", "2", "--save-every", "3",
        "--logging.seen_ids", "true", "--logging.progress", "false",
    ]  # fmt: skip


def check_coverage(shards, run, num_ranks, steps):
    ids = sorted(s["meta"]["id"] for p in read_manifest(shards).shard_paths(shards) for s in iter_tar(p))
    first_pass = collections.Counter()
    for rank in range(num_ranks):
        records = [json.loads(line) for line in (run / f"seen-rank{rank}.jsonl").read_text().splitlines()]
        assert sorted({r["step"] for r in records}) == list(range(1, steps + 1))  # same steps on every rank
        first_pass.update(r["id"] for r in records if r["pass"] == 0)
    assert sorted(first_pass) == ids and set(first_pass.values()) == {1}
    assert [c.name for c in ckpt_io.list_checkpoints(run)] == ["step-000003", f"step-{steps:06d}"]
    assert {f"rng-rank{r}.pt" for r in range(num_ranks)} <= {
        p.name for p in ckpt_io.list_checkpoints(run)[-1].iterdir()
    }


@pytest.mark.parametrize("strategy", ["fsdp"])  # DDP: the uninterrupted run of the resume test below
def test_two_processes_see_every_sample_once(tiny_shards, cache_dir, tmp_path, strategy):
    # 10 samples in 4 uneven shards, 2 ranks x 2 workers = 4 slots of 2-3 samples; 6 steps finish pass 0
    shards = tiny_shards(num_samples=10, samples_per_shard=3)
    run = tmp_path / "run"
    prefix = accelerate(FSDP_CONFIG if strategy == "fsdp" else None)
    subprocess.run([*prefix, "-m", "trainer.cli", "run", *train_args(shards, run, 6)],
                   env=launch_env(cache_dir), check=True, timeout=600)  # fmt: skip
    check_coverage(shards, run, 2, 6)
    state = ckpt_io.read_state(ckpt_io.resolve_checkpoint(run))
    assert state["parallel"] == {"strategy": strategy, "processes": 2}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_machines_on_localhost(tiny_shards, cache_dir, tmp_path, strategy):
    shards = tiny_shards(num_samples=10, samples_per_shard=3)
    run = tmp_path / "run"
    port = str(free_port())
    config = ["--config_file", str(FSDP_CONFIG)] if strategy == "fsdp" else ["--multi_gpu"]
    procs = []
    for rank in range(2):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *config, "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, "-m", "trainer.cli", "run", *train_args(shards, run, 6)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=launch_env(cache_dir)))
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    check_coverage(shards, run, 2, 6)
    ckpt = ckpt_io.resolve_checkpoint(run)
    assert ckpt_io.read_state(ckpt)["format"] == ("sharded" if strategy == "fsdp" else "gathered")


def test_two_process_resume_is_exact(tiny_shards, cache_dir, tmp_path):
    """The per-rank loader positions and RNG states: 2 ranks x 2 workers, stop at step 3, resume to 6."""
    shards = tiny_shards(num_samples=10, samples_per_shard=3)

    def launch(run, *extra):
        run_trainer(
            accelerate(), [*train_args(shards, run, 6), "--objective", "sea+distill", *extra], cache_dir
        )

    launch(tmp_path / "whole")
    check_coverage(shards, tmp_path / "whole", 2, 6)
    state = ckpt_io.read_state(ckpt_io.resolve_checkpoint(tmp_path / "whole"))
    assert state["parallel"] == {"strategy": "ddp", "processes": 2}
    launch(tmp_path / "parts", "--stop-after", "3")
    launch(tmp_path / "parts", "--resume")
    for name in ("log.jsonl", "seen-rank0.jsonl", "seen-rank1.jsonl"):
        whole = [json.loads(x) for x in (tmp_path / "whole" / name).read_text().splitlines()]
        parts = [json.loads(x) for x in (tmp_path / "parts" / name).read_text().splitlines()]
        for record in whole + parts:
            for key in ("samples_per_s", "tokens_per_s", "peak_mem_mib"):
                record.pop(key, None)
        assert parts == whole, name


@pytest.mark.parametrize("first,then", [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_a_checkpoint_resumes_under_the_other_strategy(tiny_shards, cache_dir, tmp_path, first, then):
    """A gathered (DDP) checkpoint resumes under FSDP and a sharded one under DDP (DCP reshards on load): the
    strategy is a computation setting (rounding), so --resume alone is refused and --resume-with-changes
    continues; the losses stay within 1e-5 of the uninterrupted run."""
    shards = tiny_shards(num_samples=10, samples_per_shard=3)
    flags = ["--stage", "finetune", "--objective", "sea+distill", "--num-workers", "0"]

    def args(run, strategy, *extra):
        return [*train_args(shards, run, 6), *flags, "--parallel.strategy", strategy, *extra]

    run_trainer(accelerate(), args(tmp_path / "whole", first), cache_dir)
    run_trainer(accelerate(), args(tmp_path / "parts", first, "--stop-after", "3"), cache_dir)
    refused = subprocess.run([*accelerate(), "-m", "trainer.cli", "run", *args(tmp_path / "parts", then, "--resume")],
                             env=launch_env(cache_dir), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert refused.returncode != 0 and f"parallel.strategy: '{first}' -> '{then}'" in refused.stderr
    run_trainer(accelerate(), args(tmp_path / "parts", then, "--resume", "--resume-with-changes"), cache_dir)
    whole, parts = read_log(tmp_path / "whole"), read_log(tmp_path / "parts")
    assert [r["step"] for r in parts] == list(range(1, 7))
    for ra, rb in zip(parts, whole):
        for key in (k for k in rb if k.endswith("_loss")):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    a = ckpt_io.read_tensors(ckpt_io.resolve_checkpoint(tmp_path / "parts"))
    b = ckpt_io.read_tensors(ckpt_io.resolve_checkpoint(tmp_path / "whole"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
