"""Experts from any HF vision backbone (``--experts [NAME=]hf:<folder or hub id>``).

Tiny random backbones of the real transformers classes are saved with their image processors into temporary
folders: DINOv2 (CLS + patches), DINOv2 with registers (CLS + 2 registers + patches) and SAM's ViT (a
``[B, h, w, C]`` map, no tokens in front). ``pipeline label`` caches their features; each is compared with a
direct transformers forward of the same preprocessed pixels (``AutoImageProcessor`` + ``AutoModel`` called
here, nothing of ``pipeline.encoders.backbone``). Then ``trainer run --objective distill`` trains on the
DINOv2 expert, whose 7 x 7 grid the trainer resizes to the labelling tower's 8 x 8.

Letters: B batch, T tokens, P patches, D width.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import LabelConfig
from pipeline.driver import run_label
from pipeline.encoders import EncoderError, load_expert, parse_expert
from visalign import shards as S

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """{kind: folder} of tiny random backbones saved with save_pretrained (model + image processor)."""
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        ResNetConfig,
        ResNetModel,
        SamImageProcessor,
        SamVisionConfig,
        SamVisionModel,
    )

    root = tmp_path_factory.mktemp("backbones")
    vit = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=4)  # fmt: skip
    # DINOv2's recipe: shortest side 256 -> centre crop 224, here 32 -> 28 (a 7 x 7 grid of 4 px patches)
    bit = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)  # fmt: skip
    folders = {}
    torch.manual_seed(0)
    for kind, model in (
        ("dinov2", Dinov2Model(Dinov2Config(**vit))),
        ("dinov2-reg", Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**vit, num_register_tokens=2))),
    ):
        folders[kind] = root / kind
        model.save_pretrained(folders[kind])
        bit.save_pretrained(folders[kind])
    sam = SamVisionModel(
        SamVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=64, patch_size=8,
                        window_size=4, global_attn_indexes=[2], output_channels=16, mlp_dim=64, num_pos_feats=8,
                        initializer_range=0.02)  # the default range (1e-10) leaves a random SAM near zero
    )  # fmt: skip
    folders["sam"] = root / "sam"
    sam.save_pretrained(folders["sam"])
    SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}).save_pretrained(
        folders["sam"]
    )
    folders["resnet"] = root / "resnet"
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])).save_pretrained(
        folders["resnet"]
    )
    bit.save_pretrained(folders["resnet"])
    folders["no-processor"] = root / "no-processor"
    Dinov2Model(Dinov2Config(**vit)).save_pretrained(folders["no-processor"])
    return folders


def direct_features(folder, images, layer: int) -> tuple[torch.Tensor, str]:
    """transformers alone: the folder's processor (PIL backend) -> AutoModel -> hidden_states[layer]."""
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(folder, backend="pil", trust_remote_code=False)
    model = AutoModel.from_pretrained(folder, trust_remote_code=False).eval()
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        states = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    return states[layer], type(processor).__name__


def label(tmp_path, photo_dataset, cache_dir, experts, **over):
    words = tmp_path / "w.txt"
    words.write_text("cat\ndog\ncup\nsky\ntree\nflag\n")
    cfg = LabelConfig(
        encoder="tiny-clip", input=str(photo_dataset), images=str(photo_dataset.parent / "images"),
        shards=str(tmp_path / "out"), wordlist=str(words), scheduler="synchronous", samples_per_shard=4,
        batch_size=2, top_k=3, progress=False, cache_dir=str(cache_dir), experts=experts, **over,
    )  # fmt: skip
    run_label(cfg)
    out = tmp_path / "out"
    m = S.read_manifest(out)
    return m, {s["meta"]["id"]: s for p in m.shard_paths(out) for s in S.iter_tar(p)}


def test_expert_features_equal_a_direct_hf_forward(tmp_path, photo_dataset, cache_dir, backbones):
    experts = [
        f"dino=hf:{backbones['dinov2']}",
        f"hf:{backbones['dinov2-reg']}",
        f"sam=hf:{backbones['sam']}",
    ]
    m, samples = label(tmp_path, photo_dataset, cache_dir, experts)
    by_name = {x.name: x for x in m.experts}
    assert sorted(by_name) == ["dino", "dinov2-reg", "sam"], "the name: NAME= or the folder's last part"
    dino, reg, sam = by_name["dino"], by_name["dinov2-reg"], by_name["sam"]
    assert (dino.model_type, dino.prefix_tokens, dino.patch_grid, dino.feature_dim) == (
        "dinov2",
        1,
        [7, 7],
        32,
    )
    assert (reg.model_type, reg.prefix_tokens, reg.patch_grid) == ("dinov2_with_registers", 3, [7, 7])
    assert (sam.model_type, sam.prefix_tokens, sam.patch_grid) == ("sam_vision_model", 0, [8, 8])
    assert dino.preprocess["class"] == "BitImageProcessorPil" and dino.preprocess["aspect"] == "crop"
    assert dino.preprocess["config"]["crop_size"] == {"height": 28, "width": 28}
    assert dino.path == str(backbones["dinov2"].resolve()) and dino.feature_layer == -2
    ids = sorted(samples)
    images = [Image.open(samples[i]["meta"]["source"]).convert("RGB") for i in ids]
    for name, folder, cut in (
        ("dino", backbones["dinov2"], lambda s: s[:, 1:]),
        ("dinov2-reg", backbones["dinov2-reg"], lambda s: s[:, 3:]),  # [CLS, 2 registers, patches]
        ("sam", backbones["sam"], lambda s: s.flatten(1, 2)),  # [B, h, w, C] row-major
    ):
        states, processor_class = direct_features(folder, images, -2)
        want_BPD = cut(states)
        got_BPD = torch.from_numpy(np.stack([samples[i][f"expert.{name}"] for i in ids]).astype(np.float32))
        diff = (got_BPD - want_BPD).abs().max().item()
        print(f"\nexpert {name}: shards {tuple(got_BPD.shape)} vs direct HF forward {tuple(want_BPD.shape)}, "
              f"max abs diff {diff:.2e} (fp16 storage; values up to {want_BPD.abs().max().item():.2f})")  # fmt: skip
        assert got_BPD.shape == want_BPD.shape and got_BPD.dtype == torch.float32
        torch.testing.assert_close(got_BPD, want_BPD.half().float(), rtol=2e-3, atol=2e-3)
        assert by_name[name].preprocess["class"] == processor_class
    # the registers are really dropped: the first three tokens are not patches
    states, _ = direct_features(backbones["dinov2-reg"], images[:1], -2)
    got = samples[ids[0]]["expert.dinov2-reg"].astype(np.float32)
    assert np.abs(got - states[0, 1:-2].numpy()).max() > 0.1


def test_expert_aspect_pad_uses_its_own_mean_colour(tmp_path, photo_dataset, cache_dir, backbones):
    """--image-aspect pad: each expert pads with its own processor's mean colour, then its processor."""
    from visalign.images import expand_to_square

    m, samples = label(
        tmp_path, photo_dataset, cache_dir, [f"dino=hf:{backbones['dinov2']}"], image_aspect="pad"
    )
    spec = m.experts[0].preprocess
    assert spec["aspect"] == "pad" and spec["pad_color"] == [int(x * 255) for x in IMAGENET_MEAN]
    key = next(
        i for i in sorted(samples) if samples[i]["meta"]["orig_size"][0] != samples[i]["meta"]["orig_size"][1]
    )
    image = Image.open(samples[key]["meta"]["source"]).convert("RGB")
    states, _ = direct_features(backbones["dinov2"], [expand_to_square(image, tuple(spec["pad_color"]))], -2)
    torch.testing.assert_close(
        torch.from_numpy(samples[key]["expert.dino"].astype(np.float32)), states[0, 1:].half().float(),
        rtol=2e-3, atol=2e-3,
    )  # fmt: skip


def test_distill_trains_on_an_hf_expert(tmp_path, photo_dataset, cache_dir, backbones):
    """Cached DINOv2 features (7 x 7) distilled by `trainer run --objective distill` on the 8 x 8 tower grid;
    the shards also carry the image bytes (schema 3), which the trainer's reader passes over."""
    from trainer.cli import parse_run_args
    from trainer.train import Trainer

    m, _ = label(tmp_path, photo_dataset, cache_dir, [f"dino=hf:{backbones['dinov2']}"], store_images=True)
    assert m.stores_images and m.schema_version == 3
    run = tmp_path / "run"
    cfg = parse_run_args(
        ["--shards", str(tmp_path / "out"), "--output", str(run), "--llm", "tiny-llm", "--batch-size", "2",
         "--objective", "distill", "--max-steps", "3", "--lr", "1e-2", "--logging.progress", "false",
         "--logging.tensorboard", "false"]
    )  # fmt: skip
    trainer = Trainer(cfg)
    objective = trainer.objectives["distill"]
    assert objective.target_grids["dino"] == (7, 7) and objective.grid_hw == (8, 8)
    assert all(per_layer["dino"][-1].out_features == 32 for per_layer in objective.reverse.values())
    trainer.train()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    losses = [r["distill_loss"] for r in log]
    print(f"\ndistill with an HF DINOv2 expert: losses {[round(x, 4) for x in losses]}, "
          f"cos to dino {[round(r['distill/cos_dino'], 4) for r in log]}")  # fmt: skip
    assert all(math.isfinite(x) for x in losses) and all(-1.0 <= r["distill/cos_dino"] <= 1.0 for r in log)


def test_unusable_backbones_are_one_line_errors(backbones, tmp_path, monkeypatch):
    cases = [
        (f"hf:{tmp_path / 'nowhere'}", "does not exist"),
        (f"hf:{backbones['resnet']}", "model_type 'resnet' has no patch tokens"),
        (f"hf:{backbones['no-processor']}", "no image processor"),
        ("hf:visalign-test/not-a-cached-model", "not in the HF cache"),
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec, needle in cases:
        with pytest.raises(EncoderError) as err:
            load_expert(spec)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_expert_names(backbones):
    assert parse_expert("hf:facebook/dinov2-small").name == "dinov2-small"
    assert parse_expert("hf:/models/dinov2 base/").name == "dinov2_base"
    assert parse_expert("d=hf:/x").name == "d" and parse_expert("tiny-siglip").name == "tiny-siglip"
    for bad in ("encoder=tiny-siglip", "hf:"):
        with pytest.raises(EncoderError):
            parse_expert(bad)


def test_backbones_load_without_remote_code(backbones, monkeypatch):
    import transformers

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModel, transformers.AutoImageProcessor):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", "absent")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_expert(f"hf:{backbones['dinov2']}")
    assert {name for name, _ in seen} == {"AutoConfig", "AutoModel", "AutoImageProcessor"}
    assert all(flag is False for _, flag in seen), seen
