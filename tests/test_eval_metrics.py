"""Each alignment measure on constructed cases whose answer is known by hand.

Letters: B batch, P patches, d width, W words, K label slots, N vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.evaluate import metrics as M


def _labels(rows):
    """Pad rows of word ids to K = 10 slots with -1 (absent), as the shards store them."""
    out = torch.full((len(rows), 10), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def test_nearest_chunks_agree_and_ties_go_low():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(37, 8, generator=g), torch.randn(50, 8, generator=g)
    ids_full, cos_full = M.nearest(q, k, chunk=1000)
    ids_chunk, cos_chunk = M.nearest(q, k, chunk=4)
    assert torch.equal(ids_full, ids_chunk)
    torch.testing.assert_close(cos_full, cos_chunk)
    ref = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).T
    assert torch.equal(ids_full, ref.argmax(-1))
    # two identical keys: the lower index wins
    ids, cos = M.nearest(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 0.0]]))
    assert ids.tolist() == [1] and cos.item() == pytest.approx(1.0)


def test_tokens_equal_to_top_label_targets_hit_everything():
    W, d = 12, 16
    targets_Wd = torch.eye(W, d) * 0.3  # orthogonal word targets
    labels_PK = _labels([[3, 5, 7], [0, 1], [11], [4, 2, 9, 8]])
    visual_BPd = (targets_Wd[labels_PK[:, 0]] * 5.0)[None]  # scale must not matter (cosine)
    out = M.label_hits(visual_BPd, targets_Wd, labels_PK[None], ks=(1, 10))
    assert out == {"num_labelled": 4, "hit@1": 1.0, "hit@10": 1.0}


def test_tokens_at_a_lower_label_miss_hit1_but_hit10():
    W, d = 12, 16
    targets_Wd = torch.eye(W, d)
    labels_PK = _labels([[3, 5, 7, 1], [0, 1, 2, 6]])
    visual_BPd = targets_Wd[labels_PK[:, 3]][None]  # the 4th label of each patch
    out = M.label_hits(visual_BPd, targets_Wd, labels_PK[None], ks=(1, 3, 4, 10))
    assert out["hit@1"] == 0.0 and out["hit@3"] == 0.0
    assert out["hit@4"] == 1.0 and out["hit@10"] == 1.0


def test_label_hits_mixed_case_and_unlabelled_patches_excluded():
    W, d = 12, 16
    targets_Wd = torch.eye(W, d)
    # patch 0 hits top; patch 1 hits slot 5; patch 2 misses (nearest word 11 is not a label);
    # patch 3 hits top; patch 4 has no kept label (all -1) and must not count either way.
    labels_PK = _labels([[2], [0, 1, 3, 4, 5, 6, 7], [0, 1], [9, 8], []])
    nearest_P = torch.tensor([2, 6, 11, 9, 4])
    visual_BPd = targets_Wd[nearest_P][None] + 0.01  # small common offset keeps the argmax
    out = M.label_hits(visual_BPd, targets_Wd, labels_PK[None], ks=(1, 10))
    assert out["num_labelled"] == 4
    assert out["hit@1"] == pytest.approx(2 / 4)
    assert out["hit@10"] == pytest.approx(3 / 4)
    # a precomputed nearest map gives the same
    assert M.label_hits(None, None, labels_PK[None], nearest_BP=nearest_P[None]) == out
    # nothing labelled -> NaN share, zero weight
    none = M.label_hits(visual_BPd, targets_Wd, torch.full((1, 5, 10), -1))
    assert none["num_labelled"] == 0 and math.isnan(none["hit@1"])


def test_meaningful_share_on_identity_embeddings():
    N, d = 8, 8
    embed_Nd = torch.eye(N, d)
    is_word_N = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    visual_BPd = embed_Nd[torch.tensor([[0, 1, 2, 5], [4, 4, 3, 7]])] * 2 + 0.05
    # nearest tokens 0,1,2,5 | 4,4,3,7 -> word tokens 0,1 | 4,4 -> 4 of 8
    assert M.meaningful_share(visual_BPd, embed_Nd, is_word_N) == pytest.approx(0.5)
    # tokens set exactly to word-token embeddings -> 1
    assert M.meaningful_share(embed_Nd[torch.tensor([[0, 1, 4]])], embed_Nd, is_word_N) == 1.0
    assert M.nearest_tokens(visual_BPd, embed_Nd).tolist() == [[0, 1, 2, 5], [4, 4, 3, 7]]


def test_meaningful_share_with_random_rotation_hand_answer():
    # A random orthogonal basis as E; each visual token is a unit mix 0.8 e_a + 0.6 e_b, so its nearest
    # token is a (cos 0.8 > 0.6) whatever the rotation.
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    embed_Nd = Q[:10]
    a = torch.tensor([0, 3, 3, 9, 7, 1])
    b = torch.tensor([1, 2, 4, 0, 8, 5])
    visual_BPd = (0.8 * embed_Nd[a] + 0.6 * embed_Nd[b])[None]
    is_word_N = torch.zeros(10, dtype=torch.bool)
    is_word_N[[3, 7]] = True  # a-tokens 3, 3, 7 are words -> 3 / 6
    assert M.meaningful_share(visual_BPd, embed_Nd, is_word_N) == pytest.approx(0.5)
    # same construction as word targets: nearest words 0,3,3,9,7,1 vs top labels 0,2,3,0,8,1 -> 3 of 6 at
    # hit@1; patch 1 also holds 3 in its second slot -> 4 of 6 at hit@10
    hits = M.label_hits(visual_BPd, embed_Nd, _labels([[0], [2, 3], [3], [0], [8], [1]])[None])
    assert hits["hit@1"] == pytest.approx(3 / 6) and hits["hit@10"] == pytest.approx(4 / 6)


class _FakeTokenizer:
    """Byte-level style pieces: decode([i]) returns the piece with its leading space."""

    pieces = ["<s>", "</s>", " cat", " Dog", "ele", "phant", " the", "!", "  sky "]
    all_special_ids = [0, 1]

    def __len__(self):
        return len(self.pieces)

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_word_token_mask_decodes_strips_and_lowercases():
    words = ["cat", "dog", "elephant", "sky", "</s>"]
    mask = M.word_token_mask(_FakeTokenizer(), words, vocab_size=11)  # padded embedding rows stay False
    assert mask.tolist() == [False, False, True, True, False, False, False, False, True, False, False]


def test_alignment_consistency_hand_built():
    # d = 2; sample 0: tokens at (1,0), (0,-1), (-1,0) vs caption {(1,0)}: m = [1, 0, -1], top-2 mean 0.5
    # sample 1: same tokens vs caption {(0,1), (0,2)}: m = [0, -1, 0], top-2 mean 0
    v_Pd = torch.tensor([[1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])
    visual_BPd = torch.stack([v_Pd, v_Pd * 3])
    caps = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 2.0]])]
    per = M.alignment_consistency_per_sample(visual_BPd, caps, top=2)
    assert per == pytest.approx([0.5, 0.0])
    assert M.alignment_consistency(visual_BPd, caps, top=2) == pytest.approx(0.25)
    # top larger than P uses every token: mean(1, 0, -1) = 0
    assert M.alignment_consistency(visual_BPd[:1], caps[:1], top=10) == pytest.approx(0.0)
    # a sample without caption tokens is skipped, not counted as 0
    empty = torch.zeros(0, 2)
    assert M.alignment_consistency(visual_BPd, [caps[0], empty], top=2) == pytest.approx(0.5)
    assert math.isnan(M.alignment_consistency(visual_BPd[:1], [empty]))


def test_alignment_consistency_default_top10_of_many_tokens():
    # 20 tokens at angles whose cosines to the single caption token are known; top-10 = the 10 largest.
    angles = torch.linspace(0, math.pi, 20)
    v_Pd = torch.stack([angles.cos(), angles.sin()], -1)
    expected = angles.cos().sort(descending=True).values[:10].mean().item()
    got = M.alignment_consistency(v_Pd[None], [torch.tensor([[1.0, 0.0]])])
    assert got == pytest.approx(expected, abs=1e-6)


def test_reverse_cosine_known_values():
    g = torch.Generator().manual_seed(2)
    feats_BPD = torch.randn(2, 5, 7, generator=g)
    assert M.reverse_cosine(feats_BPD * 3, feats_BPD) == pytest.approx(1.0)
    assert M.reverse_cosine(-feats_BPD, feats_BPD) == pytest.approx(-1.0)
    e0, e1 = torch.eye(4)[0], torch.eye(4)[1]
    # patch cosines: 1, 0, 0.6 (0.6 e0 + 0.8 e1 vs e0), -1 -> mean 0.15
    rev = torch.stack([e0, e1, 0.6 * e0 + 0.8 * e1, -e0])[None]
    feat = torch.stack([e0, e0, e0, e0])[None]
    assert M.reverse_cosine(rev, feat) == pytest.approx(0.15)
    with pytest.raises(ValueError):
        M.reverse_cosine(rev, feat[:, :2])


def test_pool_weights_and_skips_nan():
    assert M.pool([(1.0, 3), (0.0, 1), (float("nan"), 5), (0.7, 0)]) == pytest.approx(0.75)
    assert math.isnan(M.pool([]))


def test_nearest_never_picks_a_disallowed_key():
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    allowed = torch.tensor([False, True, True])
    assert M.nearest(torch.tensor([[1.0, 0.0]]), keys, allowed_N=allowed)[0].tolist() == [1]
    assert M.nearest_words(torch.tensor([[[1.0, 0.0]]]), keys, allowed).tolist() == [[1]]
