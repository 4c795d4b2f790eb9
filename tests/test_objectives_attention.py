"""The cheap text->visual attention path equals the same average taken from eager ``output_attentions``.

Letters: B batch, T sequence, P visual tokens, d width, L layers, H heads.
"""

from __future__ import annotations

import pytest
import torch

from trainer.models.attention import IMPLEMENTATION, capture_text_to_visual


def _eager_reference(llm, embeds_BTd, mask_BT, layers, start_B, num_visual, text_BT):
    """Mean over `layers`, heads and text queries of eager attention probabilities on the visual keys."""
    impl = llm.config._attn_implementation
    llm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = llm(inputs_embeds=embeds_BTd, attention_mask=mask_BT, output_attentions=True)
    finally:
        llm.set_attn_implementation(impl)
    rows = []
    for b in range(embeds_BTd.shape[0]):
        att_LHTT = torch.stack([out.attentions[layer - 1][b] for layer in layers])
        visual = att_LHTT[:, :, text_BT[b]][..., start_B[b] : start_B[b] + num_visual]
        rows.append(visual.mean(dim=(0, 1, 2)))
    return torch.stack(rows), out.logits


def _batch(width, num_tokens=14, num_visual=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    embeds_BTd = torch.randn(2, num_tokens, width, generator=gen)
    mask_BT = torch.ones(2, num_tokens, dtype=torch.long)
    mask_BT[1, :3] = 0  # left padding in sample 1
    start_B = torch.tensor([2, 5])
    text_BT = mask_BT.bool().clone()
    for b, s in enumerate(start_B.tolist()):
        text_BT[b, s : s + num_visual] = False
    text_BT[0, :1] = False  # a system token that is not averaged
    return embeds_BTd, mask_BT, start_B, text_BT


@pytest.mark.parametrize("layers", [(1,), (1, 2)])
def test_cheap_path_equals_eager_on_tiny_llm(cache_dir, layers):
    from trainer.models.llm import load_llm

    llm, _ = load_llm("tiny-llm", cache_dir=cache_dir)
    llm.eval()
    assert llm.config.num_key_value_heads < llm.config.num_attention_heads  # exercises GQA
    embeds_BTd, mask_BT, start_B, text_BT = _batch(llm.config.hidden_size)
    ref_BP, ref_logits = _eager_reference(llm, embeds_BTd, mask_BT, layers, start_B, 4, text_BT)
    before = llm.config._attn_implementation
    with torch.no_grad(), capture_text_to_visual(llm, layers, start_B, 4, text_BT) as holder:
        assert llm.config._attn_implementation == IMPLEMENTATION
        logits = llm(inputs_embeds=embeds_BTd, attention_mask=mask_BT).logits
    assert llm.config._attn_implementation == before  # restored
    torch.testing.assert_close(holder.result_BP, ref_BP, rtol=1e-5, atol=1e-6)
    assert (ref_BP > 0).all()  # non-trivial: text after the image attends to it
    # the forward output is SDPA's (equal to eager up to kernel rounding) at every non-padding position
    keep = mask_BT.bool()
    torch.testing.assert_close(logits[keep], ref_logits[keep], rtol=1e-4, atol=1e-4)


def test_cheap_path_through_visual_lm_and_without_padding(cache_dir):
    """VisualLM asks for it via Needs; without padding HF passes no mask (plain causal) - also covered."""
    from trainer.models.llm import load_llm
    from trainer.models.projector import build_projector
    from trainer.models.vlm import VisualLM
    from trainer.objectives.base import Needs

    llm, _ = load_llm("tiny-llm", cache_dir=cache_dir)
    torch.manual_seed(0)
    model = VisualLM(llm, build_projector("mlp2x_gelu", 8, llm.config.hidden_size)).eval()
    num_tokens, num_visual = 12, 4
    batch = {
        "input_ids_BT": torch.randint(5, 100, (2, num_tokens)),
        "labels_BT": torch.full((2, num_tokens), -100),
        "attention_mask_BT": torch.ones(2, num_tokens, dtype=torch.long),
        "visual_start_B": torch.tensor([1, 3]),
        "feats_BPD": torch.randn(2, num_visual, 8),
    }
    batch["labels_BT"][:, -3:] = batch["input_ids_BT"][:, -3:]
    with torch.no_grad():
        out = model(batch, Needs(attention_layers=(1, 2)))
        embeds_BTd = model.embed(batch)
    text_BT = torch.ones(2, num_tokens, dtype=torch.bool)
    for b, s in enumerate(batch["visual_start_B"].tolist()):
        text_BT[b, s : s + num_visual] = False
    ref_BP, _ = _eager_reference(
        llm, embeds_BTd, batch["attention_mask_BT"], (1, 2), batch["visual_start_B"], num_visual, text_BT
    )
    torch.testing.assert_close(out.text_to_visual_BP, ref_BP, rtol=1e-5, atol=1e-6)


def test_cheap_path_on_qwen2_with_small_query_chunks(monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import trainer.models.attention as attention

    # B x H x T = 2 x 4 x 14: a budget of 3 such rows gives several chunks, the last one partial
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 3 * 2 * 4 * 14)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        attn_implementation="sdpa",
    )
    llm = Qwen2ForCausalLM(config).eval()
    embeds_BTd, mask_BT, start_B, text_BT = _batch(32, seed=1)
    ref_BP, _ = _eager_reference(llm, embeds_BTd, mask_BT, (2, 3), start_B, 4, text_BT)
    with torch.no_grad(), capture_text_to_visual(llm, (2, 3), start_B, 4, text_BT) as holder:
        llm(inputs_embeds=embeds_BTd, attention_mask=mask_BT)
    torch.testing.assert_close(holder.result_BP, ref_BP, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_text_to_visual_probs_against_full_softmax(mask_kind):
    """The three mask forms HF may hand an attention function, against a full T x T softmax written out."""
    from trainer.models.attention import text_to_visual_probs

    gen = torch.Generator().manual_seed(2)
    num_batch, num_heads, num_tokens, head_dim, num_visual = 2, 3, 9, 4, 3
    q, k = torch.randn(2, num_batch * num_heads * num_tokens * head_dim, generator=gen).view(
        2, num_batch, num_heads, num_tokens, head_dim
    )
    allowed_BTT = torch.ones(num_tokens, num_tokens).tril().bool().expand(num_batch, -1, -1).clone()
    if mask_kind != "none":
        allowed_BTT[1, :, :2] = False  # sample 1 is left-padded by two tokens
        allowed_BTT[1, :2, :2] = torch.eye(2, dtype=torch.bool)  # padding rows attend to themselves
    start_B = torch.tensor([1, 4])
    text_BT = torch.zeros(num_batch, num_tokens, dtype=torch.bool)
    text_BT[0, 4:], text_BT[1, 7:] = True, True
    mask = {
        "none": None,
        "bool": allowed_BTT[:, None],
        "float": torch.zeros(num_batch, 1, num_tokens, num_tokens).masked_fill(
            ~allowed_BTT[:, None], float("-inf")
        ),
    }[mask_kind]
    got = text_to_visual_probs(
        q, k, mask, 0.5, start_B, num_visual, text_BT, chunk_elements=num_batch * 3 * 9 * 2
    )
    for b in range(num_batch):
        logits = (q[b] @ k[b].transpose(1, 2)) * 0.5
        probs = torch.softmax(logits.masked_fill(~allowed_BTT[b], float("-inf")), -1)  # [H, T, T]
        s = int(start_B[b])
        expected = probs[:, text_BT[b]][..., s : s + num_visual].mean(dim=(0, 1))
        torch.testing.assert_close(got[b], expected)
