"""``benchmarks/bench_overhead.py``: the bare loop is the same computation as the trainer's ``lm`` step (same
first loss on the same batch and weights), and a run times both sides (a check of the script, not of speed)."""

from __future__ import annotations

import importlib.util
import math
import types
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_bare_loop_matches_the_trainer_step(bench, tmp_path, cache_dir, monkeypatch, stage):
    monkeypatch.setenv("VISALIGN_CACHE", str(cache_dir))
    threads = torch.get_num_threads()
    args = types.SimpleNamespace(
        llm="tiny-llm", stage=stage, rounds=1, batch=2, samples=8, patches=16, feature_dim=32, threads=1,
        extra=["--logging.tensorboard", "false"], work=str(tmp_path),
    )  # fmt: skip
    try:
        result = bench.run_one(args)
    finally:
        torch.set_num_threads(threads)
    project_loss, bare_loss = result["first_losses"]
    assert bare_loss == pytest.approx(project_loss, rel=1e-6)
    assert len(result["project_s"]) == 1 and len(result["bare_s"]) == 1 and len(result["step_s"]) == 1
    times = result["project_s"] + result["bare_s"] + result["step_s"] + result["project_cpu_s"]
    assert all(math.isfinite(s) and s > 0 for s in times + result["bare_cpu_s"])
    assert result["tokens"][0] == 2 and result["tokens"][1] > 16  # 16 visual slots + the text
    trainable = result["trainable"]
    assert (trainable > 100_000) if stage == "finetune" else (trainable < 100_000)
