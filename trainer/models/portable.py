"""What a saved HF folder needs so that transformers 4.57 (the declared floor) and 5.x load it identically.

transformers 5 writes a few things that 4.x misreads silently or refuses; each function here rewrites one of
them into the form both read (checked by ``tests/test_compat.py`` under both versions):

* ``portable_tokenizer_config(folder)``: ``tokenizer_config.json`` names the generic fast tokenizer
  (``PreTrainedTokenizerFast``; 5.x's ``TokenizersBackend`` does not exist in 4.x, and 5.x aliases the old
  name), lists extra special tokens under ``additional_special_tokens`` (4.x reads 5.x's list-valued
  ``extra_special_tokens`` as a dict and fails), fixes ``model_input_names`` to ids + mask (4.x would add
  ``token_type_ids``, which LLaVA's ``generate`` rejects) and drops 5.x-only loader keys.
* ``with_legacy_rope(text_config)``: 5.x keeps the rotary settings in ``rope_parameters``, which 4.x ignores
  (it would fall back to ``rope_theta`` 10000, silently wrong for most real LLMs); both forms are written.
* ``portable_chat_template(llm_template)``: a template that accepts plain-string contents (with ``<image>``)
  and HF content lists (``[{"type": "image"}, {"type": "text", "text": ...}]``), then renders with the LLM's
  own template; it runs in the sandboxed Jinja environment of both versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
TOKENIZER_CONFIG = "tokenizer_config.json"
# keys transformers 5 writes that describe how the file was loaded, not the tokenizer
_LOADER_KEYS = ("backend", "is_local", "local_files_only")


def portable_tokenizer_config(folder: str | Path) -> None:
    """Rewrite ``folder/tokenizer_config.json`` (a fast tokenizer's) in the form both versions read."""
    folder = Path(folder)
    path = folder / TOKENIZER_CONFIG
    if not path.is_file() or not (folder / "tokenizer.json").is_file():
        return  # a slow-only tokenizer is left as its library wrote it
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # tokenizer.json carries the whole pipeline
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, dict):  # named extras ({"image_token": "<image>"}) mean the same in both
        cfg["extra_special_tokens"] = extra
    elif extra:
        listed = list(cfg.get("additional_special_tokens") or [])
        cfg["additional_special_tokens"] = listed + [t for t in extra if t not in listed]
    cfg["model_input_names"] = ["input_ids", "attention_mask"]
    for key in _LOADER_KEYS:
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def with_legacy_rope(text_config: dict[str, Any]) -> dict[str, Any]:
    """``text_config`` with 4.x's ``rope_theta`` / ``rope_scaling`` derived from 5.x's ``rope_parameters``."""
    params = text_config.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params:
        return text_config  # written by 4.x already, or a model without rotary embeddings
    out = dict(text_config)
    out["rope_theta"] = params["rope_theta"]
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    plain = scaling.get("rope_type", "default") == "default" and set(scaling) <= {"rope_type"}
    out["rope_scaling"] = None if plain else scaling
    return out


# The preamble rewrites ``messages`` so that every content is a string: list items joined with "\n", an
# image item -> "<image>" (so [image, text] -> "<image>\nText", the text the trainer builds), unknown item
# types raise. The sandbox forbids list.append, so lists are rebuilt with "+". A top-level ``set`` shadows
# the caller's ``messages`` for the rest of the template, which is the LLM's own, unchanged.
CHAT_PREAMBLE = (
    "{%- set _norm = namespace(msgs=[]) -%}"
    "{%- for _m in messages -%}"
    "{%- if _m['content'] is string or _m['content'] is none -%}"
    "{%- set _norm.msgs = _norm.msgs + [_m] -%}"
    "{%- else -%}"
    "{%- set _parts = namespace(items=[]) -%}"
    "{%- for _c in _m['content'] -%}"
    "{%- if _c is string -%}{%- set _parts.items = _parts.items + [_c] -%}"
    "{%- elif _c['type'] in ['image', 'image_url', 'image_file'] -%}"
    "{%- set _parts.items = _parts.items + ['" + IMAGE_TOKEN + "'] -%}"
    "{%- elif _c['type'] == 'text' -%}{%- set _parts.items = _parts.items + [_c['text']] -%}"
    "{%- else -%}{{- raise_exception('unsupported content type ' ~ _c['type'] ~ ': use text or image') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _norm.msgs = _norm.msgs + [dict(_m, content=_parts.items | join('\\n'))] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _norm.msgs -%}"
)
# LLMs without a chat template (trained on plain captions only): the contents, one after another
PLAIN_BODY = "{%- for message in messages -%}{{ message['content'] }}{%- endfor -%}"


def portable_chat_template(llm_template: str | dict | None) -> str:
    """The LLM's template (its default one if named) behind ``CHAT_PREAMBLE``; wrapping twice is a no-op."""
    if isinstance(llm_template, dict):
        llm_template = llm_template.get("default")
    if llm_template and llm_template.startswith(CHAT_PREAMBLE):
        return llm_template
    return CHAT_PREAMBLE + (llm_template or PLAIN_BODY)
