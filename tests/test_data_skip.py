"""Unusable samples in old shards: skipped, recorded, and a resumed run still equals an uninterrupted one.

Records the validator refuses (``visalign.samples.check_record``: empty conversation, human-only, two
``<image>`` marks, unknown speaker), a record the formatter refuses (its visual block cannot fit
``--max-length``) and an array that does not match the manifest are written into shards as an old labeller
would have. The rule under test (``trainer/data/collate.py``): a micro-batch is formed from ``batch_size``
consecutive samples of its slot's stream and the unusable ones are left out; stream positions count samples
read, so resume positions do not depend on which samples were usable.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.launching import VOLATILE
from trainer.config import DataConfig
from trainer.data import Collator, SampleTransform, ShardStream, StreamLayout, UnusableDataError
from trainer.data import collate as C
from trainer.data.conversations import Formatter, text_format
from visalign import shards as S
from visalign.samples import check_record

MAX_LENGTH = 48
BAD = {
    1: ("conversations", []),
    4: ("conversations", [{"from": "human", "value": "<image>\nDescribe it."}]),
    6: (
        "conversations",
        [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "Two."}],
    ),
    9: ("conversations", [{"from": "narrator", "value": "<image>"}, {"from": "gpt", "value": "Hm."}]),
    10: (
        "conversations",
        [{"from": "human", "value": "word " * 60 + "<image>"}, {"from": "gpt", "value": "It."}],
    ),
}


def edit(i, meta):
    if i in BAD:
        meta.pop("caption", None)
        key, value = BAD[i]
        meta[key] = value
    return meta


@pytest.fixture
def bad_shards(tiny_shards):
    return tiny_shards(num_samples=12, samples_per_shard=4, edit_meta=edit)


@pytest.fixture(scope="module")
def tok(cache_dir):
    from trainer.models.llm import load_llm

    return load_llm("tiny-llm", cache_dir=cache_dir)[1]


def expected_reasons(root, tok):
    """The reason of every unusable sample, computed here with the validator and the formatter directly."""
    formatter = Formatter(tok, 16, text_format(DataConfig(), "finetune"), MAX_LENGTH)
    reasons = {}
    for path in S.read_manifest(root).shard_paths(root):
        for sample in S.iter_tar(path):
            meta = sample["meta"]
            reason = check_record(meta, True)
            if reason is None:
                try:
                    formatter(meta)
                except Exception as err:  # noqa: BLE001 - whatever the formatter refuses
                    reason = str(err)
            if reason is not None:
                reasons[meta["id"]] = reason
    return reasons


def test_windows_count_samples_read_and_leave_out_the_unusable(bad_shards, tok):
    reasons = expected_reasons(bad_shards, tok)
    assert sorted(reasons) == [f"s{i:04d}" for i in sorted(BAD)]
    layout = StreamLayout(1, 0, 0, batch_size=3, seed=4, shuffle_buffer=5)
    formatter = Formatter(tok, 16, text_format(DataConfig(), "finetune"), MAX_LENGTH)
    manifest = S.read_manifest(bad_shards)

    def stream(start=0):
        return ShardStream(bad_shards, layout, SampleTransform(formatter), Collator(formatter.pad_id, manifest),
                           start_batches=start)  # fmt: skip

    raw = [s["meta"]["id"] for s, _ in zip(ShardStream(bad_shards, layout).iter_slot(0), range(24))]
    batches = [b for b, _ in zip(iter(stream()), range(8))]
    for b, batch in enumerate(batches):
        window = raw[3 * b : 3 * b + 3]
        assert batch["ids"] == [i for i in window if i not in reasons]
        assert [s["id"] for s in batch["skipped"]] == [i for i in window if i in reasons]
        assert all(s["reason"] == reasons[s["id"]] for s in batch["skipped"])
        assert batch["input_ids_BT"].shape[0] == max(len(batch["ids"]), 1)
    assert sum(len(b["skipped"]) for b in batches) == 2 * len(BAD)  # two passes, each bad sample once
    resumed = [b for b, _ in zip(iter(stream(start=5)), range(3))]
    for whole, part in zip(batches[5:], resumed):
        assert whole["ids"] == part["ids"] and whole["skipped"] == part["skipped"]
        assert torch.equal(whole["input_ids_BT"], part["input_ids_BT"])


def run_args(shards, run, *extra):
    return ["--shards", str(shards), "--output", str(run), "--llm", "tiny-llm", "--stage", "finetune",
            "--max-steps", "6", "--batch-size", "2", "--max-length", str(MAX_LENGTH), "--save-every", "3",
            "--data.shuffle_buffer", "4", "--logging.seen_ids", "true", "--logging.progress", "false",
            "--logging.tensorboard", "false", *extra]  # fmt: skip


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trainer_skips_records_and_resumes_exactly(bad_shards, tok, tmp_path):
    from trainer.cli import parse_run_args
    from trainer.train import Trainer

    reasons = expected_reasons(bad_shards, tok)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    Trainer(parse_run_args(run_args(bad_shards, whole))).train()
    skipped = records(whole / "skipped-rank0.jsonl")
    # 6 steps x 2 samples = every sample of pass 0 read once: each unusable one recorded once, with its reason
    assert sorted(r["id"] for r in skipped) == sorted(reasons)
    assert all(r["reason"] == reasons[r["id"]] and r["pass"] == 0 for r in skipped)
    log = records(whole / "log.jsonl")
    assert sum(r["skipped_samples"] for r in log) == len(reasons)
    for r in log:
        assert r["skipped_samples"] == sum(s["step"] == r["step"] for s in skipped)
        assert all(v == v for v in r.values())  # no NaN, blank micro-batches included
    seen = records(whole / "seen-rank0.jsonl")
    assert sorted(r["id"] for r in seen) == sorted({f"s{i:04d}" for i in range(12)} - set(reasons))

    Trainer(parse_run_args(run_args(bad_shards, parts, "--stop-after", "3"))).train()
    Trainer(parse_run_args(run_args(bad_shards, parts, "--resume"))).train()
    for name in ("log.jsonl", "seen-rank0.jsonl", "skipped-rank0.jsonl"):
        a, b = records(whole / name), records(parts / name)
        for r in a + b:
            for key in VOLATILE:
                r.pop(key, None)
        assert a == b, name


def test_a_blank_micro_batch_adds_nothing_and_touches_every_parameter(bad_shards, tok, cache_dir):
    from trainer.config import TrainConfig
    from trainer.models.build import build_train_module
    from trainer.objectives.base import StepContext

    manifest = S.read_manifest(bad_shards)
    marks = [{"__key__": f"k{i}", "id": f"k{i}", "skip": "bad", "slot": 0, "pass": 0} for i in range(2)]
    batch = Collator(tok.pad_token_id, manifest)(marks)
    assert batch["ids"] == [] and [s["id"] for s in batch["skipped"]] == ["k0", "k1"]
    assert batch["input_ids_BT"].tolist() == [[tok.pad_token_id]] and batch["attention_mask_BT"].tolist() == [
        [1]
    ]
    assert batch["num_target_tokens"] == 0 and batch["has_image_B"].tolist() == [False]
    cfg = TrainConfig(
        shards=str(bad_shards), output="unused", objective="sea+basic+distill", stage="finetune"
    )
    cfg.model.llm = "tiny-llm"
    module, _ = build_train_module(cfg, manifest, bad_shards, apply_stage_to="finetune")
    losses, _ = module(batch, StepContext())
    assert {k: float(v) for k, v in losses.items()} == dict.fromkeys(losses, 0.0)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(sum(losses.values()), params)  # raises if a trainable parameter is unused
    assert all(float(g.abs().sum()) == 0.0 for g in grads)


def test_a_long_run_of_unusable_samples_stops_with_a_setting_error(tok, monkeypatch):
    monkeypatch.setattr(C, "MAX_CONSECUTIVE_UNUSABLE", 5)
    collate = Collator(tok.pad_token_id)
    marks = [{"__key__": f"k{i}", "id": f"k{i}", "skip": "too long", "slot": 0, "pass": 0} for i in range(3)]
    with pytest.raises(ValueError, match="needs the Collator built with the manifest"):
        collate(marks)  # a blank batch needs the shapes
    with pytest.raises(
        UnusableDataError, match=r"the last 5 samples were all unusable \(the latest, 'k1': too long\)"
    ):
        collate(marks)


def test_a_sample_whose_arrays_differ_from_the_manifest(tiny_shards, tmp_path, capsys):
    """Checksums consistent, one feat.npy one row short: the full check refuses the shard; the size check
    lets the run start and the loader skips and records the sample."""
    from trainer.cli import main

    root = tiny_shards(num_samples=4, samples_per_shard=4)
    manifest = S.read_manifest(root)
    samples = [S.decode_sample(r) for r in S.iter_raw(manifest.shard_paths(root)[0])]
    with S.ShardWriter(root, 0) as writer:
        for i, s in enumerate(samples):
            writer.write(
                s["__key__"], s["feat"][:15] if i == 2 else s["feat"], s["labels"], s["scores"], s["meta"]
            )
        stats = writer.close()
    manifest.shards[0].sha256 = stats["sha256"]
    manifest.shards[0].num_bytes = (root / stats["name"]).stat().st_size
    S.write_manifest(root, manifest)
    args = ["run", "--shards", str(root), "--llm", "tiny-llm", "--max-steps", "2", "--batch-size", "2",
            "--logging.progress", "false", "--logging.tensorboard", "false"]  # fmt: skip
    assert main(args + ["--output", str(tmp_path / "full")]) == 3
    assert "sample s0002: feat.npy is float16 [15, 32] but the manifest implies float16 [16, 32]" in (
        capsys.readouterr().err
    )
    assert main(args + ["--output", str(tmp_path / "size"), "--data.verify-shards", "size"]) == 0
    skipped = records(tmp_path / "size" / "skipped-rank0.jsonl")
    assert [(r["id"], r["reason"]) for r in skipped] == [
        ("s0002", "feat.npy is float16 [15, 32] but the manifest implies float16 [16, 32]")
    ]
