"""Text-only samples: the dense batch with a mask, VisualLM, the objectives' rule, attention, evaluation.

The rule: a text-only sample is an ordinary LM sample (no visual slots); objectives that need visual tokens
(sea, basic, distill) compute over the image rows of the micro-batch only, and return for a micro-batch
without any image a zero that is still attached to every parameter they own or use, so DDP/FSDP sync every
gradient on every rank. Each case is checked against an independent computation: the same objectives on the
image rows alone, the same LM loss summed over the two kinds separately, the same attention without the row.

The formatter's text-only call (``Formatter(meta, has_image=False)``: no visual slots, ``visual_start``
None) renders the text-only samples.
Letters: B batch, T sequence, P patches, D feature width, K label slots.
"""

from __future__ import annotations

import pytest
import torch

from tests.launching import VOLATILE
from trainer.data import Collator, SampleTransform
from trainer.data.conversations import IGNORE_INDEX, Formatter
from trainer.objectives.base import StepContext
from visalign import shards as S

TEXT_ONLY = {1, 4}


@pytest.fixture(scope="module")
def setup(cache_dir, tmp_path_factory):
    from tests.conftest import write_tiny_shards
    from trainer.config import TrainConfig
    from trainer.models.build import build_train_module

    root = write_tiny_shards(tmp_path_factory.mktemp("shards"), num_samples=6, samples_per_shard=6,
                             text_only=TEXT_ONLY)  # fmt: skip
    manifest = S.read_manifest(root)
    cfg = TrainConfig(shards=str(root), output="unused", objective="sea+basic+distill", stage="finetune")
    cfg.model.llm = "tiny-llm"
    module, tok = build_train_module(cfg, manifest, root, apply_stage_to="finetune")
    transform = SampleTransform(Formatter(tok, manifest.num_patches, "plain", 128))
    samples = [
        transform(S.decode_checked(r, S.sample_layout(manifest)))
        for r in S.iter_raw(manifest.shard_paths(root)[0])
    ]
    for s in samples:
        s["slot"], s["pass"] = 0, 0
    return module, tok, manifest, samples, Collator(tok.pad_token_id, manifest)


def test_collated_text_only_rows(setup):
    module, tok, manifest, samples, collate = setup
    batch = collate(samples[:3])  # image, text-only, image
    assert batch["has_image_B"].tolist() == [True, False, True]
    assert batch["visual_start_B"].tolist() == [0, -1, 0]
    assert torch.equal(batch["feats_BPD"][1], torch.zeros(16, 32))
    assert torch.equal(batch["labels_BPK"][1], torch.full((16, 4), -1))
    assert torch.equal(batch["scores_BPK"][1], torch.full((16, 4), float("-inf")))
    assert torch.equal(batch["feats_BPD"][0], torch.from_numpy(samples[0]["feat"].astype("float32")))
    # no visual slots: the text-only row is the formatter's text-only rendering, i.e. the same sample as an
    # image sample minus its P visual slots
    fmt = Formatter(tok, 16, "plain", 128)
    text = samples[1]["input_ids"]
    assert text == fmt(samples[1]["meta"], has_image=False)["input_ids"]
    as_image = fmt(samples[1]["meta"], has_image=True)
    start = as_image["visual_start"]
    assert as_image["input_ids"][:start] + as_image["input_ids"][start + 16 :] == text
    assert batch["input_ids_BT"][1, : len(text)].tolist() == text
    assert batch["labels_BT"][1, : len(text)].tolist() == samples[1]["text_labels"]
    assert batch["attention_mask_BT"][1].sum() == len(text)
    assert batch["ids"] == ["s0000", "s0001", "s0002"] and batch["skipped"] == []
    only_text = collate([samples[1], samples[4]])  # no image sample to read the shapes from: the manifest's
    assert only_text["feats_BPD"].shape == (2, 16, 32) and not only_text["has_image_B"].any()


def rows(batch, keep):
    """The batch restricted to rows ``keep`` (and trimmed to their longest sequence)."""
    index = torch.tensor(keep)
    length = int(batch["attention_mask_BT"][index].sum(1).max())
    out = {}
    for key, value in batch.items():
        if key == "experts":
            out[key] = {k: v[index] for k, v in value.items()}
        elif isinstance(value, torch.Tensor):
            out[key] = value[index][:, :length] if key.endswith("_BT") else value[index]
    out["num_target_tokens"] = int((out["labels_BT"] != IGNORE_INDEX).sum())
    return out


def test_visual_lm_writes_visual_tokens_into_image_rows_only(setup):
    module, tok, manifest, samples, collate = setup
    vlm = module.vlm
    batch = collate(samples[:3])
    with torch.no_grad():
        embeds = vlm.embed(batch)
        token_embeds = vlm.llm.get_input_embeddings()(batch["input_ids_BT"])
        assert torch.equal(embeds[1], token_embeds[1])  # the text-only row: its tokens, nothing written
        images = vlm.embed(rows(batch, [0, 2]))
        assert torch.equal(embeds[[0, 2], : images.shape[1]], images)
        # the LM term: the mixed batch's summed NLL = image rows' + text row's, each computed alone
        mixed = vlm(batch).lm_loss_sum
        apart = vlm(rows(batch, [0, 2])).lm_loss_sum + vlm(rows(batch, [1])).lm_loss_sum
    torch.testing.assert_close(mixed, apart, rtol=1e-5, atol=1e-5)


def losses_of(module, batch, step=StepContext(step=2, seed=7)):
    losses, report = module(batch, step)
    return {k: v for k, v in losses.items()}, report


def test_objectives_use_the_image_rows_only(setup):
    module, tok, manifest, samples, collate = setup
    module.eval()
    batch = collate(samples[:4])  # image, text, image, image
    sea = module.objectives["sea"]
    # SEA draws from the image rows alone: the same pairs as a batch of those rows, mapped to their index
    b_M, p_M, word_M = sea.draw(batch, StepContext(step=2, seed=7))
    b2, p2, w2 = sea.draw(rows(batch, [0, 2, 3]), StepContext(step=2, seed=7))
    assert torch.equal(b_M, torch.tensor([0, 2, 3])[b2]) and torch.equal(p_M, p2) and torch.equal(word_M, w2)
    assert 1 not in b_M.tolist()
    with torch.no_grad():
        mixed, _ = losses_of(module, batch)
        images, _ = losses_of(module, rows(batch, [0, 2, 3]))
    for key in ("sea_loss", "basic_das_loss", "basic_sds_loss", "distill_loss"):
        torch.testing.assert_close(mixed[key], images[key], rtol=1e-4, atol=1e-7, msg=key)
    module.train()


def test_a_micro_batch_without_an_image_gives_attached_zeros(setup):
    module, tok, manifest, samples, collate = setup
    batch = collate([samples[1], samples[4]])
    losses, report = losses_of(module, batch)
    assert float(losses["lm_loss"]) > 0
    for key in ("sea_loss", "basic_das_loss", "basic_sds_loss", "distill_loss"):
        assert float(losses[key]) == 0.0, key
    assert report["sea/pairs"] == 0.0
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    aux = sum(v for k, v in losses.items() if k != "lm_loss")
    # every trainable parameter the auxiliary objectives use is reached by their zeros alone; the LLM's final
    # norm is used by none of them (distill reads the last layer before it, norm=pre) and is reached by the
    # LM term (the whole-loss gradient below has allow_unused=False)
    grads = dict(zip(names, torch.autograd.grad(aux, params, retain_graph=True, allow_unused=True)))
    assert {n for n, g in grads.items() if g is None} == {"vlm.llm.model.norm.weight"}
    grads = {n: g for n, g in grads.items() if g is not None}
    assert all(float(g.abs().sum()) == 0.0 for g in grads.values())
    assert (
        any(n.startswith("objectives.distill.reverse") for n in grads)
        and "objectives.sea.logit_scale" in grads
    )
    # the whole loss: the LM term trains the LLM, nothing reaches the projector or the objectives' modules
    total = dict(zip(names, torch.autograd.grad(sum(losses.values()), params)))
    assert float(total["vlm.llm.model.embed_tokens.weight"].abs().sum()) > 0
    for name, grad in total.items():
        if name.startswith(("vlm.projector", "objectives.")):
            assert float(grad.abs().sum()) == 0.0, name


def test_an_untied_head_is_reached_without_supervised_tokens(cache_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.models.projector import build_projector
    from trainer.models.vlm import VisualLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    llm = LlamaForCausalLM(config)
    vlm = VisualLM(llm, build_projector("linear", 8, 16))
    batch = {
        "input_ids_BT": torch.tensor([[3, 4, 5, 6, 7]]),
        "labels_BT": torch.full((1, 5), IGNORE_INDEX),
        "attention_mask_BT": torch.ones(1, 5, dtype=torch.long),
        "visual_start_B": torch.tensor([-1]),
        "has_image_B": torch.tensor([False]),
        "feats_BPD": torch.zeros(1, 2, 8),
    }
    out = vlm(batch)
    assert out.num_target_tokens == 0 and float(out.lm_loss_sum) == 0.0
    head, projector = llm.get_output_embeddings().weight, vlm.projector.weight
    grad_head, grad_proj = torch.autograd.grad(out.lm_loss_sum, [head, projector])
    assert float(grad_head.abs().sum()) == 0.0 and float(grad_proj.abs().sum()) == 0.0


def test_attention_capture_gives_zero_rows_without_visual_tokens():
    from trainer.models.attention import text_to_visual_probs

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 2, 10, 4, generator=gen), torch.randn(3, 2, 10, 4, generator=gen)
    text = torch.ones(3, 10, dtype=torch.bool)
    text[[0, 2], 2:6] = False
    start = torch.tensor([2, -1, 2])
    got = text_to_visual_probs(q, k, None, 0.5, start, 4, text)
    assert torch.equal(got[1], torch.zeros(4))
    alone = text_to_visual_probs(q[[0, 2]], k[[0, 2]], None, 0.5, start[[0, 2]], 4, text[[0, 2]])
    torch.testing.assert_close(got[[0, 2]], alone)
    # sequences shorter than P (a batch of short text-only samples) are fine too
    short = text_to_visual_probs(
        q[:, :, :3], k[:, :, :3], None, 0.5, torch.tensor([-1, -1, -1]), 4, text[:, :3]
    )
    assert torch.equal(short, torch.zeros(3, 4))


def test_measures_leave_text_only_samples_out(setup):
    from trainer.evaluate.measure import evaluate_batches
    from trainer.evaluate.metrics import word_token_mask
    from trainer.objectives.sea import word_targets

    module, tok, manifest, samples, collate = setup
    words = [f"word{i}" for i in range(20)]
    kwargs = {
        "word_targets_Wd": word_targets(
            module.objectives["sea"].word_tokens_WS, module.vlm.llm.get_input_embeddings().weight
        ),
        "word_ok_W": module.objectives["sea"].word_ok_W,
        "is_word_token_N": word_token_mask(tok, words),
        "top_k": 4,
        "layers": [0, 1, 2],
    }
    with_text = evaluate_batches(module.vlm, module.objectives, [collate(samples[:4])], **kwargs)
    images = evaluate_batches(
        module.vlm, module.objectives, [collate([samples[i] for i in (0, 2, 3)])], **kwargs
    )
    assert with_text["counts"] == images["counts"] and with_text["counts"]["samples"] == 3
    for layer in (0, 1, 2):
        for name, value in images["per_layer"][layer].items():
            assert with_text["per_layer"][layer][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (
                layer,
                name,
            )
    for name, value in images["objectives"].items():
        assert with_text["objectives"][name] == pytest.approx(value, rel=1e-5), name


def test_first_samples_are_image_samples(tiny_shards):
    from trainer.evaluate.measure import first_samples

    root = tiny_shards(num_samples=7, samples_per_shard=3, text_only={0, 1, 3, 4, 5})
    assert [s["meta"]["id"] for s in first_samples(root, 5)] == ["s0002", "s0006"]
    assert [s["meta"]["id"] for s in first_samples(root, 1)] == ["s0002"]


def test_trainer_interleaves_text_only_samples_and_resumes_exactly(tiny_shards, tmp_path):
    """The real loader and formatter: text-only samples are trained on in the global order (a pass sees each
    sample once, text-only ones included), every step is finite, and a resumed run equals the whole one."""
    import json

    from trainer.cli import parse_run_args
    from trainer.train import Trainer

    root = tiny_shards(num_samples=8, samples_per_shard=3, text_only={1, 4, 5})
    args = ["--shards", str(root), "--llm", "tiny-llm", "--objective", "sea+basic+distill", "--max-steps", "4",
            "--batch-size", "2", "--save-every", "2", "--data.shuffle_buffer", "4", "--logging.seen_ids", "true",
            "--logging.progress", "false", "--logging.tensorboard", "false"]  # fmt: skip
    Trainer(parse_run_args(args + ["--output", str(tmp_path / "whole")])).train()
    Trainer(parse_run_args(args + ["--output", str(tmp_path / "parts"), "--stop-after", "2"])).train()
    Trainer(parse_run_args(args + ["--output", str(tmp_path / "parts"), "--resume"])).train()

    def records(run, name):
        out = [json.loads(line) for line in (tmp_path / run / name).read_text().splitlines()]
        for r in out:
            for key in VOLATILE:
                r.pop(key, None)
        return out

    seen = records("whole", "seen-rank0.jsonl")
    assert sorted(r["id"] for r in seen) == [f"s{i:04d}" for i in range(8)]  # 4 steps x 2 = one pass
    log = records("whole", "log.jsonl")
    assert all(v == v and abs(v) != float("inf") for r in log for v in r.values())
    assert sum(r["skipped_samples"] for r in log) == 0
    for name in ("log.jsonl", "seen-rank0.jsonl"):
        assert records("parts", name) == records("whole", name), name
