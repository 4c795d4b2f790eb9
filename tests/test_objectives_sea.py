"""SEA's sampling (labels, windows, de-duplication), word targets and the objective's forward.

Letters: B batch, P patches, K label slots, W words, S sub-tokens, M pairs.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.objectives.base import ObjectiveContext, StepContext
from trainer.objectives.sea import (
    SeaConfig,
    SeaObjective,
    cached_word_tokens,
    contrastive_loss,
    keep_one_per_word,
    sample_labels,
    sample_pairs,
    select_one_per_window,
    tokenize_words,
    window_ids,
    word_targets,
)


def test_label_frequencies_follow_scores_and_absent_never_drawn():
    # one patch, four slots: ids 7, 3, 9 kept with scores 0.5, 0.3, 0.2; slot 4 absent (-1, -inf)
    num_draws = 20000
    labels = torch.tensor([[7, 3, 9, -1]]).expand(num_draws, 4).reshape(1, num_draws, 4)
    scores = torch.tensor([[0.5, 0.3, 0.2, float("-inf")]]).expand(num_draws, 4).reshape(1, num_draws, 4)
    words = sample_labels(labels, scores, torch.Generator().manual_seed(0)).flatten()
    assert set(words.tolist()) == {7, 3, 9}
    counts = np.array([(words == w).sum().item() for w in (7, 3, 9)])
    expected = np.array([0.5, 0.3, 0.2]) * num_draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # chi-square, 2 dof, p = 0.001


def test_patch_without_kept_labels_gets_minus_one_and_zero_scores_fall_back_to_uniform():
    labels = torch.tensor([[[-1, -1], [4, 5], [6, -1]]])
    scores = torch.tensor([[[float("-inf"), float("-inf")], [0.0, 0.0], [0.0, float("-inf")]]])
    seen = set()
    for seed in range(50):
        w = sample_labels(labels, scores, torch.Generator().manual_seed(seed))[0]
        assert w[0].item() == -1 and w[2].item() == 6
        seen.add(w[1].item())
    assert seen == {4, 5}


def test_window_ids_and_one_patch_per_window():
    # 4 x 6 grid, 2 x 2 windows -> 2 x 3 windows
    win = window_ids((4, 6), 2)
    assert win.reshape(4, 6).tolist() == [
        [0, 0, 1, 1, 2, 2],
        [0, 0, 1, 1, 2, 2],
        [3, 3, 4, 4, 5, 5],
        [3, 3, 4, 4, 5, 5],
    ]
    gen = torch.Generator().manual_seed(0)
    eligible = torch.rand(3, 24, generator=gen) > 0.3
    eligible[0, win == 4] = False  # a window with no eligible patch contributes nothing
    counts = torch.zeros(24)
    for _ in range(300):
        chosen = select_one_per_window(eligible, (4, 6), 2, gen)
        assert not (chosen & ~eligible).any()
        for b in range(3):
            for w in range(6):
                expect = int(eligible[b, win == w].any())
                assert int(chosen[b, win == w].sum()) == expect
        counts += chosen[1].float()
    # uniform within a window: every eligible patch of sample 1 is picked sometimes
    assert (counts[eligible[1]] > 0).all()


def test_one_pair_per_word():
    gen = torch.Generator().manual_seed(0)
    word = torch.tensor([5, 2, 5, 5, 9, 2, 1])
    picks = torch.zeros(7)
    for _ in range(400):
        keep = keep_one_per_word(word, gen)
        assert sorted(word[keep].tolist()) == [1, 2, 5, 9]
        picks += keep.float()
    assert (picks[[0, 2, 3]] > 80).all()  # each of the three 5s is kept about 1/3 of the time


def test_sample_pairs_invariants_and_reproducibility():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 12, (4, 16, 3), generator=gen)
    labels[:, :, 2] = -1
    labels[0, :5] = -1  # patches without any kept label
    scores = torch.rand(4, 16, 3, generator=gen)
    b, p, w = sample_pairs(labels, scores, (4, 4), 2, StepContext(step=7).generator("sea"))
    assert len(set(w.tolist())) == len(w) > 1  # no word twice in the batch
    assert not ((b == 0) & (p < 5)).any()  # never a patch without kept labels
    win = window_ids((4, 4), 2)
    pairs = list(zip(b.tolist(), win[p].tolist()))
    assert len(pairs) == len(set(pairs))  # at most one patch per window
    for bi, pi, wi in zip(b.tolist(), p.tolist(), w.tolist()):
        assert wi in labels[bi, pi, :2].tolist()
    again = sample_pairs(labels, scores, (4, 4), 2, StepContext(step=7).generator("sea"))
    assert all(torch.equal(x, y) for x, y in zip((b, p, w), again))
    # another step or another rank draws differently (compared as (sample, patch, word) sets)
    first = set(zip(b.tolist(), p.tolist(), w.tolist()))
    for gen in (StepContext(step=8).generator("sea"), StepContext(step=7, rank=1).generator("sea")):
        assert set(zip(*(t.tolist() for t in sample_pairs(labels, scores, (4, 4), 2, gen)))) != first


class _Tok:
    """A toy tokenizer: a lone leading-space piece, then greedy two- or one-character pieces."""

    vocab = {"▁": 0, "re": 1, "d": 2, "ca": 3, "r": 4, "sk": 5, "y": 6}

    def __call__(self, texts, add_special_tokens=False):
        out = []
        for t in texts:
            ids = [0]  # a lone space piece, as SentencePiece emits: must be dropped
            word, i = t.strip(), 0
            while i < len(word):  # greedy: a known pair, else one character
                step = 2 if word[i : i + 2] in self.vocab else 1
                ids.append(self.vocab[word[i : i + step]])
                i += step
            out.append(ids)
        return {"input_ids": out}

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(" " if inv[i] == "▁" else inv[i] for i in ids)

    def get_vocab(self):
        return dict(self.vocab)


def test_tokenize_words_pads_drops_space_and_caches(tmp_path):
    tok = _Tok()
    tokens = tokenize_words(["red", "sky", "car"], tok)
    assert tokens.tolist() == [[1, 2], [5, 6], [3, 4]]
    cached = cached_word_tokens(["red", "sky", "car"], tok, tmp_path, "abc" * 10)
    files = list((tmp_path / "sea_words").glob("*.npy"))
    assert len(files) == 1 and np.array_equal(np.load(files[0], allow_pickle=False), cached)
    assert np.array_equal(cached_word_tokens(["red", "sky", "car"], tok, tmp_path, "abc" * 10), tokens)


def test_word_targets_average_sub_token_embeddings():
    embed = torch.randn(7, 3, requires_grad=True)
    tokens = torch.tensor([[1, 2], [5, -1]])
    t = word_targets(tokens, embed)
    torch.testing.assert_close(t, torch.stack([(embed[1] + embed[2]) / 2, embed[5]]).detach())
    assert not t.requires_grad  # targets are detached: SEA does not move E


def _write_wordlist(root, words):
    (root / "wordlist.txt").write_text("".join(w + "\n" for w in words))


def test_sea_objective_forward_reports_and_trains_scale(tmp_path):
    words = ["red", "sky", "car", "ry", "dd"]
    _write_wordlist(tmp_path, words)
    manifest = types.SimpleNamespace(
        encoder=types.SimpleNamespace(patch_grid=[4, 4]), wordlist=types.SimpleNamespace(sha256="f" * 64)
    )
    ctx = ObjectiveContext(
        llm_config=None,
        projector="linear",
        feature_dim=8,
        manifest=manifest,
        shards_root=str(tmp_path),
        tokenizer=_Tok(),
        cache_dir=str(tmp_path / "cache"),
    )
    obj = SeaObjective.build(SeaConfig(), ctx)
    assert obj.logit_scale.item() == pytest.approx(np.log(1 / 0.07))
    gen = torch.Generator().manual_seed(0)
    batch = {
        "labels_BPK": torch.randint(0, 5, (3, 16, 2), generator=gen),
        "scores_BPK": torch.rand(3, 16, 2, generator=gen),
    }
    v = torch.randn(3, 16, 4, requires_grad=True)
    out = types.SimpleNamespace(visual_BPd=v, embed_Nd=torch.randn(7, 4))
    losses, report = obj(batch, out, StepContext(step=0))
    assert set(losses) == {"sea_loss"} and report["sea/temperature"] == pytest.approx(0.07, rel=1e-5)
    # the loss and the report recomputed from the same draw with the (separately tested) pure functions
    b, p, w = obj.draw(batch, StepContext(step=0))
    t = word_targets(obj.word_tokens_WS[w], out.embed_Nd)
    assert report["sea/pairs"] == len(w) >= 2
    expected = contrastive_loss(v[b, p], t, obj.scale())
    assert losses["sea_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    cos = F.normalize(v[b, p].detach(), dim=-1) @ F.normalize(t, dim=-1).T
    ar = torch.arange(len(w))
    acc = ((cos.argmax(1) == ar).float().mean() + (cos.argmax(0) == ar).float().mean()).item() / 2
    assert report["sea/pair_acc"] == pytest.approx(acc)
    losses["sea_loss"].backward()
    assert v.grad.abs().sum() > 0 and obj.logit_scale.grad is not None
    # the same step gives the same draws (exact resume); another run seed, micro-step or step does not
    step = StepContext(step=3, seed=5)
    first = obj.draw(batch, step)
    assert all(torch.equal(x, y) for x, y in zip(first, obj.draw(batch, step)))

    def as_set(draw):
        return set(zip(*(t.tolist() for t in draw)))

    for other in (
        StepContext(step=3, seed=6),
        StepContext(step=3, seed=5, micro_step=1),
        StepContext(step=4, seed=5),
    ):
        assert as_set(obj.draw(batch, other)) != as_set(first)
