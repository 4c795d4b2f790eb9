"""Exactly-once output: kill -9 mid-run then rerun == uninterrupted run; schedulers give the same shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import LabelConfig
from pipeline.driver import run_label
from pipeline.task import available_cores
from visalign import shards as S

REPO = Path(__file__).resolve().parent.parent
WORDS = (
    "cat dog car tree house sky cloud sun flower grass water boat bird fish horse cup spoon "
    "helmet flag rocket"
)


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory, photo_dataset):
    """14 records over the 7 photos (ids differ), so a run has enough shards to be killed in the middle."""
    root = tmp_path_factory.mktemp("many")
    recs = json.loads(photo_dataset.read_text())
    many = [dict(r, id=f"{r['id']}-{i}") for i in range(2) for r in recs]
    path = root / "many.json"
    path.write_text(json.dumps(many))
    (root / "words.txt").write_text(WORDS.replace(" ", "\n"))
    return path


def _args(many: Path, out: Path, cache_dir: Path, **over) -> list[str]:
    flags = {
        "encoder": "tiny-clip",
        "input": str(many),
        "images": str(Path(many).parent.parent / "photos0" / "images"),
        "shards": str(out),
        "wordlist": str(many.parent / "words.txt"),
        "scheduler": "synchronous",
        "samples-per-shard": "1",
        "batch-size": "1",
        "progress": "false",
        "cache-dir": str(cache_dir),
    }
    flags.update(over)
    return [x for k, v in flags.items() for x in (f"--{k}", v)]


def snapshot(out: Path) -> tuple[dict, dict]:
    """(manifest without its timestamp, {shard name: decoded samples}) for equality checks."""
    manifest = json.loads((out / S.MANIFEST).read_text())
    manifest["created"] = ""
    content = {}
    for p in sorted(out.glob("shard-*.tar")):
        content[p.name] = [
            {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for s in S.iter_tar(p)
        ]
    return manifest, content


def _images_root(photo_dataset: Path) -> str:
    return str(photo_dataset.parent / "images")


@pytest.fixture(scope="module")
def lone_run(tmp_path_factory, many_photos, photo_dataset, cache_dir) -> Path:
    """The reference: the console command run alone, uninterrupted."""
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("lone") / "out"
    assert main(["label", *_args(many_photos, out, cache_dir, images=_images_root(photo_dataset))]) == 0
    return out


def test_kill9_then_resume_equals_uninterrupted(tmp_path, many_photos, photo_dataset, cache_dir, lone_run):
    from pipeline.cli import main

    images = _images_root(photo_dataset)
    ref_out = lone_run

    out = tmp_path / "killed"
    env = dict(os.environ, VISALIGN_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pipeline.cli", "label", *_args(many_photos, out, cache_dir, images=images)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "shard-000001.json").exists():  # poll: kill right after a couple of shards completed
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no shard completed within 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / S.MANIFEST).exists(), "killed before the end: no manifest"
    finals = sorted(out.glob("shard-*.tar"))
    assert 2 <= len(finals) < 14
    for p in finals:  # a final name is never half-written: every one reads back whole
        with tarfile.open(p) as tar:
            tar.getmembers()
        assert len(list(S.iter_tar(p))) == 1

    assert main(["label", *_args(many_photos, out, cache_dir, images=images)]) == 0
    assert snapshot(out) == snapshot(ref_out)
    assert not list(out.glob("*.tmp"))


def test_two_runs_started_together_one_is_refused(tmp_path, many_photos, photo_dataset, cache_dir, lone_run):
    """Two `pipeline label` on one folder at the same moment: one refused naming the other, whose output is
    byte for byte that of a lone run (shards, manifest but its timestamp, rejects, word list)."""
    images = _images_root(photo_dataset)
    lone = lone_run

    out = tmp_path / "shared"
    env = dict(os.environ, VISALIGN_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pipeline.cli", "label", *_args(many_photos, out, cache_dir, images=images)]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        results = [(p, *p.communicate(timeout=300)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(p.returncode for p in procs) == [0, 3], [r[2][-500:] for r in results]
    winner = next(p for p in procs if p.returncode == 0)
    _, _, err = next(r for r in results if r[0].returncode == 3)
    assert (
        f"{out} is in use by" in err and f"pid {winner.pid}" in err and "one pipeline label per folder" in err
    )
    assert len(err.strip().splitlines()) == 1, err

    def files(root: Path) -> dict[str, bytes]:
        names = sorted(p.name for p in root.glob("shard-*.tar")) + [S.REJECTS, S.WORDLIST]
        return {name: (root / name).read_bytes() for name in names}

    assert files(out) == files(lone) and len(files(out)) == 14 + 2
    assert snapshot(out)[0] == snapshot(lone)[0], "manifests equal except `created`"
    assert not list(out.glob("*.tmp"))


def _same_shards(a: Path, b: Path) -> None:
    ma, ca = snapshot(a)
    mb, cb = snapshot(b)
    assert ma == mb, "manifests (checksums included) differ"
    assert ca == cb


def _scheduler_config(many_photos, photo_dataset, cache_dir) -> dict:
    """The label settings both scheduler-equivalence tests run twice (synchronous vs a cluster)."""
    return dict(
        encoder="tiny-clip",
        input=str(many_photos),
        images=_images_root(photo_dataset),
        wordlist=str(many_photos.parent / "words.txt"),
        samples_per_shard=5,
        batch_size=2,
        progress=False,
        cache_dir=str(cache_dir),
    )


def test_local_cluster_equals_synchronous(tmp_path, many_photos, photo_dataset, cache_dir):
    base = _scheduler_config(many_photos, photo_dataset, cache_dir)
    run_label(LabelConfig(shards=str(tmp_path / "sync"), scheduler="synchronous", **base))
    # one worker process: the Dask path (task and config pickling, as_completed) at half the start-up cost;
    # several workers on one node are covered by the slow existing-cluster test
    summary = run_label(LabelConfig(shards=str(tmp_path / "local"), scheduler="local", workers=1, **base))
    assert summary["num_images"] == 14 and summary["num_shards"] == 3
    _same_shards(tmp_path / "sync", tmp_path / "local")
    # the worker computes on the machine's cores, not on the one thread Dask's nanny gives a worker
    threads = {
        json.loads(p.read_text())["timing"]["threads"] for p in (tmp_path / "local").glob("shard-*.json")
    }
    assert threads == {available_cores()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_existing_cluster_equals_synchronous(tmp_path, many_photos, photo_dataset, cache_dir):
    """`dask scheduler` + two `dask worker` processes on loopback, started by hand, killed in the finally."""
    dask = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    assert dask, "the dask CLI (dask[distributed]) is needed"
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, VISALIGN_CACHE=str(cache_dir), HF_HUB_OFFLINE="1")
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [dask, "worker", addr, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        from dask.distributed import Client

        with Client(addr, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
        base = _scheduler_config(many_photos, photo_dataset, cache_dir)
        run_label(LabelConfig(shards=str(tmp_path / "sync"), scheduler="synchronous", **base))
        run_label(LabelConfig(shards=str(tmp_path / "tcp"), scheduler=addr, **base))
        _same_shards(tmp_path / "sync", tmp_path / "tcp")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
