"""The reader yields what a plain reference yields: Python's ``tarfile`` + ``np.load(allow_pickle=False)``
(what the reader was built on before it parsed tar headers itself and cached ``.npy`` headers) and the
collator's float32 / int64 batches equal ``np.stack(...).astype(...)`` of those arrays, in the main process
and through a DataLoader worker. Also: tars written by other tools (GNU long names, ustar prefixes, pax
headers, directories and links between members), and the checks the header cache must not skip."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from trainer.data.collate import Collator
from trainer.data.shards import ShardStream, StreamLayout, make_loader
from visalign import shards as S
from visalign.shards import reader as R

P, D, K = 16, 32, 4


def reference_samples(path) -> list[dict]:
    """Samples of a tar as tarfile sees them: ``{"__key__", ext: bytes}`` in order, regular members only."""
    samples: list[dict] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tar.extractfile(member).read()
    return samples


def reference_arrays(raw: dict) -> dict:
    return {
        k[: -len(".npy")]: np.load(io.BytesIO(v), allow_pickle=False)
        for k, v in raw.items()
        if k.endswith(".npy")
    }


@pytest.fixture
def shards_with_everything(tmp_path):
    """Two shards through the writer: experts, text-only samples, and ids long or odd enough for pax headers."""
    rng = np.random.default_rng(1)
    root = tmp_path / "out"
    root.mkdir()
    words = [f"w{i}" for i in range(20)]
    S.write_wordlist(words, root / S.WORDLIST)
    ids = ["a", "b.c", "x" * 150, "über/straße", "t1", "e", "f" * 99, "g"]
    infos = []
    for index, chunk in enumerate((ids[:5], ids[5:])):
        with S.ShardWriter(root, index) as writer:
            for ident in chunk:
                key = S.sample_key(ident)
                if ident == "t1":
                    writer.write_text_only(key, {"id": ident, "conversations": []})
                    continue
                feat = rng.standard_normal((P, D)).astype(np.float16)
                labels = rng.integers(-1, 20, (P, K)).astype(np.int32)
                scores = np.where(labels < 0, -np.inf, rng.random((P, K))).astype(np.float16)
                expert = rng.standard_normal((4, 8)).astype(np.float16)
                writer.write(key, feat, labels, scores, {"id": ident, "caption": "c"}, {"dino": expert})
            infos.append(S.shard_info(root, writer.close()))
    manifest = S.Manifest(
        encoder=S.EncoderInfo("e", "hf", "fp", 16, -2, [4, 4], D, D),
        wordlist=S.WordlistInfo("w", S.wordlist_sha256(words), len(words)),
        templates=[],
        score_sign="cos",
        top_k=K,
        shards=infos,
        num_samples=len(ids),
        num_rejects=0,
        experts=[S.ExpertInfo("dino", "hf", "fp2", -1, [2, 2], 8)],
        num_text_only=1,
    )
    S.write_manifest(root, manifest)
    return root


def test_iter_raw_equals_tarfile_for_every_window(shards_with_everything):
    root = shards_with_everything
    manifest = S.read_manifest(root)
    for path, info in zip(manifest.shard_paths(root), manifest.shards):
        reference = reference_samples(path)
        assert len(reference) == info.num_samples
        for first in range(info.num_samples + 1):
            for end in [None, *range(first + 1, info.num_samples + 1)]:
                assert list(S.iter_raw(path, first, end)) == reference[first:end], (path.name, first, end)
    long_keys = [s["__key__"] for p in manifest.shard_paths(root) for s in reference_samples(p)]
    assert max(len(k) for k in long_keys) > 100  # the pax path header was exercised


def test_decoded_arrays_equal_np_load_and_stay_read_only_views(shards_with_everything):
    root = shards_with_everything
    manifest = S.read_manifest(root)
    layout = S.sample_layout(manifest)
    seen = 0
    for path in manifest.shard_paths(root):
        for raw, ref in zip(S.iter_raw(path), reference_samples(path)):
            sample = S.decode_checked(raw, layout)
            assert sample["meta"] == json.loads(ref["json"])
            expected = reference_arrays(ref)
            assert sorted(k for k in sample if k in expected or k.startswith("expert.")) == sorted(expected)
            for key, value in expected.items():
                got = sample[key]
                assert got.dtype == value.dtype and got.shape == value.shape
                assert np.array_equal(got, value, equal_nan=True)
                assert not got.flags.writeable and got.base is not None  # a view of the member bytes
            seen += bool(expected)
    assert seen == 7


def test_collated_batches_equal_stack_astype_in_process_and_in_a_worker(shards_with_everything):
    """feats float32, labels int64, scores float32 (with -inf), experts float32; text-only rows filled."""
    root = shards_with_everything
    manifest = S.read_manifest(root)
    collate = Collator(pad_id=0, manifest=manifest)

    def reference(samples):
        def stack(key, fill, dtype):
            shape = S.sample_layout(manifest)[f"{key}.npy"][0]
            rows = [s[key] if s["has_image"] else np.full(shape, fill) for s in samples]
            return torch.from_numpy(np.stack(rows).astype(dtype))

        return {
            "feats_BPD": stack("feat", 0.0, np.float32),
            "labels_BPK": stack("labels", -1, np.int64),
            "scores_BPK": stack("scores", -np.inf, np.float32),
            "dino": stack("expert.dino", 0.0, np.float32),
        }

    def check(batch, samples):
        ref = reference(samples)
        got = {
            **{k: batch[k] for k in ("feats_BPD", "labels_BPK", "scores_BPK")},
            "dino": batch["experts"]["dino"],
        }
        for key in ref:
            assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape, key
            assert torch.equal(got[key], ref[key]), key

    layout = StreamLayout(1, 0, 0, batch_size=4, seed=0, shuffle_buffer=3)
    stream = ShardStream(root, layout, transform=with_tokens, collate=collate)
    samples = stream.iter_slot(0)
    window = [next(samples) for _ in range(8)]  # a whole pass: the text-only sample is in it
    assert sum(not s["has_image"] for s in window) == 1
    check(collate(window[:4]), window[:4])
    check(collate(window[4:]), window[4:])
    # the same batches through a worker process (shared-memory batch tensors)
    layout = StreamLayout(1, 0, 1, batch_size=4, seed=0, shuffle_buffer=3)
    worker_stream = ShardStream(root, layout, transform=with_tokens, collate=collate)
    batches = []
    for batch in make_loader(worker_stream):
        batches.append(batch)
        if len(batches) == 2:
            break
    check(batches[0], window[:4])
    check(batches[1], window[4:])


def with_tokens(sample: dict) -> dict:
    """A stand-in for the tokenising transform (the arrays are what is compared)."""
    return {**sample, "input_ids": [1, 2, 3], "text_labels": [-100, 2, 3], "visual_start": 0}


def _tar(path, members, fmt):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if isinstance(data, bytes) else None)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tars_of_other_writers_read_as_tarfile_reads_them(tmp_path, fmt):
    long_dir = "d" * 60 + "/" + "e" * 60  # ustar stores it in the name prefix; GNU and pax as long names
    names = (
        [f"{long_dir}/k{i}" for i in range(3)] if fmt == tarfile.USTAR_FORMAT else ["k0", "k" * 130, "ké2"]
    )
    members = [("somedir", None)]
    for i, key in enumerate(names):
        members += [(f"{key}.feat.npy", bytes((i + j) % 256 for j in range(700))), (f"{key}.json", b"{}")]
        members.append((f"link{i}", "somedir"))  # a member without data between samples
    path = tmp_path / "x.tar"
    _tar(path, members, fmt)
    reference = reference_samples(path)
    assert [s["__key__"] for s in reference] == names
    assert list(S.iter_raw(path)) == reference
    assert list(S.iter_raw(path, 1, 3)) == reference[1:3]


def test_header_cache_keeps_every_check():
    layout = {"feat.npy": ((2, 3), "float16")}
    good = S.encode_npy(np.ones((2, 3), np.float16))
    v2 = io.BytesIO()
    np.lib.format.write_array(v2, np.ones((2, 3), np.float16), version=(2, 0), allow_pickle=False)
    for data in (good, v2.getvalue()):
        for _ in range(2):  # the second decode is served by the cache
            out = S.decode_checked({"__key__": "k", "json": b"{}", "feat.npy": data}, layout)
            assert np.array_equal(out["feat"], np.ones((2, 3), np.float16))
        with pytest.raises(S.SampleError, match="holds 10 data bytes, not the 12 of its header"):
            S.decode_checked({"__key__": "k", "json": b"{}", "feat.npy": data[:-2]}, layout)
    with pytest.raises(S.SampleError, match=r"is float16 \[2, 3\] but the manifest implies float16 \[3, 2\]"):
        S.decode_checked({"__key__": "k", "json": b"{}", "feat.npy": good}, {"feat.npy": ((3, 2), "float16")})
    bad = bytearray(good)
    bad[20] = ord("!")  # inside the header's dict literal
    with pytest.raises(S.SampleError, match="feat.npy cannot be decoded"):
        S.decode_checked({"__key__": "k", "json": b"{}", "feat.npy": bytes(bad)}, layout)
    fortran = io.BytesIO()
    np.save(fortran, np.asfortranarray(np.arange(6, dtype=np.float16).reshape(2, 3)))
    out = S.decode_checked({"__key__": "k", "json": b"{}", "feat.npy": fortran.getvalue()}, layout)
    assert np.array_equal(out["feat"], np.arange(6, dtype=np.float16).reshape(2, 3))
    assert len(R._NPY_HEADERS) <= R._NPY_HEADERS_MAX


def test_scan_reports_where_and_why_the_member_list_ends(tmp_path):
    path = tmp_path / "a.tar"
    _tar(path, [("k.json", b"{}"), ("m.json", b"[]")], tarfile.PAX_FORMAT)
    with open(path, "rb") as f:
        scan = R.TarScan(f)
        assert [m.name for m in scan] == ["k.json", "m.json"]
        assert scan.stop == "zero" and scan.end == 4 * 512 and scan.end_marker()
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 3 * 512 - 100])  # inside the second header
    with open(cut, "rb") as f:
        scan = R.TarScan(f)
        assert [m.name for m in scan] == ["k.json"]
        assert scan.stop == "truncated" and scan.end == 2 * 512 and not scan.end_marker()
    garbled = bytearray(data)
    garbled[2 * 512 + 10] ^= 0xFF  # the second header's checksum no longer matches
    (tmp_path / "g.tar").write_bytes(bytes(garbled))
    with open(tmp_path / "g.tar", "rb") as f:
        scan = R.TarScan(f)
        assert [m.name for m in scan] == ["k.json"] and scan.stop == "invalid"
    (tmp_path / "n.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(
        S.ShardFormatError, match="n.tar differs from its manifest: it cannot be read as a tar"
    ):
        list(S.iter_raw(tmp_path / "n.tar"))


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_larger_than_one_copy_chunk_convert_exactly(threads):
    """Rows of more elements than one serial copy (collate.SERIAL_CHUNK), with one torch thread (whole rows)
    and two (chunks), against numpy's own cast; a Fortran-ordered row too."""
    from trainer.data import collate as C

    rng = np.random.default_rng(3)
    shape = (300, 250)  # 75,000 elements: 3 chunks
    assert np.prod(shape) > 2 * C.SERIAL_CHUNK
    rows = [rng.standard_normal(shape).astype(np.float16) for _ in range(2)]
    rows.append(np.asfortranarray(rng.standard_normal(shape).astype(np.float16)))
    for row in rows:
        row.setflags(write=False)
    samples = [
        {"feat": r, "labels": np.zeros((300, 1), np.int32), "scores": np.zeros((300, 1), np.float16)}
        for r in rows
    ]
    samples.insert(1, {})
    image_B = [True, False, True, True]
    layout = {
        "feat.npy": (shape, "float16"),
        "labels.npy": ((300, 1), "int32"),
        "scores.npy": ((300, 1), "float16"),
    }
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = C.Collator.arrays(samples, image_B, layout)
    finally:
        torch.set_num_threads(before)
    expected = np.stack([rows[0], np.zeros(shape), rows[1], rows[2]]).astype(np.float32)
    assert out["feats_BPD"].dtype == torch.float32 and torch.equal(
        out["feats_BPD"], torch.from_numpy(expected)
    )
    assert out["labels_BPK"][1].eq(-1).all() and out["scores_BPK"][1].eq(-np.inf).all()
