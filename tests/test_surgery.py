"""CLIP Surgery (``--dense surgery``) against an independent computation written out in this file.

The reference is a plain per-block loop from the towers' raw weights with the reference implementation's
block structure: a pair (surgery path, original path) through the last ``depth`` blocks, where each block
normalises the ORIGINAL path's state, computes q, k, v, runs q-k attention head by head for the original
path (then its MLP) and v-v attention head by head for the surgery path (no MLP), and the class token of
the output is the original path's. Nothing of ``pipeline.encoders.surgery`` is used. Random init leaves
LayerNorms at identity and biases at zero, so every parameter is perturbed first (otherwise the v bias and
the LayerNorm terms would go untested).

Feature surgery (the score) is checked against the reference formula written out over ``[B, P, N, E]``:
``sum_e (x t w - mean_n (x t w))`` with ``w = softmax(2 g.t) / mean(softmax)``.

Letters: B batch, T tokens (CLS first), P patches, D width, E joint width, N words, K top-k slots.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.encoders import EncoderError, load_encoder
from pipeline.search import FeatureSurgeryIndex, rescore_pairs


def _perturb(module: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _layer_norm(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _act(name: str, x):
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu(x)
    raise AssertionError(f"activation {name}")


def _heads(q, k, v, num_heads, scale):
    """Attention head by head, one image at a time: softmax(q k^T * scale) v, heads concatenated."""
    out = torch.empty_like(v)
    width = v.shape[-1] // num_heads
    for b in range(v.shape[0]):
        for h in range(num_heads):
            cols = slice(h * width, (h + 1) * width)
            weights = torch.softmax(q[b, :, cols] @ k[b, :, cols].T * scale, dim=-1)
            out[b, :, cols] = weights @ v[b, :, cols]
    return out


def plain_surgery(blocks, x_BTD, depth):
    """The dual path over plain blocks: ``blocks`` = list of dicts of raw weights. Returns (surgery tokens
    with the original class token, original path's final state)."""
    first = len(blocks) - min(depth, len(blocks))
    x_ori, x_sur = x_BTD, None
    for i, blk in enumerate(blocks):
        h = _layer_norm(x_ori, blk["ln_1"])
        q = h @ blk["wq"].T + blk["bq"]
        k = h @ blk["wk"].T + blk["bk"]
        v = h @ blk["wv"].T + blk["bv"]
        scale = (q.shape[-1] // blk["heads"]) ** -0.5
        if i >= first:
            vv = _heads(v, v, v, blk["heads"], scale) @ blk["wo"].T + blk["bo"]
            x_sur = (x_ori if x_sur is None else x_sur) + blk["ls"] * vv  # no FFN on this path
        x_ori = x_ori + blk["ls"] * (_heads(q, k, v, blk["heads"], scale) @ blk["wo"].T + blk["bo"])
        m = _layer_norm(x_ori, blk["ln_2"]) @ blk["w1"].T + blk["b1"]
        x_ori = x_ori + (_act(blk["act"], m) @ blk["w2"].T + blk["b2"])
    tokens = x_sur.clone()
    tokens[:, 0] = x_ori[:, 0]
    return tokens, x_ori


def hf_plain(model, pixels_BCHW, depth):
    """(surgery patches [B, P, E], image embedding [B, E], original path's last state) of an HF CLIPModel."""
    vm = model.vision_model
    cfg = model.config.vision_config
    emb = vm.embeddings
    patches = (
        F.conv2d(pixels_BCHW, emb.patch_embedding.weight, stride=cfg.patch_size).flatten(2).transpose(1, 2)
    )
    cls = emb.class_embedding.expand(patches.shape[0], 1, -1)
    x = torch.cat([cls, patches], dim=1) + emb.position_embedding.weight[None]
    x = _layer_norm(x, vm.pre_layrnorm)
    blocks = []
    for layer in vm.encoder.layers:
        a = layer.self_attn
        blocks.append(
            dict(ln_1=layer.layer_norm1, ln_2=layer.layer_norm2, heads=a.num_heads, act=cfg.hidden_act, ls=1.0,
                 wq=a.q_proj.weight, bq=a.q_proj.bias, wk=a.k_proj.weight, bk=a.k_proj.bias,
                 wv=a.v_proj.weight, bv=a.v_proj.bias, wo=a.out_proj.weight, bo=a.out_proj.bias,
                 w1=layer.mlp.fc1.weight, b1=layer.mlp.fc1.bias, w2=layer.mlp.fc2.weight, b2=layer.mlp.fc2.bias)
        )  # fmt: skip
    tokens, last = plain_surgery(blocks, x, depth)
    joint = _layer_norm(tokens, vm.post_layernorm) @ model.visual_projection.weight.T
    return joint[:, 1:], joint[:, 0], last


def openclip_plain(visual, pixels_BCHW, depth):
    """The same for an open_clip ``VisionTransformer`` (packed in-projection, LayerScale if any)."""
    patches = (
        F.conv2d(pixels_BCHW, visual.conv1.weight, stride=visual.conv1.stride).flatten(2).transpose(1, 2)
    )
    cls = visual.class_embedding.expand(patches.shape[0], 1, -1)
    x = torch.cat([cls, patches], dim=1) + visual.positional_embedding[None]
    x = _layer_norm(x, visual.ln_pre)
    blocks = []
    for blk in visual.transformer.resblocks:
        a = blk.attn
        wq, wk, wv = a.in_proj_weight.chunk(3)
        bq, bk, bv = a.in_proj_bias.chunk(3)
        act = "gelu" if isinstance(blk.mlp.gelu, torch.nn.GELU) else "quick_gelu"
        ls = blk.ls_1.gamma if hasattr(blk.ls_1, "gamma") else 1.0
        blocks.append(
            dict(ln_1=blk.ln_1, ln_2=blk.ln_2, heads=a.num_heads, act=act, ls=ls, wq=wq, bq=bq, wk=wk, bk=bk,
                 wv=wv, bv=bv, wo=a.out_proj.weight, bo=a.out_proj.bias, w1=blk.mlp.c_fc.weight,
                 b1=blk.mlp.c_fc.bias, w2=blk.mlp.c_proj.weight, b2=blk.mlp.c_proj.bias)
        )  # fmt: skip
    tokens, last = plain_surgery(blocks, x, depth)
    joint = _layer_norm(tokens, visual.ln_post) @ visual.proj
    return joint[:, 1:], joint[:, 0], last


@pytest.fixture(scope="module")
def photos(photo_dataset) -> list[Image.Image]:
    paths = sorted((Path(photo_dataset).parent / "images").glob("*.jpg"))[:3]
    return [Image.open(p).convert("RGB") for p in paths]


@pytest.mark.parametrize("backend", ["hf", "open_clip"])
@pytest.mark.parametrize("depth,effective", [(None, 3), (2, 2), (1, 1)])
def test_surgery_features_equal_the_plain_dual_path(photos, cache_dir, backend, depth, effective):
    """Default depth 6 on the 3-block tiny tower runs all 3 blocks (clamped, recorded); 2 and 1 the last ones."""
    options = {"dense": "surgery"} | ({"surgery_depth": depth} if depth is not None else {})
    enc = load_encoder("tiny-clip", backend=backend, cache_dir=cache_dir, **options)
    stock = load_encoder("tiny-clip", backend=backend, cache_dir=cache_dir)
    _perturb(enc.model)
    _perturb(stock.model)
    assert enc.surgery_depth == effective and enc.info(-2)["surgery_depth"] == effective
    assert enc.info(-2)["dense"] == "surgery" and stock.info(-2)["dense"] == "none"
    pixels_BCHW = torch.stack([enc.preprocess(p) for p in photos])
    with torch.no_grad():
        out = enc(pixels_BCHW, feature_layer=-2)
        base = stock(pixels_BCHW, feature_layer=-2)
        if backend == "hf":
            want_BPE, image_BE, last_BTD = hf_plain(enc.model, pixels_BCHW, effective)
            stock_image_BE = enc.model.get_image_features(pixel_values=pixels_BCHW)
            stock_image_BE = getattr(stock_image_BE, "pooler_output", stock_image_BE)
        else:
            want_BPE, image_BE, last_BTD = openclip_plain(enc.model.visual, pixels_BCHW, effective)
            stock_image_BE = enc.model.encode_image(pixels_BCHW)
    diff = (out.joint_BPE - want_BPE).abs().max().item()
    print(
        f"\nsurgery {backend} depth {depth}->{effective}: joint {tuple(out.joint_BPE.shape)} vs plain "
        f"{tuple(want_BPE.shape)}, max abs diff {diff:.2e} (values up to {want_BPE.abs().max().item():.2f}); "
        f"image embedding diff {(out.image_BE - image_BE).abs().max().item():.2e}"
    )
    assert out.joint_BPE.shape == want_BPE.shape == (3, 64, 32)
    torch.testing.assert_close(out.joint_BPE, want_BPE, rtol=0, atol=1e-5)
    # the image embedding is CLIP's own (the original path's class token), the features the tower's own
    torch.testing.assert_close(out.image_BE, stock_image_BE, rtol=0, atol=1e-5)
    torch.testing.assert_close(image_BE, stock_image_BE, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.feats_BPD, base.feats_BPD, rtol=0, atol=0)
    assert (base.joint_BPE - out.joint_BPE).abs().max() > 0.1, "surgery patches differ from the stock ones"
    # the plain loop's original path is the stock tower: the reference is anchored, not only self-consistent
    with torch.no_grad():
        feats_last = stock(pixels_BCHW, feature_layer=-1).feats_BPD
    torch.testing.assert_close(last_BTD[:, 1:], feats_last, rtol=0, atol=1e-5)


def test_depths_differ(photos, cache_dir):
    """Depth changes the features (the option is not ignored)."""
    outs = []
    for depth in (1, 3):
        enc = load_encoder("tiny-clip", cache_dir=cache_dir, dense="surgery", surgery_depth=depth)
        _perturb(enc.model)
        with torch.no_grad():
            outs.append(enc(torch.stack([enc.preprocess(p) for p in photos]), feature_layer=-2).joint_BPE)
    assert (outs[0] - outs[1]).abs().max() > 0.05


def test_surgery_option_errors(cache_dir):
    for backend in ("hf", "open_clip"):
        with pytest.raises(EncoderError, match="CLIP towers") as err:
            load_encoder("tiny-siglip", backend=backend, cache_dir=cache_dir, dense="surgery")
        assert "\n" not in str(err.value)
    with pytest.raises(EncoderError, match="dense='surgery' only"):
        load_encoder("tiny-clip", cache_dir=cache_dir, surgery_depth=2)
    with pytest.raises(EncoderError, match="at least one block"):
        load_encoder("tiny-clip", cache_dir=cache_dir, dense="surgery", surgery_depth=0)


# ---- feature surgery ---------------------------------------------------------------------------------------
def written_out_feature_surgery(x_BPE, g_BE, t_NE):
    """The reference formula over [B, P, N, E] in float64 (small N only)."""
    x = F.normalize(x_BPE.double(), dim=-1)
    g = F.normalize(g_BE.double(), dim=-1)
    t = t_NE.double()
    prob_BN = torch.softmax(2 * g @ t.T, dim=-1)
    w_BN = prob_BN / prob_BN.mean(dim=-1, keepdim=True)
    feats_BPNE = x[:, :, None, :] * t[None, None] * w_BN[:, None, :, None]
    return (feats_BPNE - feats_BPNE.mean(dim=2, keepdim=True)).sum(-1)


def reference_topk(sim_BPN, k):
    scores, order = torch.sort(sim_BPN, dim=-1, descending=True, stable=True)
    scores, order = scores[..., :k], order[..., :k]
    return torch.where(scores >= 0, order, -1).numpy(), scores.numpy()


@pytest.mark.parametrize("score,sign", [("cos", 1.0), ("neg-cos", -1.0)])
@pytest.mark.parametrize("num_words,k", [(300, 10), (40, 30)])
def test_feature_surgery_topk_equals_the_written_out_formula(score, sign, num_words, k):
    gen = torch.Generator().manual_seed(num_words)
    t_NE = F.normalize(torch.randn(num_words, 16, generator=gen), dim=-1)
    x_BPE = torch.randn(3, 20, 16, generator=gen)
    g_BE = torch.randn(3, 16, generator=gen)
    index = FeatureSurgeryIndex(t_NE.numpy(), score=score)
    labels, scores = index.search(x_BPE, g_BE, k)
    sim_BPN = sign * written_out_feature_surgery(x_BPE, g_BE, t_NE)
    want_labels, want_scores = reference_topk(sim_BPN, k)
    assert labels.dtype == np.int32 and scores.dtype == np.float16 and labels.shape == (3, 20, k)
    np.testing.assert_array_equal(labels, want_labels)
    kept = want_labels >= 0
    np.testing.assert_allclose(scores[kept].astype(np.float64), want_scores[kept], atol=2e-3, rtol=1e-3)
    assert np.isneginf(scores[~kept]).all()
    if k == 30:
        assert (~kept).any() and kept.any(), "a long k exercises the absent rule"
    # not the cosine ranking: the per-image word weights reorder the words
    cos_labels, _ = reference_topk(sign * (F.normalize(x_BPE.double(), dim=-1) @ t_NE.double().T), k)
    assert (cos_labels != want_labels).any()


def test_feature_surgery_two_words_by_hand():
    """Two words t0 = (1, 0), t1 = (0, 1) and g = t0: p = softmax(2, 0), w = 2p, r = p0 t0 + p1 t1, so for a
    unit patch at angle a: score_0 = p0 cos a - p1 sin a = -score_1 (one word of the two is always absent)."""
    t_NE = torch.eye(2)
    p0 = math.exp(2) / (math.exp(2) + 1)
    for angle in (0.3, 2.0, -1.0):
        x = torch.tensor([[[math.cos(angle), math.sin(angle)]]])
        labels, scores = FeatureSurgeryIndex(t_NE.numpy()).search(x, torch.tensor([[1.0, 0.0]]), 2)
        score0 = p0 * math.cos(angle) - (1 - p0) * math.sin(angle)
        assert labels.tolist() == [[[0 if score0 >= 0 else 1, -1]]]
        assert math.isclose(float(scores[0, 0, 0]), abs(score0), abs_tol=1e-3) and np.isneginf(
            scores[0, 0, 1]
        )
    assert rescore_pairs(
        torch.ones(1, 2, dtype=torch.float64), t_NE, *torch.zeros(2, 0, dtype=torch.long)
    ).shape == (0,)


def test_feature_surgery_candidates_stay_few():
    """The error bound is tight enough that few words beyond the k are re-scored (a real-size guard)."""
    gen = torch.Generator().manual_seed(0)
    t_NE = F.normalize(torch.randn(5000, 64, generator=gen), dim=-1)
    index = FeatureSurgeryIndex(t_NE.numpy())
    index.search(torch.randn(2, 49, 64, generator=gen), torch.randn(2, 64, generator=gen), 10)
    assert index.stats["pairs"] < 2 * 49 * 10 * 1.5, index.stats


def test_label_dense_surgery_end_to_end(tmp_path, photo_dataset, cache_dir):
    """`pipeline label --dense surgery`: labels are the written-out feature surgery of the plain-loop patches,
    the features the tower's hidden states; the manifest records dense, depth and feature surgery."""
    from pipeline.config import LabelConfig
    from pipeline.driver import run_label
    from visalign import shards as S

    words = ["cat", "dog", "cup", "coffee", "rocket", "sky", "flag", "tree", "flower", "temple", "red", "man"]
    (tmp_path / "w.txt").write_text("\n".join(words) + "\n")
    out = tmp_path / "out"
    cfg = LabelConfig(
        encoder="tiny-clip", input=str(photo_dataset), images=str(photo_dataset.parent / "images"),
        shards=str(out), wordlist=str(tmp_path / "w.txt"), scheduler="synchronous", samples_per_shard=4,
        batch_size=3, top_k=8, progress=False, cache_dir=str(cache_dir), dense="surgery", search_backend="torch",
    )  # fmt: skip
    run_label(cfg)
    m = S.read_manifest(out)
    assert (m.encoder.dense, m.encoder.surgery_depth, m.feature_surgery) == ("surgery", 3, True)
    assert (m.score_sign, m.score_source) == ("neg-cos", "family-default")
    samples = {s["meta"]["id"]: s for p in m.shard_paths(out) for s in S.iter_tar(p)}
    ids = sorted(samples)
    enc = load_encoder("tiny-clip", cache_dir=cache_dir)
    images = [Image.open(samples[i]["meta"]["source"]).convert("RGB") for i in ids]
    pixels_BCHW = torch.stack([enc.preprocess(im) for im in images])
    t_NE = F.normalize(enc.encode_text(words).float(), dim=-1)
    with torch.no_grad():
        patches_BPE, image_BE, _ = hf_plain(enc.model, pixels_BCHW, 6)
        feats_BPD = enc(pixels_BCHW, feature_layer=-2).feats_BPD
    sim_BPN = -written_out_feature_surgery(patches_BPE, image_BE, t_NE)
    want_labels, want_scores = reference_topk(sim_BPN, 8)
    got_labels = np.stack([samples[i]["labels"] for i in ids])
    got_scores = np.stack([samples[i]["scores"] for i in ids]).astype(np.float64)
    mismatch = np.argwhere(got_labels != want_labels)
    for b, p, j in mismatch:  # the run batches differently: only near-ties may swap
        g, w = got_labels[b, p, j], want_labels[b, p, j]
        assert g >= 0 and w >= 0 and math.isclose(sim_BPN[b, p, g], sim_BPN[b, p, w], abs_tol=1e-5)
    assert len(mismatch) <= 2
    kept = want_labels >= 0
    assert kept.any() and (~kept).any()
    np.testing.assert_allclose(got_scores[kept], want_scores[kept], atol=3e-3)
    np.testing.assert_allclose(
        np.stack([samples[i]["feat"] for i in ids]).astype(np.float32),
        feats_BPD.half().float().numpy(), atol=2e-3, rtol=2e-3,
    )  # fmt: skip
