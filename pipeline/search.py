"""Exact top-k word search for patch embeddings.

Input: L2-normalised word embeddings ``[N, E]`` and query patch embeddings ``[Q, E]`` (any norm; they are
normalised here). Output: ``labels_QK`` int32 word ids and ``scores_QK`` float16, descending per row.

Score ``cos`` = cosine similarity; ``neg-cos`` = minus the cosine (SEA, following CLIP Surgery, negates it
for CLIP). For ``neg-cos`` the index holds the NEGATED word matrix, so an inner-product top-k returns the
exact top-k of ``-cos`` rather than the bottom-k of ``cos`` re-signed. Slots whose score is < 0 (or that do
not exist because K > N) get label -1 and score -inf; the patch itself is always kept.

Backends: FAISS ``IndexFlatIP`` (exact; on GPU when FAISS sees one and the device is CUDA) or a torch matmul
+ topk (used where FAISS is not installed). ``backend="auto"`` prefers FAISS.

Letters: Q queries (patches), N words, E embedding width, K top-k slots.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from visalign.config import ConfigError

ScoreSign = Literal["cos", "neg-cos"]
SCORE_SIGNS = ("cos", "neg-cos")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class WordIndex:
    """Exact inner-product index over ``sign * words_NE``; build once per process, query per batch."""

    def __init__(
        self,
        words_NE: np.ndarray,
        score: str = "cos",
        backend: str = "auto",
        device: str = "cpu",
    ):
        if score not in SCORE_SIGNS:
            raise ConfigError(f"score {score!r} is not one of {list(SCORE_SIGNS)}")
        if backend not in ("auto", "faiss", "torch"):
            raise ConfigError(f"search backend {backend!r} is not one of ['auto', 'faiss', 'torch']")
        if backend == "faiss" and not faiss_available():
            raise ConfigError(
                "search backend 'faiss' asked for but faiss is not installed: use 'torch' or 'auto'"
            )
        self.score = score
        self.num_words = int(words_NE.shape[0])
        sign = -1.0 if score == "neg-cos" else 1.0
        signed_NE = np.ascontiguousarray(sign * np.asarray(words_NE, dtype=np.float32))
        self.backend = "faiss" if backend == "faiss" or (backend == "auto" and faiss_available()) else "torch"
        self.device = device
        if self.backend == "faiss":
            import faiss

            index = faiss.IndexFlatIP(signed_NE.shape[1])
            index.add(signed_NE)
            # GPU FAISS only when the run itself is on CUDA; a CPU-only faiss build has no get_num_gpus > 0
            if str(device).startswith("cuda") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            self._index = index
        else:
            self._words_NE = torch.from_numpy(signed_NE).to(device)

    def search(self, queries_QE: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k word ids and scores per query: ``(labels_QK int32, scores_QK float16)``."""
        q_QE = torch.as_tensor(queries_QE).float()
        q_QE = torch.nn.functional.normalize(q_QE, dim=-1)
        num_q = q_QE.shape[0]
        k_eff = min(k, self.num_words)
        if self.backend == "faiss":
            scores_QK, labels_QK = self._index.search(np.ascontiguousarray(q_QE.cpu().numpy()), k_eff)
            labels_QK = labels_QK.astype(np.int64)
        else:
            sim_QN = q_QE.to(self._words_NE.device) @ self._words_NE.T
            top = torch.topk(sim_QN, k_eff, dim=1, largest=True, sorted=True)
            scores_QK, labels_QK = top.values.cpu().numpy(), top.indices.cpu().numpy()
        out_labels = np.full((num_q, k), -1, dtype=np.int32)
        out_scores = np.full((num_q, k), -np.inf, dtype=np.float32)
        keep = scores_QK >= 0  # the absent rule: a negative score is no label, the patch stays
        out_labels[:, :k_eff] = np.where(keep, labels_QK, -1)
        out_scores[:, :k_eff] = np.where(keep, scores_QK, -np.inf)
        return out_labels, out_scores.astype(np.float16)
