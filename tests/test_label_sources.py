"""Input listing: LLaVA JSON (malformed records kept in place as rejects), folders, img2dataset tars, keys."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from pipeline.sources import InputError, list_inputs, listing_digest, partition
from visalign.shards import sample_key


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_llava_records_and_malformed(tmp_path):
    recs = [
        {"id": "a", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>"}]},
        {"image": "b.jpg", "conversations": []},
        {"id": "c", "conversations": []},
        {"id": "d", "image": "d.jpg", "conversations": "not a list"},
        "just a string",
        {"id": "a", "image": "a2.jpg", "conversations": []},
        {"id": 7, "image": "sub/e.jpg", "conversations": []},
    ]
    (tmp_path / "x.json").write_text(json.dumps(recs))
    with pytest.raises(InputError, match="--images"):  # a wrong image root fails fast, not with N rejects
        list_inputs(tmp_path / "x.json")
    (tmp_path / "a.jpg").write_bytes(b"x")  # existence is all the listing probes
    kind, items = list_inputs(tmp_path / "x.json")
    assert kind == "llava" and len(items) == len(recs), "malformed records keep their position"
    reasons = [it.get("reject", "") for it in items]
    assert reasons[0] == "" and reasons[6] == ""
    assert "missing or empty 'id'" in reasons[1]
    assert "missing 'image'" in reasons[2]
    assert "'conversations' must be a list" in reasons[3]
    assert "expected an object" in reasons[4]
    assert "duplicate id 'a'" in reasons[5]
    assert items[6]["id"] == "7" and items[6]["source"] == str(tmp_path / "sub" / "e.jpg")
    assert [len(p) for p in partition(items, 3)] == [3, 3, 1]


def test_folder_with_captions(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("z.jpg", "a.png", "b/c.JPG", "notes.md"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a.txt").write_text("a caption")
    kind, items = list_inputs(tmp_path)
    assert kind == "folder"
    assert [it["id"] for it in items] == ["a", "b/c", "z"]
    assert items[0]["caption_path"] == str(tmp_path / "a.txt") and "caption_path" not in items[2]


def test_img2dataset_tars(tmp_path):
    _tar(
        tmp_path / "00001.tar", {"000.jpg": b"j", "000.txt": b"cap", "000.json": b"{}", "001.txt": b"orphan"}
    )
    _tar(tmp_path / "00000.tar", {"k.png": b"p"})
    (tmp_path / "00000_stats.json").write_text("{}")
    kind, items = list_inputs(tmp_path)
    assert kind == "tar"
    assert [it["id"] for it in items] == ["00000/k", "00001/000", "00001/001"]
    assert items[1]["source"].endswith("00001.tar::000.jpg") and items[1]["caption_member"] == "000.txt"
    assert "no image member" in items[2]["reject"]


def test_unusable_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        list_inputs(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(InputError, match="JSON list"):
        list_inputs(tmp_path / "obj.json")
    (tmp_path / "x.csv").write_text("")
    with pytest.raises(InputError, match="LLaVA .json"):
        list_inputs(tmp_path / "x.csv")
    with pytest.raises(InputError, match="samples-per-shard"):
        partition([], 0)


def test_sample_keys_tar_safe_and_distinct():
    ids = ["plain_id-1", "a.b", "a_b", "dir/x.jpg", "dir_x_jpg", "sp ace", "ünï"]
    keys = [sample_key(i) for i in ids]
    assert keys[0] == "plain_id-1" and keys[2] == "a_b"
    assert len(set(keys)) == len(ids)
    assert all("." not in k and "/" not in k and " " not in k for k in keys)
    assert sample_key("a.b") == sample_key("a.b"), "deterministic"


def test_listing_digest_changes_with_content():
    a = [{"id": "1", "source": "s"}]
    b = [{"id": "1", "source": "t"}]
    assert listing_digest(a) == listing_digest([dict(a[0])]) != listing_digest(b)
