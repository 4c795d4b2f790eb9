"""Labelling a LLaVA-1.5 mix-style JSON and damaged caption/tar inputs: kept, text-only or rejected, never a crash.

Every record the trainer could not use is a reject whose reason is the shared validator's
(``visalign.samples.check_record``, called here on the raw record as the reference); text-only records become
text-only samples; lone surrogates anywhere (a caption, an id, a tar's ``.json``) are rejects with exit 0, and
a rerun resumes; reasons are the same on every run and in every output folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from visalign import shards as S
from visalign.samples import check_record

WORDS = "cat dog tree sky cup spoon rocket flower temple helmet flag grass water car road".split()


def conv(*turns):
    return [{"from": f, "value": v} for f, v in turns]


MIX = [
    {"id": "cap-cat", "image": "cat.jpg", "conversations": conv(("human", "<image>"), ("gpt", "A ginger cat."))},
    {
        "id": "multi-coffee",
        "image": "coffee.jpg",
        "conversations": conv(
            ("human", "<image>\nWhat is in the cup?"),
            ("gpt", "Coffee."),
            ("human", "Is there a spoon?"),
            ("gpt", "Yes, on the saucer."),
        ),
    },
    {
        "id": "end-rocket",
        "image": "rocket.jpg",
        "conversations": conv(("human", "What is shown here?\n<image>"), ("gpt", "A rocket.")),
    },
    {
        "id": "later-flower",
        "image": "flower.jpg",
        "conversations": conv(
            ("human", "Hello!"),
            ("gpt", "Hi, how can I help?"),
            ("human", "<image>\nWhich flower is this?"),
            ("gpt", "A pink flower."),
        ),
    },
    {
        "id": "text-sharegpt",
        "conversations": conv(
            ("human", "Write a haiku about rain."), ("gpt", "Soft rain on the roof"), ("human", "More?"), ("gpt", "No.")
        ),
    },
    {"id": "two-marks", "image": "china.jpg", "conversations": conv(("human", "<image>\n<image>\nCompare."), ("gpt", "Same."))},
    {"id": "two-files", "image": ["cat.jpg", "china.jpg"], "conversations": conv(("human", "<image>"), ("gpt", "x"))},
    {"id": "empty", "image": "cat.jpg", "conversations": []},
    {"id": "human-only", "image": "cat.jpg", "conversations": conv(("human", "<image>\nDescribe."))},
    {"id": "robot", "image": "cat.jpg", "conversations": conv(("human", "<image>"), ("robot", "beep"))},
    {"id": "no-from", "image": "cat.jpg", "conversations": [{"value": "<image>"}, {"from": "gpt", "value": "x"}]},
    {"id": "text-with-mark", "conversations": conv(("human", "<image>\nWhat is this?"), ("gpt", "A cat."))},
    {"id": "surrogate-caption", "image": "cat.jpg", "conversations": conv(("human", "<image>"), ("gpt", "bad \ud800"))},
    {"id": "bad-\ud800-id", "image": "cat.jpg", "conversations": conv(("human", "<image>"), ("gpt", "ok"))},
    {"id": "escape", "image": "../secret.jpg", "conversations": conv(("human", "<image>"), ("gpt", "x"))},
    {"id": "passwd", "image": "../../../../../../etc/passwd", "conversations": conv(("human", "<image>"), ("gpt", "x"))},
    {"id": "text-system", "conversations": conv(("system", "Be brief."), ("human", "2+2?"), ("gpt", "4."))},
    {"id": "nomark-china", "image": "china.jpg", "conversations": conv(("human", "The roof?"), ("gpt", "Curved."))},
]  # fmt: skip
KEPT = ["cap-cat", "multi-coffee", "end-rocket", "later-flower", "nomark-china"]
TEXT_ONLY = ["text-sharegpt", "text-system"]
BY_VALIDATOR = [
    "two-marks",
    "empty",
    "human-only",
    "robot",
    "no-from",
    "text-with-mark",
    "surrogate-caption",
    "bad-\ud800-id",
]


@pytest.fixture(scope="module")
def mix(tmp_path_factory, photo_dataset) -> Path:
    root = tmp_path_factory.mktemp("mix")
    shutil.copytree(photo_dataset.parent / "images", root / "images")
    # a real, valid image just outside the image root: only the documented switch may open it
    Image.open(photo_dataset.parent / "images" / "astronaut.jpg").save(root / "secret.jpg")
    (root / "mix.json").write_text(json.dumps(MIX))  # lone surrogates are written as \ud800 escapes
    (root / "words.txt").write_text("\n".join(WORDS) + "\n")
    return root


def label_args(input_path: Path, out: Path, words: Path, cache_dir, *extra: str) -> list[str]:
    return [
        "label", "--encoder", "tiny-clip", "--input", str(input_path), "--shards", str(out),
        "--wordlist", str(words), "--scheduler", "synchronous", "--samples-per-shard", "4",
        "--batch-size", "2", "--progress", "false", "--cache-dir", str(cache_dir), *extra,
    ]  # fmt: skip


def contents(out: Path) -> tuple[dict, list, list]:
    """(manifest without its timestamp, [(shard, [(key, member names, json)])], rejects rows)."""
    manifest = json.loads((out / S.MANIFEST).read_text())
    manifest["created"] = ""
    shards = []
    for path in S.read_manifest(out).shard_paths(out):
        shards.append((path.name, [(r["__key__"], sorted(r), r["json"]) for r in S.iter_raw(path)]))
    return manifest, shards, pq.read_table(out / S.REJECTS).to_pylist()


@pytest.fixture(scope="module")
def labelled_mix(tmp_path_factory, mix, cache_dir) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("mix-out") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            label_args(mix / "mix.json", out, mix / "words.txt", cache_dir, "--images", str(mix / "images"))
        )
    assert rc == 0
    return out, buf.getvalue()


def test_mix_json_kept_text_only_and_rejected(tmp_path, mix, labelled_mix, cache_dir):
    out, summary = labelled_mix
    m = S.read_manifest(out)
    samples = [s for p in m.shard_paths(out) for s in S.iter_tar(p)]
    ids = [s["meta"]["id"] for s in samples]
    assert ids == [r["id"] for r in MIX if r["id"] in KEPT + TEXT_ONLY], (
        "input order, text-only ones in place"
    )
    by_id = {s["meta"]["id"]: s for s in samples}
    for ident in KEPT:
        s = by_id[ident]
        record = next(r for r in MIX if r["id"] == ident)
        assert s["feat"].shape == (64, 64) and s["labels"].shape == (64, 10)
        assert s["meta"]["conversations"] == record["conversations"] and "has_image" not in s["meta"]
    for ident in TEXT_ONLY:
        s = by_id[ident]
        record = next(r for r in MIX if r["id"] == ident)
        assert set(s) == {"__key__", "meta"}
        assert s["meta"] == {"id": ident, "conversations": record["conversations"], "has_image": False}
    assert (m.num_samples, m.num_text_only, m.num_rejects) == (7, 2, 11)
    assert sum(x.num_text_only for x in m.shards) == 2 and all(x.num_bytes > 0 for x in m.shards)
    assert "7 samples (5 with an image, 2 text-only)" in summary and "11 rejects" in summary

    rejects = pq.read_table(out / S.REJECTS).to_pylist()
    reasons = {r["id"].encode("utf-8").decode("unicode_escape"): r["reason"] for r in rejects}
    assert list(reasons) == [r["id"] for r in MIX if r["id"] not in KEPT + TEXT_ONLY]
    for ident in BY_VALIDATOR:  # exactly the shared validator's reason, computed here on the raw record
        record = next(r for r in MIX if r["id"] == ident)
        assert reasons[ident] == check_record(record, has_image="image" in record), ident
    for ident, fragment in {
        "two-marks": "2 '<image>' marks",
        "empty": "non-empty list",
        "human-only": "no assistant reply",
        "robot": "unknown speaker 'robot'",
        "no-from": "no 'from'",
        "text-with-mark": "text-only record with 1 '<image>'",
        "surrogate-caption": "not valid Unicode",
        "bad-\ud800-id": "id is not valid Unicode",
        "two-files": "2 images in one record",
        "escape": "leaves the image root",
        "passwd": "leaves the image root",
    }.items():
        assert fragment in reasons[ident], (ident, reasons[ident])
    assert next(r for r in rejects if r["id"] == "passwd")["source"].endswith("mix.json#15"), "never a path"

    # the documented switch opens the image outside the root (and only that record changes)
    trusted = tmp_path / "trusted"
    args = label_args(
        mix / "mix.json", trusted, mix / "words.txt", cache_dir, "--images", str(mix / "images")
    )
    assert main([*args, "--allow-outside-images", "true"]) == 0
    got = {s["meta"]["id"]: s for p in S.read_manifest(trusted).shard_paths(trusted) for s in S.iter_tar(p)}
    assert "escape" in got and got["escape"]["meta"]["source"] == str(mix / "images" / "../secret.jpg")
    passwd = {r["id"]: r["reason"] for r in pq.read_table(trusted / S.REJECTS).to_pylist()}["passwd"]
    assert passwd.startswith("not an image") or passwd.startswith("missing file"), passwd

    # the same command into another folder gives the same shards and the same reasons, byte for byte
    again = tmp_path / "again"
    assert (
        main(
            label_args(mix / "mix.json", again, mix / "words.txt", cache_dir, "--images", str(mix / "images"))
        )
        == 0
    )
    m1, shards1, rejects1 = contents(out)
    m2, shards2, rejects2 = contents(again)
    assert shards1 == shards2 and rejects1 == rejects2 and m1 == m2
    assert (out / S.REJECTS).read_bytes() == (again / S.REJECTS).read_bytes()
    assert not any(str(out) in r["reason"] or "0x" in r["reason"] for r in rejects1)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_damaged_captions_sidecars_and_surrogates_in_a_tar(tmp_path, mix, cache_dir):
    jpg = (mix / "images" / "cat.jpg").read_bytes()
    shards_in = tmp_path / "in"
    shards_in.mkdir()
    _tar(
        shards_in / "00000.tar",
        {
            "000.jpg": jpg, "000.txt": b"a cat", "000.json": b'{"url": "http://x/\\ud800.jpg"}',
            "001.jpg": jpg, "001.txt": b"a good cat", "001.json": b'{"url": "http://x/1.jpg", "w": 300}',
            "002.jpg": jpg, "002.txt": b"caf\xe9 latin-1",
            "003.jpg": jpg, "003.txt": b"fine", "003.json": b"{not json",
            "004.jpg": jpg, "004.txt": b"\xef\xbb\xbfbom and text",
        },
    )  # fmt: skip
    # a second tar cut inside its last sample's image: the complete sample before the cut is kept
    _tar(shards_in / "00001.tar", {"100.jpg": jpg, "100.txt": b"kept", "101.jpg": jpg, "101.txt": b"cut"})
    with tarfile.open(shards_in / "00001.tar") as tar:
        cut = tar.getmember("101.jpg").offset_data + 1000
    data = (shards_in / "00001.tar").read_bytes()
    (shards_in / "00001.tar").write_bytes(data[:cut])
    out = tmp_path / "out"
    args = label_args(shards_in, out, mix / "words.txt", cache_dir)
    assert main(args) == 0
    got = {s["meta"]["id"]: s for p in S.read_manifest(out).shard_paths(out) for s in S.iter_tar(p)}
    assert sorted(got) == ["00000/001", "00000/004", "00001/100"]
    assert got["00001/100"]["meta"]["caption"] == "kept"
    assert got["00000/001"]["meta"]["meta"] == {"url": "http://x/1.jpg", "w": 300}
    assert got["00000/004"]["meta"]["caption"] == "bom and text", "a byte-order mark is not caption text"
    reasons = {r["id"]: r["reason"] for r in pq.read_table(out / S.REJECTS).to_pylist()}
    assert set(reasons) == {"00000/000", "00000/002", "00000/003", "00001/101"}
    assert "cannot be written as UTF-8 JSON" in reasons["00000/000"] and "surrogates" in reasons["00000/000"]
    assert reasons["00000/002"].startswith("the caption member is not valid UTF-8")
    assert reasons["00000/003"].startswith("the .json metadata is not valid JSON")
    assert reasons["00001/101"].startswith("truncated input tar")
    first = contents(out)

    # a rerun resumes: complete shards are kept, a shard whose sidecar is gone is redone identically
    (out / "shard-000001.json").unlink()
    assert main(args) == 0
    assert contents(out) == first


def test_folder_captions_and_sidecars(tmp_path, mix, cache_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    jpg = (mix / "images" / "cat.jpg").read_bytes()
    for stem in ("good", "latin1", "brokenjson", "surrogatejson"):
        (folder / f"{stem}.jpg").write_bytes(jpg)
    (folder / "good.txt").write_text("a cat\n", encoding="utf-8")
    (folder / "good.json").write_text('{"source": "web"}')
    (folder / "latin1.txt").write_bytes("café".encode("latin-1"))
    (folder / "brokenjson.json").write_text('{"a": ')
    (folder / "surrogatejson.json").write_text('{"a": "\\udc80"}')
    os.mkdir(folder / "sub")
    with open(os.fsencode(folder / "sub") + b"/name\xff.jpg", "wb") as f:  # not UTF-8: a surrogate id
        f.write(jpg)
    out = tmp_path / "out"
    assert main(label_args(folder, out, mix / "words.txt", cache_dir)) == 0
    got = {s["meta"]["id"]: s["meta"] for p in S.read_manifest(out).shard_paths(out) for s in S.iter_tar(p)}
    assert got == {
        "good": {
            "id": "good",
            "source": str(folder / "good.jpg"),
            "orig_size": got["good"]["orig_size"],
            "caption": "a cat",
            "meta": {"source": "web"},
        }
    }
    rejects = pq.read_table(out / S.REJECTS).to_pylist()
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons["latin1"].startswith("the caption file is not valid UTF-8")
    assert reasons["brokenjson"].startswith("the .json metadata is not valid JSON")
    assert "surrogates not allowed" in reasons["surrogatejson"]
    assert (
        reasons["sub/name\\udcff"] == "malformed record: the id is not valid Unicode text (a lone surrogate?)"
    )


def test_text_only_samples_do_not_disturb_the_image_features(labelled_mix, cache_dir):
    """The image samples of a mix get the features their images get alone (one forward per image batch)."""
    from pipeline.encoders import load_encoder

    out, _ = labelled_mix
    got = {s["meta"]["id"]: s for p in S.read_manifest(out).shard_paths(out) for s in S.iter_tar(p)}
    enc = load_encoder("tiny-clip", cache_dir=str(cache_dir)).eval()
    for ident in KEPT:
        image = Image.open(got[ident]["meta"]["source"]).convert("RGB")
        with torch.no_grad():
            want = enc(enc.preprocess(image)[None], feature_layer=-2).feats_BPD[0].half().float().numpy()
        np.testing.assert_allclose(got[ident]["feat"].astype(np.float32), want, atol=2e-3, rtol=2e-3)


def test_reasons_are_stable_single_lines():
    from pipeline.sources import stable_reason

    text = "could not decode: ValueError: <PIL.Image.Image image mode=RGB at 0x7F12AB34CD10>\n  details"
    assert (
        stable_reason(text) == "could not decode: ValueError: <PIL.Image.Image image mode=RGB at 0x…> details"
    )
