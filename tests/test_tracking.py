"""Trackers (``--logging.report-to``) get exactly log.jsonl's scalars under the same names, offline; every start
writes env.json. TensorBoard is a project dependency; W&B and MLflow are in the dev extra and their tests are
skipped (with the install command) where they are absent.

One training run with periodic evaluation (so names with sections and ``@`` occur: ``eval/hit@1/l0``) feeds
every installed tracker at once; each test reads one tracker's own files back."""

from __future__ import annotations

import glob
import importlib.util
import json
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--llm", "tiny-llm", "--batch-size", "2", "--logging.progress", "false", "--objective", "sea"]
OPTIONAL = [t for t in ("wandb", "mlflow") if importlib.util.find_spec(t) is not None]


def installed_or_skip(name: str) -> None:
    if name not in OPTIONAL:
        package = "mlflow-skinny" if name == "mlflow" else name
        pytest.skip(f"{name} is not installed (pip install {package}, or pip install -e .[dev])")


def log_records(run: Path) -> dict[int, dict[str, float]]:
    """log.jsonl as ``{step: {name: value}}`` (the training and the evaluation record of a step merged)."""
    merged: dict[int, dict[str, float]] = defaultdict(dict)
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        merged[record.pop("step")].update(record)
    return dict(merged)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A 3-step run with held-out evaluation every 2 steps, logged to TensorBoard and the optional trackers,
    without W&B credentials (so W&B must go offline) and without an MLflow server."""
    from tests.conftest import write_tiny_shards

    tmp = tmp_path_factory.mktemp("tracked")
    shards = write_tiny_shards(tmp / "shards", num_samples=6)
    run = tmp / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(tmp / "home"))  # no ~/.netrc, no W&B settings of the user
    for var in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "WANDB_DIR"):
        mp.delenv(var, raising=False)
    mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a closed port: any network use would fail loudly
    report_to = ",".join(["tensorboard", *OPTIONAL])
    args = ["run", "--shards", str(shards), *BASE, "--max-steps", "3", "--output", str(run)]
    args += [
        "--eval.shards",
        str(shards),
        "--eval.every",
        "2",
        "--eval.samples",
        "2",
        "--logging.report-to",
        report_to,
    ]
    try:
        assert main(args) == 0
    finally:
        mp.undo()
    records = log_records(run)
    assert sorted(records) == [1, 2, 3] and "eval/hit@1/l0" in records[2] and "sea/pair_acc" in records[1]
    return run, records


def test_tensorboard_scalars_are_log_jsonl(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, records = tracked
    assert sorted(p.name for p in (run / "tensorboard").iterdir() if p.is_dir()) == []  # one event stream
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged: dict[int, dict[str, float]] = defaultdict(dict)
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            logged[event.step][tag] = event.value
    assert sorted(logged) == sorted(records)
    for step, record in records.items():
        assert sorted(logged[step]) == sorted(record), step  # the same names, "/" and "@" kept
        for name, value in record.items():
            assert logged[step][name] == pytest.approx(value, rel=1e-6, abs=1e-6), name  # float32 in events
    print("tensorboard tags == log.jsonl names:", sorted(records[2]))


def wandb_records(path: str) -> list[bytes]:
    """The records of a W&B ``.wandb`` file: a 7-byte header, then 32 KiB blocks of chunks, each with a
    7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last), as W&B writes them."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            records.append(pending + chunk)
    return records


def test_wandb_offline_run_has_the_same_names(tracked):
    installed_or_skip("wandb")
    from wandb.proto import wandb_internal_pb2

    run, records = tracked
    (path,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert json.loads((run / "trackers.json").read_text())["wandb"] in path
    history = {}
    for raw in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    assert sorted(history) == sorted(records)
    for step, record in records.items():
        assert sorted(history[step]) == sorted(record), step
        for name, value in record.items():
            assert history[step][name] == pytest.approx(value, rel=1e-9), name
    print("W&B offline history names == log.jsonl names:", sorted(records[2]))


def test_mlflow_local_store_has_the_same_values(tracked):
    installed_or_skip("mlflow")
    from mlflow.tracking import MlflowClient

    from trainer.tracking import mlflow_local_uri, mlflow_names

    run, records = tracked
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=mlflow_local_uri(run))
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.run_name == run.name and mlflow_run.data.params["optim.max_steps"] == "3"
    expected = {step: mlflow_names(record) for step, record in records.items()}
    names = set().union(*expected.values())
    assert set(mlflow_run.data.metrics) == names
    assert "eval/hit_1/l0" in names and "eval/meaningful_share/l0" in names  # only "@" is replaced
    for name in names:
        history = {m.step: m.value for m in client.get_metric_history(run_id, name)}
        assert history == pytest.approx({s: r[name] for s, r in expected.items() if name in r}, rel=1e-9)


def test_trackers_are_checked_before_training(tiny_shards, tmp_path, capsys):
    shards = tiny_shards(num_samples=4)
    args = ["run", "--shards", str(shards), *BASE, "--max-steps", "1", "--output", str(tmp_path / "r")]
    assert main([*args, "--logging.report-to", "tensorboard,nosuch"]) == 3
    assert (
        "--logging.report-to 'nosuch' is not a tracker Accelerate knows; choose from"
        in capsys.readouterr().err
    )
    missing = next(t for t in ("aim", "swanlab", "dvclive", "clearml") if importlib.util.find_spec(t) is None)
    assert main([*args, "--logging.report-to", missing]) == 3
    assert f"the {missing!r} package is not installed; pip install {missing}" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_env_json_records_each_start(tiny_shards, tmp_path):
    import accelerate
    import torch
    import transformers

    shards = tiny_shards(num_samples=4)
    run = tmp_path / "run"
    args = [
        "run",
        "--shards",
        str(shards),
        *BASE,
        "--max-steps",
        "2",
        "--save-every",
        "1",
        "--output",
        str(run),
    ]
    assert main([*args, "--stop-after", "1", "--logging.tensorboard", "false"]) == 0  # the deprecated switch
    assert not (run / "tensorboard").exists()
    first = json.loads((run / "env.json").read_text())
    assert main([*args, "--resume"]) == 0
    env = json.loads((run / "env.json").read_text())
    assert env["step"] == 1 and [s["step"] for s in env["earlier_starts"]] == [0]
    assert env["earlier_starts"][0]["started"] == first["started"]
    assert (
        env["packages"]["torch"] == torch.__version__
        and env["packages"]["transformers"] == transformers.__version__
    )
    assert env["packages"]["accelerate"] == accelerate.__version__
    assert env["hardware"]["num_processes"] == 1 and env["hardware"]["cpu_count"] >= 1
    assert env["hardware"]["gpus"] == [] or torch.cuda.is_available()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert env["git"]["commit"] == head.stdout.strip() and isinstance(env["git"]["dirty"], bool)
    assert env["command"] == [sys.executable, *sys.argv]  # this process's command line (here: pytest's)
    assert (run / "tensorboard").is_dir()  # the resumed start uses the default report-to
