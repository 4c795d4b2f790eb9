"""Conversation templating, masking and truncation against hand-built token sequences (tiny-llm tokenizer),
and collation into the documented batch fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.data.collate import Collator, SampleTransform
from trainer.data.conversations import IGNORE_INDEX, IMAGE_TOKEN, ConversationError, Formatter

P = 4


@pytest.fixture(scope="module")
def tok(cache_dir):
    from trainer.models.llm import load_llm

    return load_llm("tiny-llm")[1]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_image_token_matches_model_layer():
    from trainer.models.llm import IMAGE_TOKEN as MODEL_IMAGE_TOKEN

    assert IMAGE_TOKEN == MODEL_IMAGE_TOKEN


def test_plain_caption_is_visual_then_caption_eos(tok):
    out = Formatter(tok, P, "plain", 64)({"caption": "A red motorcycle."})
    caption = ids(tok, "A red motorcycle.") + [tok.eos_token_id]
    pad = tok.pad_token_id
    assert out["input_ids"] == [pad] * P + caption
    assert out["labels"] == [IGNORE_INDEX] * P + caption
    assert out["visual_start"] == 0
    # a LLaVA pre-training record stores the caption as the gpt turn; the human '<image>' turn is dropped
    conv = {
        "conversations": [
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": "A red motorcycle."},
        ]
    }
    assert Formatter(tok, P, "plain", 64)(conv) == out


def test_chat_masks_all_but_assistant_and_splits_at_image(tok):
    meta = {
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Ginger."},
        ]
    }
    out = Formatter(tok, P, "chat", 256)(meta)
    # hand-built from the ChatML template tiny-llm declares
    before = ids(tok, "<|im_start|>user\n")
    user1 = ids(tok, "\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
    reply1 = ids(tok, "A cat.<|im_end|>\n")
    user2 = ids(tok, "<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n")
    reply2 = ids(tok, "Ginger.<|im_end|>\n")
    pad, ign = tok.pad_token_id, IGNORE_INDEX
    assert out["input_ids"] == before + [pad] * P + user1 + reply1 + user2 + reply2
    assert out["labels"] == [ign] * (len(before) + P + len(user1)) + reply1 + [ign] * len(user2) + reply2
    assert out["visual_start"] == len(before)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) not in out["input_ids"]  # never fed to the LLM


def test_chat_without_image_mark_puts_visual_tokens_at_start_of_first_user_turn(tok):
    with_mark = {
        "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yes."}]
    }
    without = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes."}]}
    fmt = Formatter(tok, P, "chat", 256)
    assert fmt(without) == fmt(with_mark)


def test_truncation_cuts_text_only_and_refuses_a_visual_block_that_does_not_fit(tok):
    meta = {
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A " * 40}]
    }
    full = Formatter(tok, P, "chat", 1000)(meta)
    short = Formatter(tok, P, "chat", 20)(meta)
    assert short["input_ids"] == full["input_ids"][:20] and short["labels"] == full["labels"][:20]
    assert short["input_ids"][short["visual_start"] : short["visual_start"] + P] == [tok.pad_token_id] * P
    with pytest.raises(ConversationError, match="max-length"):
        Formatter(tok, P, "chat", full["visual_start"] + P - 1)(meta)
    with pytest.raises(ConversationError, match="one image per sample"):
        Formatter(tok, P, "chat", 99)({"conversations": [{"from": "human", "value": "<image><image>"}]})


def test_collate_pads_right_and_keeps_dtypes(tok):
    fmt = Formatter(tok, P, "plain", 64)
    rng = np.random.default_rng(0)
    samples = []
    for i, caption in enumerate(["A cat.", "A red motorcycle parked in a garage."]):
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
    expected_targets = sum(len(ids(tok, c)) + 1 for c in ["A cat.", "A red motorcycle parked in a garage."])
    assert batch["num_target_tokens"] == expected_targets
    assert batch["ids"] == ["id0", "id1"] and batch["visual_start_B"].tolist() == [0, 0]
