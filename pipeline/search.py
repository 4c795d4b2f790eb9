"""Exact top-k word search for patch embeddings.

Input: L2-normalised word embeddings ``[N, E]`` and query patch embeddings ``[Q, E]`` (any norm; they are
normalised here). Output: ``labels_QK`` int32 word ids and ``scores_QK`` float16, descending per row.

Score ``cos`` = cosine similarity; ``neg-cos`` = minus the cosine (SEA, following CLIP Surgery, negates it
for CLIP). For ``neg-cos`` the index holds the NEGATED word matrix, so an inner-product top-k returns the
exact top-k of ``-cos`` rather than the bottom-k of ``cos`` re-signed. Slots whose score is < 0 (or that do
not exist because K > N) get label -1 and score -inf; the patch itself is always kept.

Backends:

* ``faiss``: FAISS ``IndexFlatIP`` (float32 scores; on GPU when FAISS sees one and the device is CUDA).
* ``torch`` and ``bf16``: a screen + exact re-score. A matmul over all N words (float32 for ``torch``, bfloat16
  for ``bf16``, about 3x faster on CPUs with bf16 kernels and on GPUs) keeps, per query, every word whose
  screened score could still belong to the exact top-k given a proven bound on the screen's error; only
  those candidates are re-scored in float64 from the float32 vectors. The result is the exact top-k of the
  float64 scores, ties to the lower word id, whatever the screen's precision, batch or chunking: ``torch``
  and ``bf16`` give identical labels and scores.
* ``auto``: ``bf16`` where torch has bf16 matmul kernels for the device, else ``faiss`` if installed, else
  ``torch``.

Why the screen is exact. For a query ``q`` (unit norm) and word ``w``, the screen computes ``ŝ = R(a)`` where
``a`` is the float32-accumulated dot product of the rounded vectors ``q̃ = r(q)``, ``w̃ = r(w)`` and ``R`` the
rounding of the output. With the exact score ``s = q·w``:

    |s - a| <= d1 = |q̃|·max_j|w̃_j - w_j| + |q̃ - q|·max_j|w_j| + E·2^-23·|q̃|·max_j|w̃_j|   (Cauchy-Schwarz,
                                                                    fp32 accumulation with a 2x margin)
    |a - ŝ| <= u·|ŝ|                                 (u = 2^-8 for a bfloat16 output, 2^-24 for float32)

so ``lo(ŝ) <= s <= hi(ŝ)`` with ``lo(x) = x - u|x| - d1``, ``hi(x) = x + u|x| + d1``, both increasing in ``x``.
The k words with the largest ``ŝ`` each have ``s >= lo(ŝ_(k))``, so the exact k-th score is ``>= L =
lo(ŝ_(k))``; every word of the exact top-k (ties at the k-th score included) has ``hi(ŝ_j) >= s_j >= L`` and
is a candidate. The k-th largest *block maximum* (blocks of 64 words) stands in for ``ŝ_(k)``: it is a lower
bound (so the list only grows) that costs one pass over the scores instead of a top-k over all N. The candidate
list is as long as the number of words within about ``2·d1`` of the k-th score (d1 ~ 0.004 for bf16 at any
width, ~1e-4 for float32); there is no fixed length to choose and nothing to fall back from. Queries whose
k-th score is not clearly positive take the same route on the float values of the whole row. The bound is
also checked on every candidate (their exact scores are known): a screen that violates it (a GEMM
that accumulates below float32) makes the index recompute the chunk with a float32 screen and keep it.

Letters: Q queries (patches), C queries of one chunk, N words, B word blocks, E embedding width, K top-k
slots, M candidate (query, word) pairs.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from typing import Literal

import numpy as np
import torch

from visalign.config import ConfigError

ScoreSign = Literal["cos", "neg-cos"]
SCORE_SIGNS = ("cos", "neg-cos")
BACKENDS = ("auto", "faiss", "torch", "bf16")

BLOCK = 64
"""words per block of the screen's block maxima"""
CHUNK_BYTES = 128 << 20
"""screened scores held at once (one chunk of queries); the buffer is kept, since fresh large allocations
pay page faults on every call"""
PAIR_CHUNK = 256
"""(query, word) pairs re-scored at once: their float64 rows stay in the CPU's cache"""


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def bf16_matmul_available(device: str) -> bool:
    """True where a bfloat16 matmul runs on native kernels (so the bf16 screen pays off)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_backend(backend: str, device: str = "cpu") -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"search backend {backend!r} is not one of {list(BACKENDS)}")
    if backend == "faiss" and not faiss_available():
        raise ConfigError(
            "search backend 'faiss' asked for but faiss is not installed: use 'torch' or 'auto'"
        )
    if backend != "auto":
        return backend
    if bf16_matmul_available(device):
        return "bf16"
    return "faiss" if faiss_available() else "torch"


@contextlib.contextmanager
def _one_thread():
    """Run torch CPU ops inline on the calling thread. The search's many small gathers and masks gain
    little from a second thread, and on a busy machine each multi-threaded op waits for a core."""
    num = torch.get_num_threads()
    if num == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(num)


_INT_VIEW = {torch.bfloat16: torch.int16, torch.float32: torch.int32}
"""same-width integers: for positive floats the bit patterns order like the values"""


def rescore_pairs(
    q64_CE: torch.Tensor, words_NE: torch.Tensor, rows_M: torch.Tensor, cols_M: torch.Tensor
) -> torch.Tensor:
    """float64 dot products of (query, word) pairs of float32 vectors: every product is exact, and a sum
    over the last dimension does not depend on where the pair sits, so equal vectors score equal. Pairs go
    through small reused buffers that stay in the CPU's cache."""
    out = torch.empty(len(rows_M), dtype=torch.float64, device=q64_CE.device)
    step = max(1, min(PAIR_CHUNK, len(rows_M)))  # no pairs: every word of these rows scores < 0
    q_PE = torch.empty(step, q64_CE.shape[1], dtype=torch.float64, device=q64_CE.device)
    w_PE = torch.empty(step, q64_CE.shape[1], dtype=torch.float32, device=q64_CE.device)
    w64_PE = torch.empty(step, q64_CE.shape[1], dtype=torch.float64, device=q64_CE.device)
    for a in range(0, len(rows_M), step):
        r, c = rows_M[a : a + step], cols_M[a : a + step]
        n = len(r)
        torch.index_select(q64_CE, 0, r, out=q_PE[:n])
        torch.index_select(words_NE, 0, c, out=w_PE[:n])
        w64_PE[:n].copy_(w_PE[:n])
        q_PE[:n].mul_(w64_PE[:n])
        torch.sum(q_PE[:n], dim=-1, out=out[a : a + n])
    return out


class WordIndex:
    """Exact inner-product index over ``sign * words_NE``; build once per process, query per batch.

    ``stats`` counts queries, re-scored candidate pairs and queries that took the whole-row route.
    """

    def __init__(
        self,
        words_NE: np.ndarray,
        score: str = "cos",
        backend: str = "auto",
        device: str = "cpu",
    ):
        if score not in SCORE_SIGNS:
            raise ConfigError(f"score {score!r} is not one of {list(SCORE_SIGNS)}")
        self.score = score
        self.backend = resolve_backend(backend, device)
        self.num_words = int(words_NE.shape[0])
        sign = -1.0 if score == "neg-cos" else 1.0
        signed_NE = np.ascontiguousarray(sign * np.asarray(words_NE, dtype=np.float32))
        self.device = device
        self._lock = threading.Lock()  # one search at a time: the screen buffer is shared
        self.stats = {"queries": 0, "pairs": 0, "row_route": 0, "bound_failures": 0}
        if self.backend == "faiss":
            import faiss

            index = faiss.IndexFlatIP(signed_NE.shape[1])
            index.add(signed_NE)
            # GPU FAISS only when the run itself is on CUDA; a CPU-only faiss build has no get_num_gpus > 0
            if str(device).startswith("cuda") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            self._index = index
            return
        self._words_NE = torch.from_numpy(signed_NE).to(device)
        self._set_screen(torch.bfloat16 if self.backend == "bf16" else torch.float32)

    def _set_screen(self, dtype: torch.dtype) -> None:
        """The screen's word matrix (padded to whole blocks with zero rows) and its error constants."""
        if dtype == torch.bfloat16 and str(self.device).startswith("cuda"):
            # the error bound assumes float32 accumulation; cuBLAS may otherwise reduce split-K partial sums
            # in bf16 (the check below would catch it, at the cost of a recomputation)
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        words_NE = self._words_NE
        num_words, width = words_NE.shape
        self._screen_dtype = dtype
        self._num_blocks = max(1, math.ceil(num_words / BLOCK))
        screen_NE = torch.zeros(self._num_blocks * BLOCK, width, dtype=dtype, device=words_NE.device)
        screen_NE[:num_words] = words_NE.to(dtype)
        self._screen_NE = screen_NE
        rows = max(1, CHUNK_BYTES // (screen_NE.shape[0] * screen_NE.element_size()))
        self._buffer_RN = torch.empty(rows, screen_NE.shape[0], dtype=dtype, device=screen_NE.device)
        w64_NE = words_NE.double()
        rounded64_NE = screen_NE[:num_words].double()
        self._max_norm = float(w64_NE.norm(dim=1).max()) if num_words else 0.0
        self._max_rounded_norm = float(rounded64_NE.norm(dim=1).max()) if num_words else 0.0
        self._max_word_error = float((rounded64_NE - w64_NE).norm(dim=1).max()) if num_words else 0.0
        self._out_rel = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
        self._acc = width * 2.0**-23  # float32 accumulation (any order), with a factor 2 of margin

    # ---- queries -------------------------------------------------------------------------------------------
    def search(self, queries_QE: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k word ids and scores per query: ``(labels_QK int32, scores_QK float16)``."""
        with self._lock:
            return self._search(queries_QE, k)

    def _search(self, queries_QE: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        q_QE = torch.as_tensor(queries_QE).float()
        num_q = q_QE.shape[0]
        k_eff = min(k, self.num_words)
        self.stats["queries"] += num_q
        if self.backend == "faiss":
            q_QE = torch.nn.functional.normalize(q_QE, dim=-1)
            scores_QK, labels_QK = self._index.search(np.ascontiguousarray(q_QE.cpu().numpy()), k_eff)
            labels_QK = labels_QK.astype(np.int64)
        elif num_q == 0 or k_eff == 0:
            scores_QK = np.zeros((num_q, k_eff), dtype=np.float32)
            labels_QK = np.zeros((num_q, k_eff), dtype=np.int64)
        else:
            q_QE = q_QE.to(self._words_NE.device)
            rows = self._buffer_RN.shape[0]
            parts = [self._exact_topk(q_QE[a : a + rows], k_eff) for a in range(0, num_q, rows)]
            scores_QK = torch.cat([p[0] for p in parts]).cpu().numpy()  # float64: the absent rule on it
            labels_QK = torch.cat([p[1] for p in parts]).cpu().numpy()
        out_labels = np.full((num_q, k), -1, dtype=np.int32)
        out_scores = np.full((num_q, k), -np.inf, dtype=np.float32)
        keep = scores_QK >= 0  # the absent rule: a negative score is no label, the patch stays
        out_labels[:, :k_eff] = np.where(keep, labels_QK, -1)
        out_scores[:, :k_eff] = np.where(keep, scores_QK, -np.inf)  # float64 -> float32 -> float16
        return out_labels, out_scores.astype(np.float16)

    def _exact_topk(self, q_CE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of one chunk of raw queries: ``(scores_CK float64, labels_CK int64)``."""
        screen_dtype = self._screen_dtype
        result = self._screened_topk(q_CE, k)
        if result is None:  # the screen broke its error bound: never trust it again in this process
            self.stats["bound_failures"] += 1
            if screen_dtype != torch.float32:
                warnings.warn(
                    f"the {screen_dtype} screen of the word search exceeded its error bound on "
                    f"{self.device}; searching with a float32 screen from now on",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self._set_screen(torch.float32)
                result = self._screened_topk(q_CE, k)
            if result is None:
                raise RuntimeError("the float32 screen of the word search exceeded its error bound")
        return result

    def _screened_topk(self, q_CE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The screen's matmul on every thread, the rest on one; ``None`` when the screen broke its bound.

        ``q_CE``: the queries as given (float32). Scores are those of the unit queries, in float64; the
        order is decided on the raw queries' float64 dot products, whose float32 x float32 products are
        exact, so no rounding of a normalisation can reorder two words.
        """
        num_c = q_CE.shape[0]
        q64_CE = q_CE.double()
        norm64_C = q64_CE.norm(dim=1).clamp(min=1e-12)
        unit64_CE = q64_CE / norm64_C[:, None]
        q_rounded_CE = unit64_CE.to(self._screen_dtype)
        s_CN = torch.mm(q_rounded_CE, self._screen_NE.T, out=self._buffer_RN[:num_c])  # zero words score 0
        with _one_thread():
            return self._candidates_topk(q64_CE, norm64_C, unit64_CE, q_rounded_CE, s_CN, k)

    def _candidates_topk(self, q64_CE, norm64_C, unit64_CE, q_rounded_CE, s_CN, k: int):
        """Everything after the screen's matmul: bound, candidates, re-score, top-k."""
        num_c = q64_CE.shape[0]
        dtype, int_dtype = self._screen_dtype, _INT_VIEW[self._screen_dtype]
        if self._screen_NE.shape[0] > self.num_words:
            s_CN[:, self.num_words :] = float("-inf")
        # d1 per query (module docstring), plus the float64 arithmetic of the bound and of the re-score
        q_rounded64_CE = q_rounded_CE.double()
        d1_C = (
            q_rounded64_CE.norm(dim=1) * (self._max_word_error + self._acc * self._max_rounded_norm)
            + (q_rounded64_CE - unit64_CE).norm(dim=1) * self._max_norm
            + q64_CE.shape[1] * 2.0**-50 * self._max_norm
        ) * (1 + 1e-6) + 1e-12

        # L = lo(k-th screened score) bounds the exact k-th score from below. Words scoring < 0 are absent
        # whatever their rank, so a word is a candidate iff hi(ŝ) >= max(L, 0). The k-th largest block
        # maximum stands in for the k-th screened score (a lower bound: the list only grows); on bit
        # patterns, which order positive floats (a non-positive one gives no bound: L = -inf).
        bits_CBW = s_CN.view(int_dtype).view(num_c, self._num_blocks, BLOCK)
        parts = []  # (rows_M, cols_M, screened_M), each (row, col) ascending
        if self._num_blocks >= k:
            block_max_CB = bits_CBW.amax(dim=-1).long()
            kth_bits_C = torch.topk(block_max_CB, k, dim=1, sorted=False).values.amin(dim=1)
            kth_C = kth_bits_C.to(int_dtype).view(dtype).double()
            low_C = torch.where(kth_bits_C > 0, self._low(kth_C, d1_C), torch.zeros_like(kth_C))
            t_C = self._hi_inverse(low_C.clamp(min=0), d1_C)
            # ŝ >= t  <=>  bits >= up_C (values >= 0)  or  bits <= down_C (values in [t, -0.0] when t < 0)
            up_C, down_C = self._bit_thresholds(t_C)
            cand_CB = block_max_CB >= up_C[:, None]
            low_rows = (t_C <= 0).nonzero().squeeze(1)
            if len(low_rows):
                block_min_RB = bits_CBW[low_rows].amin(dim=-1).long()
                cand_CB[low_rows] |= block_min_RB <= down_C[low_rows, None]
            r_b, b_b = cand_CB.nonzero(as_tuple=True)
            vals_bits = bits_CBW[r_b, b_b]  # [candidate blocks, BLOCK]
            vals_int = vals_bits.long()
            i, pos = ((vals_int >= up_C[r_b, None]) | (vals_int <= down_C[r_b, None])).nonzero(as_tuple=True)
            parts.append((r_b[i], b_b[i] * BLOCK + pos, vals_bits[i, pos].view(dtype)))
        else:  # fewer blocks than k (short lists): the k-th screened score of each whole row
            self.stats["row_route"] += num_c
            s_CN32 = s_CN[:, : self.num_words].float()
            kth_C = torch.topk(s_CN32, k, dim=1, sorted=False).values.amin(dim=1).double()
            t_C = self._hi_inverse(self._low(kth_C, d1_C).clamp(min=0), d1_C)
            t32_C = t_C.float()
            down = torch.nextafter(t32_C, torch.full_like(t32_C, -math.inf))
            t32_C = torch.where(t32_C.double() > t_C, down, t32_C)
            r_s, c_s = (s_CN32 >= t32_C[:, None]).nonzero(as_tuple=True)
            parts.append((r_s, c_s, s_CN32[r_s, c_s]))
        rows_M = torch.cat([p[0] for p in parts])
        cols_M = torch.cat([p[1] for p in parts])
        screened_M = torch.cat([p[2].double() for p in parts])
        if len(parts) > 1:  # merge the two routes back into (row, col) order, which ties keep below
            order = torch.argsort(rows_M * self._screen_NE.shape[0] + cols_M)
            rows_M, cols_M, screened_M = rows_M[order], cols_M[order], screened_M[order]
        self.stats["pairs"] += len(rows_M)

        raw_M = self._rescore(q64_CE, rows_M, cols_M)
        exact_M = raw_M / norm64_C[rows_M]
        bound_M = self._out_rel * screened_M.abs() + d1_C[rows_M]
        if bool(((exact_M - screened_M).abs() > bound_M).any()):
            return None
        return self._topk_of_pairs(raw_M, exact_M, rows_M, cols_M, num_c, k)

    def _low(self, x_C: torch.Tensor, d1_C: torch.Tensor) -> torch.Tensor:
        """lo(x): the smallest exact score a screened value x allows."""
        return x_C - self._out_rel * x_C.abs() - d1_C

    def _hi_inverse(self, low_C: torch.Tensor, d1_C: torch.Tensor) -> torch.Tensor:
        """The smallest screened value x with hi(x) >= low (a little below it: conservative)."""
        u = self._out_rel
        need_C = low_C - d1_C
        t_C = torch.where(need_C >= 0, need_C / (1 + u), need_C / (1 - u))
        return t_C - 1e-12 - 1e-9 * t_C.abs()

    def _bit_thresholds(self, t_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` as int64 such that every screen value x >= t has ``bits(x) >= up`` (x >= 0) or
        ``bits(x) <= down`` (x < 0: a sign bit set, so the pattern is negative and grows more negative
        with |x|). For t > 0 no negative value qualifies; for t <= 0 every value >= 0 does."""
        shift = 16 if self._screen_dtype == torch.bfloat16 else 0
        sign_bit = -(1 << (31 - shift))  # bits of -0.0 as a signed pattern of the screen's width
        mag32 = t_C.abs().float()
        mag32 = torch.where(
            mag32.double() < t_C.abs(), torch.nextafter(mag32, torch.full_like(mag32, math.inf)), mag32
        )
        # |t| rounded up to the screen's precision (an upper bound of the magnitudes to keep when t < 0)
        up_mag = mag32.view(torch.int32).long()
        if shift:
            up_mag = (up_mag >> shift) + ((up_mag & ((1 << shift) - 1)) != 0).long()
        # t rounded down to the screen's precision (a lower bound of the values to keep when t > 0)
        mag32_down = t_C.float()
        mag32_down = torch.where(
            mag32_down.double() > t_C, torch.nextafter(mag32_down, torch.zeros_like(mag32_down)), mag32_down
        )
        down_mag = mag32_down.view(torch.int32).long() >> shift
        positive = t_C > 0
        up_C = torch.where(positive, down_mag, torch.zeros_like(down_mag))
        down_C = torch.where(positive, torch.full_like(up_mag, sign_bit - 1), sign_bit + up_mag)
        return up_C, down_C

    def _rescore(self, q64_CE: torch.Tensor, rows_M: torch.Tensor, cols_M: torch.Tensor) -> torch.Tensor:
        return rescore_pairs(q64_CE, self._words_NE, rows_M, cols_M)

    @staticmethod
    def _topk_of_pairs(raw_M, exact_M, rows_M, cols_M, num_c: int, k: int):
        """Per row, the k best pairs by raw score, ties to the lower word id (pairs come (row, col) ascending
        and both sorts are stable), with their unit-query scores."""
        if len(raw_M) == 0:  # no word of any of these rows can score >= 0: every slot is absent
            empty = torch.full((num_c, k), -math.inf, dtype=exact_M.dtype, device=exact_M.device)
            return empty, torch.full((num_c, k), -1, dtype=cols_M.dtype, device=cols_M.device)
        order = torch.argsort(raw_M, descending=True, stable=True)
        order = order[torch.argsort(rows_M[order], stable=True)]
        counts = torch.bincount(rows_M, minlength=num_c)
        starts = torch.cumsum(counts, 0) - counts
        slot_K = torch.arange(k, device=rows_M.device)
        # a query may have fewer than k candidates: only words that can score >= 0 are kept
        filled_CK = slot_K[None, :] < counts[:, None]
        idx_CK = order[(starts[:, None] + slot_K[None, :]).clamp(max=max(len(order) - 1, 0))]
        scores_CK = torch.where(filled_CK, exact_M[idx_CK], torch.full_like(exact_M[idx_CK], -math.inf))
        return scores_CK, torch.where(filled_CK, cols_M[idx_CK], torch.full_like(cols_M[idx_CK], -1))


class FeatureSurgeryIndex:
    """Exact top-k of CLIP Surgery's feature-surgery score, which depends on the image as well as the patch.

    CLIP Surgery's "feature surgery" removes the part of a patch-word similarity that every word shares. For
    L2-normalised patch ``x_p``, image embedding ``g`` (the class token's, ``EncoderOutput.image_BE``) and
    the N words ``t_n`` of the list:

        p_n = softmax_n(2 g.t_n)      w_n = N p_n      r = sum_m p_m t_m
        score_pn = sign * (w_n x_p.t_n - x_p.r)

    which is the reference's ``sum_c (x_pc t_nc w_n - mean_m x_pc t_mc w_m)`` (its ``[B, P, N, E]``
    intermediate, 68 GiB per image at 41k words and ViT-L sizes, is never formed). The temperature 2 is the
    reference's constant. ``x_p.r`` is the same for every word of a patch, so the ranking is that of
    ``w_n cos_pn``; the subtraction moves the scores, and with them the absent rule (score < 0) and SEA's
    score-proportional sampling. ``w`` and ``r`` are per image and per word list, so no fixed index can hold
    them. Per image, one float32 GEMM screens every word: the query ``[x_p, -sign x_p.r]`` against the words
    ``[sign w_n t_n, 1]`` gives the signed score directly. Every word that the screen's proven error bound
    cannot exclude from the exact top-k is re-scored in float64, and the top-k of those is returned with ties
    to the lower word id (the same contract as ``WordIndex``).

    The bound, per (patch, word), from the float32 roundings of the unit query, of ``w_n`` and of its product
    with ``t_n``, of ``x_p.r`` and from a float32 accumulation over E + 1 terms (``2 (E + 1) u`` with
    ``u = 2^-24``: the 2x margin of the module docstring):
    ``|s32 - s| <= w_n t_max (3u + 2 (E+1) u) + |x_p.r| (u + 2 (E+1) u)``, doubled. The screen uses its per-chunk maximum over the words; every re-scored candidate is checked
    against it (a GEMM that accumulates below float32, such as TF32, breaks it: a ``RuntimeError``).

    Letters: B images, P patches, N words, C words of one chunk, E joint width, K top-k slots, M candidates.
    """

    TEMPERATURE = 2.0

    def __init__(self, words_NE: np.ndarray, score: str = "cos", device: str = "cpu"):
        if score not in SCORE_SIGNS:
            raise ConfigError(f"score {score!r} is not one of {list(SCORE_SIGNS)}")
        self.score = score
        self.sign = -1.0 if score == "neg-cos" else 1.0
        self.device = device
        self._words_NE = torch.from_numpy(np.ascontiguousarray(words_NE, dtype=np.float32)).to(device)
        self._words64_NE = self._words_NE.double()
        self.num_words, width = self._words_NE.shape
        max_norm = float(self._words64_NE.norm(dim=1).max()) if self.num_words else 0.0
        unit = 2.0**-24
        acc = 2 * (width + 1) * unit
        # times w_n: the unit query's rounding (u), w_n's and the product's (2u), the accumulation
        self._slope = 2 * (1 + 1e-6) * max_norm * (3 * unit + acc)
        self._offset = 2 * (1 + 1e-6) * (unit + acc)  # times |x_p.r|
        self._screen_NE = torch.empty(self.num_words, width + 1, dtype=torch.float32, device=device)
        self._screen_NE[:, width] = 1.0
        self._lock = threading.Lock()
        self.stats = {"images": 0, "queries": 0, "pairs": 0}

    def search(
        self, patches_BPE: np.ndarray | torch.Tensor, image_BE: np.ndarray | torch.Tensor, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(labels_BPK int32, scores_BPK float16)``: -1 / -inf where fewer than k words score >= 0."""
        with self._lock, torch.inference_mode():
            x_BPE = torch.as_tensor(patches_BPE).float().to(self._words_NE.device)
            g_BE = torch.as_tensor(image_BE).float().to(self._words_NE.device)
            num_b, num_p, _ = x_BPE.shape
            labels = np.full((num_b, num_p, k), -1, dtype=np.int32)
            scores = np.full((num_b, num_p, k), -np.inf, dtype=np.float32)
            k_eff = min(k, self.num_words)
            if k_eff == 0 or num_p == 0:
                return labels, scores.astype(np.float16)
            for b in range(num_b):
                scores_PK, labels_PK = self._image_topk(x_BPE[b], g_BE[b], k_eff)
                labels[b, :, :k_eff] = labels_PK.cpu().numpy()
                scores[b, :, :k_eff] = scores_PK.cpu().numpy()  # float64 -> float32 -> float16
            self.stats["images"] += num_b
            self.stats["queries"] += num_b * num_p
            return labels, scores.astype(np.float16)

    def weights(self, image_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_N, r_E)`` in float64 for one image embedding (normalised here)."""
        g64_E = image_E.double()
        g64_E = g64_E / g64_E.norm().clamp(min=1e-12)
        prob_N = torch.softmax(self.TEMPERATURE * (self._words64_NE @ g64_E), dim=0)
        return prob_N * self.num_words, prob_N @ self._words64_NE

    def _image_topk(self, x_PE: torch.Tensor, g_E: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        sign, width = self.sign, self._words_NE.shape[1]
        w64_N, r64_E = self.weights(g_E)
        x64_PE = x_PE.double()
        u64_PE = x64_PE / x64_PE.norm(dim=1, keepdim=True).clamp(min=1e-12)
        c64_P = u64_PE @ r64_E
        num_p = x_PE.shape[0]
        query_PE1 = torch.empty(num_p, width + 1, dtype=torch.float32, device=x_PE.device)
        query_PE1[:, :width] = u64_PE
        query_PE1[:, width] = -sign * c64_P
        torch.mul(self._words_NE, (sign * w64_N).float()[:, None], out=self._screen_NE[:, :width])
        slope64_N = self._slope * w64_N
        offset_P = (self._offset * c64_P.abs() + 1e-12).float()
        step = max(1, min(self.num_words, CHUNK_BYTES // (4 * max(num_p, 1))))
        best_lo_PK: torch.Tensor | None = None
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for first in range(0, self.num_words, step):
            last = min(first + step, self.num_words)
            s_PC = query_PE1 @ self._screen_NE[first:last].T  # sign * (w_n cos - c_p), float32
            slack_P = offset_P + float(slope64_N[first:last].max())  # the chunk's largest bound, per patch
            top_PX = torch.topk(s_PC, min(k, last - first), dim=1).values - slack_P[:, None]
            best_lo_PK = top_PX if best_lo_PK is None else torch.cat([best_lo_PK, top_PX], dim=1)
            best_lo_PK = torch.topk(best_lo_PK, min(k, best_lo_PK.shape[1]), dim=1).values
            # a word of the exact top-k has s32 + bound >= max(k-th lower bound, 0): the absent rule
            low_P = self._threshold(best_lo_PK, k) - slack_P
            r_M, c_M = (s_PC >= low_P[:, None]).nonzero(as_tuple=True)
            found.append((r_M, c_M + first, s_PC[r_M, c_M]))
        threshold_P = self._threshold(best_lo_PK, k).double()
        rows_M = torch.cat([f[0] for f in found])
        cols_M = torch.cat([f[1] for f in found])
        screened_M = torch.cat([f[2] for f in found]).double()
        bound_M = slope64_N[cols_M] + offset_P.double()[rows_M]
        keep = screened_M + bound_M >= threshold_P[rows_M]
        rows_M, cols_M, screened_M, bound_M = rows_M[keep], cols_M[keep], screened_M[keep], bound_M[keep]
        dots_M = rescore_pairs(u64_PE, self._words_NE, rows_M, cols_M)
        exact_M = sign * (w64_N[cols_M] * dots_M - c64_P[rows_M])
        if bool(((exact_M - screened_M).abs() > bound_M).any()):
            raise RuntimeError(
                "the float32 screen of the feature-surgery search exceeded its error bound (a matmul that "
                "accumulates below float32, e.g. TF32: set torch.backends.cuda.matmul.allow_tf32 = False)"
            )
        nonneg = exact_M >= 0  # the absent rule: a negative score is no label
        rows_M, cols_M, exact_M = rows_M[nonneg], cols_M[nonneg], exact_M[nonneg]
        order = torch.argsort(rows_M * self.num_words + cols_M)  # (row, col) ascending: ties to lower ids
        rows_M, cols_M, exact_M = rows_M[order], cols_M[order], exact_M[order]
        self.stats["pairs"] += len(rows_M)
        return WordIndex._topk_of_pairs(exact_M, exact_M, rows_M, cols_M, num_p, k)

    @staticmethod
    def _threshold(best_lo_PK: torch.Tensor, k: int) -> torch.Tensor:
        """max(k-th largest lower bound, 0): every word of the exact top-k (that can be a label) has an upper
        bound at least this."""
        if best_lo_PK.shape[1] < k:
            return torch.zeros(best_lo_PK.shape[0], dtype=best_lo_PK.dtype, device=best_lo_PK.device)
        return best_lo_PK[:, k - 1].clamp(min=0)
