"""Vision-encoder registry: every output checked against an independent computation on real photos.

Tiny towers are built once per session into the ``cache_dir`` fixture and loaded back from disk. References
are computed with the backends' own entry points (HF ``*VisionModel`` loaded separately, open_clip
``encode_image`` with forward hooks, the processors) or by hand from raw weights.

Letters: B batch, T tokens (with CLS), P patches, D vision width, E joint width.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.encoders import ENCODERS, EncoderError, load_encoder
from visalign.registry import UnknownNameError

TOWERS = [
    ("tiny-clip", "hf"),
    ("tiny-clip", "open_clip"),
    ("tiny-siglip", "hf"),
    ("tiny-siglip", "open_clip"),
]
WORDS = ["cat", "a photo of a dog.", "rocket", "espresso cup", "temple"]


@pytest.fixture(scope="session")
def encoders(cache_dir):
    return {
        (name, backend): load_encoder(name, backend=backend, cache_dir=cache_dir) for name, backend in TOWERS
    }


@pytest.fixture(scope="session")
def photos(photo_dataset) -> list[Image.Image]:
    images = sorted((Path(photo_dataset).parent / "images").glob("*.jpg"))
    photos = [Image.open(p).convert("RGB") for p in images]
    # a crop with an odd excess after resizing (67 x 64 -> 3 columns to crop): the backends round differently
    photos.append(photos[0].crop((0, 0, 67, 64)))
    return photos


@pytest.fixture(scope="session")
def pixels(encoders, photos):
    """Preprocessed photos per tower kind (CLIP and SigLIP preprocess differently)."""
    return {key: torch.stack([enc.preprocess(p) for p in photos[:4]]) for key, enc in encoders.items()}


def _forward(encoder, pixels_BCHW, feature_layer=-2):
    with torch.no_grad():
        return encoder(pixels_BCHW, feature_layer=feature_layer)


# ------------------------------------------------------------ 1. reload
@pytest.mark.parametrize("name,backend", TOWERS)
def test_reload_gives_identical_outputs(encoders, pixels, cache_dir, name, backend):
    first = encoders[(name, backend)]
    folder = Path(cache_dir) / "encoders" / f"{name}-{backend}"
    assert (folder / ".complete").is_file()
    again = load_encoder(name, backend=backend, cache_dir=cache_dir)
    assert again is not first
    out1, out2 = _forward(first, pixels[(name, backend)]), _forward(again, pixels[(name, backend)])
    num_patches = first.patch_grid[0] * first.patch_grid[1]
    assert out1.feats_BPD.shape == (4, num_patches, first.feature_dim)
    assert out1.joint_BPE.shape == (4, num_patches, first.joint_dim)
    assert torch.equal(out1.feats_BPD, out2.feats_BPD)
    assert torch.equal(out1.joint_BPE, out2.joint_BPE)
    text1, text2 = first.encode_text(WORDS), again.encode_text(WORDS)
    assert text1.shape == (len(WORDS), first.joint_dim)
    assert torch.equal(text1, text2)
    assert first.fingerprint() == again.fingerprint()
    # random weights are not all-equal outputs: the comparison above is not vacuous
    assert out1.feats_BPD.std() > 0 and text1.std() > 0


@pytest.mark.parametrize("name,backend", TOWERS)
def test_build_is_deterministic(encoders, tmp_path, name, backend):
    """A second build from the seed (another folder) gives the same weights, hence the same fingerprint."""
    other = load_encoder(name, backend=backend, cache_dir=tmp_path)
    assert other.path != encoders[(name, backend)].path
    assert other.fingerprint() == encoders[(name, backend)].fingerprint()


# ------------------------------------------------------------ 2. feats
def _openclip_block_outputs(encoder, pixels_BCHW):
    """Hidden states from forward hooks on the blocks while open_clip runs its own ``encode_image``."""
    visual = encoder.model.visual
    blocks = visual.transformer.resblocks if hasattr(visual, "transformer") else visual.trunk.blocks
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in blocks]
    try:
        with torch.no_grad():
            encoder.model.encode_image(pixels_BCHW)
    finally:
        for h in hooks:
            h.remove()
    return outputs


@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
@pytest.mark.parametrize("name,backend", TOWERS)
def test_feats_equal_backend_hidden_states(encoders, pixels, name, backend, feature_layer):
    encoder, pix = encoders[(name, backend)], pixels[(name, backend)]
    feats_BPD = _forward(encoder, pix, feature_layer).feats_BPD
    num_prefix = 1 if name == "tiny-clip" else 0
    if backend == "hf":
        from transformers import CLIPVisionModel, SiglipVisionModel

        cls = CLIPVisionModel if name == "tiny-clip" else SiglipVisionModel
        tower = cls.from_pretrained(encoder.path).eval()  # an independent load of the vision tower alone
        with torch.no_grad():
            states = tower(pixel_values=pix, output_hidden_states=True).hidden_states
        ref_BPD = states[feature_layer][:, num_prefix:]
    else:
        blocks = _openclip_block_outputs(encoder, pix)
        index = feature_layer % (len(blocks) + 1)  # hidden state i = output of block i (1-based)
        ref_BPD = blocks[index - 1][:, num_prefix:]
    torch.testing.assert_close(feats_BPD, ref_BPD, rtol=1e-5, atol=1e-5)


def test_bad_feature_layer_and_pixels_are_clear_errors(encoders, pixels):
    encoder = encoders[("tiny-clip", "hf")]
    with pytest.raises(EncoderError, match="feature_layer=7"):
        encoder(pixels[("tiny-clip", "hf")], feature_layer=7)
    with pytest.raises(ValueError, match="preprocess"):
        encoder(torch.zeros(2, 3, 32, 32))


# ------------------------------------------------------------ 3. joint
def test_joint_hf_clip_matches_projection_of_tokens(encoders, pixels):
    encoder, pix = encoders[("tiny-clip", "hf")], pixels[("tiny-clip", "hf")]
    model = encoder.model
    joint_BPE = _forward(encoder, pix).joint_BPE
    with torch.no_grad():
        last_BTD = model.vision_model(pixel_values=pix).last_hidden_state  # before post_layernorm
        ref_BTE = model.visual_projection(model.vision_model.post_layernorm(last_BTD))
        image_BE = model.get_image_features(pixel_values=pix)
    image_BE = getattr(image_BE, "pooler_output", image_BE)
    # the same recipe on the CLS token IS CLIP's image embedding: the patches share its joint space
    torch.testing.assert_close(ref_BTE[:, 0], image_BE, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(joint_BPE, ref_BTE[:, 1:], rtol=1e-5, atol=1e-5)


def test_joint_openclip_clip_matches_output_tokens(encoders, pixels):
    encoder, pix = encoders[("tiny-clip", "open_clip")], pixels[("tiny-clip", "open_clip")]
    visual = encoder.model.visual
    joint_BPE = _forward(encoder, pix).joint_BPE
    visual.output_tokens = True
    try:
        with torch.no_grad():
            pooled_BE, tokens_BPD = visual(pix)
    finally:
        visual.output_tokens = False
    torch.testing.assert_close(joint_BPE, tokens_BPD @ visual.proj, rtol=1e-5, atol=1e-5)


def _map_head_by_hand(token_D, v_weight, v_bias, out_proj, norm, mlp):
    """MAP pooling of a single token: softmax over one key is 1, so attention = out_proj(v_proj(token))."""
    attended = out_proj(F.linear(token_D[None], v_weight, v_bias))
    return (attended + mlp(norm(attended)))[0]


def test_joint_hf_siglip_is_head_on_each_token(encoders, pixels):
    encoder, pix = encoders[("tiny-siglip", "hf")], pixels[("tiny-siglip", "hf")]
    vision = encoder.model.vision_model
    joint_BPE = _forward(encoder, pix).joint_BPE
    head = vision.head
    width = encoder.feature_dim
    with torch.no_grad():
        tokens_BPD = vision(pixel_values=pix).last_hidden_state  # post_layernorm applied
        pooled_BE = encoder.model.get_image_features(pixel_values=pix)
        for b, p in [(0, 0), (1, 17), (3, 63)]:
            via_head = head(tokens_BPD[b, p][None, None])[0]
            attn = head.attention
            by_hand = _map_head_by_hand(
                tokens_BPD[b, p],
                attn.in_proj_weight[2 * width :],
                attn.in_proj_bias[2 * width :],
                attn.out_proj,
                head.layernorm,
                head.mlp,
            )
            torch.testing.assert_close(joint_BPE[b, p], via_head, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(joint_BPE[b, p], by_hand, rtol=1e-4, atol=1e-5)
    pooled_BE = getattr(pooled_BE, "pooler_output", pooled_BE)
    assert pooled_BE.shape[-1] == joint_BPE.shape[-1] == encoder.encode_text(["cat"]).shape[-1]


def test_joint_openclip_siglip_is_attn_pool_on_each_token(encoders, pixels):
    encoder, pix = encoders[("tiny-siglip", "open_clip")], pixels[("tiny-siglip", "open_clip")]
    trunk = encoder.model.visual.trunk
    joint_BPE = _forward(encoder, pix).joint_BPE
    pool = trunk.attn_pool
    width = encoder.feature_dim
    with torch.no_grad():
        tokens_BPD = trunk.forward_features(pix)
        for b, p in [(0, 0), (2, 30), (3, 63)]:
            via_pool = pool(tokens_BPD[b, p][None, None])[0]
            by_hand = _map_head_by_hand(
                tokens_BPD[b, p], pool.kv.weight[width:], pool.kv.bias[width:], pool.proj, pool.norm, pool.mlp
            )
            torch.testing.assert_close(joint_BPE[b, p], via_pool, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(joint_BPE[b, p], by_hand, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------ text
def test_hf_tokenizer_matches_openclip_bpe(encoders):
    """The HF tokenizer converted from open_clip's BPE file gives open_clip's ids."""
    hf_tok = encoders[("tiny-clip", "hf")].tokenizer
    oc_tok = encoders[("tiny-clip", "open_clip")].tokenizer
    for text in WORDS + ["Hello, World! 123", "naïve café"]:
        oc_ids = oc_tok([text])[0]
        oc_ids = oc_ids[: int((oc_ids != 0).sum())].tolist()
        assert hf_tok(text)["input_ids"] == oc_ids, text


def test_text_context_truncation_keeps_embeddings(encoders, cache_dir):
    """open_clip: a sliced positional embedding and causal mask give the full-context embeddings; hf: the
    option really truncates (padding to the longest text already leaves embeddings unchanged there)."""
    full = encoders[("tiny-clip", "open_clip")]
    short = load_encoder("tiny-clip", backend="open_clip", cache_dir=cache_dir, text_context=16)
    torch.testing.assert_close(short.encode_text(WORDS), full.encode_text(WORDS), rtol=1e-5, atol=1e-5)
    short_hf = load_encoder("tiny-clip", backend="hf", cache_dir=cache_dir, text_context=16)
    assert short_hf._tokenize(["cat " * 40])["input_ids"].shape == (1, 16)


def test_hf_text_matches_model_text_features(encoders):
    encoder = encoders[("tiny-clip", "hf")]
    enc = encoder.tokenizer(WORDS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = encoder.model.get_text_features(**enc)
    ref = getattr(ref, "pooler_output", ref)
    torch.testing.assert_close(encoder.encode_text(WORDS), ref, rtol=1e-5, atol=1e-5)


def test_siglip_refuses_text_context(cache_dir):
    with pytest.raises(EncoderError, match="SigLIP"):
        load_encoder("tiny-siglip", cache_dir=cache_dir, text_context=16)


# ------------------------------------------------------------ 4. preprocess
@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_preprocess_matches_hf_processors(encoders, photos, name):
    from transformers import AutoImageProcessor, CLIPImageProcessorPil, SiglipImageProcessorPil

    encoder = encoders[(name, "hf")]
    pil_cls = CLIPImageProcessorPil if name == "tiny-clip" else SiglipImageProcessorPil
    pil_proc = pil_cls.from_pretrained(encoder.path)
    default_proc = AutoImageProcessor.from_pretrained(encoder.path)
    for photo in photos:
        ours = encoder.preprocess(photo)
        assert ours.dtype == torch.float32 and ours.shape == (3, encoder.image_size, encoder.image_size)
        ref = torch.as_tensor(pil_proc(photo, return_tensors="pt")["pixel_values"][0])
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
        # the default (torchvision-backed) processor resizes tensors with its own antialias kernel
        ref_tv = torch.as_tensor(default_proc(photo, return_tensors="pt")["pixel_values"][0])
        assert (ours - ref_tv).abs().mean() < 0.05


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_preprocess_matches_openclip_transform(encoders, photos, name):
    encoder = encoders[(name, "open_clip")]
    for photo in photos:
        torch.testing.assert_close(
            encoder.preprocess(photo), encoder.reference_transform(photo), rtol=0, atol=1e-5
        )


def test_preprocess_rejects_non_images(encoders):
    with pytest.raises(TypeError, match="PIL"):
        encoders[("tiny-clip", "hf")].preprocess(torch.zeros(3, 64, 64))


# ------------------------------------------------------------ 5. fingerprint
def test_fingerprint_changes_with_a_weight(encoders, cache_dir):
    original = encoders[("tiny-clip", "hf")].fingerprint()
    fingerprints = {encoders[key].fingerprint() for key in TOWERS}
    assert len(fingerprints) == len(TOWERS) and all(len(f) == 64 for f in fingerprints)
    copy = load_encoder("tiny-clip", backend="hf", cache_dir=cache_dir)
    weight = copy.model.vision_model.encoder.layers[0].mlp.fc1.weight
    with torch.no_grad():
        weight[0, 0] += 1e-3
        assert copy.fingerprint(refresh=True) != original
        weight[0, 0] -= 1e-3
    assert copy.fingerprint(refresh=True) == original


def test_info_has_exactly_the_manifest_fields(encoders):
    import dataclasses

    from visalign.shards import EncoderInfo

    encoder = encoders[("tiny-siglip", "open_clip")]
    info = encoder.info(feature_layer=-2)
    assert set(info) == {f.name for f in dataclasses.fields(EncoderInfo)}
    assert info["patch_grid"] == [8, 8] and info["feature_dim"] == 64 and info["backend"] == "open_clip"
    assert info["fingerprint"] == encoder.fingerprint()
    EncoderInfo(**info)


# ------------------------------------------------------------ 6. registry, export
def test_unknown_name_lists_valid_names(cache_dir):
    with pytest.raises(UnknownNameError) as err:
        load_encoder("tiny-clipp", cache_dir=cache_dir)
    for name in ("tiny-clip", "tiny-siglip", "clip", "siglip", "random-vit-b16"):
        assert name in str(err.value)
    assert set(ENCODERS) == {"tiny-clip", "tiny-siglip", "clip", "siglip", "random-vit-b16"}


def test_bad_backend_and_options_are_clear_errors(cache_dir):
    with pytest.raises(EncoderError, match="backend 'timm'"):
        load_encoder("tiny-clip", backend="timm", cache_dir=cache_dir)
    with pytest.raises(EncoderError, match="backend 'open_clip'"):
        load_encoder("random-vit-b16", backend="open_clip", cache_dir=cache_dir)
    with pytest.raises(EncoderError, match="valid options"):
        load_encoder("tiny-clip", cache_dir=cache_dir, layers=3)
    with pytest.raises(EncoderError, match="CLIP towers"):
        load_encoder("tiny-siglip", cache_dir=cache_dir, dense="maskclip")


@pytest.mark.parametrize(
    "name,oc_name,image,patch,width,layers",
    [("clip", "ViT-L-14-336", 336, 14, 1024, 24), ("siglip", "ViT-SO400M-14-SigLIP-384", 384, 14, 1152, 27)],
)
def test_real_names_are_llava_towers(name, oc_name, image, patch, width, layers):
    """`clip` is LLaVA-1.5's CLIP ViT-L/14-336 (24 x 24 = 576 patches), `siglip` SigLIP-SO400M/14-384: the
    open_clip architecture each name resolves to, built on the meta device (shapes only, no weights, no
    memory), and the HF hub id."""
    import open_clip

    from pipeline.encoders import REAL

    hub_id, registered, _, _ = REAL[name]
    assert registered == oc_name
    with torch.device("meta"):
        visual = open_clip.create_model(oc_name, pretrained=None, device="meta").visual
    if hasattr(visual, "trunk"):  # SigLIP: a timm ViT trunk
        t = visual.trunk
        got = (t.patch_embed.img_size[0], t.patch_embed.patch_size[0], t.embed_dim, len(t.blocks))
    else:
        got = (visual.image_size[0], visual.conv1.kernel_size[0], visual.transformer.width)
        got += (len(visual.transformer.resblocks),)
    assert got == (image, patch, width, layers)
    assert (
        hub_id
        == {"clip": "openai/clip-vit-large-patch14-336", "siglip": "google/siglip-so400m-patch14-384"}[name]
    )


def test_real_tower_without_weights_names_the_fix(monkeypatch, tmp_path):
    """Offline with nothing cached: one error that names the weights and --encoder_path, for both backends;
    any other loading error passes through unchanged."""
    import pipeline.encoders.hf as hf
    import pipeline.encoders.openclip as oc

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
                      "them in the cached files.")  # fmt: skip

    def no_download(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'webli'")

    monkeypatch.setattr(hf, "HFVisionEncoder", offline)
    monkeypatch.setattr(oc, "OpenCLIPVisionEncoder", no_download)
    with pytest.raises(EncoderError, match="openai/clip-vit-large-patch14-336.*--encoder_path"):
        load_encoder("clip")
    with pytest.raises(EncoderError, match="ViT-SO400M-14-SigLIP-384.*--encoder_path"):
        load_encoder("siglip", backend="open_clip")
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder("clip", path=str(tmp_path / "nowhere"))

    def corrupt(*args, **kwargs):
        raise RuntimeError("size mismatch for vision_model.embeddings")

    monkeypatch.setattr(hf, "HFVisionEncoder", corrupt)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_encoder("clip")


def test_local_folder_as_name(encoders, pixels):
    """A bare HF checkpoint folder loads as an encoder (model_type read from config.json)."""
    known = encoders[("tiny-siglip", "hf")]
    by_path = load_encoder(known.path)
    assert by_path.name == known.path and by_path.fingerprint() == known.fingerprint()
    torch.testing.assert_close(
        _forward(by_path, pixels[("tiny-siglip", "hf")]).joint_BPE,
        _forward(known, pixels[("tiny-siglip", "hf")]).joint_BPE,
    )


# ------------------------------------------------------------ 7. maskclip
@pytest.mark.parametrize("backend", ["hf", "open_clip"])
def test_maskclip_is_the_value_path_of_the_last_block(encoders, pixels, cache_dir, backend):
    plain = encoders[("tiny-clip", backend)]
    dense = load_encoder("tiny-clip", backend=backend, cache_dir=cache_dir, dense="maskclip")
    pix = pixels[("tiny-clip", backend)]
    out_plain, out_dense = _forward(plain, pix), _forward(dense, pix)
    assert torch.equal(out_plain.feats_BPD, out_dense.feats_BPD)  # LLaVA features untouched
    assert not torch.allclose(out_plain.joint_BPE, out_dense.joint_BPE, atol=1e-3)
    with torch.no_grad():
        if backend == "hf":
            vision = dense.model.vision_model
            h_BTD = vision(pixel_values=pix, output_hidden_states=True).hidden_states[-2]
            layer = vision.encoder.layers[-1]
            attn = layer.self_attn
            x = F.layer_norm(
                h_BTD, (h_BTD.shape[-1],), layer.layer_norm1.weight, layer.layer_norm1.bias, 1e-5
            )
            v = x @ attn.v_proj.weight.T + attn.v_proj.bias
            h_BTD = h_BTD + v @ attn.out_proj.weight.T + attn.out_proj.bias
            h_BTD = h_BTD + layer.mlp(layer.layer_norm2(h_BTD))
            ref_BPE = dense.model.visual_projection(vision.post_layernorm(h_BTD[:, 1:]))
        else:
            visual = dense.model.visual
            h_BTD = _openclip_block_outputs(dense, pix)[-2]
            block = visual.transformer.resblocks[-1]
            width = h_BTD.shape[-1]
            x = F.layer_norm(h_BTD, (width,), block.ln_1.weight, block.ln_1.bias, 1e-5)
            v = x @ block.attn.in_proj_weight[2 * width :].T + block.attn.in_proj_bias[2 * width :]
            h_BTD = h_BTD + v @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
            h_BTD = h_BTD + block.mlp(block.ln_2(h_BTD))
            ref_BPE = visual.ln_post(h_BTD[:, 1:]) @ visual.proj
    torch.testing.assert_close(out_dense.joint_BPE, ref_BPE, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ precision
@pytest.mark.parametrize("name,backend", TOWERS)
def test_half_precision_forward(cache_dir, pixels, name, backend):
    """What the GPU labeller does: ``.to(dtype=float16)`` after loading; fp32 pixels are cast inside."""
    encoder = load_encoder(name, backend=backend, cache_dir=cache_dir)
    pix = pixels[(name, backend)]
    ref = _forward(encoder, pix)
    fingerprint = encoder.fingerprint()
    encoder.to(dtype=torch.float16)
    out = _forward(encoder, pix)
    assert out.feats_BPD.dtype == out.joint_BPE.dtype == torch.float16
    torch.testing.assert_close(out.feats_BPD.float(), ref.feats_BPD, rtol=0.02, atol=0.02)
    torch.testing.assert_close(out.joint_BPE.float(), ref.joint_BPE, rtol=0.02, atol=0.02)
    assert encoder.encode_text(["cat"]).dtype == torch.float32
    assert encoder.fingerprint() == fingerprint  # identity of the weights as loaded, not of the cast


@pytest.mark.slow
def test_random_vit_b16_shapes(tmp_path, photos):
    encoder = load_encoder("random-vit-b16", cache_dir=tmp_path)
    pixels_BCHW = torch.stack([encoder.preprocess(p) for p in photos[:2]])
    out = _forward(encoder, pixels_BCHW)
    assert out.feats_BPD.shape == (2, 196, 768) and out.joint_BPE.shape == (2, 196, 512)
    assert encoder.encode_text(["cat"]).shape == (1, 512)
    assert encoder.fingerprint() == load_encoder("random-vit-b16", cache_dir=tmp_path).fingerprint()
