"""Shards at a URL: `trainer run` / `trainer eval` over http on loopback equal the same shards read locally
(step for step, also across a resume), fsspec URLs (file://, memory://) read and verify like local folders,
nothing is written next to remote shards, and every failure is one line naming the URL and the fix."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.launching import read_log
from trainer.cli import main
from trainer.data import verify as V
from trainer.data.shards import ShardStream, StreamLayout
from visalign import shards as S
from visalign.shards import remote

RUN = ["--llm", "tiny-llm", "--batch-size", "2", "--logging.progress", "false", "--logging.report-to", "none"]


class Handler(http.server.SimpleHTTPRequestHandler):
    """A static file server that records its requests and, with ``ranges``, answers ``Range`` requests
    (Python's own handler ignores them: that case is served too). ``cut_first`` sends only the first half
    of the first response to a .tar, then drops the connection (a flaky network)."""

    ranges = True
    cut_first = False
    requests: list[tuple[str, str | None]] = []

    def log_message(self, *args):
        pass

    def send_head(self):
        self.requests.append((self.path, self.headers.get("Range")))
        path = self.translate_path(self.path)
        wanted = self.headers.get("Range")
        cut = self.cut_first and self.path.endswith(".tar") and self.command == "GET"
        if not os.path.isfile(path) or not ((self.ranges and wanted) or cut):
            return super().send_head()
        size = os.path.getsize(path)
        start, end = 0, size - 1
        if self.ranges and wanted:
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            start, end = int(first), int(last) if last else size - 1
            if start >= size:
                self.send_error(416)
                return None
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206 if self.ranges and wanted else 200)
        self.send_header("Content-Type", "application/octet-stream")
        if self.ranges and wanted:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cut:
            type(self).cut_first = False
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return None
        return io.BytesIO(body)


@pytest.fixture
def serve():
    """``serve(folder, ranges=True, cut_first=False) -> (base URL, handler class)``: a loopback http server
    of ``folder`` in a thread, shut down after the test."""
    servers = []

    def start(folder: Path, ranges: bool = True, cut_first: bool = False):
        handler = type("H", (Handler,), {"ranges": ranges, "cut_first": cut_first, "requests": []})
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
        )
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", handler

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_training_from_http_equals_local_and_resumes_exactly(tiny_shards, serve, tmp_path, monkeypatch):
    """Local run of 6 steps == a run from http://127.0.0.1 stopped at step 3 and resumed from the same URL:
    same losses, gradient norms, samples and order. Two worker processes stream the shards; the second
    worker's slot starts inside a shard, which it seeks into with a Range request."""
    root = tiny_shards(num_samples=8, samples_per_shard=3)
    before = listing(root)
    base, handler = serve(root.parent)
    url = f"{base}/{root.name}/"
    # a seek is a Range request however short, and the stream buffers one block: tiny shards get sought into
    monkeypatch.setattr(remote, "HTTP_DISCARD", 0)
    monkeypatch.setattr(remote, "STREAM_BUFFER", 512)
    common = [*RUN, "--max-steps", "6", "--save-every", "3", "--lr", "1e-2", "--num-workers", "2"]
    common += ["--data.shuffle_buffer", "3", "--logging.seen_ids", "true", "--seed", "4"]
    assert main(["run", "--shards", str(root), *common, "--output", str(tmp_path / "local")]) == 0
    parts = tmp_path / "http"
    assert main(["run", "--shards", url, *common, "--output", str(parts), "--stop-after", "3"]) == 0
    assert [r["step"] for r in read_log(parts)] == [1, 2, 3]
    assert main(["run", "--shards", url, *common, "--output", str(parts), "--resume"]) == 0

    local = read_log(tmp_path / "local")
    assert len(local) == 6 and {"lm_loss", "grad_norm"} <= set(local[0])
    assert read_log(parts) == local  # exact float equality, step by step
    seen = (tmp_path / "local" / "seen-rank0.jsonl").read_text()
    assert (parts / "seen-rank0.jsonl").read_text() == seen and seen
    tars = [(p, r) for p, r in handler.requests if p.endswith(".tar")]
    assert tars and any(r for _, r in tars)  # shards streamed, and sought into with Range requests
    assert listing(root) == before  # nothing written next to the shards (no stamp, no lock, no cache)


def test_eval_from_http_equals_local(tiny_shards, serve, tmp_path):
    root = tiny_shards(num_samples=6, samples_per_shard=4)
    run = tmp_path / "run"
    assert main(["run", "--shards", str(root), *RUN, "--max-steps", "1", "--output", str(run)]) == 0
    base, _ = serve(root)
    common = ["--samples", "4", "--pictures", "0", "--device", "cpu"]
    assert main(["eval", str(run), "--shards", str(root), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["eval", str(run), "--shards", base, "--out", str(tmp_path / "b"), *common]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert b.pop("shards") == base and a.pop("shards") == str(root)
    assert a == b and a["counts"]["samples"] == 4


@pytest.mark.parametrize("ranges", [True, False])
def test_http_reader_equals_local_windows(tiny_shards, serve, monkeypatch, ranges):
    """Every window of samples of a shard, over a server with and without Range support: the same raw
    members as the local file, and the same size (from a 1-byte range, or the whole response's length)."""
    root = tiny_shards(num_samples=5, samples_per_shard=5, text_only={3})
    base, handler = serve(root, ranges=ranges)
    monkeypatch.setattr(remote, "HTTP_DISCARD", 0)
    monkeypatch.setattr(remote, "STREAM_BUFFER", 512)
    local = root / S.shard_name(0)
    url = f"{base}/{S.shard_name(0)}"
    for first in range(5):
        for end in range(first + 1, 6):
            assert list(S.iter_raw(url, first, end)) == list(S.iter_raw(local, first, end))
    assert remote.size(url) == local.stat().st_size
    assert S.read_wordlist(base) == S.read_wordlist(root)
    assert S.read_manifest(base + "/") == S.read_manifest(root)
    # the skips asked for ranges; the server without them sent whole files, read and dropped up to the window
    assert [r for p, r in handler.requests if p.endswith(".tar") and r]


def test_a_dropped_connection_is_resumed_at_its_byte(tiny_shards, serve):
    root = tiny_shards(num_samples=4, samples_per_shard=4)
    base, handler = serve(root, cut_first=True)
    url = f"{base}/{S.shard_name(0)}"
    assert list(S.iter_raw(url)) == list(S.iter_raw(root / S.shard_name(0)))
    tars = [r for p, r in handler.requests if p.endswith(".tar")]
    assert len(tars) == 2 and tars[0] is None and tars[1].startswith("bytes=")  # reopened where it broke


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_fsspec_urls_read_and_verify_like_local(tiny_shards, tmp_path, scheme, caplog):
    pytest.importorskip("fsspec")
    import fsspec

    root = tiny_shards(num_samples=7, samples_per_shard=3, text_only={2})
    if scheme == "file":
        url = root.as_uri()
    else:
        url = f"memory://{tmp_path.name}/shards"
        fs = fsspec.filesystem("memory")
        for path in root.iterdir():
            fs.pipe(f"/{tmp_path.name}/shards/{path.name}", path.read_bytes())
    manifest = S.read_manifest(url)
    assert manifest == S.read_manifest(root) and S.read_wordlist(url) == S.read_wordlist(root)
    for there, here in zip(manifest.shard_paths(url), manifest.shard_paths(root)):
        assert isinstance(there, str) and there.startswith(f"{scheme}://")
        assert list(S.iter_raw(there, 1)) == list(S.iter_raw(here, 1))
    stream_remote = ShardStream(url, StreamLayout(1, 0, 2, batch_size=2, seed=1, shuffle_buffer=2))
    stream_local = ShardStream(root, StreamLayout(1, 0, 2, batch_size=2, seed=1, shuffle_buffer=2))
    for slot in range(2):
        a, b = stream_remote.iter_slot(slot, skip=1), stream_local.iter_slot(slot, skip=1)
        for _ in range(6):
            x, y = next(a), next(b)
            assert x["meta"] == y["meta"] and x.keys() == y.keys()
            if x["has_image"]:
                assert np.array_equal(x["feat"], y["feat"]) and np.array_equal(x["labels"], y["labels"])
    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger=V.__name__):
        summary = V.verify_shards(url, manifest, "full", cache_dir=cache)
    assert (summary.checked, summary.stamped) == (3, 0)
    assert summary.bytes_read == sum(s.num_bytes for s in manifest.shards)
    assert "re-hashed on every start" in caplog.text
    assert not cache.exists()  # no stamp for a URL (and nothing written next to the shards)
    assert V.verify_shards(url, manifest, "size").checked == 3


def test_remote_damage_is_named_with_the_url(tiny_shards, serve, tmp_path, capsys):
    from tests.test_shard_verify import cut, flip_feat_bytes

    root = tiny_shards(num_samples=6, samples_per_shard=3)
    flip_feat_bytes(root / S.shard_name(1))
    base, _ = serve(root)
    shard = f"{base}/{S.shard_name(1)}"
    manifest = S.read_manifest(base)
    with pytest.raises(S.ShardFormatError) as err:
        V.verify_shards(base, manifest, "full")
    message = str(err.value)
    assert (
        message.startswith(f"shard {shard} differs from its manifest: its sha256 is ") and "\n" not in message
    )
    assert message.endswith("; " + S.reader.REPAIR_REMOTE)
    assert V.verify_shards(base, manifest, "size").checked == 2  # same size: documented as unseen by size
    cut(root / S.shard_name(0))
    problems = S.check_shard(
        f"{base}/{S.shard_name(0)}", manifest.shards[0], S.sample_layout(manifest), False
    )
    assert (
        len(problems) == 1
        and problems[0].startswith("it is ")
        and "bytes but the manifest records" in problems[0]
    )
    # the same through the command line: one line, exit 3, nothing of the run written
    run = tmp_path / "run"
    assert main(["run", "--shards", base, *RUN, "--max-steps", "1", "--output", str(run)]) == 3
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("trainer run: error: 2 of 2 shards of " + base)
    assert not (run / "log.jsonl").exists()


def test_a_remote_shard_that_ends_early_is_named_when_read(tiny_shards, serve):
    """The size mode of a URL does not walk the headers; a shard holding fewer samples than recorded is
    named by the reader when it gets there (the same message as locally)."""
    from tests.test_shard_verify import drop_one_sample

    root = tiny_shards(num_samples=6, samples_per_shard=3)
    drop_one_sample(root, 1)
    base, _ = serve(root)
    with pytest.raises(
        S.ShardFormatError, match=r"shard-000001.tar differs from its manifest: it ends after 2 "
    ):
        list(S.iter_raw(f"{base}/{S.shard_name(1)}", 0, 3))


def _refusal(capsys, shards, tmp_path) -> str:
    run = tmp_path / "run"
    assert main(["run", "--shards", shards, *RUN, "--max-steps", "1", "--output", str(run)]) == 3
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("trainer run: error: ")
    assert not (run / "config.yaml").exists()
    return lines[0].removeprefix("trainer run: error: ")


def test_unreachable_server_is_one_line_naming_url_and_fix(capsys, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/shards"
    line = _refusal(capsys, url, tmp_path)
    assert line.startswith(f"cannot read {url}/manifest.json (ConnectionRefusedError: "), line
    assert line.endswith("check the address, that the server is running and that this machine may read it, or "
                         "copy the shards to a local folder and pass that")  # fmt: skip


def test_missing_manifest_names_the_url_and_the_fix(tiny_shards, serve, capsys, tmp_path):
    root = tiny_shards(num_samples=4, samples_per_shard=2)
    base, _ = serve(root.parent)
    url = f"{base}/{root.name}/shard-000000.tar"  # a shard, not the folder
    line = _refusal(capsys, url, tmp_path)
    assert line.startswith(f"{url} has no manifest.json ({url}/manifest.json (HTTP 404)): point --shards at the "
                           "URL of the folder that holds manifest.json and the shard-*.tar files")  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_missing_protocol_package_names_pip_install(capsys, tmp_path):
    line = _refusal(capsys, "s3://some-bucket/shards", tmp_path)
    assert line == (
        "s3://some-bucket/shards/manifest.json: reading s3:// URLs needs a package that is not installed "
        "(pip install s3fs)"
    )


def test_unknown_protocol_and_missing_fsspec(capsys, tmp_path, monkeypatch):
    line = _refusal(capsys, "nosuch://host/shards", tmp_path)
    assert line.startswith(
        "nosuch://host/shards/manifest.json: unknown protocol 'nosuch'; use a local folder"
    )
    monkeypatch.setitem(__import__("sys").modules, "fsspec.core", None)  # as if fsspec were not installed
    line = _refusal(capsys, "gs://bucket/shards", tmp_path / "x")
    assert (
        line == "gs://bucket/shards/manifest.json: reading gs:// URLs needs fsspec (pip install fsspec gcsfs)"
    )


def test_join_and_is_url():
    assert remote.is_url("https://h/a") and remote.is_url("s3://b/k") and remote.is_url("file:///x")
    assert (
        not remote.is_url("/data/out") and not remote.is_url(Path("http:/x")) and not remote.is_url("c:\\x")
    )
    assert (
        remote.join("https://h/a/", "m.json") == remote.join("https://h/a", "m.json") == "https://h/a/m.json"
    )
    assert remote.join("/data/out", "m.json") == Path("/data/out/m.json")
