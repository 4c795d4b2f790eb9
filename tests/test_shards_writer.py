"""The one shard writer: text-only samples, sizes and counts in the sidecar, unserialisable samples refused
before a byte is written, deterministic bytes, and manifests of both schema versions read back."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from visalign import shards as S

P, D, K = 4, 8, 3


def arrays(seed: int):
    rng = np.random.default_rng(seed)
    feat = rng.standard_normal((P, D)).astype(np.float16)
    labels = rng.integers(0, 10, (P, K)).astype(np.int32)
    scores = -np.sort(-rng.random((P, K)), axis=1).astype(np.float16)
    return feat, labels, scores


def image_meta(i: int) -> dict:
    return {"id": f"img{i}", "source": f"/data/{i}.jpg", "orig_size": [4, 4], "caption": f"caption {i}"}


def text_meta(i: int) -> dict:
    chat = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": f"Hello {i}."}]
    return {"id": f"txt{i}", "conversations": chat}


def write_mixed(root, index=0, bad_at: int | None = None) -> dict:
    """img0, txt1, img2 (and, if asked, an unserialisable sample attempted at position ``bad_at``)."""
    with S.ShardWriter(root, index) as w:
        for i in range(3):
            if i == bad_at:
                with pytest.raises(S.SampleEncodeError, match="surrogates not allowed"):
                    w.write("bad", *arrays(9), {"id": "bad", "source": "/x/\ud800.jpg"})
                with pytest.raises(S.SampleEncodeError):
                    w.write_text_only("bad2", {"id": "bad2", "conversations": [{"value": "\udc80"}]})
            if i == 1:
                w.write_text_only(f"txt{i}", text_meta(i))
            else:
                w.write(f"img{i}", *arrays(i), image_meta(i))
        return w.close({"num_rejects": 0})


def test_text_only_sample_is_its_json_alone(tmp_path):
    side = write_mixed(tmp_path)
    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert names == [
        "img0.feat.npy", "img0.labels.npy", "img0.scores.npy", "img0.json",
        "txt1.json",
        "img2.feat.npy", "img2.labels.npy", "img2.scores.npy", "img2.json",
    ]  # fmt: skip
    samples = list(S.iter_tar(path))
    assert [s["__key__"] for s in samples] == ["img0", "txt1", "img2"]
    assert set(samples[1]) == {"__key__", "meta"}
    assert samples[1]["meta"] == {**text_meta(1), "has_image": False}
    assert "has_image" not in samples[0]["meta"] and samples[0]["meta"] == image_meta(0)
    np.testing.assert_array_equal(samples[2]["feat"], arrays(2)[0])
    # the sidecar: counts, the tar's size and checksum; the manifest entry built from it
    assert side["num_samples"] == 3 and side["num_text_only"] == 1
    assert side["num_bytes"] == path.stat().st_size and side["sha256"] == S.sha256_file(path)
    assert json.loads((tmp_path / "shard-000000.json").read_text()) == side
    assert S.shard_is_complete(tmp_path, 0) == side
    info = S.shard_info(tmp_path, side)
    assert (info.num_samples, info.num_text_only, info.num_bytes) == (3, 1, path.stat().st_size)
    # a reader's "samples i..j" window counts text-only samples like any other
    assert [r["__key__"] for r in S.iter_raw(path, 1, 2)] == ["txt1"]


def test_unserialisable_samples_leave_no_trace(tmp_path):
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    clean.mkdir()
    dirty.mkdir()
    write_mixed(clean)
    write_mixed(dirty, bad_at=1)
    a, b = clean / "shard-000000.tar", dirty / "shard-000000.tar"
    assert a.read_bytes() == b.read_bytes(), "the refused samples wrote nothing: same bytes as without them"
    assert not list(dirty.glob("*.tmp"))


def test_text_only_sample_has_no_source(tmp_path):
    with S.ShardWriter(tmp_path, 0) as w:
        with pytest.raises(ValueError, match="no 'source'"):
            w.write_text_only("t", {"id": "t", "source": "/x.jpg", "conversations": []})
    assert not (tmp_path / "shard-000000.tar").exists() and not list(tmp_path.glob("*.tmp"))


def test_schema_1_2_and_3_manifests_read_back():
    encoder = {
        "name": "clip", "backend": "hf", "fingerprint": "f", "image_size": 336, "feature_layer": -2,
        "patch_grid": [24, 24], "feature_dim": 1024, "joint_dim": 768,
    }  # fmt: skip
    v1 = {
        "schema_version": 1,
        "encoder": encoder,
        "wordlist": {"source": "w", "sha256": "s", "count": 3},
        "templates": [],
        "score_sign": "neg-cos",
        "top_k": 10,
        "shards": [{"name": "shard-000000.tar", "num_samples": 5, "sha256": "x", "num_rejects": 1}],
        "num_samples": 5,
        "num_rejects": 1,
    }
    m1 = S.Manifest.from_dict(v1)
    assert m1.schema_version == 1 and m1.num_text_only == 0 and m1.encoder.preprocess is None
    assert m1.shards[0].num_text_only == 0 and m1.shards[0].num_bytes is None
    from visalign.pictures import view_geometry

    assert view_geometry(m1) == (336, "shortest", "floor", "crop", None), "schema 1: the family's geometry"
    v2 = json.loads(json.dumps(m1.to_dict()))
    for added_in_3 in ("score_source", "feature_surgery", "stores_images"):  # a schema-2 writer knew none
        del v2[added_in_3]
    del v2["encoder"]["dense"], v2["encoder"]["surgery_depth"]
    v2["schema_version"] = 2
    v2["num_text_only"] = 2
    v2["shards"][0].update(num_text_only=2, num_bytes=1234)
    v2["encoder"]["preprocess"] = {
        "image_size": 336, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
        "resize_mode": "shortest", "crop_rounding": "floor", "resample": "bicubic", "aspect": "pad",
        "pad_color": [122, 116, 104],
    }  # fmt: skip
    m2 = S.Manifest.from_dict(v2)
    assert (m2.num_text_only, m2.shards[0].num_bytes) == (2, 1234)
    assert view_geometry(m2) == (336, "shortest", "floor", "pad", (122, 116, 104))
    assert (m2.score_source, m2.feature_surgery, m2.stores_images, m2.encoder.dense) == (
        None,
        False,
        False,
        None,
    )
    v3 = {**v2, "schema_version": 3, "score_source": "family-default", "stores_images": True}
    v3["encoder"] = {**v2["encoder"], "dense": "surgery", "surgery_depth": 6}
    v3["experts"] = [
        {"name": "dino", "backend": "hf", "fingerprint": "e", "feature_layer": -2, "patch_grid": [16, 16],
         "feature_dim": 768, "path": "/m/dino", "preprocess": {"kind": "hf-image-processor"},
         "model_type": "dinov2", "prefix_tokens": 1}
    ]  # fmt: skip
    m3 = S.Manifest.from_dict(v3)
    assert (m3.score_source, m3.stores_images, m3.encoder.surgery_depth) == ("family-default", True, 6)
    assert m3.experts[0].model_type == "dinov2" and m3.experts[0].prefix_tokens == 1
    with pytest.raises(S.ShardFormatError, match="relabel"):
        S.Manifest.from_dict({**v3, "schema_version": 4})
