"""The vision tower online in ``trainer run`` (``--model.vision.mode frozen|train``, SEA-PRIME's stage 2).

Shards are written by ``pipeline label --store-images`` from the bundled photos (and one text-only record) with
the tiny-clip and tiny-siglip towers; the LLM is tiny-llm. Checked by value:

* the tower module against HF's own ``hidden_states[feature_layer]`` (prefix dropped), and at step 0 the
  online features of every sample against the shards' ``feat.npy`` (float16 rounding, max diff printed);
* mode frozen: nothing of the tower trains or builds a graph; mode train: every tower tensor moves by the
  vision learning rate (Adam's first step moves each weight by about lr), which is the rate of its own
  AdamW groups and of the log's ``vision_lr``; SEA's labels are the shards' (relabelled shards change the SEA
  loss, not the LM loss);
* resume of a mode-train run equals the uninterrupted run bit for bit (logs, weights, the tower, AdamW);
* the HF LLaVA export of a mode-train run computes our logits on the same image, with the tuned tower;
* refusals: shards without images, a tower whose fingerprint differs, periodic evaluation, cached features
  for a tuned tower; an undecodable stored image is skipped and recorded;
* FSDP (slow, 2 processes): the tower sharded as groups of its own gives DDP's losses and weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_photo_dataset
from trainer import checkpoint as ckpt_io
from trainer.cli import main, parse_run_args
from trainer.train import Trainer
from visalign import shards as S
from visalign.images import Preprocess, load_image

BASE = [
    "--llm", "tiny-llm", "--batch-size", "2", "--logging.progress", "false", "--logging.report-to", "none",
    "--optim.warmup_ratio", "0", "--data.shuffle_buffer", "2",
]  # fmt: skip
VOLATILE = ("samples_per_s", "tokens_per_s", "peak_mem_mib")


# ---------------------------------------------------------------------------------------------------------
# shards with images, labelled by the real pipeline
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, cache_dir):
    """``labelled(encoder)`` -> a ``pipeline label --store-images`` root over 5 photos + 1 text-only record
    (2 shards of 3, aspect pad), labelled once per encoder in this module."""
    from pipeline.config import LabelConfig
    from pipeline.driver import run_label

    root = tmp_path_factory.mktemp("labelled")
    source = write_photo_dataset(root / "photos", ["astronaut", "cat", "coffee", "rocket", "flower"])
    records = json.loads(source.read_text())
    chat = [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi there."}]
    records.insert(2, {"id": "chat", "conversations": chat})
    source.write_text(json.dumps(records))
    words = root / "words.txt"
    words.write_text("cat\ndog\ncup\nsky\nflower\nrocket\nred\nwhite\nhelmet\ngarden\n")
    done: dict[str, Path] = {}

    def make(encoder: str) -> Path:
        if encoder not in done:
            out = root / encoder
            run_label(LabelConfig(
                encoder=encoder, input=str(source), images=str(source.parent / "images"), shards=str(out),
                wordlist=str(words), scheduler="synchronous", samples_per_shard=3, batch_size=4, top_k=3,
                progress=False, store_images=True, image_aspect="pad", cache_dir=str(cache_dir),
            ))  # fmt: skip
            done[encoder] = out
        return done[encoder]

    return make


def samples_by_id(root: Path) -> dict[str, dict]:
    m = S.read_manifest(root)
    return {s["meta"]["id"]: s for p in m.shard_paths(root) for s in S.iter_tar(p)}


def copy_shards(src: Path, dst: Path, edit) -> Path:
    """A copy of a label root written through the one writer, ``edit(sample) -> sample`` applied to every
    image sample (labels, image bytes, ...); manifest and word list otherwise the same."""
    m = S.read_manifest(src)
    dst.mkdir(parents=True)
    shutil.copy(src / S.WORDLIST, dst / S.WORDLIST)
    infos = []
    for index, path in enumerate(m.shard_paths(src)):
        with S.ShardWriter(dst, index) as writer:
            for s in S.iter_tar(path):
                if s["meta"].get("has_image") is False:
                    writer.write_text_only(s["__key__"], s["meta"])
                    continue
                s = edit(dict(s))
                image = (s["image_ext"], s["image_bytes"])
                writer.write(s["__key__"], s["feat"], s["labels"], s["scores"], s["meta"], image=image)
            infos.append(S.shard_info(dst, writer.close({"num_rejects": 0, "rejects": []})))
    m.shards = infos
    S.write_manifest(dst, m)
    return dst


def run_args(shards, run, *extra) -> list[str]:
    return ["--shards", str(shards), "--output", str(run), *BASE, *extra]


def read_log(run, drop=VOLATILE):
    records = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def original_tower(root: Path):
    """The labelling tower, loaded independently of the trainer (HF, full model)."""
    from trainer.models.vision import load_tower

    return load_tower(S.read_manifest(root).encoder)[0]


# ---------------------------------------------------------------------------------------------------------
# the features: tower module vs HF, online vs cached feat.npy
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder,prefix", [("tiny-clip", 1), ("tiny-siglip", 0)])
@pytest.mark.parametrize("layer", [-2, -1, 1])
def test_tower_features_are_hf_hidden_states_without_the_prefix(labelled, encoder, prefix, layer):
    """VisionTower (the blocks up to the feature layer, called directly) == HF's full forward with
    ``output_hidden_states`` at that layer, CLS dropped for CLIP and nothing for SigLIP."""
    from trainer.models.vision import VisionTower

    hf = original_tower(labelled(encoder))
    vision = hf.vision_model
    model_type = hf.config.model_type
    tower = VisionTower(vision, model_type, layer)
    assert tower.num_prefix == prefix
    assert len(tower.layers) == layer % (len(vision.encoder.layers) + 1)
    pixels_BCHW = torch.randn(3, 3, hf.config.vision_config.image_size, hf.config.vision_config.image_size)
    with torch.no_grad():
        want_BTD = vision(pixel_values=pixels_BCHW, output_hidden_states=True).hidden_states[layer]
        got_BPD = tower(pixels_BCHW)
    assert got_BPD.shape == want_BTD[:, prefix:].shape
    torch.testing.assert_close(got_BPD, want_BTD[:, prefix:], atol=1e-6, rtol=0)


def test_text_only_rows_get_zeros_and_a_batch_without_images_keeps_the_graph(labelled):
    from trainer.models.vision import VisionTower

    hf = original_tower(labelled("tiny-clip"))
    tower = VisionTower(hf.vision_model, "clip", -2, tuned=True)
    side = hf.config.vision_config.image_size
    pixels_BCHW = torch.randn(3, 3, side, side)
    image_B = torch.tensor([True, False, True])
    feats_BPD = tower.features(pixels_BCHW, image_B)
    with torch.no_grad():
        alone_BPD = tower(pixels_BCHW[[0, 2]])
    torch.testing.assert_close(feats_BPD[[0, 2]], alone_BPD, atol=1e-6, rtol=0)
    assert torch.equal(feats_BPD[1], torch.zeros_like(feats_BPD[1]))
    none_BPD = tower.features(pixels_BCHW, torch.zeros(3, dtype=torch.bool))
    assert torch.equal(none_BPD, torch.zeros_like(none_BPD)) and none_BPD.requires_grad
    none_BPD.sum().backward()  # every tower weight gets a (zero) gradient: DDP's and FSDP's sync see them all
    assert all(p.grad is not None and not p.grad.any() for p in tower.parameters())


def test_checkpointed_tower_gives_the_same_gradients(labelled):
    from trainer.models.vision import VisionTower

    hf = original_tower(labelled("tiny-siglip"))
    side = hf.config.vision_config.image_size
    pixels_BCHW = torch.randn(2, 3, side, side)
    grads = []
    for checkpointing in (False, True):
        tower = VisionTower(hf.vision_model, "siglip", -2, tuned=True, gradient_checkpointing=checkpointing)
        tower.zero_grad(set_to_none=True)
        (tower(pixels_BCHW) ** 2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


@pytest.mark.parametrize("encoder", ["tiny-clip", "tiny-siglip"])
def test_step0_online_features_equal_the_cached_feat_npy(labelled, tmp_path, encoder):
    """One pass of the loader with mode frozen: every image row's pixels are the manifest's preprocessing
    of its source file, its online features equal its feat.npy up to float16 rounding, its labels are its
    labels.npy; text-only rows have zero pixels and features."""
    root = labelled(encoder)
    manifest = S.read_manifest(root)
    stored = samples_by_id(root)
    trainer = Trainer(parse_run_args(run_args(root, tmp_path / "run", "--model.vision.mode", "frozen")))
    assert trainer.vlm.vision is not None and not trainer.vlm.vision.tuned
    assert not any(p.requires_grad for p in trainer.vlm.vision.parameters())
    preprocess = Preprocess.from_dict(manifest.encoder.preprocess)
    seen, worst, worst_rel, flipped, total = set(), 0.0, 0.0, 0, 0
    for _ in range(3):  # 6 samples, batches of 2: one pass
        batch = next(trainer.batches)
        with torch.no_grad():
            out = trainer.vlm(batch)
        assert out.feats_BPD is not None and not out.feats_BPD.requires_grad
        for row, sample_id in enumerate(batch["ids"]):
            seen.add(sample_id)
            if not batch["has_image_B"][row]:
                assert not batch["pixels_BCHW"][row].any() and not out.feats_BPD[row].any()
                continue
            sample = stored[sample_id]
            want = preprocess(load_image(sample["meta"]["source"])[0])
            assert torch.equal(batch["pixels_BCHW"][row], want)
            assert np.array_equal(batch["labels_BPK"][row].numpy(), sample["labels"].astype(np.int64))
            cached_PD = torch.from_numpy(sample["feat"].astype(np.float32))
            online_PD = out.feats_BPD[row].float()
            diff_PD = (online_PD - cached_PD).abs()
            # float16 keeps 11 significant bits: rounding moves a value by at most 2^-11 of it
            assert bool((diff_PD <= cached_PD.abs() * 2.0**-11 + 1e-5).all()), float(diff_PD.max())
            worst = max(worst, float(diff_PD.max()))
            flipped += int((online_PD.half().float() != cached_PD).sum())  # float16 values not bit-equal
            total += cached_PD.numel()
            worst_rel = max(worst_rel, float((diff_PD / cached_PD.abs().clamp_min(1e-3)).max()))
    assert seen == set(stored)
    print(f"\n{encoder}: online vs feat.npy max abs diff {worst:.3e}, max rel diff {worst_rel:.3e}; rounded to "
          f"float16, {flipped} of {total} values differ (by one float16 step)")  # fmt: skip
    trainer.close()


# ---------------------------------------------------------------------------------------------------------
# training the tower
# ---------------------------------------------------------------------------------------------------------


def test_frozen_tower_does_not_train_and_is_not_checkpointed(labelled, tmp_path):
    root = labelled("tiny-clip")
    trainer = Trainer(parse_run_args(run_args(root, tmp_path / "run", "--model.vision.mode", "frozen",
                                              "--stage", "finetune", "--max-steps", "2", "--lr", "1e-2")))  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.vlm.vision.named_parameters()}
    trainer.train()
    assert all(torch.equal(before[n], p) for n, p in trainer.vlm.vision.named_parameters())
    weights, _ = ckpt_io.read_weights(ckpt_io.resolve_checkpoint(tmp_path / "run"))
    assert not any(k.startswith("vision.") for k in weights) and any(k.startswith("llm.") for k in weights)
    assert [g["name"] for g in trainer.raw_optimizer().param_groups if g["name"].startswith("vision")] == []


def test_trained_tower_moves_at_its_own_learning_rate(labelled, tmp_path):
    """One step of mode train (lr 1e-2 for the rest, 3e-6 for the tower, no warm-up): Adam's first update
    moves every weight by about lr x sign(gradient), so each tower tensor changed by ~3e-6 and no more."""
    root = labelled("tiny-clip")
    vision_lr = 3e-6
    cfg = parse_run_args(run_args(root, tmp_path / "run", "--model.vision.mode", "train", "--model.vision.lr",
                                  str(vision_lr), "--stage", "finetune", "--objective", "sea", "--max-steps", "1",
                                  "--lr", "1e-2"))  # fmt: skip
    trainer = Trainer(cfg)
    groups = {g["name"]: g for g in trainer.raw_optimizer().param_groups}
    assert {"vision/decay", "vision/no_decay"} <= set(groups)
    assert groups["vision/decay"]["initial_lr"] == groups["vision/no_decay"]["initial_lr"] == vision_lr
    tower_ids = {id(p) for p in trainer.vlm.vision.parameters()}
    in_groups = {id(p) for name, g in groups.items() if name.startswith("vision") for p in g["params"]}
    assert in_groups == tower_ids
    before = {n: p.detach().clone() for n, p in trainer.vlm.vision.named_parameters()}
    trainer.train()
    (record,) = read_log(tmp_path / "run")
    assert record["vision_lr"] == vision_lr and record["lr"] == 1e-2
    moves = []
    for name, p in trainer.vlm.vision.named_parameters():
        delta = (p.detach() - before[name]).abs()
        assert bool(delta.any()), f"{name} did not change"
        moves.append(delta.flatten())
    moved = torch.cat(moves)
    small = torch.cat([before[n].abs().flatten() for n in before]) < 0.25  # where fp32 resolves 3e-6 well
    print(f"\ntower update after one step: median {moved[small].median():.3e}, max {moved.max():.3e}")
    assert float(moved.max()) <= 1.05 * vision_lr
    assert float(moved[small].median()) == pytest.approx(vision_lr, rel=0.05)
    weights, _ = ckpt_io.read_weights(ckpt_io.resolve_checkpoint(tmp_path / "run"))
    tuned = {f"vision.{n}" for n in before}
    assert tuned <= set(weights)
    assert all(torch.equal(weights[f"vision.{n}"], p) for n, p in trainer.vlm.vision.named_parameters())


def test_sea_labels_come_from_the_shards(labelled, tmp_path):
    """The same run on a copy of the shards whose labels.npy name other words: the LM loss of the first step
    is the same (same images, same tower), SEA's is not. The tower computes features, never labels."""
    root = labelled("tiny-clip")
    count = S.read_manifest(root).wordlist.count

    def other_words(sample):
        labels = sample["labels"]
        sample["labels"] = np.where(labels >= 0, (labels + 1) % count, -1).astype(np.int32)
        return sample

    relabelled = copy_shards(root, tmp_path / "relabelled", other_words)
    flags = ["--model.vision.mode", "train", "--stage", "finetune", "--objective", "sea", "--max-steps", "1"]
    assert main(["run", *run_args(root, tmp_path / "a", *flags)]) == 0
    assert main(["run", *run_args(relabelled, tmp_path / "b", *flags)]) == 0
    (a,), (b,) = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    print(
        f"\nfirst step: lm {a['lm_loss']:.6f} / {b['lm_loss']:.6f}, sea {a['sea_loss']:.6f} / {b['sea_loss']:.6f}"
    )
    assert a["lm_loss"] == b["lm_loss"]
    assert abs(a["sea_loss"] - b["sea_loss"]) > 1e-3


def test_resume_with_a_trained_tower_is_exact(labelled, tmp_path):
    root = labelled("tiny-clip")
    common = run_args(root, "X", "--model.vision.mode", "train", "--model.vision.lr", "1e-4",
                      "--stage", "finetune", "--objective", "sea", "--max-steps", "4", "--save-every", "2",
                      "--num-workers", "1", "--lr", "1e-2")  # fmt: skip
    whole = [*common[:3], str(tmp_path / "whole"), *common[4:]]
    parts = [*common[:3], str(tmp_path / "parts"), *common[4:]]
    assert main(["run", *whole]) == 0
    assert main(["run", *parts, "--stop-after", "2"]) == 0
    assert main(["run", *parts, "--resume"]) == 0
    assert read_log(tmp_path / "parts") == read_log(tmp_path / "whole")
    assert len(read_log(tmp_path / "whole")) == 4
    for name in (ckpt_io.MODEL, ckpt_io.OPTIMIZER_TENSORS):
        w = load_file(ckpt_io.step_dir(tmp_path / "whole", 4) / name)
        p = load_file(ckpt_io.step_dir(tmp_path / "parts", 4) / name)
        assert any("vision." in k for k in w)
        assert w.keys() == p.keys() and all(torch.equal(w[k], p[k]) for k in w), name


# ---------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned_run(labelled, tmp_path_factory):
    """A finetune run that trained its tower at a rate large enough to move its outputs, and its export."""
    tmp = tmp_path_factory.mktemp("tuned")
    root = labelled("tiny-clip")
    flags = ["--model.vision.mode", "train", "--model.vision.lr", "1e-2", "--stage", "finetune",
             "--objective", "sea", "--max-steps", "2", "--lr", "1e-2"]  # fmt: skip
    assert main(["run", *run_args(root, tmp / "run", *flags)]) == 0
    assert main(["export", str(tmp / "run"), "--format", "hf-llava", "--out", str(tmp / "hf")]) == 0
    return root, tmp / "run", tmp / "hf"


def test_export_of_a_trained_tower_gives_our_logits(tuned_run):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from trainer.models.build import load_trained
    from trainer.models.vision import vision_weights

    root, run, out = tuned_run
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    loaded = load_trained(run, with_objectives=False)
    ours, tok = loaded.vlm, loaded.tokenizer
    assert ours.vision is not None and ours.vision.tuned

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8))
    enc = processor(text="<image>\nWhat is in the image?", images=image, return_tensors="pt")
    image_id = hf.config.image_token_index
    pixels_BCHW = Preprocess.from_dict(S.read_manifest(root).encoder.preprocess)(image)[None]
    torch.testing.assert_close(enc["pixel_values"], pixels_BCHW, atol=1e-6, rtol=0)
    ids_BT = enc["input_ids"].clone()
    start = int((ids_BT[0] == image_id).nonzero()[0])
    ids_BT[ids_BT == image_id] = tok.pad_token_id
    num_patches, width = S.read_manifest(root).num_patches, S.read_manifest(root).encoder.feature_dim
    batch = {
        "input_ids_BT": ids_BT, "labels_BT": torch.full_like(ids_BT, -100),
        "attention_mask_BT": torch.ones_like(ids_BT), "visual_start_B": torch.tensor([start]),
        "feats_BPD": torch.zeros(1, num_patches, width), "pixels_BCHW": pixels_BCHW,
    }  # fmt: skip
    with torch.no_grad():
        mine = ours(batch, return_logits=True).logits_BTN
        theirs = hf(input_ids=enc["input_ids"], pixel_values=pixels_BCHW,
                    attention_mask=torch.ones_like(ids_BT)).logits  # fmt: skip
    vocab = mine.shape[-1]
    diff = float((theirs[..., :vocab] - mine).abs().max())
    torch.testing.assert_close(theirs[..., :vocab], mine, atol=1e-4, rtol=1e-4)

    # the export carries the tuned tower: its blocks are ours, and the labelling tower would give other logits
    original = original_tower(root)
    exported = hf.model.vision_tower.state_dict()
    tuned = ours.vision.hf_state()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in exported) else ""
    assert all(torch.equal(exported[prefix + k], v) for k, v in tuned.items())
    untouched = set(vision_weights(original)) - set(tuned)  # the last block, the final norm
    assert untouched and all(
        torch.equal(exported[prefix + k], vision_weights(original)[k]) for k in untouched
    )
    hf.model.vision_tower.load_state_dict({prefix + k: v for k, v in vision_weights(original).items()})
    with torch.no_grad():
        before = hf(input_ids=enc["input_ids"], pixel_values=pixels_BCHW,
                    attention_mask=torch.ones_like(ids_BT)).logits  # fmt: skip
    moved = float((before[..., :vocab] - mine).abs().max())
    print(f"\nexport vs ours: max logit diff {diff:.2e}; with the labelling tower instead: {moved:.2e}")
    assert moved > 1e-3
    facts = json.loads((out / "visalign_export.json").read_text())
    assert facts["encoder"]["tuned_fingerprint"] not in (None, facts["encoder"]["fingerprint"])
    assert "trained with the LLM" in (out / "README.md").read_text()


def test_a_tuned_tower_refuses_cached_features(tuned_run, tmp_path, capsys):
    """Evaluation reads cached features, which a tuned tower no longer gives: `trainer eval` of such a run
    is one line naming the export, and so is a batch without pixels given to its model."""
    from trainer.models.build import load_trained
    from visalign.config import ConfigError

    root, run, _ = tuned_run
    assert main(["eval", str(run), "--shards", str(root), "--out", str(tmp_path / "eval")]) == 3
    err = capsys.readouterr().err
    assert "trainer export" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    vlm = load_trained(run, with_objectives=False).vlm
    batch = {"feats_BPD": torch.zeros(1, 4, 8)}
    with pytest.raises(ConfigError, match="trainer export"):
        vlm.features(batch)


# ---------------------------------------------------------------------------------------------------------
# refusals and bad samples
# ---------------------------------------------------------------------------------------------------------


def test_shards_without_images_are_refused_naming_the_fix(tiny_shards, tmp_path, capsys):
    shards = tiny_shards(num_samples=4)
    assert main(["run", *run_args(shards, tmp_path / "run", "--model.vision.mode", "frozen")]) == 3
    err = capsys.readouterr().err
    assert "pipeline label --store-images" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_tower_with_another_fingerprint_is_refused(labelled, tmp_path, capsys):
    from safetensors.torch import save_file

    root = labelled("tiny-clip")
    folder = Path(S.read_manifest(root).encoder.path)
    copy = tmp_path / "tower"
    shutil.copytree(folder, copy)
    weights_file = next(copy.glob("*.safetensors"))
    weights = load_file(weights_file)
    key = next(k for k in weights if "patch_embedding" in k)
    weights[key] = weights[key] + 1e-3
    save_file(weights, weights_file, metadata={"format": "pt"})
    code = main(["run", *run_args(root, tmp_path / "run", "--model.vision.mode", "train",
                                  "--model.vision.path", str(copy))])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 3 and "fingerprint" in err and "Traceback" not in err
    # the same folder unchanged is accepted
    shutil.rmtree(copy)
    shutil.copytree(folder, copy)
    assert main(["run", *run_args(root, tmp_path / "ok", "--model.vision.mode", "train", "--max-steps", "1",
                                  "--model.vision.path", str(copy))]) == 0  # fmt: skip


def test_periodic_evaluation_with_a_trained_tower_is_refused(labelled, tmp_path, capsys):
    root = labelled("tiny-clip")
    flags = ["--model.vision.mode", "train", "--eval.shards", str(root), "--eval.every", "1"]
    assert main(["run", *run_args(root, tmp_path / "run", *flags)]) == 3
    assert "--eval.every with --model.vision.mode train" in capsys.readouterr().err


def test_an_undecodable_stored_image_is_skipped_and_recorded(labelled, tmp_path):
    root = labelled("tiny-clip")

    def break_cat(sample):
        if sample["meta"]["id"] == "cat":
            sample["image_bytes"] = sample["image_bytes"][: len(sample["image_bytes"]) // 3]
        return sample

    broken = copy_shards(root, tmp_path / "broken", break_cat)
    flags = ["--model.vision.mode", "train", "--max-steps", "3", "--logging.seen_ids", "true"]
    assert main(["run", *run_args(broken, tmp_path / "run", *flags)]) == 0
    skipped = [json.loads(x) for x in (tmp_path / "run" / "skipped-rank0.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == ["cat"] and "stored image 'jpg'" in skipped[0]["reason"]
    seen = {json.loads(x)["id"] for x in (tmp_path / "run" / "seen-rank0.jsonl").read_text().splitlines()}
    assert "cat" not in seen and len(seen) == 5


# ---------------------------------------------------------------------------------------------------------
# memory estimate
# ---------------------------------------------------------------------------------------------------------


def test_memory_estimate_counts_the_tower(labelled, tmp_path):
    """The tower's parameters cost storage when frozen, and float32 weights + gradients + AdamW (16 B) plus
    the step's temporary (4 B) when trained; its activations appear on top of the LLM's."""
    from trainer.memory import MemoryPlan, estimate_memory, vision_activation_bytes
    from trainer.models.build import build_train_module

    root = labelled("tiny-clip")
    manifest = S.read_manifest(root)
    plan = MemoryPlan("ddp", 1, batch_size=2, seq_len=128)
    estimates = {}
    for mode in ("cached", "frozen", "train"):
        cfg = parse_run_args(run_args(root, tmp_path / mode, "--model.vision.mode", mode))
        module, _ = build_train_module(cfg, manifest, root, apply_stage_to="pretrain")
        estimates[mode] = (estimate_memory(module, plan), module)
    tower = estimates["train"][1].vlm.vision
    n = sum(p.numel() for p in tower.parameters())
    cached, frozen, train = (estimates[m][0] for m in ("cached", "frozen", "train"))
    assert frozen.parameters - cached.parameters == 4 * n and frozen.optimizer == cached.optimizer
    assert train.trainable - cached.trainable == n
    assert (train.gradients - cached.gradients, train.optimizer - cached.optimizer) == (4 * n, 12 * n)
    act_frozen = vision_activation_bytes(estimates["frozen"][1], plan)
    act_train = vision_activation_bytes(estimates["train"][1], plan)
    assert frozen.activations - cached.activations == act_frozen > 0
    assert train.activations - cached.activations == act_train > act_frozen


# ---------------------------------------------------------------------------------------------------------
# FSDP
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp_with_a_trained_tower_matches_ddp(labelled, cache_dir, tmp_path):
    """2 processes (gloo), mode train, stage 2, no clipping: the tower sharded as groups of its own gives
    DDP's losses at every step and DDP's final weights (tower included), bitwise."""
    from tests.launching import accelerate, run_many

    root = labelled("tiny-clip")
    runs = {
        strategy: run_args(root, tmp_path / strategy, "--model.vision.mode", "train", "--model.vision.lr", "1e-3",
                           "--stage", "finetune", "--objective", "sea", "--max-steps", "3", "--lr", "1e-2",
                           "--batch-size", "1", "--optim.max_grad_norm", "0", "--parallel.strategy", strategy)
        for strategy in ("ddp", "fsdp")
    }  # fmt: skip
    run_many(accelerate(), list(runs.values()), cache_dir, tmp_path)
    ddp, fsdp = read_log(tmp_path / "ddp"), read_log(tmp_path / "fsdp")
    assert len(ddp) == 3
    for a, b in zip(ddp, fsdp):
        assert {k: v for k, v in a.items() if k.endswith("_loss")} == {
            k: v for k, v in b.items() if k.endswith("_loss")
        }, a["step"]
    ckpt = ckpt_io.resolve_checkpoint(tmp_path / "fsdp")
    assert ckpt_io.read_state(ckpt)["format"] == "sharded"
    (wa, _), (wb, _) = (ckpt_io.read_weights(ckpt_io.resolve_checkpoint(tmp_path / "ddp")),
                        ckpt_io.read_weights(ckpt))  # fmt: skip
    assert any(k.startswith("vision.") for k in wa) and wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the tower was sharded: each process wrote its own half of a tower block's weight
    from safetensors import safe_open

    name = "vlm.vision.layers.0.mlp.fc1.weight"
    rows = []
    for path in sorted((ckpt / ckpt_io.SHARDED).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            rows.append(f.get_slice(name).get_shape()[0])
    assert len(rows) == 2 and rows[0] == rows[1] and sum(rows) == wb[name[len("vlm.") :]].shape[0]
