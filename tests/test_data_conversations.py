"""Conversation formats against LLaVA's own rules (``tests/llava_reference.py``, written independently of the
trainer) and against hand-built token sequences: rendered text character for character, supervised spans,
token ids and labels; ``<image>`` placement; text-only samples; system prompts of chat templates; truncation;
collation into the documented batch fields."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests import llava_reference as ref
from trainer.data.collate import Collator, SampleTransform
from trainer.data.conversations import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    ConversationError,
    Formatter,
    TextFormat,
    text_format,
)

P = 4
TWO_TURNS = [
    {"from": "human", "value": "<image>\nWhat is in the photo?"},
    {"from": "gpt", "value": "A cat on a sofa."},
    {"from": "human", "value": "What colour is it?"},
    {"from": "gpt", "value": "Ginger."},
]
# LLaVA-1.5's conv_vicuna_v1 / LLaVA-NeXT's qwen_2 and llava_llama_3 training text of TWO_TURNS, as produced by
# running their conversation.py (/work/notes/llava.md section 1.4 quotes them); typed here, not computed.
LLAVA_VICUNA_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the photo? ASSISTANT: "
    "A cat on a sofa.</s>USER: What colour is it? ASSISTANT: Ginger.</s>"
)
NEXT_QWEN_2 = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is in the "
    "photo?<|im_end|>\n<|im_start|>assistant\nA cat on a sofa.<|im_end|>\n<|im_start|>user\nWhat colour is "
    "it?<|im_end|>\n<|im_start|>assistant\nGinger.<|im_end|>\n"
)
NEXT_LLAMA_3 = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
    "assistant. You are able to understand the visual content that the user provides, and assist the user "
    "with a variety of tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    "<image>\nWhat is in the photo?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA cat on a "
    "sofa.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat colour is it?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nGinger.<|eot_id|>"
)
# SmolLM2-135M-Instruct's template has this shape: a default system turn when the first message is not one.
SMOL_LIKE_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def record(turns, ident="x"):
    return {"id": ident, "conversations": copy.deepcopy(turns)}


@pytest.fixture(scope="module")
def tok(cache_dir):
    from trainer.data.sample import load_tokenizer

    return load_tokenizer("tiny-llm")


@pytest.fixture(scope="module")
def sp_tok():
    from trainer.models.llm import add_image_token

    tokenizer = ref.sp_tokenizer()
    add_image_token(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def llama3_tok(tok):
    """tiny-llm's tokenizer with Llama-3's header / end-of-turn / BOS tokens."""
    tokenizer = copy.deepcopy(tok)
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.add_tokens(specials, special_tokens=True)
    tokenizer.bos_token = "<|begin_of_text|>"
    return tokenizer


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def supervised_text(enc):
    return ["".join(enc.rendered.text[a:b]) for a, b in enc.rendered.supervised]


def spans_of(text, pieces):
    """Character spans of ``pieces`` found left to right in ``text``."""
    out, pos = [], 0
    for piece in pieces:
        start = text.index(piece, pos)
        out.append((start, start + len(piece)))
        pos = start + len(piece)
    return out


def test_image_token_matches_model_layer_and_validator():
    from trainer.models.llm import IMAGE_TOKEN as MODEL_IMAGE_TOKEN
    from visalign.samples import IMAGE_TOKEN as RECORD_IMAGE_TOKEN

    assert IMAGE_TOKEN == MODEL_IMAGE_TOKEN == RECORD_IMAGE_TOKEN


# ---- LLaVA-1.5: vicuna_v1 and plain, token for token --------------------------------------------------------
def test_vicuna_v1_two_turns_equals_llava_text_tokens_and_labels(sp_tok):
    enc = Formatter(sp_tok, P, "vicuna_v1", 512).encode(record(TWO_TURNS))
    assert enc.rendered.text == LLAVA_VICUNA_V1  # typed from LLaVA's own output
    prompt, input_ids, labels = ref.preprocess_v1(ref.preprocess_multimodal(TWO_TURNS), sp_tok, True)
    assert enc.rendered.text == prompt
    assert (enc.input_ids, enc.labels) == ref.expand_image(input_ids, labels, P, sp_tok.pad_token_id)
    # the space before each reply is supervised, as LLaVA's "-2" makes it ("▁A" carries it)
    assert enc.rendered.supervised == spans_of(prompt, [" A cat on a sofa.</s>", " Ginger.</s>"])
    assert enc.visual_start == input_ids.index(ref.IMAGE_TOKEN_INDEX)
    assert sum(label != IGNORE_INDEX for label in enc.labels) > 6


def test_vicuna_v1_uses_the_llms_own_eos(tok):
    enc = Formatter(tok, P, "vicuna_v1", 512).encode(record(TWO_TURNS))
    assert enc.rendered.text == LLAVA_VICUNA_V1.replace("</s>", "<|im_end|>")
    assert supervised_text(enc) == [" A cat on a sofa.<|im_end|>", " Ginger.<|im_end|>"]
    # byte-level BPE: the supervised tokens are exactly " A", " cat", ... and the eos id
    sup = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    assert sup == ids(tok, " A cat on a sofa.<|im_end|>") + ids(tok, " Ginger.<|im_end|>")
    assert sup.count(tok.eos_token_id) == 2


def test_vicuna_v1_multi_turn_and_trailing_question(sp_tok):
    turns = TWO_TURNS + [
        {"from": "human", "value": "Where is it?"},
        {"from": "gpt", "value": "Here."},
        {"from": "human", "value": "Which one?"},
        {"from": "gpt", "value": "There is a cat."},
    ]
    enc = Formatter(sp_tok, P, "vicuna_v1", 512).encode(record(turns))
    prompt, input_ids, labels = ref.preprocess_v1(ref.preprocess_multimodal(turns), sp_tok, True)
    assert enc.rendered.text == prompt
    assert (enc.input_ids, enc.labels) == ref.expand_image(input_ids, labels, P, sp_tok.pad_token_id)
    assert [enc.rendered.text[a:b] for a, b in enc.rendered.supervised] == [
        " A cat on a sofa.</s>",
        " Ginger.</s>",
        " Here.</s>",
        " There is a cat.</s>",
    ]
    # a trailing question: LLaVA's count mask gives up on it and zeroes the whole sample ("tokenization
    # mismatch"); we keep the replies before it supervised and the question unsupervised
    asked = Formatter(sp_tok, P, "vicuna_v1", 512).encode(record(turns + [{"from": "human", "value": "Hi"}]))
    _, _, llava_labels = ref.preprocess_v1(
        ref.preprocess_multimodal(turns + [{"from": "human", "value": "Hi"}]), sp_tok, True
    )
    assert all(label == IGNORE_INDEX for label in llava_labels)
    assert asked.rendered.text == prompt + "USER: Hi "
    assert asked.labels[: len(enc.labels)] == enc.labels
    assert set(asked.labels[len(enc.labels) :]) == {IGNORE_INDEX}


def test_plain_equals_llava_preprocess_plain(sp_tok, tok):
    turns = [
        {"from": "human", "value": "Describe the image briefly.\n<image>"},
        {"from": "gpt", "value": "A red motorcycle."},
    ]
    enc = Formatter(sp_tok, P, "plain", 512).encode(record(turns))
    text, input_ids, labels = ref.preprocess_plain(ref.preprocess_multimodal(turns), sp_tok)
    assert enc.rendered.text == text == "<image>A red motorcycle.\n"  # the instruction is dropped
    assert (enc.input_ids, enc.labels) == ref.expand_image(input_ids, labels, P, sp_tok.pad_token_id)
    assert enc.input_ids[0] == sp_tok.bos_token_id and enc.visual_start == 1
    assert supervised_text(enc) == ["A red motorcycle.\n"]
    # a caption record renders the same; a tokenizer without BOS starts with the visual block
    assert (
        Formatter(sp_tok, P, "plain", 512).encode({"id": "c", "caption": "A red motorcycle."}).input_ids
        == enc.input_ids
    )
    out = Formatter(tok, P, "plain", 64)({"id": "c", "caption": "A red motorcycle."})
    caption = ids(tok, "A red motorcycle.\n")
    assert out == {
        "input_ids": [tok.pad_token_id] * P + caption,
        "labels": [IGNORE_INDEX] * P + caption,
        "visual_start": 0,
    }


# ---- <image> anywhere in the first turn, both positions -------------------------------------------------
@pytest.mark.parametrize(
    "first_turn",
    [
        "<image>\nWhat is in the photo?",
        "What is in the photo?<image>",
        "What is in <image> the photo?",
        "What is in the photo?",
    ],
)
@pytest.mark.parametrize("position", ["first", "keep"])
def test_image_anywhere_in_first_turn(sp_tok, tok, first_turn, position):
    turns = [{"from": "human", "value": first_turn}] + TWO_TURNS[1:]
    fmt = TextFormat("vicuna_v1", image_position=position)
    enc = Formatter(sp_tok, P, fmt, 512).encode(record(turns))
    if IMAGE_TOKEN not in first_turn:  # no mark: "<image>\n" in front of the first user turn, either way
        placed = [{"from": "human", "value": "<image>\n" + first_turn}] + TWO_TURNS[1:]
    elif position == "first":
        placed = ref.preprocess_multimodal(turns)
    else:
        placed = turns
    prompt, input_ids, labels = ref.preprocess_v1(placed, sp_tok, True)
    assert enc.rendered.text == prompt
    assert enc.rendered.image_at == prompt.index("<image>")
    if position == "first":
        assert "USER: <image>\nWhat is in" in prompt
    assert (enc.input_ids, enc.labels) == ref.expand_image(input_ids, labels, P, sp_tok.pad_token_id)
    assert supervised_text(enc) == [" A cat on a sofa.</s>", " Ginger.</s>"]
    # the same placement in the templates tokenised as a whole: the image token's slot, replies supervised
    for template in ("chatml", "tokenizer"):
        chat = Formatter(tok, P, TextFormat(template, image_position=position), 512).encode(record(turns))
        user = next(t["value"] for t in placed)
        assert f"user\n{user}<|im_end|>" in chat.rendered.text
        before = chat.rendered.text[: chat.rendered.image_at]
        assert chat.visual_start == len(ids(tok, before))
        assert chat.input_ids[chat.visual_start : chat.visual_start + P] == [tok.pad_token_id] * P
        sup = [t for t, label in zip(chat.input_ids, chat.labels) if label != IGNORE_INDEX]
        assert sup == ids(tok, "A cat on a sofa.<|im_end|>\n") + ids(tok, "Ginger.<|im_end|>\n")


def test_first_position_is_llavas_preprocess_multimodal_exactly():
    from trainer.data.conversations import move_image_first

    for value in ["<image>", "  <image>  ", "Look: <image> ", "a\n<image>\nb", "<image>What", "x <image>"]:
        assert (
            move_image_first(value)
            == ref.preprocess_multimodal([{"from": "human", "value": value}])[0]["value"]
        )


def test_image_in_a_later_turn(tok):
    turns = TWO_TURNS[:2] + [{"from": "human", "value": "And here? <image>"}, TWO_TURNS[3]]
    turns[0] = {"from": "human", "value": "What is in the photo?"}
    enc = Formatter(tok, P, "vicuna_v1", 512).encode(record(turns))
    assert "ASSISTANT: A cat on a sofa.<|im_end|>USER: <image>\nAnd here? ASSISTANT:" in enc.rendered.text
    assert supervised_text(enc) == [" A cat on a sofa.<|im_end|>", " Ginger.<|im_end|>"]
    first_reply = [
        t for t, label in zip(enc.input_ids[: enc.visual_start], enc.labels) if label != IGNORE_INDEX
    ]
    assert first_reply == ids(tok, " A cat on a sofa.<|im_end|>")


# ---- NeXT templates: chatml (qwen_2) and llama_3 -------------------------------------------------------------
def test_chatml_equals_next_qwen_2_and_supervises_reply_and_end(tok):
    enc = Formatter(tok, P, "qwen_2", 512).encode(record(TWO_TURNS))
    placed = ref.preprocess_multimodal(TWO_TURNS)
    roles = {"human": "<|im_start|>user", "gpt": "<|im_start|>assistant"}
    prompt = ref.prompt_chatml(
        "<|im_start|>system\nYou are a helpful assistant.", [(roles[t["from"]], t["value"]) for t in placed]
    )
    assert enc.rendered.text == prompt == NEXT_QWEN_2
    assert supervised_text(enc) == ["A cat on a sofa.<|im_end|>\n", "Ginger.<|im_end|>\n"]
    # NeXT's preprocess_qwen tokenises turn by turn; our labels: the assistant turns minus their header
    expected_ids, expected_labels = [], []
    pieces = [("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False)]
    for t in placed:
        role = roles[t["from"]]
        pieces.append((role + "\n", False))
        pieces.append((t["value"] + "<|im_end|>\n", t["from"] == "gpt"))
    for text, supervised in pieces:
        for chunk_i, chunk in enumerate(text.split("<image>")):
            if chunk_i:
                expected_ids += [tok.pad_token_id] * P
                expected_labels += [IGNORE_INDEX] * P
            piece_ids = ids(tok, chunk)
            expected_ids += piece_ids
            expected_labels += piece_ids if supervised else [IGNORE_INDEX] * len(piece_ids)
    assert (enc.input_ids, enc.labels) == (expected_ids, expected_labels)


def test_llama_3_equals_next_llava_llama_3(llama3_tok):
    enc = Formatter(llama3_tok, P, "llama_3", 512).encode(record(TWO_TURNS))
    placed = ref.preprocess_multimodal(TWO_TURNS)
    roles = {"human": "user", "gpt": "assistant"}
    prompt = ref.prompt_llama_3(
        "<|begin_of_text|>",
        "You are a helpful language and vision assistant. You are able to understand the visual content that "
        "the user provides, and assist the user with a variety of tasks using natural language.",
        [(roles[t["from"]], t["value"]) for t in placed],
    )
    assert enc.rendered.text == prompt == NEXT_LLAMA_3
    assert supervised_text(enc) == ["A cat on a sofa.<|eot_id|>", "Ginger.<|eot_id|>"]
    sup = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    eot = llama3_tok.convert_tokens_to_ids("<|eot_id|>")
    assert sup == ids(llama3_tok, "A cat on a sofa.") + [eot] + ids(llama3_tok, "Ginger.") + [eot]
    assert enc.input_ids[0] == llama3_tok.bos_token_id and enc.input_ids.count(llama3_tok.bos_token_id) == 1


# ---- text-only samples ------------------------------------------------------------------------------------
def test_text_only_samples_have_no_visual_block(sp_tok, tok):
    turns = [
        {"from": "human", "value": "Hello, how are you today?"},
        {"from": "gpt", "value": "I am fine, thank you."},
    ]
    enc = Formatter(sp_tok, P, "vicuna_v1", 512).encode(record(turns), has_image=False)
    prompt, input_ids, labels = ref.preprocess_v1(turns, sp_tok, False)  # LLaVA's text-only path
    assert (enc.rendered.text, enc.input_ids, enc.labels) == (prompt, input_ids, labels)
    assert (
        enc.visual_start is None
        and enc.rendered.image_at is None
        and sp_tok.pad_token_id not in enc.input_ids
    )
    assert Formatter(sp_tok, P, "vicuna_v1", 512)(record(turns), has_image=False)["visual_start"] is None
    for template in ("chatml", "llama_3", "tokenizer", "plain"):
        out = Formatter(tok, P, template, 512).encode(record(turns), has_image=False)
        assert out.visual_start is None and IMAGE_TOKEN not in out.rendered.text
        sup = [t for t, label in zip(out.input_ids, out.labels) if label != IGNORE_INDEX]
        assert tok.decode(sup).startswith("I am fine, thank you.")
    # the same record with an image gets the visual block in front of the question
    with_image = Formatter(tok, P, "chatml", 512).encode(record(turns))
    assert "user\n<image>\nHello" in with_image.rendered.text and with_image.visual_start is not None
    # a text-only record must not hold the mark
    with pytest.raises(ConversationError, match="text-only record"):
        Formatter(tok, P, "chatml", 512)(record(TWO_TURNS), has_image=False)


# ---- system prompts: records, settings, the tokenizer template's default ----------------------------------
@pytest.fixture(scope="module")
def smol_like(tok):
    tokenizer = copy.deepcopy(tok)
    tokenizer.chat_template = SMOL_LIKE_TEMPLATE
    return tokenizer


def test_tokenizer_template_default_system_prompt_kept_dropped_or_replaced(smol_like, tok):
    meta = record(TWO_TURNS)
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    kept = Formatter(smol_like, P, "tokenizer", 512).encode(meta)
    dropped = Formatter(smol_like, P, TextFormat("tokenizer", system_prompt=""), 512).encode(meta)
    replaced = Formatter(smol_like, P, TextFormat("tokenizer", system_prompt="Be brief."), 512).encode(meta)
    no_default = Formatter(tok, P, "tokenizer", 512).encode(meta)  # tiny-llm: plain ChatML, no default
    assert kept.rendered.text == f"<|im_start|>system\n{default}<|im_end|>\n" + no_default.rendered.text
    assert kept.rendered.system == default
    assert dropped.rendered.text == no_default.rendered.text and dropped.rendered.system is None
    assert replaced.rendered.text == "<|im_start|>system\nBe brief.<|im_end|>\n" + no_default.rendered.text
    assert replaced.rendered.system == "Be brief."
    for enc in (kept, dropped, replaced, no_default):
        assert supervised_text(enc) == ["A cat on a sofa.<|im_end|>\n", "Ginger.<|im_end|>\n"]
    assert dropped.input_ids == no_default.input_ids and dropped.labels == no_default.labels
    # a record's own system turn wins over the setting
    own = record([{"from": "system", "value": "Answer in French."}] + TWO_TURNS)
    for fmt in (TextFormat("tokenizer", system_prompt=""), TextFormat("tokenizer")):
        assert (
            Formatter(smol_like, P, fmt, 512)
            .encode(own)
            .rendered.text.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\n")
        )


def test_named_templates_system_prompt_setting(tok):
    meta = record(TWO_TURNS)
    none = Formatter(tok, P, TextFormat("vicuna_v1", system_prompt=""), 512).encode(meta)
    assert none.rendered.text.startswith("USER: <image>\nWhat")
    mine = Formatter(tok, P, TextFormat("chatml", system_prompt="Be brief."), 512).encode(meta)
    assert mine.rendered.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    own = record([{"from": "system", "value": "Answer in French."}] + TWO_TURNS)
    vicuna = Formatter(tok, P, "vicuna_v1", 512).encode(own)
    assert vicuna.rendered.text.startswith("Answer in French. USER: <image>\n")
    assert Formatter(tok, P, "plain", 512).encode(own).rendered.text == "<image>A cat on a sofa.\n"


def test_tokenizer_template_with_bos_keeps_it_when_dropping_the_system_turn(llama3_tok):
    tokenizer = copy.deepcopy(llama3_tok)
    # Llama-3.1-like: BOS in front, a system header always rendered (with a default text)
    tokenizer.chat_template = (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set msgs = messages[1:] %}{% else %}{% set sys = 'Knowledge cutoff: 2023' %}{% set msgs = messages %}"
        "{% endif %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + sys + '<|eot_id|>' }}"
        "{% for m in msgs %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    )
    dropped = Formatter(tokenizer, P, TextFormat("tokenizer", system_prompt=""), 512).encode(
        record(TWO_TURNS)
    )
    assert dropped.rendered.text.startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>"
    )
    assert supervised_text(dropped) == ["A cat on a sofa.<|eot_id|>", "Ginger.<|eot_id|>"]
    kept = Formatter(tokenizer, P, "tokenizer", 512)
    assert kept.chat_template.default_system == "Knowledge cutoff: 2023"


def test_tokenizer_template_missing_is_one_line_naming_the_setting(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ConversationError, match="--data.conv-template") as err:
        Formatter(bare, P, "tokenizer", 512)
    assert "\n" not in str(err.value)
    Formatter(bare, P, "vicuna_v1", 512)(record(TWO_TURNS))  # the named templates need none


def test_auto_resolution_and_settings():
    from trainer.config import DataConfig
    from visalign.config import ConfigError

    pre, fine = text_format(DataConfig(), "pretrain"), text_format(DataConfig(), "finetune")
    assert (pre.template, pre.image_position) == ("plain", "first")
    assert (fine.template, fine.image_position) == ("tokenizer", "keep")
    assert text_format(DataConfig(conv_template="qwen_2"), "finetune").template == "chatml"
    assert text_format(DataConfig(conv_template="vicuna_v1"), "finetune").image_position == "first"
    assert (
        text_format(DataConfig(conv_template="chatml", image_position="keep"), "x").image_position == "keep"
    )
    with pytest.raises(ConfigError, match="conv-template"):
        TextFormat("vicuna")
    with pytest.raises(ConfigError, match="system-prompt"):
        TextFormat("chatml", system_prompt="<image>")


# ---- the validator refuses what no format can render ---------------------------------------------------
def test_records_the_validator_refuses_are_refused_by_every_format(tok):
    from visalign.samples import check_record

    bad = [
        ({"id": "c", "caption": "a <image> b"}, True, "in the caption"),
        (
            record([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]),
            True,
            "one image",
        ),
        (
            record([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x <image>"}]),
            True,
            "user turn",
        ),
        (record([{"from": "gpt", "value": "x"}, {"from": "human", "value": "hi"}]), True, "alternate"),
    ]
    for meta, has_image, reason in bad:
        assert reason in check_record(meta, has_image)
        for template in ("plain", "vicuna_v1", "chatml", "tokenizer"):
            with pytest.raises(ConversationError, match=reason):
                Formatter(tok, P, template, 512)(meta, has_image)


# ---- truncation ---------------------------------------------------------------------------------------------
def test_truncation_cuts_text_only_and_refuses_a_visual_block_that_does_not_fit(tok):
    meta = record([{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A " * 40}])
    full = Formatter(tok, P, "tokenizer", 1000)(meta)
    short = Formatter(tok, P, "tokenizer", 20).encode(meta)
    assert short.input_ids == full["input_ids"][:20] and short.labels == full["labels"][:20]
    assert short.num_dropped == len(full["input_ids"]) - 20
    assert short.input_ids[short.visual_start : short.visual_start + P] == [tok.pad_token_id] * P
    with pytest.raises(ConversationError, match="max-length"):
        Formatter(tok, P, "tokenizer", full["visual_start"] + P - 1)(meta)
    text_only = Formatter(tok, P, "tokenizer", 7)(
        record([{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A " * 40}]), has_image=False
    )
    assert len(text_only["input_ids"]) == 7 and text_only["visual_start"] is None


def test_tokenizer_template_hand_built(tok):
    out = Formatter(tok, P, "tokenizer", 256)(record(TWO_TURNS))
    before = ids(tok, "<|im_start|>user\n")
    user1 = ids(tok, "\nWhat is in the photo?<|im_end|>\n<|im_start|>assistant\n")
    reply1 = ids(tok, "A cat on a sofa.<|im_end|>\n")
    user2 = ids(tok, "<|im_start|>user\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\n")
    reply2 = ids(tok, "Ginger.<|im_end|>\n")
    pad, ign = tok.pad_token_id, IGNORE_INDEX
    assert out["input_ids"] == before + [pad] * P + user1 + reply1 + user2 + reply2
    assert out["labels"] == [ign] * (len(before) + P + len(user1)) + reply1 + [ign] * len(user2) + reply2
    assert out["visual_start"] == len(before)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) not in out["input_ids"]  # never fed to the LLM


def test_collate_pads_right_and_keeps_dtypes(tok):
    fmt = Formatter(tok, P, "plain", 64)
    rng = np.random.default_rng(0)
    samples = []
    captions = ["A cat.", "A red motorcycle parked in a garage."]
    for i, caption in enumerate(captions):
        samples.append(
            SampleTransform(fmt)(
                {
                    "__key__": f"k{i}",
                    "feat": rng.standard_normal((P, 8)).astype(np.float16),
                    "labels": np.full((P, 3), i, dtype=np.int32),
                    "scores": np.ones((P, 3), dtype=np.float16),
                    "expert.dino": np.zeros((2, 5), dtype=np.float16),
                    "meta": {"id": f"id{i}", "caption": caption},
                    "slot": 0,
                    "pass": 0,
                }
            )
        )
    batch = Collator(tok.pad_token_id)(samples)
    n0, n1 = len(samples[0]["input_ids"]), len(samples[1]["input_ids"])
    assert batch["input_ids_BT"].shape == (2, max(n0, n1)) and n0 < n1
    assert batch["input_ids_BT"][0, n0:].eq(tok.pad_token_id).all()
    assert batch["labels_BT"][0, n0:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask_BT"].sum(1).tolist() == [n0, n1]
    assert batch["feats_BPD"].dtype == torch.float32 and batch["labels_BPK"].dtype == torch.int64
    assert batch["scores_BPK"].dtype == torch.float32 and batch["experts"]["dino"].shape == (2, 2, 5)
    assert torch.equal(batch["feats_BPD"][1], torch.from_numpy(samples[1]["feat"].astype(np.float32)))
    assert batch["num_target_tokens"] == sum(len(ids(tok, c + "\n")) for c in captions)
    assert batch["ids"] == ["id0", "id1"] and batch["visual_start_B"].tolist() == [0, 0]


# ---- the real SmolLM2 tokenizer ------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_default_system_prompt_dropped_or_replaced(cache_dir):
    """Builds smollm2-135m from its GGUF (about a minute)."""
    from trainer.data.sample import load_tokenizer

    smol = load_tokenizer("smollm2-135m")
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    meta = record(TWO_TURNS)
    kept = Formatter(smol, P, "tokenizer", 512).encode(meta)
    assert kept.rendered.text.startswith(
        f"<|im_start|>system\n{default}<|im_end|>\n<|im_start|>user\n<image>"
    )
    dropped = Formatter(smol, P, TextFormat("tokenizer", system_prompt=""), 512).encode(meta)
    chatml = Formatter(smol, P, TextFormat("chatml", system_prompt="", image_position="keep"), 512).encode(
        meta
    )
    assert (
        dropped.rendered.text
        == chatml.rendered.text
        == kept.rendered.text[len(f"<|im_start|>system\n{default}<|im_end|>\n") :]
    )
    assert (dropped.input_ids, dropped.labels) == (chatml.input_ids, chatml.labels)
    replaced = Formatter(smol, P, TextFormat("tokenizer", system_prompt="Be brief."), 512).encode(meta)
    assert replaced.rendered.text == "<|im_start|>system\nBe brief.<|im_end|>\n" + dropped.rendered.text
    for enc in (kept, dropped, replaced):
        sup = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
        assert smol.decode(sup) == "A cat on a sofa.<|im_end|>\nGinger.<|im_end|>\n"


@pytest.mark.parametrize(
    "fmt",
    [
        TextFormat("vicuna_v1"),
        TextFormat("vicuna_v1", system_prompt=""),
        TextFormat("chatml"),
        TextFormat("chatml", system_prompt="Be brief."),
        TextFormat("llama_3"),
        TextFormat("tokenizer", system_prompt="Be brief."),
    ],
    ids=lambda f: f"{f.template}-{f.system_prompt!r}",
)
def test_exported_chat_template_prompts_the_trained_format(smol_like, llama3_tok, fmt):
    """The chat template an export ships (``inference_chat_template``) renders a conversation exactly as
    training did, and its generation prompt ends where each supervised reply begins."""
    from trainer.data.conversations import inference_chat_template, render

    tokenizer = {"llama_3": llama3_tok, "tokenizer": smol_like}.get(fmt.template, smol_like)
    template = inference_chat_template(fmt, tokenizer)
    assert template is not None
    for turns in (TWO_TURNS, [{"from": "system", "value": "Answer in French."}] + TWO_TURNS):
        rendered = render(fmt, tokenizer, record(turns), has_image=True)
        messages = [
            {"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
            for t in turns
        ]

        def chat(msgs, generation):
            return tokenizer.apply_chat_template(
                msgs, chat_template=template, tokenize=False, add_generation_prompt=generation
            )

        assert chat(messages, False) == rendered.text
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for (start, _end), i in zip(rendered.supervised, replies):
            prompt = chat(messages[:i], True)
            # the prompt is the text up to the reply (vicuna supervises the space after "ASSISTANT:")
            assert rendered.text.startswith(prompt) and len(prompt) == start, (prompt[-30:], start)
    assert inference_chat_template(TextFormat("plain"), smol_like) is None
    assert inference_chat_template(TextFormat("tokenizer"), smol_like) is None  # the LLM's own is right
