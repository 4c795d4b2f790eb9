"""``trainer sample``: one shard sample as trained on, checked against hand-built text, spans and tokens; the
tokenisation check that reports supervised tokens differing from the supervised characters."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest

from trainer.cli import main
from trainer.data.conversations import Formatter, TextFormat
from trainer.data.sample import as_text, explain, has_image_of, load_tokenizer

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
P = 16  # write_tiny_shards' default patch count


@pytest.fixture(scope="module")
def tok(cache_dir):
    return load_tokenizer("tiny-llm")


@pytest.fixture
def root(tiny_shards):
    return tiny_shards()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def sample(capsys, *argv):
    code = main(["sample", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_json_is_the_vicuna_v1_text_spans_and_tokens(capsys, root, tok):
    code, out, _ = sample(
        capsys, root, "s0000", "--llm", "tiny-llm", "--conv-template", "vicuna_v1", "--json"
    )
    assert code == 0
    report = json.loads(out)
    # write_tiny_shards' sample 0: human "<image>\nWhat is this?", gpt "It shows word0."
    text = VICUNA_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: It shows word0.<|im_end|>"
    assert report["text"] == text
    start = text.index(" It shows")
    assert report["supervised"] == [[start, len(text)]]
    assert report["visual_at"] == text.index("<image>")
    before = len(ids(tok, text[: text.index("<image>")]))
    assert report["visual_tokens"] == [before, before + P]
    supervised = [t for t in report["tokens"] if t["supervised"]]
    assert [t["id"] for t in supervised] == ids(tok, " It shows word0.<|im_end|>")
    assert "".join(t["text"] for t in supervised) == text[start:]
    assert report["num_tokens"] == len(ids(tok, text.replace("<image>", ""))) + P
    assert report["problems"] == [] and report["has_image"] is True
    assert (report["template"], report["image_position"], report["system_prompt"]) == (
        "vicuna_v1", "first", VICUNA_SYSTEM
    )  # fmt: skip


def test_sample_text_marks_spans_and_the_visual_block(capsys, root):
    code, out, _ = sample(capsys, root, "s0001", "--llm", "tiny-llm")  # auto + pretrain = plain
    assert code == 0
    # sample 1 is a caption: "a photo of word1 and word7"
    assert "template plain" in out and f"({P} visual at 0..{P - 1})" in out
    assert f"⟨image × {P}⟩⟦a photo of word1 and word7\n⟧" in out
    assert f"{f'0..{P - 1}':>11}" in out and "visual tokens" in out
    assert "ok: the supervised tokens decode to exactly the supervised characters" in out


def test_sample_takes_settings_from_a_config_and_reports_truncation(capsys, root, tmp_path, tok):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "stage: finetune\nmodel:\n  llm: tiny-llm\n"
        "data:\n  conv_template: qwen_2\n  system_prompt: ''\n  max_length: 24\n"
    )
    code, out, _ = sample(capsys, root, "s0002", "--config", cfg, "--json")
    report = json.loads(out)
    assert code == 0 and report["template"] == "chatml" and report["system_prompt"] is None
    assert report["text"] == (
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\nIt shows word2.<|im_end|>\n"
    )
    full = len(ids(tok, report["text"].replace("<image>", ""))) + P
    assert report["num_tokens"] == 24 and report["num_dropped"] == full - 24
    assert report["problems"] and "--max-length" in report["problems"][0]
    # a flag overrides the file
    code, out, _ = sample(capsys, root, "s0002", "--config", cfg, "--max-length", "512", "--json")
    assert json.loads(out)["problems"] == []


def test_sample_finds_by_tar_key_or_id_and_names_a_missing_one(capsys, root, tok):
    from visalign import shards as S

    manifest = S.read_manifest(root)
    ident = "coco/000123.jpg"
    rng = np.random.default_rng(0)
    with S.ShardWriter(root, len(manifest.shards)) as writer:
        writer.write(
            S.sample_key(ident),
            rng.standard_normal((P, 32)).astype(np.float16),
            np.zeros((P, 4), np.int32),
            np.zeros((P, 4), np.float16),
            {"id": ident, "caption": "A cat."},
        )
        stats = writer.close()
    info = S.ShardInfo(name=stats["name"], num_samples=1, sha256=stats["sha256"])
    S.write_manifest(
        root,
        dataclasses.replace(manifest, shards=[*manifest.shards, info], num_samples=manifest.num_samples + 1),
    )
    key = S.sample_key(ident)
    assert key != ident
    for wanted in (ident, key):
        code, out, _ = sample(capsys, root, wanted, "--llm", "tiny-llm", "--json")
        report = json.loads(out)
        assert code == 0 and (report["id"], report["key"]) == (ident, key)
        assert report["text"] == "<image>A cat.\n"
    code, out, err = sample(capsys, root, "s9999", "--llm", "tiny-llm")
    assert code == 3 and out == ""
    assert err.strip().splitlines() == [
        f"trainer sample: error: {root} has no sample with id or key 's9999' (7 samples in 4 shards); keys "
        "are the tar member names before the first dot"
    ]


def test_check_reports_a_token_straddling_a_reply_border(tok):
    """A template whose generation prompt ends with a space: byte-level BPE merges that space into the reply's
    first token, which then starts before the reply and is not supervised; the check says so."""
    odd = copy.deepcopy(tok)
    odd.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    meta = {
        "id": "x",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "A cat."}],
    }
    report = explain(Formatter(odd, P, "tokenizer", 512), meta, has_image=False)
    assert report["supervised"] == [[len("user: Hi\nassistant: "), len(report["text"])]]
    assert len(report["problems"]) == 1
    assert "'A cat.\\n' are supervised but their tokens" in report["problems"][0]
    assert "decode to ' cat.\\n'" in report["problems"][0]
    assert "MISMATCH:" in as_text(report)


def test_text_only_sample_report(tok):
    meta = {
        "id": "t",
        "has_image": False,
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
    }
    assert has_image_of({"meta": meta}) is False
    assert has_image_of({"meta": {"id": "i"}, "feat": np.zeros((1, 1))}) is True
    report = explain(Formatter(tok, P, TextFormat("chatml", system_prompt=""), 512), meta, has_image=False)
    assert report["text"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    assert report["visual_at"] is None and report["visual_tokens"] is None and report["problems"] == []
    assert "text-only: no visual tokens" in as_text(report)
