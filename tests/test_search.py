"""Exact top-k search: FAISS and torch against a brute-force numpy reference, both signs, absent rule."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.search import WordIndex, faiss_available
from visalign.config import ConfigError


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference(q_QE, w_NE, k, sign):
    sim = sign * (_unit(q_QE) @ _unit(w_NE).T)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(sim, order, axis=1)
    labels = np.where(scores >= 0, order, -1)
    return labels, np.where(scores >= 0, scores, -np.inf)


BACKENDS = ["torch", "bf16"] + (["faiss"] if faiss_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score,sign", [("cos", 1.0), ("neg-cos", -1.0)])
def test_topk_matches_bruteforce(backend, score, sign):
    rng = np.random.default_rng(0)
    w_NE = _unit(rng.normal(size=(300, 16)).astype(np.float32))
    q_QE = rng.normal(size=(50, 16)).astype(np.float32) * 7.0  # unnormalised queries are normalised inside
    k = 10
    labels, scores = WordIndex(w_NE, score=score, backend=backend).search(q_QE, k)
    ref_labels, ref_scores = _reference(q_QE, w_NE, k, sign)
    assert labels.dtype == np.int32 and scores.dtype == np.float16 and labels.shape == (50, k)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(scores.astype(np.float32), ref_scores, atol=2e-3)
    finite = np.where(np.isfinite(scores), scores, -10).astype(np.float32)
    assert (np.diff(finite, axis=1) <= 0).all(), "scores descend per row"


@pytest.mark.parametrize("backend", BACKENDS)
def test_absent_slots_and_k_larger_than_vocab(backend):
    # two words; query aligned with word 0 and orthogonal-ish/opposite to word 1
    w_NE = np.array([[1.0, 0.0], [-0.6, 0.8]], dtype=np.float32)
    q_QE = np.array([[1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    labels, scores = WordIndex(w_NE, score="cos", backend=backend).search(q_QE, 4)
    # row 0: cos = [1, -0.6] -> word 0 kept, word 1 absent; slots 3-4 do not exist -> absent
    np.testing.assert_array_equal(labels, [[0, -1, -1, -1], [1, -1, -1, -1]])
    assert scores[0, 0] == np.float16(1.0) and np.isneginf(scores[0, 1:]).all()
    assert scores[1, 0] == np.float16(0.6)
    neg_labels, neg_scores = WordIndex(w_NE, score="neg-cos", backend=backend).search(q_QE, 4)
    np.testing.assert_array_equal(neg_labels, [[1, -1, -1, -1], [0, -1, -1, -1]])
    assert neg_scores[0, 0] == np.float16(0.6) and neg_scores[1, 0] == np.float16(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_words", [3, 700])  # fewer blocks than k, and the block route
def test_queries_where_every_word_scores_below_zero_get_no_label(backend, num_words):
    rng = np.random.default_rng(0)
    w_NE = np.abs(rng.standard_normal((num_words, 8))).astype(np.float32)  # all in the positive orthant
    q_QE = -np.abs(rng.standard_normal((5, 8))).astype(np.float32)  # every cosine < 0
    labels, scores = WordIndex(w_NE, score="cos", backend=backend).search(q_QE, 4)
    np.testing.assert_array_equal(labels, -np.ones((5, 4)))
    assert np.isneginf(scores).all()


def test_faiss_equals_torch():
    if not faiss_available():
        pytest.skip("faiss not installed")
    rng = np.random.default_rng(1)
    w_NE = _unit(rng.normal(size=(2000, 32)).astype(np.float32))
    q_QE = rng.normal(size=(196, 32)).astype(np.float32)
    a = WordIndex(w_NE, backend="faiss").search(q_QE, 10)
    b = WordIndex(w_NE, backend="torch").search(q_QE, 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_bad_arguments():
    w = np.eye(3, dtype=np.float32)
    with pytest.raises(ConfigError, match="score"):
        WordIndex(w, score="dot")
    with pytest.raises(ConfigError, match="backend"):
        WordIndex(w, backend="annoy")


# ---- the screened search (bf16 / float32 screen + float64 re-score) is exact --------------------------------
SCREENED = ["torch", "bf16"]


def _reference64(q_QE, w_NE, k):
    """Brute force in float64 over the float32 inputs, ordered on the raw queries (a positive scale does not
    change the order) with a stable sort, so exact ties go to the lower word id; scores of the unit queries
    rounded float64 -> float32 -> float16 as the index stores them."""
    q64 = q_QE.astype(np.float64)
    raw = q64 @ w_NE.astype(np.float64).T
    order = np.argsort(-raw, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(raw, order, axis=1) / np.linalg.norm(q64, axis=1, keepdims=True)
    keep = scores >= 0
    return np.where(keep, order, -1), np.where(keep, scores, -np.inf).astype(np.float32).astype(np.float16)


def _hard_case(seed: int = 0, num: int = 6000, width: int = 64):
    """Words and queries built to defeat a screen that trusted bf16: exact duplicates (ties), distinct
    vectors with equal scores, near-duplicates 1e-9..1e-4 apart, and per query a shell of 60 words, spread
    over the list, whose cosines all lie within two bf16 steps of 0.5 (a bf16 step at 0.5 is 3.9e-3)."""
    rng = np.random.default_rng(seed)
    w = _unit(rng.normal(size=(num, width)))
    slots = rng.permutation(num - 10)  # the last 10 ids are kept for the equal-score pair
    queries = []
    for i in range(40):
        q = _unit(rng.normal(size=width))
        shell = slots[60 * i : 60 * (i + 1)]
        for j in shell:
            noise = rng.normal(size=width)
            noise = _unit(noise - q * (noise @ q))
            cos = 0.5 + rng.uniform(-8e-3, 8e-3)
            w[j] = cos * q + np.sqrt(1 - cos**2) * noise
        src, dup, near = shell[:3]
        w[dup] = w[src]  # an exact duplicate: equal scores, one of the two ids is lower
        w[near] = _unit(w[src] + 10.0 ** -(4 + i % 6) * w[shell[3]])  # 1e-4 .. 1e-9 away
        queries.append(q)
    # distinct vectors with exactly equal scores: a query on the diagonal of two axis-aligned words
    w[num - 2] = np.eye(width)[0]
    w[num - 1] = np.eye(width)[1]
    queries.append(_unit(np.eye(width)[0] + np.eye(width)[1]))
    queries += list(rng.normal(size=(30, width)))  # ordinary queries
    return w.astype(np.float32), np.asarray(queries, dtype=np.float32)


@pytest.mark.parametrize("backend", SCREENED)
def test_screened_search_equals_float64_bruteforce_with_ties_and_near_ties(backend):
    w_NE, q_QE = _hard_case()
    k = 10
    index = WordIndex(w_NE, backend=backend)
    labels, scores = index.search(q_QE, k)
    ref_labels, ref_scores = _reference64(q_QE, w_NE, k)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(scores, ref_scores)
    num = len(w_NE)
    assert labels[40, 0] == num - 2 and labels[40, 1] == num - 1, "an exact tie goes to the lower word id"
    # the case is hard: a top-k straight from the screen's own scores gets many of these rows wrong
    import torch

    dtype = torch.bfloat16 if backend == "bf16" else torch.float32
    q = torch.nn.functional.normalize(torch.from_numpy(q_QE), dim=-1)
    screened = (q.to(dtype) @ torch.from_numpy(w_NE).to(dtype).T).float()
    naive = torch.topk(screened, k, dim=1).indices.numpy()
    if backend == "bf16":
        assert (naive != np.where(ref_labels >= 0, ref_labels, naive)).any(axis=1).sum() >= 20
    assert index.stats["pairs"] >= k * len(q_QE) and index.stats["bound_failures"] == 0


def _rounding_biased(x: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Each value moved to one float32 step beside the midpoint of its two bf16 neighbours, on the side that
    makes bf16 rounding move it by half a bf16 step up (direction +1) or down (-1): the worst case."""
    x32 = np.asarray(x, dtype=np.float32)
    towards_zero = (x32.view(np.int32) & ~0xFFFF).view(np.float32)
    away = ((x32.view(np.int32) & ~0xFFFF) + 0x10000).view(np.float32)
    mid = ((towards_zero.astype(np.float64) + away) / 2).astype(np.float32)  # 9 bits: exact in float32
    go_away = (x32 >= 0) == (direction > 0)  # rounding up means away from zero for positive values
    return np.where(go_away, np.nextafter(mid, np.sign(mid) * np.inf), np.nextafter(mid, np.float32(0)))


def test_rounding_that_reorders_across_bf16_steps_is_caught():
    """Per query: the best word rounds by half a bf16 step against the query in every component, ten
    slightly worse words round with it; in bf16 the best word then scores a whole step below the ten others.
    A screen that kept only the words at or above its own k-th score would drop it; the bound keeps it."""
    import torch

    rng = np.random.default_rng(11)
    width, k, num_q = 128, 10, 8
    w_rows, queries = [_unit(rng.normal(size=(20000, width)))], []
    for _ in range(num_q):
        q = _unit(rng.normal(size=width))
        rows = []
        for cos in [0.5008] + [0.4996 - 1e-5 * j for j in range(k)]:
            noise = rng.normal(size=width)
            noise = _unit(noise - q * (noise @ q))
            rows.append(cos * q + np.sqrt(1 - cos**2) * noise)
        rows[0] = _rounding_biased(rows[0], -np.sign(q))
        rows[1:] = [_rounding_biased(r, np.sign(q)) for r in rows[1:]]
        w_rows.append(np.stack(rows))
        queries.append(q)
    # spread over the list: in 64-word blocks of their own, the block maxima would hide the problem
    perm = rng.permutation(20000 + num_q * (k + 1))
    w_NE = np.concatenate(w_rows)[perm].astype(np.float32)
    q_QE = np.asarray(queries, dtype=np.float32)
    ref_labels, ref_scores = _reference64(q_QE, w_NE, k)
    best_ids = np.argsort(perm)[20000 + (k + 1) * np.arange(num_q)]
    np.testing.assert_array_equal(ref_labels[:, 0], best_ids)

    unit = torch.from_numpy(q_QE.astype(np.float64))
    unit = (unit / unit.norm(dim=1, keepdim=True)).to(torch.bfloat16)
    screened = (unit @ torch.from_numpy(w_NE).to(torch.bfloat16).T).float().numpy()
    kth = np.sort(screened, axis=1)[:, -k]
    dropped = screened[np.arange(num_q), best_ids] < kth
    assert dropped.sum() >= num_q // 2, "the case must defeat a screen without the bound"

    labels, scores = WordIndex(w_NE, backend="bf16").search(q_QE, k)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(scores, ref_scores)


def test_words_barely_above_zero_are_kept_when_the_screen_puts_them_below():
    """Queries with fewer than k words scoring >= 0: the output is every word scoring >= 0, including those
    whose exact score is a hair above 0 but whose screened score is negative (rounding against the query)."""
    import torch

    rng = np.random.default_rng(13)
    width, k = 64, 10
    axis = _unit(rng.normal(size=width))
    w_rows = [_unit(3 * axis + rng.normal(size=(6000, width)) * 0.1)]  # every word on one side of `axis`
    queries = [_unit(-axis + 0.3 * _unit(rng.normal(size=width))) for _ in range(6)]
    for i, q in enumerate(queries):
        # orthogonal to q and pointing away from the other queries: negative for them
        away = -np.mean([x for j, x in enumerate(queries) if j != i], axis=0)
        rows = []
        for cos in rng.uniform(0, 2e-3, 300):
            noise = _unit(away) + 0.05 * rng.normal(size=width)
            noise = _unit(noise - q * (noise @ q))
            rows.append(_rounding_biased(cos * q + np.sqrt(1 - cos**2) * noise, -np.sign(q)))
        rows = np.stack(rows)
        exact = rows.astype(np.float64) @ q.astype(np.float32).astype(np.float64)
        q16 = torch.from_numpy(q).to(torch.bfloat16)
        screened = (torch.from_numpy(rows).to(torch.bfloat16) @ q16).float().numpy()
        hairline = rows[(exact >= 0) & (screened < 0)][:3]  # >= 0 exactly, < 0 in bf16
        assert len(hairline) == 3
        noise = _unit(away - q * (away @ q))
        w_rows.append(np.concatenate([hairline, [0.05 * q + np.sqrt(1 - 0.05**2) * noise]]))
    perm = rng.permutation(6000 + 6 * 4)
    w_NE = np.concatenate(w_rows)[perm].astype(np.float32)
    q_QE = np.asarray(queries, dtype=np.float32)
    ref_labels, ref_scores = _reference64(q_QE, w_NE, k)
    assert ((ref_labels >= 0).sum(axis=1) == 4).all(), "fewer than k words score >= 0: the 4 built ones"

    for backend in SCREENED:
        index = WordIndex(w_NE, backend=backend)
        labels, scores = index.search(q_QE, k)
        np.testing.assert_array_equal(labels, ref_labels)
        np.testing.assert_array_equal(scores, ref_scores)
        assert index.stats["row_route"] == 0


def test_bf16_and_torch_screens_give_identical_output():
    rng = np.random.default_rng(3)
    w_NE = _unit(rng.normal(size=(5000, 96))).astype(np.float32)
    q_QE = rng.normal(size=(400, 96)).astype(np.float32)
    for score in SCORE_SIGNS_ALL:
        a = WordIndex(w_NE, score=score, backend="bf16").search(q_QE, 10)
        b = WordIndex(w_NE, score=score, backend="torch").search(q_QE, 10)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


SCORE_SIGNS_ALL = ["cos", "neg-cos"]


@pytest.mark.parametrize("backend", SCREENED)
def test_both_routes_and_small_chunks_give_the_same_answer(backend, monkeypatch):
    """Queries whose k-th score is not clearly positive take the whole-row route; chunks of queries and of
    re-scored pairs, and which other queries share a call, change nothing."""
    import pipeline.search as search_mod

    rng = np.random.default_rng(5)
    w_NE = _unit(rng.normal(size=(700, 8))).astype(np.float32)  # narrow: many words score < 0
    q_QE = rng.normal(size=(300, 8)).astype(np.float32)
    k = 300  # k-th score negative for most queries: the absent rule and the row route
    want = WordIndex(w_NE, backend=backend).search(q_QE, k)
    np.testing.assert_array_equal(want[0], _reference64(q_QE, w_NE, k)[0])
    index = WordIndex(w_NE, backend=backend)
    index.search(q_QE[:1], k)
    assert index.stats["row_route"] == 1
    fast = WordIndex(w_NE, backend=backend)
    fast.search(q_QE, 3)
    assert fast.stats["row_route"] < len(q_QE), "small k: most queries take the block route"

    monkeypatch.setattr(search_mod, "CHUNK_BYTES", 4 * 1024)  # a few queries per chunk
    monkeypatch.setattr(search_mod, "PAIR_CHUNK", 7)
    small = WordIndex(w_NE, backend=backend)
    got = small.search(q_QE, k)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    one_by_one = [small.search(q_QE[i : i + 1], 3)[0] for i in range(0, 300, 37)]
    np.testing.assert_array_equal(np.concatenate(one_by_one), fast.search(q_QE, 3)[0][::37])


def test_a_screen_that_breaks_its_bound_is_caught_and_replaced(recwarn):
    """A screen whose error exceeds the bound (here: one word of the bf16 matrix corrupted by far more than
    bf16's rounding) is detected on the candidates; the index switches to a float32 screen and stays exact."""
    import torch

    rng = np.random.default_rng(7)
    w_NE = _unit(rng.normal(size=(2000, 32))).astype(np.float32)
    q_QE = np.repeat(w_NE[:1], 4, axis=0) + 0.01 * rng.normal(size=(4, 32)).astype(np.float32)
    index = WordIndex(w_NE, backend="bf16")
    with torch.no_grad():
        index._screen_NE[0] *= 0.97  # word 0: its screened score drops by ~0.03, far beyond the bound
    labels, scores = index.search(q_QE, 10)
    ref_labels, ref_scores = _reference64(q_QE, w_NE, 10)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(scores, ref_scores)
    assert index.stats["bound_failures"] == 1 and index._screen_dtype == torch.float32
    assert any("exceeded its error bound" in str(w.message) for w in recwarn)


def test_auto_backend_choice():
    from pipeline.search import bf16_matmul_available, resolve_backend

    want = "bf16" if bf16_matmul_available("cpu") else ("faiss" if faiss_available() else "torch")
    assert resolve_backend("auto", "cpu") == want
    assert WordIndex(np.eye(4, dtype=np.float32), backend="auto").backend == want
