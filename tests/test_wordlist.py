"""Word-list normalisation, the shipped default list, and the on-disk embedding cache."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pipeline.wordlist import (
    WordlistError,
    cached_word_embeddings,
    compute_word_embeddings,
    default_wordlist_path,
    load_wordlist,
)
from visalign.shards import wordlist_sha256, write_wordlist


def test_normalisation_rules(tmp_path):
    raw = "\ufeffCat\r\n  dog \r\n\r\n\nDon't\nT-Shirt\ncat\nDOG\n  \nice cream\nzebra"
    path = tmp_path / "w.txt"
    path.write_bytes(raw.encode("utf-8"))
    assert load_wordlist(path) == ["cat", "dog", "don't", "t-shirt", "ice cream", "zebra"]
    # case kept when asked: "Cat" and "cat" are then different words, first occurrence order kept
    assert load_wordlist(path, lowercase=False) == [
        "Cat",
        "dog",
        "Don't",
        "T-Shirt",
        "cat",
        "DOG",
        "ice cream",
        "zebra",
    ]


def test_old_mac_line_ends_and_sha(tmp_path):
    path = tmp_path / "w.txt"
    path.write_bytes(b"one\rtwo\rthree")
    words = load_wordlist(path)
    assert words == ["one", "two", "three"]
    out = write_wordlist(words, tmp_path / "out.txt")
    assert out.read_bytes() == b"one\ntwo\nthree\n"
    assert wordlist_sha256(words) == hashlib.sha256(b"one\ntwo\nthree\n").hexdigest()


@pytest.mark.parametrize("content", [b"", b"\n\n  \r\n", b"\xff\xfe\x00bad"])
def test_unusable_lists_are_clear_errors(tmp_path, content):
    path = tmp_path / "w.txt"
    path.write_bytes(content)
    with pytest.raises(WordlistError, match=str(path)):
        load_wordlist(path)


def test_missing_list_is_a_clear_error(tmp_path):
    with pytest.raises(WordlistError, match="does not exist"):
        load_wordlist(tmp_path / "missing.txt")


def test_shipped_default_list():
    path = default_wordlist_path()
    assert path.is_file(), "wordlists/english-41k.txt must ship with the repo"
    words = load_wordlist(None)
    assert len(words) == 41_000
    raw = path.read_text(encoding="utf-8").split("\n")[:-1]
    assert words == raw, "the shipped list is already normalised (the committed file is the artifact)"
    assert words[:3] == ["the", "to", "and"]
    assert all(w.replace("'", "").replace("-", "").isalpha() for w in words)


class _FakeTextTower:
    """encode_text = a fixed random projection of a per-text hash, so averaging can be checked exactly."""

    calls = 0

    def encode_text(self, texts):
        import torch

        _FakeTextTower.calls += 1
        rows = [
            np.random.default_rng(int(hashlib.md5(t.encode()).hexdigest()[:8], 16)).normal(size=8)
            for t in texts
        ]
        return torch.tensor(np.stack(rows), dtype=torch.float32) * 3.0

    def fingerprint(self):
        return "fake"


def test_template_average_and_cache(tmp_path):
    enc = _FakeTextTower()
    words = ["cat", "dog", "car"]
    templates = ["a photo of a {}.", "{}"]
    got = compute_word_embeddings(enc, words, templates, batch_size=2, progress=False)
    ref = []
    for w in words:
        vs = [enc.encode_text([t.format(w)]).numpy()[0] for t in templates]
        vs = [v / np.linalg.norm(v) for v in vs]
        m = np.mean(vs, axis=0)
        ref.append(m / np.linalg.norm(m))
    np.testing.assert_allclose(got, np.stack(ref), rtol=1e-5, atol=1e-6)
    path = cached_word_embeddings(enc, words, templates, tmp_path, progress=False)
    calls = _FakeTextTower.calls
    assert cached_word_embeddings(enc, words, templates, tmp_path, progress=False) == path
    assert _FakeTextTower.calls == calls, "second call must hit the cache"
    np.testing.assert_allclose(np.load(path, allow_pickle=False), got, rtol=1e-6)
    other = cached_word_embeddings(enc, words, ["{}"], tmp_path, progress=False)
    assert other != path, "templates are part of the cache key"
    with pytest.raises(WordlistError, match="placeholder"):
        compute_word_embeddings(enc, words, ["no placeholder"], progress=False)
