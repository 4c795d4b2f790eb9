"""Content identities: file checksums, settings digests and model fingerprints.

* ``sha256_file``: the checksum recorded for every shard in the manifest.
* ``digest_of(settings)``: sha256 of a JSON-able mapping with sorted keys (the label settings digest).
* ``fingerprint_of(config, state_dict)``: sha256 over a model's identity config and every tensor (name, dtype,
  shape, raw bytes). Two shard roots with the same encoder fingerprint were made by the same tower.
* ``hf_identity_config(config_dict)``: an HF config minus what varies with where or how it was saved (library
  version, dtype, architectures, private keys), so a tower saved twice keeps its fingerprint.

The pipeline fingerprints the tower it labels with; the trainer recomputes the same fingerprint when it
loads that tower again (export, online encoder) and refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_of(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def fingerprint_of(config: dict[str, Any], state_dict: dict[str, Any]) -> str:
    """sha256 over a JSON config and every tensor (name, dtype, shape, raw bytes), in sorted key order."""
    import torch

    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # a uint8 view hashes every dtype (bf16 included) without a numpy round trip of the values
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def hf_identity_config(config: dict[str, Any]) -> dict[str, Any]:
    """An HF config dict minus bookkeeping that varies with where/how it was saved."""
    skip = {"transformers_version", "dtype", "torch_dtype", "architectures"}
    return {
        k: hf_identity_config(v) if isinstance(v, dict) else v
        for k, v in config.items()
        if not str(k).startswith("_") and k not in skip
    }


def hf_fingerprint(model: Any) -> str:
    """The fingerprint of a full HF CLIP/SigLIP model (vision + text towers), as the pipeline records it."""
    return fingerprint_of(
        {"backend": "hf", "config": hf_identity_config(model.config.to_dict())}, model.state_dict()
    )
