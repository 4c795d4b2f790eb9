"""Verified reading: a shard that differs from its manifest is named before any of its data is trained on.

The three damages of the field report, made to real shards written by the one writer: 64 flipped bytes
inside one ``feat.npy`` (same size), a tar cut to 60 %, a shard holding one sample fewer than its record.
Each is found by ``check_shard`` (the checks), by ``verify_shards`` (the stamped, rank-split driver), by
``trainer run`` before its first step (nothing logged, no checkpoint, no config.yaml) and by ``trainer eval``.
"""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest

from trainer.data import verify as V
from visalign import shards as S

LINE = "shard {path} differs from its manifest: "


def member_offset(path, suffix: str) -> tuple[int, int]:
    """(data offset, size) of the first member whose name ends with ``suffix``."""
    with tarfile.open(path) as tar:
        for member in tar:
            if member.name.endswith(suffix):
                return member.offset_data, member.size
    raise AssertionError(suffix)


def flip_feat_bytes(path) -> None:
    """64 bytes inside the first feat.npy's data, inverted in place: same size, same tar structure."""
    offset, size = member_offset(path, ".feat.npy")
    with open(path, "r+b") as f:
        f.seek(offset + size // 2)
        data = f.read(64)
        f.seek(offset + size // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def cut(path, fraction: float = 0.6) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


def drop_one_sample(root, index: int) -> None:
    """Rewrite shard ``index`` through the writer without its last sample; the manifest keeps the old record."""
    path = root / S.shard_name(index)
    samples = list(S.iter_raw(path))[:-1]
    with S.ShardWriter(root, index) as writer:
        for raw in samples:
            sample = S.decode_sample(raw)
            writer.write(
                sample["__key__"], sample["feat"], sample["labels"], sample["scores"], sample["meta"]
            )
        writer.close()


DAMAGES = {
    "flipped": lambda root: flip_feat_bytes(root / S.shard_name(1)),
    "cut": lambda root: cut(root / S.shard_name(1)),
    "missing": lambda root: drop_one_sample(root, 1),
}


def problems(root, mode: str):
    manifest = S.read_manifest(root)
    layout = S.sample_layout(manifest)
    return [
        S.check_shard(p, info, layout, full=mode == "full")
        for p, info in zip(manifest.shard_paths(root), manifest.shards)
    ]


def test_intact_shards_pass_both_modes(tiny_shards):
    root = tiny_shards(num_samples=7, samples_per_shard=3, text_only={2, 5})
    assert problems(root, "full") == [[], [], []]
    assert problems(root, "size") == [[], [], []]


@pytest.mark.parametrize("record_sizes", [True, False])
def test_each_damage_is_found_in_its_shard(tiny_shards, record_sizes):
    for name, damage in DAMAGES.items():
        root = tiny_shards(num_samples=9, samples_per_shard=3, record_sizes=record_sizes)
        damage(root)
        full = problems(root, "full")
        size = problems(root, "size")
        assert full[0] == full[2] == [] and size[0] == size[2] == [], name
        assert full[1], name
        if name == "flipped":
            # the same size and structure: only the checksum sees it; the size mode is documented not to
            assert full[1] == [full[1][0]] and full[1][0].startswith("its sha256 is ")
            assert size[1] == []
        elif name == "cut":
            assert size[1] and full[1]
            expected = "it is " if record_sizes else "it is truncated"
            assert size[1][0].startswith(expected) and full[1][0].startswith(expected), (size, full)
        else:
            # one small sample fewer leaves the tar's size as it was (tar pads to 10 KiB records): the count
            assert size[1] == ["it holds 2 samples but the manifest records 3"]
            assert full[1][0] == size[1][0] and full[1][1].startswith("its sha256 is ") and len(full[1]) == 2


def test_a_wrong_array_shape_is_named_by_the_full_check(tiny_shards):
    # checksums consistent (written by the writer), but one feat has 15 rows where the manifest implies 16
    root = tiny_shards(num_samples=3, samples_per_shard=3)
    manifest = S.read_manifest(root)
    samples = [S.decode_sample(r) for r in S.iter_raw(manifest.shard_paths(root)[0])]
    samples[1]["feat"] = samples[1]["feat"][:15]
    with S.ShardWriter(root, 0) as writer:
        for s in samples:
            writer.write(s["__key__"], s["feat"], s["labels"], s["scores"], s["meta"])
        stats = writer.close()
    manifest.shards[0].sha256 = stats["sha256"]
    manifest.shards[0].num_bytes = (root / stats["name"]).stat().st_size
    S.write_manifest(root, manifest)
    assert problems(root, "full") == [
        ["sample s0001: feat.npy is float16 [15, 32] but the manifest implies float16 [16, 32]"]
    ]
    assert problems(root, "size") == [[]]


def test_verify_shards_message_names_shard_and_fix(tiny_shards, tmp_path):
    for name, damage in DAMAGES.items():
        root = tiny_shards(num_samples=9, samples_per_shard=3)
        damage(root)
        for mode in ("full", "size") if name != "flipped" else ("full",):
            with pytest.raises(S.ShardFormatError) as err:
                V.verify_shards(root, S.read_manifest(root), mode, cache_dir=tmp_path / name)
            message = str(err.value)
            assert "\n" not in message
            assert message.startswith(LINE.format(path=root / S.shard_name(1)))
            assert message.endswith(
                f"restore the file from a copy, or rerun the `pipeline label` command that wrote {root}: "
                "it relabels every shard whose checksum no longer matches its record and rewrites the manifest"
            )
    # several damaged shards: the first in full, the others by name, still one line
    root = tiny_shards(num_samples=9, samples_per_shard=3)
    cut(root / S.shard_name(0))
    flip_feat_bytes(root / S.shard_name(2))
    with pytest.raises(S.ShardFormatError, match=r"^2 of 3 shards of .* differ from its manifest: shard .*"
                       r"shard-000000.tar: it is .*; also shard-000002.tar; restore"):  # fmt: skip
        V.verify_shards(root, S.read_manifest(root), "full", stamps=False)


def test_stamp_skips_the_rehash_until_the_file_changes(tiny_shards, tmp_path, monkeypatch):
    root = tiny_shards(num_samples=6, samples_per_shard=3)
    manifest = S.read_manifest(root)
    calls = []
    real = V.check_shard
    monkeypatch.setattr(V, "check_shard", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cache = tmp_path / "cache"
    first = V.verify_shards(root, manifest, "full", cache_dir=cache)
    assert (first.checked, first.stamped, len(calls)) == (2, 0, 2)
    assert len(list((cache / V.STAMP_DIR).glob("*.json"))) == 2
    again = V.verify_shards(root, manifest, "full", cache_dir=cache)
    assert (again.checked, again.stamped, len(calls)) == (2, 2, 2)  # no shard read again
    # flip bytes and put the modification time back: the status-change time still voids the stamp
    path = root / S.shard_name(1)
    st = os.stat(path)
    flip_feat_bytes(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns
    with pytest.raises(S.ShardFormatError, match="shard-000001.tar differs from its manifest: its sha256"):
        V.verify_shards(root, manifest, "full", cache_dir=cache)
    assert calls[2:] == [path]
    # the size mode never reads or writes stamps
    assert V.verify_shards(root, manifest, "size", cache_dir=tmp_path / "other").stamped == 0
    assert not (tmp_path / "other").exists()


def test_ranks_split_the_shards(tiny_shards, monkeypatch):
    root = tiny_shards(num_samples=10, samples_per_shard=2)
    manifest = S.read_manifest(root)
    seen = {}
    real = V.check_shard
    calls: list[str] = []
    monkeypatch.setattr(V, "check_shard", lambda *a, **k: calls.append(a[0].name) or real(*a, **k))
    for rank in range(3):
        calls.clear()
        V.verify_shards(root, manifest, "full", rank=rank, world_size=3, stamps=False)
        seen[rank] = sorted(calls)
    assert seen == {
        0: ["shard-000000.tar", "shard-000003.tar"],
        1: ["shard-000001.tar", "shard-000004.tar"],
        2: ["shard-000002.tar"],
    }


def _run_args(shards, run, *extra):
    return ["run", "--shards", str(shards), "--output", str(run), "--llm", "tiny-llm", "--max-steps", "2",
            "--batch-size", "2", "--logging.progress", "false", "--logging.tensorboard", "false", *extra]  # fmt: skip


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_trainer_run_refuses_a_damaged_shard_before_any_step(tiny_shards, tmp_path, capsys, damage):
    from trainer.cli import main

    root = tiny_shards(num_samples=9, samples_per_shard=3)
    DAMAGES[damage](root)
    run = tmp_path / "run"
    assert main(_run_args(root, run)) == 3
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("trainer run: error: " + LINE.format(path=root / S.shard_name(1))), lines[0]
    assert "Traceback" not in err
    print(f"\n[{damage}] {lines[0]}")  # the message, for the record (pytest -s)
    # nothing of the run was started: no step logged, no checkpoint, no config
    assert not (run / "log.jsonl").exists() and not (run / "checkpoints").exists()
    assert not (run / "config.yaml").exists()
    if damage != "flipped":  # the size mode sees it too
        assert main(_run_args(root, run, "--data.verify-shards", "size")) == 3
        assert LINE.format(path=root / S.shard_name(1)) in capsys.readouterr().err


def test_trainer_eval_refuses_a_damaged_shard(tiny_shards, tmp_path, capsys):
    from trainer.cli import main

    root = tiny_shards(num_samples=6, samples_per_shard=3)
    run = tmp_path / "run"
    assert main(_run_args(root, run)) == 0
    flip_feat_bytes(root / S.shard_name(0))
    assert main(["eval", str(run), "--shards", str(root), "--out", str(tmp_path / "ev"), "--samples", "2",
                 "--pictures", "0", "--device", "cpu"]) == 3  # fmt: skip
    err = capsys.readouterr().err
    assert "trainer eval: error: " + LINE.format(path=root / S.shard_name(0)) + "its sha256" in err
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_trainer_eval_refuses_another_encoder_or_word_list(tiny_shards, tmp_path, capsys):
    from trainer.cli import main

    root = tiny_shards(num_samples=6, samples_per_shard=3)
    run = tmp_path / "run"
    assert main(_run_args(root, run, "--objective", "sea")) == 0
    other_encoder = tiny_shards(num_samples=6, samples_per_shard=3, fingerprint="other-fp")
    other_words = tiny_shards(num_samples=6, samples_per_shard=3, words=[f"term{i}" for i in range(20)])
    for shards, what, value in [
        (other_encoder, "encoder fingerprint", "other-fp"),
        (other_words, "word list sha256", S.read_manifest(other_words).wordlist.sha256),
    ]:
        out = tmp_path / f"ev-{what[:4]}"
        assert main(["eval", str(run), "--shards", str(shards), "--out", str(out), "--device", "cpu"]) == 3
        err = capsys.readouterr().err
        assert f"trainer eval: error: the run {run} was trained on shards with {what} " in err, err
        assert f"but the shards given have {what} {value}: point --shards at shards of the same" in err
        assert not (out / "metrics.json").exists()
    # the same shards are accepted (the check compares, it does not refuse everything)
    assert main(["eval", str(run), "--shards", str(root), "--out", str(tmp_path / "ok"), "--samples", "2",
                 "--pictures", "0", "--device", "cpu"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "ok" / "metrics.json").read_text())["counts"]["samples"] == 2


def test_reader_names_a_shard_that_ends_early(tiny_shards):
    root = tiny_shards(num_samples=5, samples_per_shard=5)
    path = S.read_manifest(root).shard_paths(root)[0]
    offset, _ = member_offset(path, "s0003.feat.npy")
    with open(path, "r+b") as f:
        f.truncate(offset - 512)  # exactly at s0003's feat header: tarfile itself ends quietly there
    assert [r["__key__"] for r in S.iter_raw(path, 0, 3)] == ["s0000", "s0001", "s0002"]
    with pytest.raises(
        S.ShardFormatError, match=r"shard-000000.tar differs from its manifest: it ends after"
    ):
        list(S.iter_raw(path, 1, 5))
    assert np.asarray(problems(root, "size")[0]).size > 0
