"""A sample's text (LLaVA conversation or caption) -> rendered text, token ids, supervision labels, visual slots.

Input: the shard sample's ``meta`` (``{"conversations": [{"from", "value"}...]}`` or ``{"caption": ...}``),
whether the sample has an image, the LLM tokenizer, the number of visual tokens ``P`` per image and a
``TextFormat`` (``--data.conv-template``, ``--data.image-position``, ``--data.system-prompt``). Output per
sample: ``input_ids`` (visual slots hold the pad id: the model writes the projected features there),
``labels`` (-100 where unsupervised) and ``visual_start`` (index of the first visual slot; ``None`` for a
text-only sample, which has no visual block). ``Formatter.encode`` also returns the rendered text, the
supervised character spans and each token's characters (what ``trainer sample`` prints).

Templates (docs/conversations.md has the rendered strings and every difference from LLaVA):

* ``plain``: LLaVA-1.5 stage 1 (``preprocess_plain``): ``<image>`` + caption + ``"\\n"``; the caption is the
  record's ``caption`` or its first assistant reply (the instruction is dropped); supervised: caption + ``"\\n"``.
* ``vicuna_v1``: LLaVA-1.5 stage 2 (``conv_vicuna_v1`` + ``preprocess_v1``): system prompt, ``" "``, then
  ``USER: {q} ASSISTANT: {a}{eos}`` per round, with the LLM's own eos text; supervised: ``" " + a + eos``.
* ``llama_3``: LLaVA-NeXT's ``llava_llama_3``; supervised: each reply (trimmed, as the template does) +
  ``<|eot_id|>``.
* ``chatml`` (alias ``qwen_2``): LLaVA-NeXT's ``qwen_2``; supervised: each reply + ``<|im_end|>\\n``.
* ``tokenizer``: the LLM tokenizer's own chat template; supervised: what the template renders for each
  assistant turn after its generation prompt (reply + end-of-turn text), found by rendering prefixes.

Tokens: ``plain`` and ``vicuna_v1`` tokenise like LLaVA's ``tokenizer_image_token`` (the text before and
after ``<image>`` separately, with the tokenizer's own special tokens, e.g. BOS, on the first piece); the
others tokenise the rendered text as a whole (the template carries its own BOS). A token is supervised when
its first character lies in a supervised span (the tokenizer's offset mapping); tokens the tokenizer adds
(BOS) never are.

``<image>`` marks where the visual tokens go. An image record without it gets ``<image>\\n`` at the start of
its first user turn; ``image_position="first"`` moves a mark to the start of its turn followed by ``"\\n"``
exactly as LLaVA's ``preprocess_multimodal`` does. Records are checked with the shared validator
(``visalign.samples.check_record``) first, so the formats render every record it accepts.

Over-long samples lose text from the end, never visual tokens; a sample whose visual block alone does not
fit in ``--max-length`` is an error (raise --data.max_length).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from visalign.config import ConfigError
from visalign.errors import VisalignError
from visalign.samples import IMAGE_TOKEN, SPEAKERS, check_record

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = SPEAKERS
"""LLaVA speaker names (``human``, ``gpt``) and chat roles -> ``user`` / ``assistant`` / ``system``"""

TEMPLATES = ("plain", "vicuna_v1", "llama_3", "chatml", "tokenizer")
TEMPLATE_ALIASES = {"qwen_2": "chatml"}
CHOICES = ("auto", *TEMPLATES, *TEMPLATE_ALIASES)
"""what ``--data.conv-template`` accepts"""
LLAVA_TOKENISATION = ("plain", "vicuna_v1")
"""templates tokenised piecewise around ``<image>`` with the tokenizer's special tokens, as LLaVA-1.5 does"""

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA_3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "You are a helpful assistant."
DEFAULT_SYSTEM = {"vicuna_v1": VICUNA_V1_SYSTEM, "llama_3": LLAMA_3_SYSTEM, "chatml": CHATML_SYSTEM}
MARKERS = {
    "llama_3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}
"""the tokens a template's LLM family has; without them the markers are trained as ordinary text"""


class ConversationError(VisalignError):
    """A sample whose text cannot be turned into a training sequence."""


# ---------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextFormat:
    """How a record becomes text: the template, where ``<image>`` goes, the system prompt.

    ``system_prompt``: ``None`` = the template's own (LLaVA's for the named templates, whatever the chat
    template inserts for ``tokenizer``), ``""`` = none, else the text to use. A record's own leading system
    turn always wins (it is data).
    """

    template: str = "tokenizer"
    image_position: str = "auto"
    system_prompt: str | None = None

    def __post_init__(self):
        template = TEMPLATE_ALIASES.get(self.template, self.template)
        if template not in TEMPLATES:
            raise ConfigError(
                f"--data.conv-template {self.template!r}: expected one of {', '.join(CHOICES)} "
                "('auto' is resolved from --stage)"
            )
        object.__setattr__(self, "template", template)
        position = self.image_position
        if position == "auto":
            position = "keep" if template == "tokenizer" else "first"
        if position not in ("keep", "first"):
            raise ConfigError(f"--data.image-position {self.image_position!r}: expected auto, keep or first")
        object.__setattr__(self, "image_position", position)
        if self.system_prompt is not None and IMAGE_TOKEN in self.system_prompt:
            raise ConfigError(f"--data.system-prompt must not contain {IMAGE_TOKEN!r}")


def resolve_template(name: str, stage: str) -> str:
    """``auto`` -> ``plain`` for pretrain, ``tokenizer`` for finetune; aliases -> their template."""
    if name == "auto":
        return "plain" if stage == "pretrain" else "tokenizer"
    return TEMPLATE_ALIASES.get(name, name)


def text_format(data_cfg: Any, stage: str) -> TextFormat:
    """The ``TextFormat`` of a run: ``data_cfg`` is a ``DataConfig`` (conv_template, image_position,
    system_prompt), ``stage`` resolves ``auto``."""
    return TextFormat(
        template=resolve_template(data_cfg.conv_template, stage),
        image_position=data_cfg.image_position,
        system_prompt=data_cfg.system_prompt,
    )


# ---------------------------------------------------------------------------------------------------------
# records -> turns
# ---------------------------------------------------------------------------------------------------------


def move_image_first(value: str) -> str:
    """LLaVA-1.5 ``preprocess_multimodal`` on one turn: every mark removed, the text stripped, one mark put
    in front followed by a newline, stripped again (so a turn that is only the mark stays ``<image>``)."""
    return (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()


def record_turns(
    meta: dict[str, Any], has_image: bool, image_position: str = "keep"
) -> tuple[str | None, list[tuple[str, str]]]:
    """A validated record -> (its own system text or None, ``[(role, text)]`` alternating user/assistant),
    with ``<image>`` placed: in the turn that holds it (moved to the start with ``first``), else at the start
    of the first user turn. A caption becomes ``[("user", "<image>"), ("assistant", caption)]``."""
    if "conversations" in meta:
        turns = [(ROLES[t["from"]], t["value"]) for t in meta["conversations"]]
    else:
        turns = [("user", IMAGE_TOKEN if has_image else ""), ("assistant", meta["caption"])]
    system = None
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    if not has_image:
        return system, turns
    if not any(IMAGE_TOKEN in text for _, text in turns):
        turns[0] = (turns[0][0], IMAGE_TOKEN + "\n" + turns[0][1])
    if image_position == "first":
        turns = [(role, move_image_first(text) if IMAGE_TOKEN in text else text) for role, text in turns]
    return system, turns


def caption_of(meta: dict[str, Any]) -> str:
    """The stage-1 caption: ``caption``, else the first assistant reply (LLaVA's ``conversations[1]``)."""
    if isinstance(meta.get("caption"), str) and "conversations" not in meta:
        return meta["caption"]
    return next(t["value"] for t in meta["conversations"] if ROLES[t["from"]] == "assistant")


# ---------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Rendered:
    """A sample as text: ``supervised`` are character spans ``[start, end)`` of ``text``; ``image_at`` is
    where ``<image>`` (the visual block) stands in ``text``, ``None`` for a text-only sample."""

    text: str
    supervised: list[tuple[int, int]]
    image_at: int | None
    system: str | None
    """the system prompt the text carries (None: none)"""


class _Builder:
    def __init__(self):
        self.parts: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self.size = 0

    def add(self, text: str, supervised: bool = False) -> None:
        if supervised and text:
            self.spans.append((self.size, self.size + len(text)))
        self.parts.append(text)
        self.size += len(text)

    def done(self, system: str | None) -> Rendered:
        text = "".join(self.parts)
        at = text.find(IMAGE_TOKEN)
        return Rendered(text, self.spans, None if at < 0 else at, system)


def _system(own: str | None, setting: str | None, default: str) -> str:
    if own is not None:
        return own
    return default if setting is None else setting


class ChatTemplate:
    """The LLM tokenizer's chat template, with its default system prompt kept, dropped or replaced.

    Dropping works for any template that renders a given system turn in place of its default one: the
    conversation is rendered after a placeholder system turn, and the text of that lone turn is cut off
    (keeping a BOS the template puts in front of it)."""

    PLACEHOLDER = "SYSTEM-PROMPT-PLACEHOLDER"
    BOS_MARK = "BOS-PLACEHOLDER"

    def __init__(self, tokenizer: Any, system_prompt: str | None):
        if not getattr(tokenizer, "chat_template", None):
            raise ConversationError(
                f"the LLM's tokenizer ({type(tokenizer).__name__}) has no chat template, so the 'tokenizer' "
                "conversation format (the finetune default) cannot be used; choose one with "
                "--data.conv-template vicuna_v1|chatml|llama_3|plain"
            )
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.head: str | None = None
        try:
            self.head = self.raw([{"role": "system", "content": self.PLACEHOLDER}], False)
        except Exception as err:  # jinja raises its own exception types for unsupported roles
            if system_prompt:
                raise ConversationError(
                    f"the LLM's chat template refuses a system turn ({err}); drop --data.system-prompt"
                ) from None
        # a BOS the template writes in front of everything stays when the system turn is cut off; it is told
        # apart from a turn marker spelled like it (SmolLM2's bos is "<|im_start|>") by rendering with a mark
        bos = getattr(tokenizer, "bos_token", None)
        self.kept = ""
        if bos and self.head is not None:
            marked = self.raw(
                [{"role": "system", "content": self.PLACEHOLDER}], False, bos_token=self.BOS_MARK
            )
            self.kept = bos if marked.startswith(self.BOS_MARK) else ""
        self.default_system = self._default_system()

    def _default_system(self) -> str | None:
        """The system prompt the template inserts when a conversation has none (None: it inserts none)."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
        try:
            as_is = self.raw(probe, False)
        except Exception as err:
            raise ConversationError(
                f"the LLM's chat template fails on a plain user/assistant conversation ({err}); "
                "choose another --data.conv-template"
            ) from None
        try:
            rest = self._dropped(probe, False)[len(self.kept) :]
        except ConversationError:
            if self.system_prompt == "":
                raise
            return None
        if as_is == self.kept + rest or not as_is.endswith(rest):
            return None
        block = as_is[: len(as_is) - len(rest)]
        if self.head is not None and self.head.count(self.PLACEHOLDER) == 1:
            pre, post = self.head.split(self.PLACEHOLDER)
            if block.startswith(pre) and block.endswith(post) and len(block) >= len(pre) + len(post):
                return block[len(pre) : len(block) - len(post)] or block[len(self.kept) :]
        return block[len(self.kept) :]

    def raw(self, messages: list[dict[str, str]], generation: bool, **context: str) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation, **context
        )

    def _dropped(self, messages: list[dict[str, str]], generation: bool) -> str:
        if self.head is None:  # no system role at all: nothing can have been inserted
            return self.raw(messages, generation)
        full = self.raw([{"role": "system", "content": self.PLACEHOLDER}, *messages], generation)
        if not full.startswith(self.head):
            raise ConversationError(
                "the chat template does not render a system turn in front of the conversation, so its "
                "default system prompt cannot be dropped; set one with --data.system-prompt TEXT"
            )
        return self.kept + full[len(self.head) :]

    def render(self, messages: list[dict[str, str]], generation: bool) -> str:
        if self.system_prompt == "" and (not messages or messages[0]["role"] != "system"):
            return self._dropped(messages, generation)
        return self.raw(messages, generation)


def render(
    fmt: TextFormat,
    tokenizer: Any,
    meta: dict[str, Any],
    has_image: bool,
    chat_template: ChatTemplate | None = None,
) -> Rendered:
    """A validated record -> its text and supervised character spans in format ``fmt``."""
    out = _Builder()
    if fmt.template == "plain":
        caption = caption_of(meta)
        out.add(IMAGE_TOKEN if has_image else "")
        out.add(caption + "\n", supervised=True)
        return out.done(None)
    own, turns = record_turns(meta, has_image, fmt.image_position)
    if fmt.template == "tokenizer":
        chat = chat_template or ChatTemplate(tokenizer, fmt.system_prompt)
        system = own if own is not None else fmt.system_prompt or None
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": role, "content": text} for role, text in turns
        ]
        full = chat.render(messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, upto = chat.render(messages[:i], True), chat.render(messages[: i + 1], False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ConversationError(
                    "the chat template does not render a conversation prefix as a text prefix, so assistant "
                    "replies cannot be located for masking; use another --data.conv-template"
                )
            spans.append((len(before), len(upto)))
        at = full.find(IMAGE_TOKEN)
        shown = system if system is not None else None if fmt.system_prompt == "" else chat.default_system
        return Rendered(full, spans, None if at < 0 else at, shown)
    system = _system(own, fmt.system_prompt, DEFAULT_SYSTEM[fmt.template])
    if fmt.template == "vicuna_v1":
        eos = tokenizer.eos_token
        if system:
            out.add(system + " ")
        for role, text in turns:
            if role == "user":
                out.add("USER: " + text + " ")
            else:
                out.add("ASSISTANT:")
                out.add(" " + text + eos, supervised=True)
    elif fmt.template == "llama_3":
        out.add(getattr(tokenizer, "bos_token", None) or "")
        if system:
            out.add("<|start_header_id|>system<|end_header_id|>\n\n" + system.strip() + "<|eot_id|>")
        for role, text in turns:
            out.add(f"<|start_header_id|>{role}<|end_header_id|>\n\n")
            out.add(text.strip() + "<|eot_id|>", supervised=role == "assistant")
    else:  # chatml
        if system:
            out.add("<|im_start|>system\n" + system + "<|im_end|>\n")
        for role, text in turns:
            out.add(f"<|im_start|>{role}\n")
            out.add(text + "<|im_end|>\n", supervised=role == "assistant")
    return out.done(system or None)


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def inference_chat_template(fmt: TextFormat, tokenizer: Any) -> str | None:
    """A Jinja chat template that renders a conversation exactly as ``render`` does in format ``fmt``, and,
    with ``add_generation_prompt``, ends where the first supervised character of the next reply starts: what
    an exported model must be prompted with. ``None`` where the LLM's own template is the right one
    (``tokenizer`` without a system-prompt setting) or where there is no chat (``plain``, stage 1)."""
    template = fmt.template
    if template == "plain":
        return None
    if template == "tokenizer":
        own = getattr(tokenizer, "chat_template", None)
        if not own or not fmt.system_prompt:  # None keeps the template's default; "" cannot be expressed
            return None
        # a system prompt set by --data.system-prompt: put it in front unless the conversation has one
        return (
            "{%- if not messages or messages[0]['role'] != 'system' -%}"
            "{%- set messages = [{'role': 'system', 'content': "
            + _jinja_string(fmt.system_prompt)
            + "}] + messages -%}"
            "{%- endif -%}" + own
        )
    default = DEFAULT_SYSTEM[template] if fmt.system_prompt is None else fmt.system_prompt
    head = (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
        "{%- else -%}{%- set system = " + _jinja_string(default) + " -%}{%- endif -%}"
    )
    # every literal goes through {{ '...' }} so that whitespace trimming ({%- -%}) never eats a space or a
    # newline of the format itself
    if template == "vicuna_v1":
        eos = _jinja_string(tokenizer.eos_token or "")
        body = (
            "{%- if system -%}{{ system + ' ' }}{%- endif -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
            "{%- else -%}{{ 'ASSISTANT: ' + message['content'] + " + eos + " }}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
        )
    elif template == "llama_3":
        body = (
            "{{- " + _jinja_string(tokenizer.bos_token or "") + " -}}"
            "{%- if system -%}"
            "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + (system | trim) + '<|eot_id|>' }}"
            "{%- endif -%}"
            "{%- for message in messages -%}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
            " + '<|eot_id|>' }}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
        )
    else:  # chatml
        body = (
            "{%- if system -%}{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{%- endif -%}"
            "{%- for message in messages -%}"
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
        )
    return head + body


# ---------------------------------------------------------------------------------------------------------
# tokens
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Encoded:
    """One sample as the model sees it, with what ``trainer sample`` shows.

    ``offsets[i]`` is the character span of token ``i`` in ``rendered.text``; ``None`` for visual slots and
    for tokens the tokenizer adds (BOS). ``num_visual``: visual slots from ``visual_start`` (0 without an
    image); ``num_dropped``: text tokens cut by ``max_length``."""

    rendered: Rendered
    input_ids: list[int]
    labels: list[int]
    visual_start: int | None
    num_visual: int
    offsets: list[tuple[int, int] | None]
    num_dropped: int

    def as_sample(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "labels": self.labels, "visual_start": self.visual_start}


def _in_spans(start: int, spans: list[tuple[int, int]]) -> bool:
    return any(a <= start < b for a, b in spans)


class Formatter:
    """Callable ``(meta, has_image=True) -> {"input_ids", "labels", "visual_start"}`` for one tokenizer,
    patch count, text format and length limit. ``fmt``: a ``TextFormat`` or a template name."""

    def __init__(self, tokenizer: Any, num_patches: int, fmt: TextFormat | str, max_length: int):
        self.fmt = fmt if isinstance(fmt, TextFormat) else TextFormat(template=fmt)
        self.tokenizer = tokenizer
        self.num_patches = num_patches
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None or tokenizer.eos_token_id is None:
            raise ConversationError("the LLM tokenizer needs an eos token (and a pad token, or eos is used)")
        self.llava_tokenisation = self.fmt.template in LLAVA_TOKENISATION
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if not self.llava_tokenisation and (self.image_id is None or self.image_id == tokenizer.unk_token_id):
            raise ConversationError(
                f"the tokenizer has no {IMAGE_TOKEN!r} token; load the LLM with load_llm()"
            )
        self.chat_template = None
        if self.fmt.template == "tokenizer":
            self.chat_template = ChatTemplate(tokenizer, self.fmt.system_prompt)
            if self.fmt.system_prompt is None and self.chat_template.default_system:
                log.warning(
                    "the LLM's chat template puts a default system prompt into every sample that has none: "
                    "%r; --data.system-prompt '' drops it, --data.system-prompt TEXT replaces it",
                    self.chat_template.default_system,
                )
        markers = MARKERS.get(self.fmt.template, ())
        split = [m for m in markers if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]
        if split:
            log.warning(
                "--data.conv-template %s: the LLM's tokenizer has no single token for %s, so they are "
                "trained as ordinary text; this template is meant for LLMs trained with it",
                self.fmt.template,
                ", ".join(split),
            )

    # -- pieces ------------------------------------------------------------------------------------------
    def render(self, meta: dict[str, Any], has_image: bool = True) -> Rendered:
        where = f"sample {meta.get('id')!r}"
        reason = check_record({**meta, "id": meta.get("id") or "?"}, has_image)
        if reason is not None:
            raise ConversationError(f"{where}: {reason}")
        return render(self.fmt, self.tokenizer, meta, has_image, self.chat_template)

    def _tokenize(self, text: str, start: int, end: int, specials: bool):
        """Token ids of ``text[start:end]`` and their spans in ``text`` (None for tokens the tokenizer adds)."""
        piece = text[start:end]
        enc = self.tokenizer(piece, add_special_tokens=specials, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets: list[tuple[int, int] | None] = [(start + a, start + b) for a, b in enc["offset_mapping"]]
        if specials:
            core = list(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
            first = next((p for p in range(len(ids) - len(core) + 1) if ids[p : p + len(core)] == core), None)
            if first is not None:  # everything around the text's own tokens was added by the tokenizer
                offsets = [o if first <= i < first + len(core) else None for i, o in enumerate(offsets)]
        return ids, offsets

    def encode(self, meta: dict[str, Any], has_image: bool = True) -> Encoded:
        """Render, tokenise, label and truncate one sample."""
        where = f"sample {meta.get('id')!r}"
        rendered = self.render(meta, has_image)
        text, at = rendered.text, rendered.image_at
        if self.llava_tokenisation:
            if at is None:
                ids, offsets = self._tokenize(text, 0, len(text), True)
                before, after = (ids, offsets), ([], [])
            else:
                before = self._tokenize(text, 0, at, True)
                after = self._tokenize(text, at + len(IMAGE_TOKEN), len(text), False)
        else:
            ids, offsets = self._tokenize(text, 0, len(text), False)
            if at is None:
                before, after = (ids, offsets), ([], [])
            else:
                hits = [i for i, o in enumerate(offsets) if o == (at, at + len(IMAGE_TOKEN))]
                if len(hits) != 1 or ids[hits[0]] != self.image_id:
                    raise ConversationError(
                        f"{where}: {IMAGE_TOKEN!r} is not one token after tokenisation; load the LLM with "
                        "load_llm(), which registers it"
                    )
                k = hits[0]
                before, after = (ids[:k], offsets[:k]), (ids[k + 1 :], offsets[k + 1 :])

        def labels_of(ids, offsets):
            return [
                tok if o is not None and _in_spans(o[0], rendered.supervised) else IGNORE_INDEX
                for tok, o in zip(ids, offsets)
            ]

        if at is None:
            ids, offsets = before[0] + after[0], before[1] + after[1]
            keep = self.max_length
            return Encoded(
                rendered, ids[:keep], labels_of(ids, offsets)[:keep], None, 0, offsets[:keep],
                max(0, len(ids) - keep),
            )  # fmt: skip
        visual_start = len(before[0])
        visual_end = visual_start + self.num_patches
        if visual_end > self.max_length:
            raise ConversationError(
                f"{where}: the visual tokens end at position {visual_end} but --max-length is "
                f"{self.max_length}; raise --max-length (or shorten the text before <image>)"
            )
        room = self.max_length - visual_end  # truncate only the text after the image
        return Encoded(
            rendered,
            before[0] + [self.pad_id] * self.num_patches + after[0][:room],
            labels_of(*before) + [IGNORE_INDEX] * self.num_patches + labels_of(*after)[:room],
            visual_start,
            self.num_patches,
            before[1] + [None] * self.num_patches + after[1][:room],
            max(0, len(after[0]) - room),
        )

    def __call__(self, meta: dict[str, Any], has_image: bool = True) -> dict[str, Any]:
        return self.encode(meta, has_image).as_sample()
