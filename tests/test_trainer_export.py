"""``trainer export --format hf-llava``: HF LLaVA loads the folder and its logits equal ours on the same image
(tiny-clip on the hf backend + tiny-llm, after a finetune step so projector and LLM both carry trained
weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer import checkpoint as ckpt_io
from trainer.cli import main
from visalign.shards import EncoderInfo, read_manifest, write_manifest

BASE = [
    "--llm",
    "tiny-llm",
    "--batch-size",
    "2",
    "--logging.progress",
    "false",
    "--logging.tensorboard",
    "false",
]


@pytest.fixture(scope="module")
def encoder(cache_dir):
    from pipeline.encoders import load_encoder

    return load_encoder("tiny-clip", backend="hf")


def clip_shards(tiny_shards, encoder, **kw):
    """Synthetic shards whose manifest names the real tiny-clip tower (features random: training only)."""
    info = encoder.info(-2)
    root = tiny_shards(num_samples=4, samples_per_shard=2, P=encoder.num_patches, D=encoder.feature_dim, **kw)
    manifest = read_manifest(root)
    manifest.encoder = EncoderInfo(**info)
    write_manifest(root, manifest)
    return root


def trained_run(tmp_path, shards, *extra):
    run = tmp_path / "run"
    args = ["run", "--shards", str(shards), *BASE, "--max-steps", "1", "--lr", "1e-2", "--output", str(run)]
    assert main([*args, *extra]) == 0
    return run


def our_model(run):
    from trainer.models.build import load_trained

    loaded = load_trained(run, with_objectives=False)
    return loaded.vlm, loaded.tokenizer


def test_exported_llava_logits_equal_ours(tiny_shards, encoder, tmp_path, cache_dir):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    run = trained_run(tmp_path, clip_shards(tiny_shards, encoder), "--stage", "finetune")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf-llava", "--out", str(out)]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    ours, tok = our_model(run)
    num_patches = encoder.num_patches
    image_id = hf.config.image_token_index
    assert tok.convert_tokens_to_ids("<image>") == image_id
    assert json.loads((out / "visalign_export.json").read_text())["num_image_tokens"] == num_patches

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8))
    enc = processor(text="<image>\nWhat is in the image?", images=image, return_tensors="pt")
    input_ids_BT = enc["input_ids"]
    assert int((input_ids_BT == image_id).sum()) == num_patches  # the processor expands <image> to P tokens
    pixels = encoder.preprocess(image)[None]
    # the exported processor preprocesses like the shards did, up to rare one-level (1/255) rounding
    diff = (enc["pixel_values"] - pixels).abs()
    assert diff.max() < 0.05 and diff.mean() < 1e-3

    with torch.no_grad():
        hf_logits = hf(
            input_ids=input_ids_BT, pixel_values=pixels, attention_mask=torch.ones_like(input_ids_BT)
        ).logits
        feats_BPD = encoder(pixels, -2).feats_BPD.float()
        start = int((input_ids_BT[0] == image_id).nonzero()[0])
        ids_BT = input_ids_BT.clone()
        ids_BT[ids_BT == image_id] = tok.pad_token_id  # the trainer never feeds <image>
        batch = {
            "input_ids_BT": ids_BT,
            "labels_BT": torch.full_like(ids_BT, -100),
            "attention_mask_BT": torch.ones_like(ids_BT),
            "visual_start_B": torch.tensor([start]),
            "feats_BPD": feats_BPD,
        }
        our_logits = ours(batch, return_logits=True).logits_BTN
    num_vocab = our_logits.shape[-1]
    assert hf_logits.shape[-1] == max(
        num_vocab, image_id + 1
    )  # room for <image> (resized when it was missing)
    torch.testing.assert_close(hf_logits[..., :num_vocab], our_logits, atol=1e-4, rtol=1e-4)
    assert our_logits.std() > 0.01  # not a degenerate comparison


def test_export_refuses_what_hf_llava_cannot_hold(tiny_shards, encoder, tmp_path, capsys):
    run = trained_run(tmp_path, clip_shards(tiny_shards, encoder), "--projector", "linear")
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 3
    assert "projector 'linear' has no HF LLaVA equivalent" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--checkpoint", "7"]) == 3
    assert "no complete checkpoint for step 7 (it has: step-000001)" in capsys.readouterr().err


def test_tower_is_the_one_that_labelled_the_shards(encoder, tmp_path):
    """The export's tower is reloaded with transformers alone and checked against the manifest."""
    import dataclasses

    from trainer.models.vision import TowerError, load_tower
    from visalign.shards import EncoderInfo

    info = EncoderInfo(**encoder.info(-2))
    model, model_type, path = load_tower(info)
    assert model_type == "clip" and path == encoder.path
    with pytest.raises(TowerError, match="relabel with --backend hf"):
        load_tower(dataclasses.replace(info, backend="open_clip"))
    with pytest.raises(TowerError, match="fingerprint"):
        load_tower(dataclasses.replace(info, fingerprint="0" * 64))
    with pytest.raises(TowerError, match="not an HF CLIP or SigLIP"):
        load_tower(info, path=str(tmp_path))


@pytest.mark.parametrize("name,strategy", [("tiny-clip", "default"), ("tiny-siglip", "full")])
def test_llava_vision_state_loads_into_llava(cache_dir, name, strategy):
    """The tower's weights land on LlavaForConditionalGeneration's vision keys; its image features equal our
    encoder's LLaVA features through the same projector."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from pipeline.encoders import load_encoder
    from trainer.models.vision import llava_vision_state, load_tower
    from visalign.shards import EncoderInfo

    ours = load_encoder(name, backend="hf")
    tower, _, _ = load_tower(EncoderInfo(**ours.info(-2)))
    vision_config, state = llava_vision_state(tower)
    text_config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=127,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).eval()
    missing, unexpected = llava.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "vision_tower" in k]
    assert len(state) == len(llava.model.vision_tower.state_dict())
    pixels = torch.randn(2, 3, ours.image_size, ours.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image_features = llava.model.get_image_features(pixel_values=pixels).pooler_output
        expected = llava.model.multi_modal_projector(ours(pixels, feature_layer=-2).feats_BPD)
    torch.testing.assert_close(torch.stack(list(image_features)), expected, rtol=1e-5, atol=1e-5)


def test_reverse_projectors_are_checkpointed_not_exported(tiny_shards, encoder, tmp_path):
    """A distill run keeps its reverse projector (and SEA's temperature) in the checkpoint's objectives file;
    the HF folder holds only what LlavaForConditionalGeneration has (no objective weights)."""
    from safetensors import safe_open

    run = trained_run(tmp_path, clip_shards(tiny_shards, encoder), "--objective", "sea+distill")
    objectives = ckpt_io.load_tensors(ckpt_io.resolve_checkpoint(run), ckpt_io.OBJECTIVES)
    assert any(k.startswith("distill.") for k in objectives) and any(k.startswith("sea.") for k in objectives)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf-llava", "--out", str(out)]) == 0
    exported = set()
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            exported |= set(f.keys())
    assert exported and any("multi_modal_projector" in k for k in exported)
    assert not any(k.startswith(("distill", "sea")) or "reverse" in k or "logit_scale" in k for k in exported)
