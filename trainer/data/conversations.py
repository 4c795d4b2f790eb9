"""A sample's text (LLaVA conversation or caption) -> token ids, supervision labels and visual slots.

Input: the shard sample's ``meta`` (``{"conversations": [{"from", "value"}...]}`` or ``{"caption": ...}``),
the LLM tokenizer, the number of visual tokens ``P`` per image. Output per sample:
``input_ids`` (visual slots hold the pad id: the model writes the projected features there),
``labels`` (-100 where unsupervised) and ``visual_start`` (index of the first visual slot).

Formats:

* ``plain`` (LLaVA pre-training, ``conv_template=plain``): ``[P visual] caption eos``; only caption + eos are
  supervised. The caption is ``meta["caption"]`` or the last ``gpt`` turn of the conversation (LLaVA's 558k
  set stores captions that way; the human turn is only ``<image>``).
* ``chat``: the tokenizer's own chat template over the turns (``human`` -> ``user``, ``gpt`` -> ``assistant``,
  ``system`` kept). Supervised: each assistant reply *as the template renders it*, i.e. its content and the
  end-of-turn markers that follow, found by rendering the conversation prefix by prefix (the template must
  render a prefix of the conversation as a prefix of the text; we check it).

``<image>`` marks where the visual tokens go: the text is split there. If the conversation has none, we do
what LLaVA does and put ``<image>\\n`` at the start of the first user turn, so the visual tokens come first
in the user's message. Exactly one image per sample.

Over-long samples lose text from the end, never visual tokens; a sample whose visual block alone does not
fit in ``--max-length`` is an error (raise --data.max_length).
"""

from __future__ import annotations

from typing import Any, Literal

from visalign.errors import VisalignError

IMAGE_TOKEN = "<image>"
"""must equal ``trainer.models.llm.IMAGE_TOKEN`` (a test checks); kept here so the data layer stays light"""

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ConversationError(VisalignError):
    """A sample whose text cannot be turned into a training sequence."""


def caption_of(meta: dict[str, Any]) -> str:
    """The pre-training caption: ``caption`` or the last gpt turn, without ``<image>``."""
    if isinstance(meta.get("caption"), str):
        text = meta["caption"]
    else:
        turns = [t for t in meta.get("conversations") or [] if ROLES.get(t.get("from")) == "assistant"]
        if not turns:
            raise ConversationError(
                f"sample {meta.get('id')!r} has neither 'caption' nor a gpt turn for the plain format"
            )
        text = turns[-1]["value"]
    return text.replace(IMAGE_TOKEN, "").strip()


def to_messages(meta: dict[str, Any]) -> list[dict[str, str]]:
    """LLaVA turns -> chat-template messages, with ``<image>`` guaranteed exactly once."""
    turns = meta.get("conversations")
    if not turns:
        if isinstance(meta.get("caption"), str):  # a captions-only shard in a chat run: ask for a description
            turns = [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": meta["caption"]}]
        else:
            raise ConversationError(f"sample {meta.get('id')!r} has no 'conversations' and no 'caption'")
    messages = []
    for turn in turns:
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise ConversationError(
                f"sample {meta.get('id')!r}: unknown speaker {turn.get('from')!r}; "
                f"expected one of {sorted(ROLES)}"
            )
        messages.append({"role": role, "content": str(turn.get("value", ""))})
    num_images = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if num_images > 1:
        raise ConversationError(
            f"sample {meta.get('id')!r} has {num_images} '<image>' marks; one image per sample"
        )
    if num_images == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ConversationError(f"sample {meta.get('id')!r} has no user turn to hold the image")
        first_user["content"] = IMAGE_TOKEN + "\n" + first_user["content"]
    return messages


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply (+ its end-of-turn marks)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConversationError(
            "the LLM tokenizer has no chat template; use --data.format plain or an instruction-tuned LLM"
        )

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ConversationError(
                "the chat template does not render a conversation prefix as a text prefix, so assistant "
                "replies cannot be located for masking; use another template or --data.format plain"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def _split_at_image(
    ids: list[int], labels: list[int], image_id: int, where: str
) -> tuple[list, list, list, list]:
    hits = [i for i, t in enumerate(ids) if t == image_id]
    if len(hits) != 1:
        raise ConversationError(
            f"{where}: expected one '<image>' token after tokenisation, found {len(hits)}"
        )
    i = hits[0]
    return ids[:i], labels[:i], ids[i + 1 :], labels[i + 1 :]


class Formatter:
    """Callable ``meta -> {"input_ids", "labels", "visual_start"}`` for one tokenizer and patch count."""

    def __init__(
        self,
        tokenizer: Any,
        num_patches: int,
        fmt: Literal["plain", "chat"],
        max_length: int,
    ):
        if fmt not in ("plain", "chat"):
            raise ValueError(f"format {fmt!r}: expected 'plain' or 'chat'")
        self.tokenizer = tokenizer
        self.num_patches = num_patches
        self.fmt = fmt
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None or tokenizer.eos_token_id is None:
            raise ConversationError("the LLM tokenizer needs an eos token (and a pad token, or eos is used)")
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if fmt == "chat" and (self.image_id is None or self.image_id == tokenizer.unk_token_id):
            raise ConversationError(
                f"the tokenizer has no {IMAGE_TOKEN!r} token; load the LLM with load_llm()"
            )

    def __call__(self, meta: dict[str, Any]) -> dict[str, Any]:
        where = f"sample {meta.get('id')!r}"
        if self.fmt == "plain":
            text_ids = self.tokenizer(caption_of(meta), add_special_tokens=False)["input_ids"]
            text_ids = list(text_ids) + [self.tokenizer.eos_token_id]
            before_ids, before_labels, after_ids, after_labels = [], [], text_ids, list(text_ids)
        else:
            full, spans = assistant_spans(self.tokenizer, to_messages(meta))
            enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            labels = [
                tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
                for tok, (start, _end) in zip(ids, enc["offset_mapping"])
            ]
            before_ids, before_labels, after_ids, after_labels = _split_at_image(
                ids, labels, self.image_id, where
            )
        visual_start = len(before_ids)
        visual_end = visual_start + self.num_patches
        if visual_end > self.max_length:
            raise ConversationError(
                f"{where}: the visual tokens end at position {visual_end} but --max-length is "
                f"{self.max_length}; "
                "raise --max-length (or shorten the text before <image>)"
            )
        room = self.max_length - visual_end  # truncate only the text after the image
        input_ids = before_ids + [self.pad_id] * self.num_patches + after_ids[:room]
        labels = before_labels + [IGNORE_INDEX] * self.num_patches + after_labels[:room]
        return {"input_ids": input_ids, "labels": labels, "visual_start": visual_start}
