"""``trainer export``: the HF LLaVA folder (logits equal ours, processor, chat template, dtypes, model card,
padding to square), a moved run exported with ``--encoder-path``, and LLaVA's ``mm_projector.bin``.

Runs use tiny-clip on the hf backend + tiny-llm; a finetune step makes projector and LLM both carry trained
weights. Loading in the oldest supported transformers is ``tests/test_compat.py``."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from trainer import checkpoint as ckpt_io
from trainer.cli import main
from visalign.hashing import digest_of
from visalign.shards import EncoderInfo, read_manifest, write_manifest

BASE = [
    "--llm",
    "tiny-llm",
    "--batch-size",
    "2",
    "--logging.progress",
    "false",
    "--logging.report-to",
    "none",
]
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def encoder(cache_dir):
    from pipeline.encoders import load_encoder

    return load_encoder("tiny-clip", backend="hf")


def clip_shards(tiny_shards, encoder, **info_changes):
    """Synthetic shards whose manifest names the real tiny-clip tower (features random: training only)."""
    info = {**encoder.info(-2), **info_changes}
    root = tiny_shards(num_samples=4, samples_per_shard=2, P=encoder.num_patches, D=encoder.feature_dim)
    manifest = read_manifest(root)
    manifest.encoder = EncoderInfo(**info)
    write_manifest(root, manifest)
    return root


def trained_run(tmp_path, shards, *extra, name="run"):
    run = tmp_path / name
    args = ["run", "--shards", str(shards), *BASE, "--max-steps", "1", "--lr", "1e-2", "--output", str(run)]
    assert main([*args, *extra]) == 0
    return run


def our_model(run):
    from trainer.models.build import load_trained

    loaded = load_trained(run, with_objectives=False)
    return loaded.vlm, loaded.tokenizer


def our_logits(vlm, tok, encoder, input_ids_BT, pixels, image_id):
    """Our VisualLM's logits for the ids the HF processor built (the <image> run replaced by our slots)."""
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
    with torch.no_grad():
        return vlm(batch, return_logits=True).logits_BTN


def random_image(h=40, w=52, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, encoder):
    """One finetuned run (shared by the read-only tests below) and its fp32 export."""
    from tests.conftest import write_tiny_shards

    tmp = tmp_path_factory.mktemp("finetuned")
    shards = write_tiny_shards(tmp / "shards", num_samples=4, P=encoder.num_patches, D=encoder.feature_dim)
    manifest = read_manifest(shards)
    manifest.encoder = EncoderInfo(**encoder.info(-2))
    write_manifest(shards, manifest)
    run = trained_run(tmp, shards, "--stage", "finetune", "--objective", "sea")
    out = tmp / "hf"
    assert main(["export", str(run), "--format", "hf-llava", "--out", str(out)]) == 0
    return run, out, shards


def test_exported_llava_logits_equal_ours(finetuned, encoder):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    run, out, _ = finetuned
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    ours, tok = our_model(run)
    num_patches = encoder.num_patches
    image_id = hf.config.image_token_index
    assert tok.convert_tokens_to_ids("<image>") == image_id
    assert json.loads((out / "visalign_export.json").read_text())["num_image_tokens"] == num_patches

    image = random_image()
    enc = processor(text=f"<image>\n{QUESTION}", images=image, return_tensors="pt")
    input_ids_BT = enc["input_ids"]
    assert int((input_ids_BT == image_id).sum()) == num_patches  # the processor expands <image> to P tokens
    pixels = encoder.preprocess(image)[None]
    # the PIL processor repeats the shards' preprocessing exactly
    torch.testing.assert_close(enc["pixel_values"], pixels, atol=1e-6, rtol=0)

    with torch.no_grad():
        hf_logits = hf(
            input_ids=input_ids_BT, pixel_values=pixels, attention_mask=torch.ones_like(input_ids_BT)
        ).logits
    mine = our_logits(ours, tok, encoder, input_ids_BT, pixels, image_id)
    num_vocab = mine.shape[-1]
    assert hf_logits.shape[-1] == max(num_vocab, image_id + 1)  # room for <image> (resized when missing)
    torch.testing.assert_close(hf_logits[..., :num_vocab], mine, atol=1e-4, rtol=1e-4)
    assert mine.std() > 0.01  # not a degenerate comparison


def test_chat_template_takes_strings_and_content_lists(finetuned):
    """HF content lists and plain strings with <image> render to the same prompt, which is the LLM's own
    template applied to the trainer's text (<image> first, then the question)."""
    from transformers import AutoProcessor, AutoTokenizer

    _, out, _ = finetuned
    processor = AutoProcessor.from_pretrained(out)
    as_list = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    as_string = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    prompt = processor.apply_chat_template(as_list, add_generation_prompt=True)
    assert prompt == processor.apply_chat_template(as_string, add_generation_prompt=True)
    assert prompt == f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"  # ChatML
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template(as_list, tokenize=False, add_generation_prompt=True) == prompt
    multi = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "And the colour?"},
    ]
    assert processor.apply_chat_template(multi) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nLook:\n<image><|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nAnd the colour?<|im_end|>\n"
    )
    with pytest.raises(Exception, match="unsupported content type video"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


def test_vicuna_trained_export_is_prompted_in_vicuna(finetuned, tmp_path):
    """A run trained with --data.conv-template vicuna_v1 ships a chat template that prompts in vicuna_v1 (the
    LLM's own ChatML would ask a question the model never saw)."""
    from transformers import AutoProcessor

    _, _, shards = finetuned
    run = trained_run(tmp_path, shards, "--stage", "finetune", "--data.conv-template", "vicuna_v1")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf-llava", "--out", str(out)]) == 0
    processor = AutoProcessor.from_pretrained(out)
    as_list = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    system = "A chat between a curious user and an artificial intelligence assistant. "
    assert processor.apply_chat_template(as_list, add_generation_prompt=True) == (
        system + "The assistant gives helpful, detailed, and polite answers to the user's questions. "
        f"USER: <image>\n{QUESTION} ASSISTANT:"
    )
    assert json.loads((out / "visalign_export.json").read_text())["conversation_format"] == "vicuna_v1"


def test_generate_from_a_raw_image_through_autoprocessor(finetuned):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _, out, _ = finetuned
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=random_image(61, 37), return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}  # no token_type_ids
    with torch.no_grad():
        ids = hf.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_model_card_names_what_made_the_model(finetuned, encoder):
    import visalign

    run, out, shards = finetuned
    card = (out / "README.md").read_text()
    info = json.loads((out / "visalign_export.json").read_text())
    manifest = read_manifest(shards)
    digest = digest_of(manifest.to_dict())
    assert info["shards"]["manifest_digest"] == digest and f"sha256:{digest}" in card
    assert "`tiny-llm`" in card and "`tiny-clip`" in card and encoder.fingerprint()[:16] in card
    assert "lm x 1, sea x 1" in card  # objectives with their loss weights
    assert "| steps | 1 of 1 |" in card and "| stage | finetune |" in card
    assert f"| visalign | {visalign.__version__} |" in card
    assert info["loss_weights"] == {"lm_loss": 1.0, "sea_loss": 1.0} and info["step"] == 1
    assert info["preprocess"] == manifest.encoder.preprocess and info["preprocess_gaps"] == []


def test_export_dtypes(finetuned, tmp_path):
    """bf16 / fp16 exports hold those tensors, say so in the config, and stay close to the fp32 export."""
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    run, fp32_out, _ = finetuned
    ref = LlavaForConditionalGeneration.from_pretrained(fp32_out, dtype=torch.float32).eval()
    ids_BT = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref_logits = ref(input_ids=ids_BT).logits
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out = tmp_path / name
        assert main(["export", str(run), "--out", str(out), "--dtype", name]) == 0
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
        config = json.loads((out / "config.json").read_text())
        assert config["dtype"] == config["torch_dtype"] == str(dtype).removeprefix("torch.")
        model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=ids_BT).logits
        err = (logits - ref_logits).abs().max().item()
        assert 0 < err < 0.05 * ref_logits.abs().max().item()  # rounded, not broken
    size = {p.name: (p / "model.safetensors").stat().st_size for p in (fp32_out, tmp_path / "bf16")}
    assert size["bf16"] < 0.55 * size[fp32_out.name]


def test_export_refuses_what_hf_llava_cannot_hold(tiny_shards, encoder, tmp_path, capsys):
    run = trained_run(tmp_path, clip_shards(tiny_shards, encoder), "--projector", "linear")
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 3
    assert "projector 'linear' has no HF LLaVA equivalent" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--checkpoint", "7"]) == 3
    assert "no complete checkpoint for step 7 (it has: step-000001)" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    assert main(["export", str(run), "--out", str(busy), "--format", "llava-projector"]) == 3
    assert "already exists and is not empty" in capsys.readouterr().err
    # nothing half-written is left behind by a refused export
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))


def test_tower_is_the_one_that_labelled_the_shards(encoder, tmp_path):
    """The export's tower is reloaded with transformers alone and checked against the manifest."""
    from trainer.models.vision import TowerError, load_tower

    info = EncoderInfo(**encoder.info(-2))
    model, model_type, path = load_tower(info)
    assert model_type == "clip" and path == encoder.path
    with pytest.raises(TowerError, match="relabel with --backend hf"):
        load_tower(dataclasses.replace(info, backend="open_clip"))
    with pytest.raises(TowerError, match="fingerprint"):
        load_tower(dataclasses.replace(info, fingerprint="0" * 64))
    with pytest.raises(TowerError, match="is not an HF checkpoint folder"):
        load_tower(info, path=str(tmp_path))


def test_moved_run_exports_and_evaluates_with_encoder_path(tiny_shards, encoder, tmp_path, capsys):
    """The labelling machine's tower folder is gone: export refuses with a message naming --encoder-path and
    succeeds with a copy of the tower (fingerprint checked, another tower refused); eval needs no tower."""
    labelling = tmp_path / "labelling-machine" / "tiny-clip"
    shutil.copytree(encoder.path, labelling)
    shards = clip_shards(tiny_shards, encoder, path=str(labelling))
    run = trained_run(tmp_path, shards)
    moved = tmp_path / "elsewhere"
    shutil.move(str(run), str(moved / "run"))
    shutil.move(str(shards), str(moved / "shards"))
    shutil.move(str(labelling), str(moved / "tower"))
    shutil.rmtree(tmp_path / "labelling-machine")

    out = moved / "hf"
    assert main(["export", str(moved / "run"), "--out", str(out)]) == 3
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("trainer export: error:")]
    assert f"from {labelling}, which is not on this machine: pass --encoder-path DIR" in line
    assert not out.exists()

    from pipeline.encoders import load_encoder

    other = load_encoder("tiny-siglip", backend="hf").path
    assert main(["export", str(moved / "run"), "--out", str(out), "--encoder-path", other]) == 3
    assert "point --encoder-path at the weights that labelled the shards" in capsys.readouterr().err

    assert (
        main(["export", str(moved / "run"), "--out", str(out), "--encoder-path", str(moved / "tower")]) == 0
    )
    assert json.loads((out / "visalign_export.json").read_text())["encoder_loaded_from"] == str(
        moved / "tower"
    )
    metrics = moved / "eval"
    args = ["eval", str(moved / "run"), "--shards", str(moved / "shards"), "--out", str(metrics)]
    assert main([*args, "--samples", "2", "--pictures", "1"]) == 0
    payload = json.loads((metrics / "metrics.json").read_text())
    assert payload["checkpoint_step"] == 1 and payload["counts"]["samples"] == 2


def test_processor_pads_to_square_like_llava(tmp_path):
    """``aspect: pad``: LlavaImageProcessor pads like LLaVA's expand2square (centred, colour int(255 x mean))
    and then resizes: the same pixels as padding by hand and preprocessing the square image."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from trainer.models.vision import image_processor_config
    from visalign.images import CLIP_MEAN, CLIP_STD, Preprocess

    def expand2square(image, colour):  # LLaVA's own (llava/mm_utils.py), written out as the reference
        w, h = image.size
        side = max(w, h)
        canvas = Image.new(image.mode, (side, side), tuple(colour))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas

    colour = [int(m * 255) for m in CLIP_MEAN]
    spec = Preprocess(32, CLIP_MEAN, CLIP_STD)
    cases = {
        "pad": (
            {**spec.to_dict(), "aspect": "pad", "pad_color": colour},
            lambda im: spec(expand2square(im, colour)),
        ),
        "crop": ({**spec.to_dict(), "aspect": "crop"}, spec),
        "resize": (
            {**spec.to_dict(), "aspect": "resize"},
            Preprocess(32, CLIP_MEAN, CLIP_STD, resize_mode="squash"),
        ),
    }
    for name, (preprocess, reference) in cases.items():
        config, gaps = image_processor_config(preprocess)
        assert gaps == []
        folder = tmp_path / name
        folder.mkdir()
        (folder / "preprocessor_config.json").write_text(json.dumps(config))
        processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
        pipeline_spec = Preprocess.from_dict(preprocess)  # what `pipeline label` fed the encoder
        for h, w in ((40, 71), (67, 30), (33, 33)):
            image = random_image(h, w, seed=h)
            ours = processor(images=image, return_tensors="pt")["pixel_values"][0]
            torch.testing.assert_close(ours, reference(image), atol=1e-5, rtol=0, msg=f"{name} {h}x{w}")
            torch.testing.assert_close(ours, pipeline_spec(image), atol=1e-5, rtol=0, msg=f"{name} {h}x{w}")
        if name == "pad":  # the border really is the mean colour: normalised, it is ~0
            padded = processor(images=random_image(20, 64), return_tensors="pt")["pixel_values"][0]
            assert padded[:, 0, :].abs().max() < 0.02

    config, gaps = image_processor_config({**spec.to_dict(), "aspect": "pad", "pad_color": [0, 0, 0]})
    assert (
        config["do_pad"] and len(gaps) == 1 and "pads with int(255 x image_mean) = [122, 116, 104]" in gaps[0]
    )


def test_llava_projector_file_loads_like_llava(tiny_shards, encoder, tmp_path):
    """``mm_projector.bin`` is a plain dict of tensors (weights_only load) whose keys LLaVA's get_w maps onto
    its projector module, strictly; the module then computes what ours does."""
    from torch import nn

    from trainer.models.build import load_trained

    def get_w(weights, keyword):  # LLaVA's llava_arch.py, as its --pretrain_mm_mlp_adapter loads
        return {k.split(keyword + ".")[1]: v for k, v in weights.items() if keyword in k}

    shards = clip_shards(tiny_shards, encoder)
    for projector, dtype in (("mlp2x_gelu", "fp32"), ("linear", "bf16")):
        run = trained_run(tmp_path, shards, "--projector", projector, name=f"run-{projector}")
        out = tmp_path / f"adapter-{projector}"
        assert (
            main(["export", str(run), "--format", "llava-projector", "--out", str(out), "--dtype", dtype])
            == 0
        )
        weights = torch.load(out / "mm_projector.bin", map_location="cpu", weights_only=True)
        assert type(weights) is dict and all(type(v) is torch.Tensor for v in weights.values())
        d, D = 64, encoder.feature_dim
        if projector == "mlp2x_gelu":
            assert sorted(weights) == [
                f"model.mm_projector.{k}" for k in ("0.bias", "0.weight", "2.bias", "2.weight")
            ]
            llava = nn.Sequential(nn.Linear(D, d), nn.GELU(), nn.Linear(d, d))
        else:
            assert sorted(weights) == ["model.mm_projector.bias", "model.mm_projector.weight"]
            llava = nn.Linear(D, d)
        assert {v.dtype for v in weights.values()} == {torch.float32 if dtype == "fp32" else torch.bfloat16}
        llava.load_state_dict(get_w(weights, "mm_projector"))  # strict, as LLaVA loads it
        ours = load_trained(run, with_objectives=False).vlm.projector
        feats_ND = torch.randn(5, D)
        with torch.no_grad():
            tol = 0 if dtype == "fp32" else 0.05
            torch.testing.assert_close(llava(feats_ND), ours(feats_ND), atol=tol, rtol=tol)
        card = (out / "README.md").read_text()
        assert f"--mm_projector_type {projector}" in card and "--mm_vision_select_layer -2" in card


@pytest.mark.parametrize("name,strategy", [("tiny-clip", "default"), ("tiny-siglip", "full")])
def test_llava_vision_state_loads_into_llava(cache_dir, name, strategy):
    """The tower's weights land on LlavaForConditionalGeneration's vision keys; its image features equal our
    encoder's LLaVA features through the same projector."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from pipeline.encoders import load_encoder
    from trainer.models.vision import llava_vision_state, load_tower

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
