"""``data.host_dtype``: batches that carry the stored float16 arrays and are converted on the device.

A float16 batch holds exactly the stored values; its float32 conversion (``Trainer.to_device``) must equal the
loader's own float32 batch, fill values of text-only rows and blank micro-batches included, so a run trains
the same numbers either way.
"""

from __future__ import annotations

import json

import pytest
import torch

from trainer.data import Collator, SampleTransform
from trainer.data.conversations import Formatter
from trainer.data.sample import load_tokenizer
from trainer.train import Trainer
from visalign import shards as S

EXPERTS = {"dino": ((2, 2), 24)}
FLOAT_KEYS = ("feats_BPD", "scores_BPK")


@pytest.fixture
def root(tiny_shards, cache_dir):
    return tiny_shards(num_samples=8, samples_per_shard=4, text_only={1, 5}, experts=EXPERTS)


def test_float16_batches_convert_to_the_float32_batches(root, cache_dir):
    manifest = S.read_manifest(root)
    tok = load_tokenizer("tiny-llm")
    transform = SampleTransform(Formatter(tok, manifest.num_patches, "plain", 128))
    samples = [transform(S.decode_checked(r, S.sample_layout(manifest))) for r in S.iter_raw(manifest.shard_paths(root)[0])]  # fmt: skip
    for s in samples:
        s["slot"], s["pass"] = 0, 0
    wide, narrow = Collator(tok.pad_token_id, manifest), Collator(tok.pad_token_id, manifest, float16=True)
    batches = [(wide(samples), narrow(samples)), (wide.blank([]), narrow.blank([]))]
    assert batches[0][0]["has_image_B"].tolist() == [True, False, True, True]
    for a, b in batches:
        assert a.keys() == b.keys()
        for key in FLOAT_KEYS:
            assert a[key].dtype == torch.float32 and b[key].dtype == torch.float16
            assert torch.equal(b[key].float(), a[key]), key
        assert a["experts"].keys() == b["experts"].keys() == {"dino"}
        assert b["experts"]["dino"].dtype == torch.float16
        assert torch.equal(b["experts"]["dino"].float(), a["experts"]["dino"])
        for key, value in a.items():
            if key not in FLOAT_KEYS and isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key]), key
    # the text-only row keeps its fill values through float16: zeros and -inf
    assert torch.equal(
        batches[0][1]["scores_BPK"][1], torch.full((16, 4), float("-inf"), dtype=torch.float16)
    )
    # the stored bytes, unconverted
    stored = torch.from_numpy(samples[0]["feat"].copy())
    assert torch.equal(batches[0][1]["feats_BPD"][0], stored)


def test_a_run_trains_the_same_numbers_with_either_host_dtype(root, tmp_path):
    from trainer.cli import parse_run_args

    def run(name: str, host: str) -> tuple[Trainer, list[dict]]:
        cfg = parse_run_args([
            "--shards", str(root), "--output", str(tmp_path / name), "--llm", "tiny-llm", "--batch-size", "2",
            "--objective", "sea+basic+distill", "--stage", "finetune", "--max-steps", "2", "--lr", "1e-2",
            "--logging.progress", "false", "--logging.tensorboard", "false", "--data.host_dtype", host,
        ])  # fmt: skip
        trainer = Trainer(cfg)
        trainer.train()
        log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        return trainer, log

    wide, wide_log = run("wide", "float32")
    narrow, narrow_log = run("narrow", "float16")
    auto, _ = run("auto", "auto")
    assert not wide.float16_batches and narrow.float16_batches
    assert not auto.float16_batches  # auto: float32 on a CPU, where the device is this process
    losses = [{k: v for k, v in row.items() if k.endswith("_loss") or k == "grad_norm"} for row in wide_log]
    assert len(losses) == 2 and all("distill_loss" in row and "sea_loss" in row for row in losses)
    assert losses == [{k: row[k] for k in losses[i]} for i, row in enumerate(narrow_log)]
    a, b = wide.vlm.state_dict(), narrow.vlm.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
