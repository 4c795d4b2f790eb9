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


BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])


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
