"""Content identities: file checksums, settings digests and model fingerprints.

* ``sha256_file``: the checksum recorded for every shard in the manifest.
* ``digest_of(settings)``: sha256 of a JSON-able mapping with sorted keys (the label settings digest).
* ``fingerprint_of(config, state_dict)``: sha256 over a model's identity config and every tensor (name, dtype,
  shape, raw bytes). Two shard roots with the same encoder fingerprint were made by the same tower.
* ``hf_identity_config(config_dict)``: an HF config minus what varies with where or how it was saved (library
  version, dtype, architectures, private keys) and minus the generic ``PretrainedConfig`` attributes
  (generation defaults, token ids, legacy flags) that transformers 4.x writes into every config and 5.x does
  not: the same tower keeps its fingerprint when saved twice and under either major version.

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


_SAVE_BOOKKEEPING = frozenset({"transformers_version", "dtype", "torch_dtype", "architectures"})
# ``PretrainedConfig().to_dict()`` of transformers 4.57 (a superset of 5.x's), minus ``model_type``: 4.x
# serialises these generic attributes into every (sub-)config, 5.x only where a model defines them. None
# changes what a vision or text tower computes. Fixed here rather than read from the running library so
# the identity cannot drift with the installed version.
_GENERIC_CONFIG_KEYS = frozenset(
    """add_cross_attention bad_words_ids begin_suppress_tokens bos_token_id chunk_size_feed_forward
    cross_attention_hidden_size decoder_start_token_id diversity_penalty do_sample early_stopping
    encoder_no_repeat_ngram_size eos_token_id exponential_decay_length_penalty finetuning_task
    forced_bos_token_id forced_eos_token_id id2label is_decoder is_encoder_decoder label2id length_penalty
    max_length min_length no_repeat_ngram_size num_beam_groups num_beams num_return_sequences
    output_attentions output_hidden_states output_scores pad_token_id prefix problem_type pruned_heads
    remove_invalid_values repetition_penalty return_dict return_dict_in_generate sep_token_id
    suppress_tokens task_specific_params temperature tf_legacy_loss tie_encoder_decoder tie_word_embeddings
    tokenizer_class top_k top_p torchscript typical_p use_bfloat16""".split()
)


def hf_identity_config(config: dict[str, Any], portable: bool = True) -> dict[str, Any]:
    """An HF config dict minus bookkeeping that varies with where/how it was saved and, with ``portable``,
    minus the generic attributes whose presence depends on the transformers major version."""
    skip = _SAVE_BOOKKEEPING | (_GENERIC_CONFIG_KEYS if portable else frozenset())
    return {
        k: hf_identity_config(v, portable) if isinstance(v, dict) else v
        for k, v in config.items()
        if not str(k).startswith("_") and k not in skip
    }


def hf_fingerprint(model: Any, portable: bool = True) -> str:
    """The fingerprint of a full HF CLIP/SigLIP model (vision + text towers), as the pipeline records it.

    ``portable=False`` gives the form manifests written before the identity dropped the generic attributes
    recorded (transformers 5 only), so towers of older shards are still recognised.
    """
    return fingerprint_of(
        {"backend": "hf", "config": hf_identity_config(model.config.to_dict(), portable)}, model.state_dict()
    )
