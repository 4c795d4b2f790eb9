"""Input listing: LLaVA JSON (malformed records kept in place as rejects), folders, img2dataset tars, keys."""

from __future__ import annotations

import hashlib
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
        {"id": "c", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "d", "image": "d.jpg", "conversations": "not a list"},
        "just a string",
        {"id": "a", "image": "a2.jpg", "conversations": []},
        {"id": 7, "image": "sub/e.jpg", "conversations": []},
        {"id": "two", "image": ["a.jpg", "b.jpg"], "conversations": []},
        {"id": "null", "image": None, "conversations": []},
    ]
    (tmp_path / "x.json").write_text(json.dumps(recs))
    with pytest.raises(InputError, match="--images"):  # a wrong image root fails fast, not with N rejects
        list_inputs(tmp_path / "x.json")
    (tmp_path / "a.jpg").write_bytes(b"x")  # existence is all the listing probes
    kind, items = list_inputs(tmp_path / "x.json")
    assert kind == "llava" and len(items) == len(recs), "malformed records keep their position"
    reasons = [it.get("reject", "") for it in items]
    assert reasons[0] == reasons[2] == reasons[3] == reasons[6] == ""
    assert "missing or empty 'id'" in reasons[1]
    assert "expected an object" in reasons[4]
    assert "duplicate id 'a'" in reasons[5]
    assert reasons[7] == "2 images in one record: one image per sample"
    assert "'image' must be a non-empty path" in reasons[8]
    # no "image" key: a text-only sample with its conversation, pointing at its place in the JSON
    assert items[2]["text_only"] and items[2]["source"] == f"{tmp_path / 'x.json'}#2"
    assert items[2]["conversations"] == recs[2]["conversations"]
    # conversations are the shared validator's job at labelling time: the listing carries them as they are
    assert items[3]["conversations"] == "not a list" and not items[3].get("text_only")
    assert items[6]["id"] == "7" and items[6]["source"] == str(tmp_path / "sub" / "e.jpg")
    assert all("conversations" not in it for it in items if it.get("reject"))
    assert [len(p) for p in partition(items, 4)] == [4, 4, 1]


@pytest.mark.parametrize(
    "image,inside",
    [
        ("a.jpg", True),
        ("sub/../a.jpg", True),
        ("./sub/./b.jpg", True),
        ("../../etc/passwd", False),
        ("sub/../../x.jpg", False),
        ("/etc/passwd", False),
        ("..\\..\\secret.jpg", False),
        ("C:/data/x.jpg", False),
    ],
)
def test_image_paths_stay_under_the_image_root(tmp_path, image, inside):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"x")
    recs = [{"id": "ok", "image": "a.jpg", "conversations": []}, {"id": "p", "image": image}]
    (tmp_path / "x.json").write_text(json.dumps(recs))
    _, items = list_inputs(tmp_path / "x.json", root)
    if inside:
        assert "reject" not in items[1] and items[1]["source"] == str(root / image)
    else:
        reason = items[1]["reject"]
        assert "leaves the image root" in reason and "--allow-outside-images" in reason
        assert items[1]["source"] == f"{tmp_path / 'x.json'}#1", "the path is never recorded as a source"
        # the documented switch trusts the JSON's paths
        _, trusted = list_inputs(tmp_path / "x.json", root, allow_outside_images=True)
        assert "reject" not in trusted[1] and trusted[1]["source"] == str(root / image)


def test_surrogate_image_path_is_a_reject(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    text = '[{"id": "ok", "image": "a.jpg"}, {"id": "s", "image": "bad\\ud800.jpg"}]'
    (tmp_path / "x.json").write_text(text)
    _, items = list_inputs(tmp_path / "x.json")
    assert "not valid Unicode" in items[1]["reject"]


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


def _three_sample_tar(path) -> list[tuple[str, int, int]]:
    """000..002 (jpg + txt each); returns ``(member, data start, data end)`` in tar order."""
    _tar(path, {f"{k:03d}.{ext}": bytes([65 + k]) * 700 for k in range(3) for ext in ("jpg", "txt")})
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.offset_data + m.size) for m in tar]


def test_truncated_tar_keeps_the_complete_samples(tmp_path):
    full = tmp_path / "full.tar"
    spans = dict((name, (start, end)) for name, start, end in _three_sample_tar(full))
    data = full.read_bytes()
    cuts = {
        "mid-data": spans["001.txt"][0] + 100,  # inside the caption of sample 001
        "in-padding": spans["001.jpg"][1] + 100,  # 001.jpg's data whole, the block padding after it cut
        "at-boundary": spans["001.jpg"][1] + 324,  # after 001.jpg's padded data (700 -> 1024), before 001.txt
        "no-end-block": spans["002.txt"][1] + 324,  # every member whole, the end-of-archive blocks gone
    }
    for label, cut in cuts.items():
        folder = tmp_path / label
        folder.mkdir()
        (folder / "00000.tar").write_bytes(data[:cut])
        _, items = list_inputs(folder)
        by_id = {it["id"]: it for it in items}
        last = "00000/002" if label == "no-end-block" else "00000/001"
        assert list(by_id) == ["00000/000", "00000/001", "00000/002"][: int(last[-1]) + 1], label
        for ident, item in by_id.items():
            if ident == last:
                assert item["reject"].startswith("truncated input tar") and "kept" in item["reject"], label
            else:
                assert "reject" not in item, (label, item)
    # the complete tar loses nothing
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "00000.tar").write_bytes(data)
    assert not any(it.get("reject") for it in list_inputs(tmp_path / "ok")[1])


def test_damaged_header_keeps_what_comes_before(tmp_path):
    path = tmp_path / "00000.tar"
    spans = _three_sample_tar(path)
    data = bytearray(path.read_bytes())
    header_of_001_txt = spans[3][1] - 512
    data[header_of_001_txt : header_of_001_txt + 512] = b"\xff" * 512  # a corrupt header, not zeros
    path.write_bytes(bytes(data))
    _, items = list_inputs(path)
    assert [it["id"] for it in items] == ["00000/000", "00000/001"]
    assert "reject" not in items[0] and "input tar" in items[1]["reject"]
    # reading the members back gives what lies before the damage, and no error
    from visalign.images import read_tar_members

    got = read_tar_members(path, {"000.jpg", "000.txt", "001.jpg", "001.txt", "002.jpg"})
    assert sorted(got) == ["000.jpg", "000.txt", "001.jpg"] and got["000.jpg"] == b"A" * 700


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
    # a fixed formula (resume across processes and machines needs the same key for the same id)
    assert keys[1] == "a_b_" + hashlib.sha1(b"a.b").hexdigest()[:8]
    assert sample_key("x" * 120) == "x" * 120
    assert sample_key("x" * 121) == "x" * 100 + "_" + hashlib.sha1(b"x" * 121).hexdigest()[:8]


def test_listing_digest_changes_with_content():
    a = [{"id": "1", "source": "s"}]
    b = [{"id": "1", "source": "t"}]
    assert listing_digest(a) != listing_digest(b)
    assert listing_digest(a) != listing_digest([{**a[0], "reject": "missing file"}])
