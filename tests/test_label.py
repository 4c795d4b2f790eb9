"""`pipeline label` end to end on the bundled photos with tiny towers.

Labels and features are checked against an independent recomputation in plain torch (the test's own
normalise -> matmul -> sort, from ``enc.encode_text`` and ``enc(...)``), for both backends and both score
signs; bad inputs become rejects; a rerun into an OUT with other settings is refused.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import LabelConfig
from pipeline.driver import SettingsMismatchError, run_label
from pipeline.task import label_shard
from visalign import shards as S

# 200 common concrete words: small enough that the tiny text tower embeds them in well under a second
WORDS = (
    "cat dog car tree house sky cloud sun moon star flower grass leaf water river sea boat ship plane bird "
    "fish horse cow sheep pig chicken duck rabbit mouse lion tiger bear wolf fox deer elephant monkey snake "
    "frog bee butterfly spider ant apple banana orange lemon grape cherry bread cake cheese egg milk coffee "
    "tea cup plate spoon fork knife bowl bottle glass table chair bed sofa lamp door window wall floor roof "
    "road street bridge city town village mountain hill valley forest desert beach island lake snow rain ice "
    "fire smoke stone rock sand metal wood paper book pen pencil phone computer screen camera clock watch "
    "bag box ball toy game music guitar piano drum song picture painting photo shirt dress hat shoe sock "
    "coat glove ring necklace face eye nose mouth ear hair hand arm leg foot head man woman child baby boy "
    "girl person people crowd soldier doctor teacher student worker farmer king queen robot rocket helmet "
    "flag spacesuit astronaut motorcycle bicycle wheel engine garage temple roof tower church castle garden "
    "park field farm truck bus train station airport market shop store kitchen bathroom office school "
    "hospital red green blue yellow white black pink purple brown gray"
).split()


@pytest.fixture(scope="module")
def words_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("words") / "words.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return path


def make_cfg(photo_dataset, out, words_file, cache_dir, **over) -> LabelConfig:
    base = dict(
        encoder="tiny-clip",
        input=str(photo_dataset),
        images=str(photo_dataset.parent / "images"),
        shards=str(out),
        wordlist=str(words_file),
        scheduler="synchronous",
        samples_per_shard=3,
        batch_size=2,
        top_k=10,
        progress=False,
        cache_dir=str(cache_dir),
        decode_threads=2,
    )
    base.update(over)
    return LabelConfig(**base)


def read_all(out: Path) -> dict[str, dict]:
    m = S.read_manifest(out)
    return {s["meta"]["id"]: s for p in m.shard_paths(out) for s in S.iter_tar(p)}


def reference(enc, images: list[Image.Image], words: list[str], templates, sign: float, k: int, layer: int):
    """Independent recomputation: the test's own normalise/matmul/sort over the encoder's raw outputs."""
    texts_per_t = templates or ["{}"]
    embs = [
        torch.nn.functional.normalize(enc.encode_text([t.format(w) for w in words]).float(), dim=-1)
        for t in texts_per_t
    ]
    w_NE = torch.nn.functional.normalize(torch.stack(embs).mean(0), dim=-1)
    with torch.no_grad():
        out = enc(torch.stack([enc.preprocess(im) for im in images]), feature_layer=layer)
    j_BPE = torch.nn.functional.normalize(out.joint_BPE.float(), dim=-1)
    sim_BPN = sign * (j_BPE @ w_NE.T)
    scores_BPN, order_BPN = torch.sort(sim_BPN, dim=-1, descending=True)
    scores_BPK, labels_BPK = scores_BPN[..., :k], order_BPN[..., :k]
    labels_BPK = torch.where(scores_BPK >= 0, labels_BPK, torch.full_like(labels_BPK, -1))
    return out.feats_BPD.float(), labels_BPK.numpy(), scores_BPK.numpy(), sim_BPN.numpy()


def assert_topk_equal(got_BPK, want_BPK, sim_BPN, tol=1e-5):
    """Equal ids, except that two words whose reference scores tie within ``tol`` may swap places.

    The run batches images differently from this reference, so scores can differ in the last float bits;
    a swap is only accepted where the reference itself cannot order the two words.
    """
    bad = np.argwhere(got_BPK != want_BPK)
    assert len(bad) <= max(2, got_BPK.size // 1000), f"{len(bad)} label mismatches"
    for b, p, j in bad:
        g, w = got_BPK[b, p, j], want_BPK[b, p, j]
        assert g >= 0 and w >= 0, f"absent flag differs at {(b, p, j)}"
        assert abs(sim_BPN[b, p, g] - sim_BPN[b, p, w]) < tol, f"not a tie at {(b, p, j)}: {g} vs {w}"


CASES = [
    ("tiny-clip", "hf", "cos", []),
    ("tiny-clip", "hf", "neg-cos", []),
    ("tiny-clip", "open_clip", "cos", ["a photo of a {}.", "{}"]),
    ("tiny-clip", "open_clip", "neg-cos", []),
    ("tiny-siglip", "hf", "neg-cos", []),
    ("tiny-siglip", "open_clip", "cos", []),
]


@pytest.mark.parametrize("encoder,backend,score,templates", CASES)
def test_labels_equal_bruteforce(
    tmp_path, photo_dataset, words_file, cache_dir, encoder, backend, score, templates
):
    from pipeline.encoders import load_encoder

    k = 120  # with 200 words a large k makes negative-score (absent) slots certain, so the rule is exercised
    cfg = make_cfg(
        photo_dataset,
        tmp_path / "out",
        words_file,
        cache_dir,
        encoder=encoder,
        backend=backend,
        score=score,
        templates=templates,
        top_k=k,
    )
    summary = run_label(cfg)
    assert summary["num_images"] == 7 and summary["num_rejects"] == 0 and summary["num_shards"] == 3
    samples = read_all(tmp_path / "out")
    assert S.read_wordlist(tmp_path / "out") == list(dict.fromkeys(WORDS)), (
        "normalised: the duplicate 'roof' dropped"
    )

    enc = load_encoder(encoder, backend=backend, cache_dir=str(cache_dir)).eval()
    ids = sorted(samples)
    images = [Image.open(samples[i]["meta"]["source"]).convert("RGB") for i in ids]
    feats, labels, scores, sim = reference(
        enc, images, S.read_wordlist(tmp_path / "out"), templates, -1.0 if score == "neg-cos" else 1.0, k, -2
    )
    got_labels = np.stack([samples[i]["labels"] for i in ids])
    got_scores = np.stack([samples[i]["scores"] for i in ids]).astype(np.float32)
    assert got_labels.dtype == np.int32 and samples[ids[0]]["scores"].dtype == np.float16
    assert (labels == -1).any() and (labels >= 0).any(), "the case must exercise the absent rule"
    assert_topk_equal(got_labels, labels, sim)
    kept = labels >= 0
    np.testing.assert_allclose(got_scores[kept], scores[kept], atol=1e-3)
    assert np.isneginf(got_scores[~kept]).all()
    got_feats = np.stack([samples[i]["feat"] for i in ids])
    assert got_feats.dtype == np.float16 and got_feats.shape == (7, enc.num_patches, enc.feature_dim)
    np.testing.assert_allclose(
        got_feats.astype(np.float32), feats.half().float().numpy(), atol=2e-3, rtol=2e-3
    )

    m = S.read_manifest(tmp_path / "out")
    assert m.encoder.fingerprint == enc.fingerprint() and m.score_sign == score and m.top_k == k
    assert m.wordlist.count == len(set(WORDS)) and m.templates == templates
    assert m.encoder.patch_grid == list(enc.patch_grid) and m.encoder.feature_layer == -2


def test_other_feature_layer(tmp_path, photo_dataset, words_file, cache_dir):
    from pipeline.encoders import load_encoder

    cfg = make_cfg(
        photo_dataset, tmp_path / "out", words_file, cache_dir, feature_layer=1, samples_per_shard=10
    )
    run_label(cfg)
    samples = read_all(tmp_path / "out")
    enc = load_encoder("tiny-clip", cache_dir=str(cache_dir)).eval()
    ids = sorted(samples)
    pixels = torch.stack(
        [enc.preprocess(Image.open(samples[i]["meta"]["source"]).convert("RGB")) for i in ids]
    )
    with torch.no_grad():
        want = enc(pixels, feature_layer=1).feats_BPD.half().float().numpy()
        other = enc(pixels, feature_layer=-2).feats_BPD.half().float().numpy()
    got = np.stack([samples[i]["feat"] for i in ids]).astype(np.float32)
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)
    assert np.abs(got - other).max() > 0.1, "layer 1 must differ from layer -2, else the check proves nothing"
    assert S.read_manifest(tmp_path / "out").encoder.feature_layer == 1


def test_label_shard_direct_call(tmp_path, photo_dataset, words_file, cache_dir):
    """The Dask unit is a plain function: call it on a hand-made task and read the shard back."""
    from pipeline.encoders import load_encoder
    from pipeline.sources import list_inputs
    from pipeline.wordlist import cached_word_embeddings, load_wordlist

    cfg = make_cfg(photo_dataset, tmp_path, words_file, cache_dir)
    enc = load_encoder("tiny-clip", cache_dir=str(cache_dir))
    emb = cached_word_embeddings(enc, load_wordlist(words_file), [], cache_dir, progress=False)
    _, items = list_inputs(photo_dataset, photo_dataset.parent / "images")
    items = items[:2] + [{"id": "gone", "source": str(tmp_path / "gone.jpg")}]
    stats = label_shard({"index": 5, "items": items, "out": str(tmp_path), "word_emb_path": str(emb)}, cfg)
    assert stats["num_samples"] == 2 and stats["num_rejects"] == 1 and stats["name"] == "shard-000005.tar"
    assert "missing file" in stats["rejects"][0]["reason"]
    assert stats["sha256"] == S.sha256_file(tmp_path / "shard-000005.tar")
    samples = list(S.iter_tar(tmp_path / "shard-000005.tar"))
    assert [s["meta"]["id"] for s in samples] == [items[0]["id"], items[1]["id"]]
    assert samples[0]["meta"]["conversations"] == items[0]["conversations"]
    assert not list(tmp_path.glob("*.tmp"))


# ---- bad inputs ------------------------------------------------------------------------------------------
def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def build_messy_dataset(photo_dataset: Path, root: Path) -> Path:
    shutil.copytree(photo_dataset.parent / "images", root / "images")
    recs = json.loads(photo_dataset.read_text())
    img = root / "images"
    src = Image.open(img / "cat.jpg")
    src.convert("L").save(img / "grey.png")  # lossless, so grey16 must decode to the same pixels
    src.convert("CMYK").save(img / "cmyk.jpg")
    rgba = src.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(img / "rgba.png")
    arr16 = np.asarray(src.convert("L")).astype(np.uint16) * 257
    Image.fromarray(arr16).save(img / "grey16.png")
    (img / "corrupt.jpg").write_bytes(b"\x89PNG not really" * 20)
    (img / "truncated.jpg").write_bytes((img / "astronaut.jpg").read_bytes()[:3000])
    (img / "zero.jpg").write_bytes(b"")
    (img / "bomb.png").write_bytes(_bomb_png())
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    for name in (
        "grey.png",
        "cmyk.jpg",
        "rgba.png",
        "grey16.png",
        "corrupt.jpg",
        "truncated.jpg",
        "zero.jpg",
        "missing.jpg",
        "bomb.png",
    ):
        recs.append({"id": name.split(".")[0], "image": name, "conversations": conv})
    recs.append({"id": "noimage", "conversations": conv})
    recs.append({"id": "badconv", "image": "cat.jpg", "conversations": "hello"})
    path = root / "messy.json"
    path.write_text(json.dumps(recs))
    return path


def test_bad_inputs_are_rejects_not_failures(tmp_path, photo_dataset, words_file, cache_dir):
    from pipeline.cli import main

    messy = build_messy_dataset(photo_dataset, tmp_path / "data")
    out = tmp_path / "out"
    rc = main(
        [
            "label",
            "--encoder",
            "tiny-clip",
            "--input",
            str(messy),
            "--images",
            str(messy.parent / "images"),
            "--shards",
            str(out),
            "--wordlist",
            str(words_file),
            "--scheduler",
            "synchronous",
            "--samples-per-shard",
            "4",
            "--batch-size",
            "3",
            "--progress",
            "false",
            "--cache-dir",
            str(cache_dir),
        ]
    )
    assert rc == 0
    samples = read_all(out)
    assert sorted(samples) == sorted(
        [
            "astronaut",
            "cat",
            "coffee",
            "rocket",
            "motorcycle",
            "china",
            "flower",
            "grey",
            "cmyk",
            "rgba",
            "grey16",
        ]
    )
    rejects = pq.read_table(out / S.REJECTS).to_pylist()
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert set(reasons) == {"corrupt", "truncated", "zero", "missing", "bomb", "noimage", "badconv"}
    assert "not an image" in reasons["corrupt"]
    assert "truncated" in reasons["truncated"]
    assert "empty file" in reasons["zero"]
    assert "missing file" in reasons["missing"]
    assert "decompression bomb" in reasons["bomb"]
    # no image key: a text-only record, whose <image> mark has nothing to stand for
    assert "text-only record with 1 '<image>'" in reasons["noimage"] and "conversations" in reasons["badconv"]
    m = S.read_manifest(out)
    assert m.num_rejects == 7 and m.num_samples == 11 and sum(s.num_rejects for s in m.shards) == 7
    assert [r["id"] for r in rejects] == [
        "corrupt",
        "truncated",
        "zero",
        "missing",
        "bomb",
        "noimage",
        "badconv",
    ]
    # the converted ones went through the encoder as RGB of the right content: grey of the cat == cat in grey
    from pipeline.config import LabelConfig
    from pipeline.encoders import load_encoder

    cfg = LabelConfig(encoder="tiny-clip", input="x", shards="y")  # the defaults the run above used
    enc = load_encoder("tiny-clip", cache_dir=str(cache_dir))
    grey_rgb = Image.open(messy.parent / "images" / "cat.jpg").convert("L").convert("RGB")
    with torch.no_grad():
        pixels = enc.preprocess_spec.with_aspect(cfg.image_aspect)(grey_rgb)[None]
        want = enc(pixels, feature_layer=cfg.feature_layer).feats_BPD[0].half().float().numpy()
    np.testing.assert_allclose(samples["grey"]["feat"].astype(np.float32), want, atol=2e-3, rtol=2e-3)
    # 16-bit = 8-bit * 257 must scale back to the identical 8-bit image, hence identical features
    np.testing.assert_array_equal(samples["grey16"]["feat"], samples["grey"]["feat"])
    assert (
        np.abs(samples["grey"]["feat"].astype(np.float32) - samples["cat"]["feat"].astype(np.float32)).max()
        > 0
    )


# ---- reruns ----------------------------------------------------------------------------------------------
def test_refuses_other_settings_unless_overwrite(tmp_path, photo_dataset, words_file, cache_dir):
    cfg = make_cfg(photo_dataset, tmp_path / "out", words_file, cache_dir)
    run_label(cfg)
    first = {p.name: p.read_bytes() for p in sorted((tmp_path / "out").glob("shard-*.tar"))}
    again = run_label(cfg)
    assert again["num_shards_skipped"] == 3 and again["num_images_this_run"] == 0
    with pytest.raises(SettingsMismatchError) as err:
        run_label(dataclasses.replace(cfg, top_k=5, score="cos"))
    assert "top_k: 10 -> 5" in str(err.value) and 'score: "neg-cos" -> "cos"' in str(err.value)
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "out").glob("shard-*.tar"))} == first
    run_label(dataclasses.replace(cfg, top_k=5, overwrite=True))
    m = S.read_manifest(tmp_path / "out")
    assert m.top_k == 5 and next(iter(read_all(tmp_path / "out").values()))["labels"].shape[1] == 5


def test_incomplete_shards_are_redone(tmp_path, photo_dataset, words_file, cache_dir):
    cfg = make_cfg(photo_dataset, tmp_path / "out", words_file, cache_dir)
    run_label(cfg)
    out = tmp_path / "out"
    want = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    manifest = json.loads((out / S.MANIFEST).read_text())
    # simulate three kinds of interruption: sidecar missing, tar corrupted (checksum), a stale .tmp
    (out / "shard-000000.json").unlink()
    (out / "shard-000001.tar").write_bytes(b"garbage")
    (out / "shard-000002.tar.tmp").write_bytes(b"half")
    summary = run_label(cfg)
    assert summary["num_shards_skipped"] == 1 and summary["num_images_this_run"] == 6
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == want
    assert not list(out.glob("*.tmp"))
    again = json.loads((out / S.MANIFEST).read_text())
    assert {**again, "created": ""} == {**manifest, "created": ""}


def test_experts_and_tar_input(tmp_path, photo_dataset, words_file, cache_dir):
    """img2dataset-style tar input (captions from .txt) with an expert encoder's features cached alongside."""
    import tarfile

    from pipeline.encoders import load_encoder

    images = photo_dataset.parent / "images"
    names = ["cat", "coffee", "rocket"]
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, name in enumerate(names):
            tar.add(images / f"{name}.jpg", arcname=f"{i:03d}.jpg")
            cap = f"caption of {name}".encode()
            info = tarfile.TarInfo(f"{i:03d}.txt")
            info.size = len(cap)
            tar.addfile(info, io.BytesIO(cap))
    cfg = make_cfg(
        tmp_path / "00000.tar", tmp_path / "out", words_file, cache_dir, images=None, experts=["tiny-siglip"]
    )
    assert run_label(cfg)["num_images"] == 3
    samples = read_all(tmp_path / "out")
    assert sorted(samples) == ["00000/000", "00000/001", "00000/002"]
    s = samples["00000/001"]
    assert s["meta"]["caption"] == "caption of coffee" and s["meta"]["source"].endswith("00000.tar::001.jpg")
    assert s["__key__"] == f"00000_001_{__import__('hashlib').sha1(b'00000/001').hexdigest()[:8]}"
    expert = load_encoder("tiny-siglip", cache_dir=str(cache_dir)).eval()
    with torch.no_grad():
        want = expert(expert.preprocess(Image.open(images / "coffee.jpg").convert("RGB"))[None]).feats_BPD[0]
    np.testing.assert_allclose(
        s["expert.tiny-siglip"].astype(np.float32), want.half().float().numpy(), atol=2e-3
    )
    m = S.read_manifest(tmp_path / "out")
    assert [x.name for x in m.experts] == ["tiny-siglip"] and m.experts[0].fingerprint == expert.fingerprint()


def test_folder_input_with_captions(tmp_path, photo_dataset, words_file, cache_dir):
    folder = tmp_path / "imgs"
    shutil.copytree(photo_dataset.parent / "images", folder)
    (folder / "cat.txt").write_text("a ginger cat\n")
    cfg = make_cfg(folder, tmp_path / "out", words_file, cache_dir, images=None)
    assert run_label(cfg)["num_images"] == 7
    samples = read_all(tmp_path / "out")
    assert samples["cat"]["meta"]["caption"] == "a ginger cat" and samples["china"]["meta"]["caption"] == ""


def test_worker_device_spreads_local_workers_over_gpus(monkeypatch):
    import distributed

    from pipeline.task import worker_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert worker_device("cuda") == "cuda", "outside a Dask worker nothing changes"
    monkeypatch.setattr(distributed, "get_worker", lambda: type("W", (), {"name": 6})())
    assert worker_device("cuda") == "cuda:2"
    assert worker_device("cuda:1") == "cuda:1" and worker_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_device("cuda") == "cuda"


def test_hf_towers_load_without_remote_code(monkeypatch, cache_dir):
    """Every transformers load of the pipeline says trust_remote_code=False explicitly (model and tokenizer)."""
    import transformers

    from pipeline.encoders import load_encoder

    seen = []
    for cls in (transformers.CLIPModel, transformers.SiglipModel, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", "absent")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_encoder("tiny-clip", backend="hf", cache_dir=str(cache_dir))
    load_encoder("tiny-siglip", backend="hf", cache_dir=str(cache_dir))
    assert {name for name, _ in seen} == {"CLIPModel", "SiglipModel", "AutoTokenizer"}
    assert all(flag is False for _, flag in seen), seen
