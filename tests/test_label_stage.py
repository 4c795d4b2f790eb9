"""The label stage's own threads and processes: the search on the writing thread or on the main thread gives
the same bytes; a failure on either thread leaves nothing half-written and no thread behind; the writer
hashes while it writes (bytes equal a plain ``tarfile``); compute threads are shared out among workers."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import LabelConfig
from pipeline.driver import local_threads, run_label
from pipeline.task import available_cores, label_shard, task_threads
from visalign import shards as S

WORDS = "cat dog car tree house sky cloud sun flower grass water boat bird fish horse cup spoon helmet flag rocket"


@pytest.fixture(scope="module")
def words_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stage-words") / "words.txt"
    path.write_text(WORDS.replace(" ", "\n") + "\n")
    return path


def make_cfg(photo_dataset, out, words_file, cache_dir, **over) -> LabelConfig:
    base = dict(
        encoder="tiny-clip",
        input=str(photo_dataset),
        images=str(photo_dataset.parent / "images"),
        shards=str(out),
        wordlist=str(words_file),
        scheduler="synchronous",
        samples_per_shard=4,
        batch_size=2,
        top_k=5,
        progress=False,
        cache_dir=str(cache_dir),
        decode_threads=2,
    )
    base.update(over)
    return LabelConfig(**base)


def _writing_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("label-write-")]


def test_search_on_either_thread_gives_identical_shards(
    tmp_path, photo_dataset, words_file, cache_dir, monkeypatch
):
    import pipeline.task as task_mod

    outs = {}
    for on_writer in (False, True):
        monkeypatch.setattr(task_mod, "SEARCH_ON_WRITER", on_writer)
        out = tmp_path / f"writer-{on_writer}"
        run_label(make_cfg(photo_dataset, out, words_file, cache_dir))
        outs[on_writer] = {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}
        sidecars = [json.loads(p.read_text()) for p in sorted(out.glob("shard-*.json"))]
        assert all(s["timing"]["search_s"] > 0 and s["timing"]["write_s"] > 0 for s in sidecars)
        assert all(s["sha256"] == S.sha256_file(out / s["name"]) for s in sidecars)
    assert len(outs[True]) == 2 and outs[True] == outs[False]
    assert not _writing_threads()


def _task(tmp_path, photo_dataset, words_file, cache_dir, index=0) -> tuple[dict, LabelConfig]:
    from pipeline.encoders import load_encoder
    from pipeline.sources import list_inputs
    from pipeline.wordlist import cached_word_embeddings, load_wordlist

    cfg = make_cfg(photo_dataset, tmp_path, words_file, cache_dir)
    enc = load_encoder("tiny-clip", cache_dir=str(cache_dir))
    emb = cached_word_embeddings(enc, load_wordlist(words_file), [], cache_dir, progress=False)
    _, items = list_inputs(photo_dataset, photo_dataset.parent / "images")
    return {"index": index, "items": items, "out": str(tmp_path), "word_emb_path": str(emb)}, cfg


@pytest.mark.parametrize("on_writer", [False, True])
def test_a_failure_while_writing_leaves_nothing(
    tmp_path, photo_dataset, words_file, cache_dir, monkeypatch, on_writer
):
    """A disk that fills up under the writing thread: the error reaches the caller, the .tmp is gone, no
    sidecar, no tar with a final name, and the thread has ended."""
    import pipeline.task as task_mod

    monkeypatch.setattr(task_mod, "SEARCH_ON_WRITER", on_writer)
    task, cfg = _task(tmp_path, photo_dataset, words_file, cache_dir)
    real_write = S.ShardWriter.write
    calls = []

    def write(self, *args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(S.ShardWriter, "write", write)
    with pytest.raises(OSError, match="No space left"):
        label_shard(task, cfg)
    assert calls[0].startswith("label-write-"), "samples are written off the main thread"
    assert not list(tmp_path.glob("shard-*")), "no .tmp, no tar, no sidecar"
    assert not _writing_threads()


def test_a_failing_forward_stops_the_writing_thread(
    tmp_path, photo_dataset, words_file, cache_dir, monkeypatch
):
    import pipeline.task as task_mod

    task, cfg = _task(tmp_path, photo_dataset, words_file, cache_dir)
    real_get = task_mod.get_encoder
    calls = []

    class Failing:
        """The real encoder, failing on its second batch."""

        def __init__(self, enc):
            self._enc = enc

        def __getattr__(self, name):
            return getattr(self._enc, name)

        def __call__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return self._enc(*args, **kwargs)

    monkeypatch.setattr(task_mod, "get_encoder", lambda *a, **kw: Failing(real_get(*a, **kw)))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        label_shard(task, cfg)
    assert not list(tmp_path.glob("shard-*")) and not _writing_threads()


def test_writer_hashes_while_writing_and_writes_what_tarfile_writes(tmp_path):
    """The sidecar's sha256 and size come from the bytes as they went out; those bytes are what a plain
    ``tarfile`` writes for the same members with the contract's fixed headers."""
    rng = np.random.default_rng(0)
    samples = []
    with S.ShardWriter(tmp_path, 0) as writer:
        for i in range(5):
            feat = rng.standard_normal((196, 48)).astype(np.float16)  # members larger than tar's 16 KiB copy
            labels = rng.integers(0, 100, (196, 10)).astype(np.int32)
            scores = -np.sort(-rng.random((196, 10)), axis=1).astype(np.float16)
            meta = {"id": f"s{i}", "source": f"/d/{i}.jpg", "orig_size": [8, 8], "caption": "é" * i}
            writer.write(f"s{i}", feat, labels, scores, meta)
            samples.append(S.encode_sample(f"s{i}", feat, labels, scores, meta))
        writer.write_text_only("t", {"id": "t", "conversations": [{"from": "human", "value": "hi"}]})
        side = writer.close({"num_rejects": 0})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        members = [m for sample in samples for m in sample]
        members.append(
            (
                "t.json",
                json.dumps(
                    {"id": "t", "conversations": [{"from": "human", "value": "hi"}], "has_image": False},
                    ensure_ascii=False,
                ).encode(),
            )
        )
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data),
                0,
                0o644,
                0,
                0,
                "",
                "",
            )
            tar.addfile(info, io.BytesIO(data))
    written = (tmp_path / "shard-000000.tar").read_bytes()
    assert written == buf.getvalue()
    assert (
        side["sha256"] == hashlib.sha256(written).hexdigest() == S.sha256_file(tmp_path / "shard-000000.tar")
    )
    assert side["num_bytes"] == len(written)


def test_compute_threads_are_shared_out(monkeypatch):
    cfg = LabelConfig(encoder="tiny-clip", input="x", shards="y", scheduler="local", workers=2)
    assert local_threads(cfg) == max(1, available_cores() // 2)
    assert local_threads(LabelConfig(encoder="tiny-clip", input="x", shards="y", workers=2, threads=3)) == 3
    assert task_threads({"threads": 4}) == 4
    assert task_threads({"threads": None}) is None  # synchronous without --threads: the process's own
    assert task_threads({"workers_per_host": {"127.0.0.1": 2}}) is None  # not inside a Dask worker

    import pipeline.task as task_mod

    class Worker:
        address = "tcp://10.1.2.3:40000"

    import distributed

    monkeypatch.setattr(distributed, "get_worker", lambda: Worker())
    monkeypatch.setattr(task_mod, "available_cores", lambda: 16)
    assert task_threads({"workers_per_host": {"10.1.2.3": 4, "10.1.2.4": 1}}) == 4


def test_threads_setting_is_checked():
    from pipeline.driver import check_config
    from visalign.config import ConfigError

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="--threads"):
            check_config(LabelConfig(encoder="tiny-clip", input="x", shards="/nonexistent/y", threads=bad))
