"""BASIC's Figure-3 probe in ``trainer eval``: each visual token replaced by its nearest token embedding (cosine,
argmax over every row of E), then greedy generation; checked against a brute-force argmax in float64, against
the embeddings the LLM is actually fed (a hook on its forward), and against a plain greedy loop without a cache.

Letters: B batch, T tokens, P patches, d LLM width, N vocabulary rows.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from trainer.evaluate import probe as Pr

NEW_TOKENS = 6


def brute_nearest(v_Pd: torch.Tensor, e_Nd: torch.Tensor) -> torch.Tensor:
    sim_PN = F.normalize(v_Pd.double(), dim=-1) @ F.normalize(e_Nd.double(), dim=-1).T
    return sim_PN.argmax(-1)


def test_nearest_rows_are_the_argmax_cosine_rows_of_e():
    gen = torch.Generator().manual_seed(0)
    e_Nd = torch.randn(300, 24, generator=gen) * torch.rand(300, 1, generator=gen) * 5  # norms differ: cosine
    v_Pd = torch.randn(40, 24, generator=gen) * 3
    ids_P, cos_P, replaced_Pd = Pr.nearest_token_embeddings(v_Pd, e_Nd)
    assert torch.equal(ids_P, brute_nearest(v_Pd, e_Nd))
    assert torch.equal(replaced_Pd, e_Nd[ids_P])
    torch.testing.assert_close(cos_P, F.cosine_similarity(v_Pd, e_Nd[ids_P], dim=-1))
    # the largest dot product is another row here: the probe's similarity is the paper's cosine
    assert not torch.equal(ids_P, (v_Pd @ e_Nd.T).argmax(-1))


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    """A real one-step `trainer run` (lm) on synthetic shards, and its rebuilt model."""
    from tests.conftest import write_tiny_shards
    from trainer.cli import parse_run_args
    from trainer.models.build import load_trained
    from trainer.train import Trainer

    root = tmp_path_factory.mktemp("probe")
    shards = write_tiny_shards(root / "shards", num_samples=4, samples_per_shard=2)
    args = ["--shards", str(shards), "--output", str(root / "run"), "--llm", "tiny-llm", "--max-steps", "1"]
    args += ["--batch-size", "2", "--logging.progress", "false", "--logging.tensorboard", "false"]
    Trainer(parse_run_args(args)).train()
    return shards, root / "run", load_trained(root / "run", shards=shards)


def tools(loaded, shards, template="plain"):
    from trainer.data.collate import Collator, SampleTransform
    from trainer.data.conversations import Formatter
    from trainer.evaluate.measure import first_samples

    manifest = loaded.manifest
    formatter = Formatter(loaded.tokenizer, manifest.num_patches, template, 256)
    return first_samples(shards, 2), SampleTransform(formatter), Collator(formatter.pad_id, manifest)


def plain_greedy(llm, embeds_1Td, eos, n):
    """Greedy decoding by hand: the whole sequence again at every step, no cache."""
    embed = llm.get_input_embeddings().weight
    ids = []
    for _ in range(n):
        seq = torch.cat([embeds_1Td, embed[ids][None]], dim=1) if ids else embeds_1Td
        token = int(llm(inputs_embeds=seq).logits[0, -1].argmax())
        if token in eos:
            break
        ids.append(token)
    return ids


def test_probe_feeds_exactly_the_nearest_rows_and_generates_greedily(run):
    shards, _, loaded = run
    vlm, tok = loaded.vlm, loaded.tokenizer
    samples, transform, collate = tools(loaded, shards)
    fed = []

    def catch(_module, _args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            fed.append(kwargs["inputs_embeds"].detach().clone())

    hook = vlm.llm.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        record = Pr.probe_sample(vlm, tok, samples[0], transform, collate, "Describe the image.", NEW_TOKENS)
    finally:
        hook.remove()
    batch = Pr.prompt_batch(samples[0], transform, collate, "Describe the image.")
    start, num = int(batch["visual_start_B"][0]), batch["feats_BPD"].shape[1]
    with torch.no_grad():
        embeds_1Td = vlm.embed(batch)
    v_Pd = embeds_1Td[0, start : start + num]
    E = vlm.llm.get_input_embeddings().weight
    expected_ids = brute_nearest(v_Pd, E)
    assert record["nearest_ids"] == expected_ids.tolist()
    # the prompt forwards of the two generations: first with V, then with the nearest rows of E in its slots
    prompts = [x for x in fed if x.shape[1] == embeds_1Td.shape[1]]
    assert len(prompts) == 2
    torch.testing.assert_close(prompts[0], embeds_1Td, rtol=0, atol=0)
    assert torch.equal(prompts[1][0, start : start + num], E[expected_ids])
    assert torch.equal(prompts[1][0, :start], embeds_1Td[0, :start])  # the text around it unchanged
    nearest_1Td = prompts[1]
    eos = Pr.stop_ids(vlm.llm, tok)
    with torch.no_grad():
        assert record["generated_ids"] == plain_greedy(vlm.llm, embeds_1Td, eos, NEW_TOKENS)
        assert record["generated_nearest_ids"] == plain_greedy(vlm.llm, nearest_1Td, eos, NEW_TOKENS)
    assert record["generated_nearest"] == tok.decode(record["generated_nearest_ids"])
    assert record["generated"] == tok.decode(record["generated_ids"])
    assert record["nearest_tokens"] == [tok.decode([i]) for i in expected_ids.tolist()]
    assert record["nearest_cos_mean"] == pytest.approx(
        float(F.cosine_similarity(v_Pd.double(), E[expected_ids].double(), dim=-1).mean()), abs=1e-5
    )


@pytest.mark.parametrize("template", ["plain", "tokenizer"])
def test_the_prompt_ends_where_the_reply_begins(run, template):
    """The prompt is the run's own format up to the assistant's reply: plain = the visual block alone (stage 1
    has no instruction), a chat format = the instruction and the assistant header."""
    shards, _, loaded = run
    tok = loaded.tokenizer
    samples, transform, collate = tools(loaded, shards, template)
    batch = Pr.prompt_batch(samples[0], transform, collate, "Say what you see.")
    full = transform(dict(samples[0], meta=Pr.probe_meta(samples[0], "Say what you see.")))
    ids_T = batch["input_ids_BT"][0].tolist()
    first_reply = next(i for i, label in enumerate(full["text_labels"]) if label != -100)
    assert ids_T == full["input_ids"][:first_reply] and (batch["labels_BT"] == -100).all()
    start, num = int(batch["visual_start_B"][0]), batch["feats_BPD"].shape[1]
    text = tok.decode(ids_T[:start]) + tok.decode(ids_T[start + num :])
    if template == "plain":
        assert start + num == len(ids_T) and "Say what you see." not in text
    else:
        assert "Say what you see." in text and start + num < len(ids_T)


def test_trainer_eval_writes_the_probe(run, tmp_path):
    from trainer.cli import main

    shards, run_dir, loaded = run
    out = tmp_path / "eval"
    args = [
        "eval",
        str(run_dir),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--samples",
        "3",
        "--pictures",
        "0",
    ]
    assert main([*args, "--probe", "2", "--probe-tokens", str(NEW_TOKENS)]) == 0
    records = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["s0000", "s0001"]
    samples, transform, collate = tools(loaded, shards)  # the run trained in plain format (stage 1)
    for record, sample in zip(records, samples):
        expected = Pr.probe_sample(
            loaded.vlm, loaded.tokenizer, sample, transform, collate, "Describe the image.", NEW_TOKENS
        )
        assert record == json.loads(json.dumps(expected))
        assert 1 <= len(record["generated_nearest_ids"]) <= NEW_TOKENS and len(record["nearest_ids"]) == 16
        assert record["generated_nearest"] == loaded.tokenizer.decode(record["generated_nearest_ids"]) != ""
    md = (out / "probe.md").read_text()
    assert "## s0000" in md and repr(records[0]["generated_nearest"]) in md
    assert json.loads((out / "metrics.json").read_text())["probe"] == ["probe.jsonl", "probe.md"]
    assert main([*args, "--probe", "-1"]) == 3  # a one-line error
