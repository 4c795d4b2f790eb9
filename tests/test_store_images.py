"""``pipeline label --store-images``: every image sample carries its image file's own bytes (``image.<ext>``).

Checked by value: the stored bytes equal the source file (JPEG, PNG and WebP files, and members of an input
tar), the extension is the format found in them, and the manifest's preprocessing applied to the stored
bytes gives exactly the pixels the encoder saw: ``feat.npy`` equals the tower recomputed on them. Text-only
samples carry none; the reader hands the bytes on (``image_bytes``) and verification accepts the member.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import LabelConfig
from pipeline.driver import run_label
from pipeline.task import image_member
from visalign import shards as S
from visalign.images import Preprocess, load_image


@pytest.fixture(scope="module")
def mixed_formats(photo_dataset, tmp_path_factory):
    """A LLaVA JSON over the photos saved as JPEG, PNG (one with alpha) and WebP, plus a text-only record."""
    root = tmp_path_factory.mktemp("formats")
    images = root / "images"
    images.mkdir()
    records = json.loads(photo_dataset.read_text())[:4]
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("png", "PNG")]
    for i, (record, (ext, fmt)) in enumerate(zip(records, formats)):
        img = Image.open(photo_dataset.parent / "images" / record["image"]).convert("RGB")
        if i == 3:
            img = img.convert("RGBA")  # composited on white for the encoder; stored as it is
        name = f"{record['id']}.{ext}"
        img.save(images / name, format=fmt)
        record["image"] = name
    chat = [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]
    records.insert(2, {"id": "chat", "conversations": chat})
    (root / "llava.json").write_text(json.dumps(records))
    return root / "llava.json"


def label(input_path, out, cache_dir, **over):
    words = out.parent / "w.txt"
    words.write_text("cat\ndog\ncup\nsky\n")
    cfg = dict(
        encoder="tiny-clip", input=str(input_path), shards=str(out), wordlist=str(words),
        scheduler="synchronous", samples_per_shard=3, batch_size=1, top_k=2, progress=False,
        cache_dir=str(cache_dir), store_images=True,
    )  # fmt: skip
    cfg.update(over)
    run_label(LabelConfig(**cfg))
    m = S.read_manifest(out)
    return m, [s for p in m.shard_paths(out) for s in S.iter_tar(p)]


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_stored_bytes_are_the_files_and_give_the_encoders_pixels(mixed_formats, tmp_path, cache_dir, aspect):
    from pipeline.encoders import load_encoder

    out = tmp_path / "out"
    m, samples = label(mixed_formats, out, cache_dir, images=str(mixed_formats.parent / "images"),
                       image_aspect=aspect)  # fmt: skip
    assert m.stores_images and m.schema_version == S.SCHEMA_VERSION == 3
    enc = load_encoder("tiny-clip", cache_dir=cache_dir)
    seen_exts = []
    for sample in samples:
        if sample["meta"].get("has_image") is False:
            assert "image_bytes" not in sample and "feat" not in sample
            continue
        source = sample["meta"]["source"]
        stored = sample["image_bytes"]
        assert stored == open(source, "rb").read(), "the file's own bytes, unchanged"
        seen_exts.append(sample["image_ext"])
        assert source.endswith("." + sample["image_ext"])
        # the manifest's preprocessing on the stored bytes = the pixels the encoder saw
        pixels = Preprocess.from_dict(m.encoder.preprocess)(load_image(stored)[0])
        want = enc.preprocess_spec.with_aspect(aspect)(load_image(source)[0])
        assert torch.equal(pixels, want)
        with torch.no_grad():
            feats_PD = enc(pixels[None], feature_layer=m.encoder.feature_layer).feats_BPD[0]
        diff = np.abs(sample["feat"].astype(np.float32) - feats_PD.half().float().numpy()).max()
        print(f"\n{sample['__key__']} ({sample['image_ext']}, {len(stored)} bytes, {aspect}): feat.npy "
              f"{sample['feat'].shape} vs the tower on the stored bytes: max abs diff {diff:.2e}")  # fmt: skip
        assert diff == 0, "one image per batch: the same computation as the run's, bit for bit"
    assert sorted(seen_exts) == ["jpg", "png", "png", "webp"]
    layout = S.sample_layout(m)
    for path, info in zip(m.shard_paths(out), m.shards):
        assert S.check_shard(path, info, layout, full=True) == []
        for raw in S.iter_raw(path):
            sample = S.decode_checked(raw, layout)
            assert sample["has_image"] == ("image_bytes" in sample)


def test_tar_input_members_are_stored(photo_dataset, tmp_path, cache_dir):
    names = ["cat", "coffee"]
    members = {}
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, name in enumerate(names):
            data = (photo_dataset.parent / "images" / f"{name}.jpg").read_bytes()
            members[f"00000/{i:03d}"] = data
            info = tarfile.TarInfo(f"{i:03d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    m, samples = label(tmp_path / "00000.tar", tmp_path / "out", cache_dir)
    assert {s["meta"]["id"]: s["image_bytes"] for s in samples} == members
    assert {s["image_ext"] for s in samples} == {"jpg"}


def test_an_image_without_file_bytes_is_stored_as_png():
    image = Image.fromarray(np.arange(48 * 3, dtype=np.uint8).reshape(4, 12, 3))
    ext, data = image_member(None, image)
    assert ext == "png" and np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(image))
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG")
    assert image_member(jpeg.getvalue(), image) == ("jpg", jpeg.getvalue())


def test_without_the_flag_nothing_is_stored_and_the_flag_is_a_content_setting(
    photo_dataset, tmp_path, cache_dir
):
    from pipeline.driver import SettingsMismatchError

    images = str(photo_dataset.parent / "images")
    m, samples = label(photo_dataset, tmp_path / "out", cache_dir, store_images=False, images=images)
    assert not m.stores_images and all("image_bytes" not in s for s in samples)
    assert not any(
        ".image." in n for p in m.shard_paths(tmp_path / "out") for n in tarfile.open(p).getnames()
    )
    with pytest.raises(SettingsMismatchError, match="store_images: false -> true"):
        label(photo_dataset, tmp_path / "out", cache_dir, images=images)
