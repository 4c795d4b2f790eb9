"""Data-parallel runs on CPU through the real launcher (gloo): 2 processes on one machine, and the multi-node
code path as 2 'machines' (two `accelerate launch` commands) on localhost. Every sample is consumed exactly
onceper pass across ranks x workers, every rank runs the same steps, and checkpoints are written."""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys

import pytest

from trainer import checkpoint as ckpt_io
from visalign.shards import iter_tar, read_manifest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(cache_dir) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "VISALIGN_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}


def train_args(shards, run, steps):
    return [
        "-m", "trainer.cli", "run", "--shards", str(shards), "--output", str(run), "--llm", "tiny-llm",
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


def test_two_processes_see_every_sample_once(tiny_shards, cache_dir, tmp_path):
    # 10 samples in 4 uneven shards, 2 ranks x 2 workers = 4 slots of 2-3 samples; 6 steps finish pass 0
    shards = tiny_shards(num_samples=10, samples_per_shard=3)
    run = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(free_port())]  # fmt: skip
    subprocess.run([*launch, *train_args(shards, run, 6)], env=launch_env(cache_dir), check=True, timeout=300)
    check_coverage(shards, run, 2, 6)


def test_two_machines_on_localhost(tiny_shards, cache_dir, tmp_path):
    shards = tiny_shards(num_samples=10, samples_per_shard=3)
    run = tmp_path / "run"
    port = str(free_port())
    procs = []
    for rank in range(2):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, *train_args(shards, run, 6)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=launch_env(cache_dir)))
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    check_coverage(shards, run, 2, 6)


def test_two_process_resume_is_exact(tiny_shards, cache_dir, tmp_path):
    """The per-rank loader positions and RNG states: 2 ranks x 2 workers, stop at step 3, resume to 6."""
    shards = tiny_shards(num_samples=10, samples_per_shard=3)

    def launch(run, *extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), *train_args(shards, run, 6),
               "--objective", "sea+distill", *extra]  # fmt: skip
        subprocess.run(cmd, env=launch_env(cache_dir), check=True, timeout=300)

    launch(tmp_path / "whole")
    launch(tmp_path / "parts", "--stop-after", "3")
    launch(tmp_path / "parts", "--resume")
    for name in ("log.jsonl", "seen-rank0.jsonl", "seen-rank1.jsonl"):
        whole = [json.loads(x) for x in (tmp_path / "whole" / name).read_text().splitlines()]
        parts = [json.loads(x) for x in (tmp_path / "parts" / name).read_text().splitlines()]
        for record in whole + parts:
            record.pop("samples_per_s", None), record.pop("tokens_per_s", None)
        assert parts == whole, name
