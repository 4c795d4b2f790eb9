"""The one validator of a sample's text record, shared by the pipeline (reject at labelling time) and the
trainer (skip and record, for shards written before a rule existed).

A record is the ``meta`` a shard sample carries: ``{"id", "conversations": [{"from", "value"}, ...]}`` (LLaVA
format) or ``{"id", "caption"}`` (folder and tar inputs). ``check_record(meta, has_image)`` returns ``None``
for a usable record, else the reject reason: one stable line (no object addresses, no paths that change
between runs), the same wherever the check runs. The rules are those every conversation format needs
(``trainer/data/conversations.py``):

* an ``id`` that is a non-empty string; all text valid Unicode that UTF-8 can hold (no lone surrogates);
* ``conversations``: a non-empty list of objects with a known speaker ``from`` (``SPEAKERS``) and a string
  ``value``; after an optional leading system turn, turns alternate user / assistant starting with the user
  (what LLaVA's preprocessing asserts), and at least one assistant reply exists (something to supervise);
* ``<image>``: an image sample has at most one mark (none: the visual tokens go before the first user turn),
  in a user turn; a text-only sample has none;
* or ``caption``: a string without ``<image>`` (it is the supervised reply; the visual tokens go before it).

Every record these rules accept renders in every conversation format (plain, vicuna_v1, llama_3, chatml, the
tokenizer's template); what is left to a format (e.g. a chat template that refuses a system turn) is reported
by the trainer for the sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

IMAGE_TOKEN = "<image>"
"""marks where the visual tokens go in a conversation"""

SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""LLaVA's speaker names (and the chat-template names) -> chat roles"""


def _bad_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_record(meta: Mapping[str, Any], has_image: bool) -> str | None:
    """``None`` if the record can be trained on, else the reason (rules in the module docstring)."""
    ident = meta.get("id")
    if not isinstance(ident, str) or not ident:
        return "malformed record: missing or empty 'id'"
    if _bad_text(ident):
        return "malformed record: the id is not valid Unicode text (a lone surrogate?)"
    if "conversations" in meta:
        return check_conversation(meta["conversations"], has_image)
    caption = meta.get("caption")
    if not isinstance(caption, str):
        return "malformed record: neither 'conversations' nor a 'caption' string"
    if _bad_text(caption):
        return "malformed record: the caption is not valid Unicode text (a lone surrogate?)"
    if IMAGE_TOKEN in caption:
        if not has_image:
            return f"text-only record with an {IMAGE_TOKEN!r} mark"
        return f"{IMAGE_TOKEN!r} in the caption; the visual tokens go before the caption, not inside it"
    return None


def check_conversation(turns: Any, has_image: bool) -> str | None:
    """The conversation rules of ``check_record``."""
    if not isinstance(turns, list) or not turns:
        return "malformed record: 'conversations' must be a non-empty list of {'from', 'value'} objects"
    roles = []
    num_marks = 0
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            return f"malformed record: turn {i} is not an object"
        speaker = turn.get("from")
        if speaker is None:
            return f"malformed record: turn {i} has no 'from'"
        if speaker not in SPEAKERS:
            return f"malformed record: turn {i} has unknown speaker {str(speaker)[:40]!r}; use one of {sorted(SPEAKERS)}"
        value = turn.get("value")
        if not isinstance(value, str):
            return f"malformed record: turn {i} has no string 'value'"
        if _bad_text(value):
            return f"malformed record: turn {i} is not valid Unicode text (a lone surrogate?)"
        role = SPEAKERS[speaker]
        marks = value.count(IMAGE_TOKEN)
        if marks and role != "user":
            return f"{IMAGE_TOKEN!r} in a {role} turn (turn {i}); it belongs in a user turn"
        num_marks += marks
        roles.append(role)
    if roles[0] == "system":
        roles = roles[1:]
    if "system" in roles:
        return "malformed record: a system turn after the first turn"
    for j, role in enumerate(roles):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            return f"malformed record: turns must alternate user/assistant from the user; turn {j} is {role}"
    if "assistant" not in roles:
        return "no assistant reply: nothing to supervise"
    if not has_image and num_marks:
        return f"text-only record with {num_marks} {IMAGE_TOKEN!r} mark(s)"
    if num_marks > 1:
        return f"{num_marks} {IMAGE_TOKEN!r} marks: one image per sample"
    return None
