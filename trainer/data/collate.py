"""Per-sample tokenisation hook and collation into the batch dict of ``trainer/objectives/base.py``.

Input: decoded shard samples (``feat`` [P, D] float16, ``labels`` [P, K] int32, ``scores`` [P, K] float16,
``expert.<name>`` [P_e, D_e], ``meta``) plus what ``Formatter`` adds (``input_ids``, ``labels``,
``visual_start``). Output: the batch dict (right padding to the longest sequence of the micro-batch):

    feats_BPD float32, labels_BPK int64, scores_BPK float32, experts {name: float32 [B, P_e, D_e]},
    input_ids_BT int64, labels_BT int64 (-100 = unsupervised), attention_mask_BT int64, visual_start_B int64,
    num_target_tokens int, ids [str], slots [int], passes [int]

Letters: B batch, T sequence, P patches, D feature width, K top-k slots.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trainer.data.conversations import IGNORE_INDEX, Formatter
from visalign.shards import EXPERT_PREFIX


class SampleTransform:
    """Decoded shard sample -> sample with token fields (runs in the dataloader worker)."""

    def __init__(self, formatter: Formatter):
        self.formatter = formatter

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        meta = sample.get("meta") or {}
        meta.setdefault("id", sample["__key__"])
        out = dict(sample)
        tokens = self.formatter(meta)
        out["input_ids"], out["text_labels"], out["visual_start"] = (
            tokens["input_ids"],
            tokens["labels"],
            tokens["visual_start"],
        )
        return out


class Collator:
    """List of transformed samples -> the batch dict (tensors on CPU)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        num_samples = len(samples)
        max_len = max(len(s["input_ids"]) for s in samples)
        input_ids_BT = torch.full((num_samples, max_len), self.pad_id, dtype=torch.long)
        labels_BT = torch.full((num_samples, max_len), IGNORE_INDEX, dtype=torch.long)
        attention_mask_BT = torch.zeros((num_samples, max_len), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids_BT[i, :n] = torch.tensor(s["input_ids"], dtype=torch.long)
            labels_BT[i, :n] = torch.tensor(s["text_labels"], dtype=torch.long)
            attention_mask_BT[i, :n] = 1
        expert_names = sorted(k[len(EXPERT_PREFIX) :] for k in samples[0] if k.startswith(EXPERT_PREFIX))
        return {
            "feats_BPD": torch.from_numpy(np.stack([s["feat"] for s in samples]).astype(np.float32)),
            "labels_BPK": torch.from_numpy(np.stack([s["labels"] for s in samples]).astype(np.int64)),
            "scores_BPK": torch.from_numpy(np.stack([s["scores"] for s in samples]).astype(np.float32)),
            "experts": {
                name: torch.from_numpy(
                    np.stack([s[EXPERT_PREFIX + name] for s in samples]).astype(np.float32)
                )
                for name in expert_names
            },
            "input_ids_BT": input_ids_BT,
            "labels_BT": labels_BT,
            "attention_mask_BT": attention_mask_BT,
            "visual_start_B": torch.tensor([s["visual_start"] for s in samples], dtype=torch.long),
            "num_target_tokens": int((labels_BT != IGNORE_INDEX).sum()),
            "ids": [s["meta"].get("id", s["__key__"]) if s.get("meta") else s["__key__"] for s in samples],
            "slots": [int(s["slot"]) for s in samples],
            "passes": [int(s["pass"]) for s in samples],
        }
