"""Multi-process launches for the tests: ``accelerate launch`` of the trainer on CPU (gloo), one machine or
several "machines" on localhost. Not a test module: imported by the distributed tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "jobs" / "accelerate" / "fsdp.yaml"
DDP_CONFIG = REPO / "jobs" / "accelerate" / "ddp.yaml"
# timing and memory differ between any two runs; everything else in a log record must be reproducible
VOLATILE = ("samples_per_s", "tokens_per_s", "peak_mem_mib")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(cache_dir, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VISALIGN_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, **extra}


def accelerate(config: Path | None = None, processes: int = 2, port: int | None = None) -> list[str]:
    """The ``accelerate launch`` prefix: with a project config file, or a plain multi-process launch."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(config)] if config is not None else ["--multi_gpu"]
    return cmd + ["--num_processes", str(processes), "--num_machines", "1",
                  "--main_process_port", str(port or free_port())]  # fmt: skip


def run_trainer(prefix: list[str], args: list[str], cache_dir, timeout: int = 600, **env: str) -> None:
    """``prefix -m trainer.cli run ARGS``; fails the test with the output's tail if it does not exit 0."""
    out = subprocess.run(
        [*prefix, "-m", "trainer.cli", "run", *args],
        env=launch_env(cache_dir, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]


def run_many(prefix: list[str], runs: list[list[str]], cache_dir, tmp_path: Path, timeout: int = 600) -> None:
    """Several ``trainer run`` argument lists one after another inside one launch (``tests/run_many.py``):
    one process start-up for all of them."""
    spec = tmp_path / f"runs-{len(list(tmp_path.glob('runs-*.json')))}.json"
    spec.write_text(json.dumps(runs))
    out = subprocess.run(
        [*prefix, str(REPO / "tests" / "run_many.py"), str(spec)],
        env=launch_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]


def read_log(run: Path, drop=VOLATILE) -> list[dict]:
    records = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in records]
