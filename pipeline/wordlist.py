"""Word lists and their text-tower embeddings.

Inputs: any newline-separated word list (a file) and an encoder with ``encode_text``.
Outputs: the normalised list (``list[str]``, written to ``OUT/wordlist.txt``; label ids index into it), its
sha256, and an ``[N, E]`` float32 matrix of L2-normalised word embeddings cached on disk.

Normalisation of a list (documented in docs/pipeline.md and tested): a UTF-8 BOM is dropped, CRLF/CR line
ends are accepted, surrounding whitespace is stripped, blank lines are skipped, words are lowercased (unless
``lowercase=False``), and duplicates are dropped keeping the first occurrence so the order of the file is
kept. Apostrophes, hyphens and inner spaces are kept: a line is one "word" even if it is a phrase.

Letters: N words, E joint (text-image) embedding width, T templates.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from visalign.errors import VisalignError
from visalign.shards import wordlist_sha256

DEFAULT_WORDLIST_NAME = "english-41k.txt"


class WordlistError(VisalignError):
    """A word list that cannot be used (missing, empty, not UTF-8)."""


def default_wordlist_path() -> Path:
    """The shipped list ``wordlists/english-41k.txt``.

    Looked up, in order: ``$VISALIGN_WORDLIST``; next to the package (``<repo>/wordlists``, which is where an
    editable install or a checkout finds it). A non-editable install does not ship the list: pass
    ``--wordlist FILE`` or set ``VISALIGN_WORDLIST``.
    """
    env = os.environ.get("VISALIGN_WORDLIST")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "wordlists" / DEFAULT_WORDLIST_NAME


def normalise_words(lines: Iterable[str], lowercase: bool = True) -> list[str]:
    """Normalise raw lines into a word list (rules in the module docstring)."""
    words: list[str] = []
    seen: set[str] = set()
    for i, line in enumerate(lines):
        if i == 0:
            line = line.lstrip("\ufeff")
        word = line.strip()  # also removes a stray \r left by CRLF files split on \n
        if lowercase:
            word = word.lower()
        if not word or word in seen:
            continue
        seen.add(word)
        words.append(word)
    return words


def load_wordlist(path: str | Path | None = None, lowercase: bool = True) -> list[str]:
    """Read and normalise a newline-separated word list; ``None`` = the shipped default."""
    path = Path(path) if path else default_wordlist_path()
    if not path.is_file():
        hint = (
            "pass --wordlist FILE (one word per line) or set VISALIGN_WORDLIST"
            if path == default_wordlist_path()
            else "pass an existing newline-separated file to --wordlist"
        )
        raise WordlistError(f"word list {path} does not exist: {hint}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise WordlistError(f"word list {path} is not UTF-8 text ({err}); convert it to UTF-8") from err
    # splitlines() would also split on form feeds and other rare separators; the contract is newlines only
    words = normalise_words(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), lowercase=lowercase)
    if not words:
        raise WordlistError(f"word list {path} holds no words after normalisation (blank or empty file)")
    return words


def embedding_cache_key(
    fingerprint: str, words_sha256: str, templates: list[str], text_context: int | None
) -> str:
    """Digest naming the cached embedding file: any change of tower, list, templates or context misses."""
    blob = json.dumps(
        {"encoder": fingerprint, "words": words_sha256, "templates": list(templates), "ctx": text_context},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def compute_word_embeddings(
    encoder,
    words: list[str],
    templates: list[str] | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Text tower over every word: ``[N, E]`` float32, L2-normalised.

    With templates (``"a photo of a {}."``) each template's embedding is L2-normalised, the T of them are
    averaged and the mean is normalised again (CLIP's zero-shot recipe); without, the bare word is embedded.
    """
    import torch
    from tqdm.auto import tqdm

    templates = list(templates or []) or ["{}"]
    for t in templates:
        if "{}" not in t:
            raise WordlistError(f"template {t!r} has no '{{}}' placeholder for the word")
    sum_NE: np.ndarray | None = None
    bar = tqdm(
        total=len(words) * len(templates),
        desc="word embeddings",
        unit="text",
        disable=not progress,
        leave=False,
    )
    for template in templates:
        chunks = []
        for start in range(0, len(words), batch_size):
            texts = [template.format(w) for w in words[start : start + batch_size]]
            with torch.inference_mode():
                emb_BE = encoder.encode_text(texts).float()
            chunks.append(torch.nn.functional.normalize(emb_BE, dim=-1).cpu().numpy())
            bar.update(len(texts))
        part_NE = np.concatenate(chunks, axis=0)
        sum_NE = part_NE if sum_NE is None else sum_NE + part_NE
    bar.close()
    assert sum_NE is not None
    norm_N1 = np.linalg.norm(sum_NE, axis=1, keepdims=True)
    return (sum_NE / np.maximum(norm_N1, 1e-12)).astype(np.float32)


def cached_word_embeddings(
    encoder,
    words: list[str],
    templates: list[str] | None,
    cache_dir: str | Path,
    text_context: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> Path:
    """Compute the word embeddings once per (encoder, list, templates, context) and return the .npy path.

    Saved with ``allow_pickle=False`` via write-then-rename, so concurrent runs never read half a file.
    """
    key = embedding_cache_key(
        encoder.fingerprint(), wordlist_sha256(words), list(templates or []), text_context
    )
    path = Path(cache_dir) / "word-embeddings" / f"{key}.npy"
    if path.is_file():
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
        if arr.shape[0] == len(words):
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    emb_NE = compute_word_embeddings(encoder, words, templates, batch_size=batch_size, progress=progress)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, emb_NE, allow_pickle=False)
    os.replace(tmp, path)
    return path


def load_word_embeddings(path: str | Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)
