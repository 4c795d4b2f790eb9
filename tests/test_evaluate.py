"""``evaluate_batches`` and ``trainer eval``/``compare`` on tiny synthetic shards with the real tiny LLM.

The shards are written here with ``visalign.shards`` helpers (3 samples, 2 x 2 patches, 8-d features) and
point at real photos; every pooled value is checked against a direct recomputation, sample by sample.
Letters: B batch, P patches, D feature width, d LLM width, K label slots, W words, N vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.evaluate import measure as Me
from trainer.evaluate import metrics as M
from trainer.evaluate import report as R
from visalign import shards as S

WORDS = ["cat", "dog", "sky", "red", "tree", "car", "flag", "helmet", "white", "blue", "photo", "zzqx"]
GRID, DIM, K = (2, 2), 8, 10
CAPTIONS = ["A red car under a blue sky.", "A white cat and a dog.", "A flag near a tree."]


def write_shards(root: Path, photo_json: Path, num: int = 3, seed: int = 0) -> Path:
    """A finished label root through the contract's writer: wordlist.txt, one shard of ``num`` samples."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    S.write_wordlist(WORDS, root / S.WORDLIST)
    images = photo_json.parent / "images"
    P = GRID[0] * GRID[1]
    with S.ShardWriter(root, 0) as writer:
        for i in range(num):
            labels = np.full((P, K), -1, np.int32)
            scores = np.full((P, K), -np.inf, np.float16)
            for p in range(P - 1):  # the last patch keeps no label at all
                n = int(rng.integers(1, 5))
                labels[p, :n] = rng.choice(len(WORDS) - 1, n, replace=False)
                scores[p, :n] = np.sort(rng.random(n))[::-1]
            source = images / ("cat.jpg" if i != 1 else "gone.jpg")  # sample 1's image is missing
            feat = rng.standard_normal((P, DIM)).astype(np.float16)
            meta = {"id": f"s{i}", "source": str(source), "caption": CAPTIONS[i % 3]}
            writer.write(f"s{i}", feat, labels, scores, meta)
        stats = writer.close()
    manifest = S.Manifest(
        encoder=S.EncoderInfo("tiny-clip", "open_clip", "f" * 64, 32, -2, list(GRID), DIM, 16),
        wordlist=S.WordlistInfo("test", S.wordlist_sha256(WORDS), len(WORDS)),
        templates=[],
        score_sign="cos",
        top_k=K,
        shards=[S.ShardInfo(stats["name"], num, stats["sha256"])],
        num_samples=num,
        num_rejects=0,
    )
    S.write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def tiny(cache_dir):
    from trainer.models.llm import load_llm
    from trainer.models.projector import build_projector
    from trainer.models.vlm import VisualLM

    torch.manual_seed(0)
    llm, tok = load_llm("tiny-llm", cache_dir=cache_dir)
    model = VisualLM(llm, build_projector("mlp2x_gelu", DIM, llm.config.hidden_size))
    return model.eval(), tok


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photo_dataset):
    return write_shards(tmp_path_factory.mktemp("shards"), photo_dataset)


def _batches(tok, samples, batch_size):
    from trainer.data.collate import Collator, SampleTransform
    from trainer.data.conversations import Formatter

    fmt = Formatter(tok, GRID[0] * GRID[1], "plain", 256)
    transform, collate = SampleTransform(fmt), Collator(fmt.pad_id)
    return [
        collate([transform(s) for s in samples[i : i + batch_size]])
        for i in range(0, len(samples), batch_size)
    ]


def _direct(model, tok, batch, targets_Wd, ok_W, layer):
    """Every measure for ONE sample, written out independently of metrics.py."""
    from trainer.models.vlm import Needs

    out = model(batch, needs=Needs(hidden_layers=tuple(range(1, 3))))
    h = out.visual_BPd[0] if layer == 0 else out.hidden_BLPd[layer][0]
    if 0 < layer < model.llm.config.num_hidden_layers:
        h = model.llm.model.norm(h)
    E = model.llm.get_input_embeddings().weight
    h_n = F.normalize(h.float(), dim=-1)
    sim_W = h_n @ F.normalize(targets_Wd, dim=-1).T
    sim_W[:, ~ok_W] = -2.0
    near = sim_W.argmax(-1).tolist()
    labels = batch["labels_BPK"][0].tolist()
    labelled = [p for p in range(len(near)) if labels[p][0] >= 0]
    hit1 = sum(near[p] == labels[p][0] for p in labelled) / len(labelled)
    hit10 = sum(near[p] in labels[p][:10] for p in labelled) / len(labelled)
    tok_near = (h_n @ F.normalize(E.float(), dim=-1).T).argmax(-1).tolist()
    vocab = set(WORDS)
    meaningful = np.mean(
        [i not in tok.all_special_ids and tok.decode([i]).strip().lower() in vocab for i in tok_near]
    )
    sup = batch["labels_BT"][0] != -100
    ids = [i for i in batch["input_ids_BT"][0][sup].tolist() if i not in tok.all_special_ids]
    cap = F.normalize(E[ids].float(), dim=-1)
    m_P = (h_n @ cap.T).max(-1).values
    consistency = m_P.topk(min(10, len(m_P))).values.mean().item()
    return {"hit@1": hit1, "hit@10": hit10, "meaningful_share": meaningful, "consistency": consistency}, near


def test_evaluate_batches_equals_direct_recomputation(tiny, shards):
    model, tok = tiny
    samples = Me.first_samples(shards, 3)
    assert [s["__key__"] for s in samples] == ["s0", "s1", "s2"]
    E = model.llm.get_input_embeddings().weight.detach()
    targets_Wd, ok_W = Me.word_targets(WORDS, tok, E)
    is_word_N = M.word_token_mask(tok, WORDS, E.shape[0])
    assert is_word_N.sum() >= 5  # the tiny tokenizer knows common words as single tokens

    result = Me.evaluate_batches(
        model,
        None,
        _batches(tok, samples, 2),
        targets_Wd,
        is_word_N,
        ok_W,
        special_ids=tok.all_special_ids,
        top_k=K,
        keep_nearest=2,
    )
    assert sorted(result["per_layer"]) == [0, 1, 2]
    assert result["counts"] == {
        "samples": 3,
        "labelled_patches": 9,
        "visual_tokens": 12,
        "captioned_samples": 3,
    }
    assert set(result["per_layer"][0]) == {"hit@1", "hit@10", "meaningful_share", "consistency"}
    for layer in (0, 1, 2):
        per_sample = []
        for i, s in enumerate(samples):
            vals, near = _direct(model, tok, _batches(tok, [s], 1)[0], targets_Wd, ok_W, layer)
            per_sample.append(vals)
            if i < 2:
                assert result["nearest"][i][layer] == near
        for name in ("hit@1", "hit@10", "meaningful_share", "consistency"):
            expected = np.mean([v[name] for v in per_sample])  # equal weights: 3 labelled / 4 tokens each
            assert result["per_layer"][layer][name] == pytest.approx(expected, abs=1e-5), (layer, name)
    flat = Me.flat_report(result)
    assert flat["eval/hit@1/l0"] == result["per_layer"][0]["hit@1"]


def test_projector_set_to_word_targets_scores_one(tiny, shards):
    """Visual tokens made exactly the top label's SEA target: hit@1 = 1 at layer 0."""
    model, tok = tiny
    samples = Me.first_samples(shards, 3)
    E = model.llm.get_input_embeddings().weight.detach()
    targets_Wd, ok_W = Me.word_targets(WORDS, tok, E)

    class Fixed(torch.nn.Module):
        def forward(self, batch, needs):
            from trainer.models.vlm import VLMOutput

            top_BP = batch["labels_BPK"][..., 0].clamp(min=0)
            v = targets_Wd[top_BP]
            return VLMOutput(v, torch.zeros(()), 0, {}, None, E)

    fixed = Fixed()
    fixed.llm = model.llm
    fixed.dummy = torch.nn.Parameter(torch.zeros(1))
    res = Me.evaluate_batches(
        fixed,
        None,
        _batches(tok, samples, 3),
        targets_Wd,
        torch.ones(E.shape[0], dtype=torch.bool),
        ok_W,
        layers=[0],
    )
    assert res["per_layer"][0]["hit@1"] == 1.0


def write_run(run: Path, shards: Path, seed: int, objective: str = "sea+distill") -> Path:
    """A real run folder: one `trainer run` step of ``objective`` (checkpoint at step 1)."""
    from trainer.cli import parse_run_args
    from trainer.train import run as train

    args = ["--shards", str(shards), "--output", str(run), "--llm", "tiny-llm", "--objective", objective]
    args += ["--seed", str(seed), "--max-steps", "1", "--batch-size", "2", "--logging.tensorboard", "false"]
    train(parse_run_args(args + ["--logging.progress", "false", "--data.shuffle_buffer", "1"]))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):
    """Two real one-step runs shared by the eval tests: plain LLaVA (lm) and sea+distill."""
    root = tmp_path_factory.mktemp("runs")
    return {"lm": write_run(root / "llava", shards, 1, "lm"), "sea": write_run(root / "sea", shards, 2)}


def test_trainer_eval_writes_metrics_and_pictures(tiny, shards, runs, tmp_path):
    from PIL import Image

    from trainer.checkpoint import OBJECTIVES, load_tensors, step_dir

    model, tok = tiny
    run = runs["sea"]
    cfg = R.EvalConfig(run=str(run), shards=str(shards), out=str(tmp_path / "eval"), samples=1, pictures=1)
    payload = R.run_eval(cfg)
    out = Path(cfg.out)
    data = json.loads((out / "metrics.json").read_text())
    assert data["checkpoint_step"] == 1 and data["num_layers"] == 2 and data["counts"]["samples"] == 1
    assert sorted(data["per_layer"]) == ["0", "1", "2"]
    for row in data["per_layer"].values():
        assert set(row) == {"hit@1", "hit@10", "meaningful_share", "consistency"}
    assert set(data["objectives"]) == {"distill/reverse_cos/encoder"}
    names = ["words-s0-l0.png", "words-s0-l1.png", "words-s0-l2.png", "curves.png"]
    assert payload["pictures"] == names
    for name in names:
        assert (out / name).stat().st_size > 2000
    # 2 x 2 grid at 128 px a cell plus the title band
    assert Image.open(out / "words-s0-l0.png").size == (256, 256 + int(128 * 0.6))

    # the same numbers, recomputed directly from the checkpoint's projector for the one sample
    from trainer.checkpoint import load_tensors as load

    weights = load(step_dir(run, 1))
    model.projector.load_state_dict({k[len("projector.") :]: v for k, v in weights.items()})
    E = model.llm.get_input_embeddings().weight.detach()
    targets_Wd, ok_W = Me.word_targets(WORDS, tok, E)
    batch = _batches(tok, Me.first_samples(shards, 1), 1)[0]
    for layer in (0, 1, 2):
        vals, _ = _direct(model, tok, batch, targets_Wd, ok_W, layer)
        for name, value in vals.items():
            assert data["per_layer"][str(layer)][name] == pytest.approx(value, abs=1e-5), (layer, name)
    # reverse cosine = mean cos(r(H_L), F) with the checkpoint's reverse projector; H_L is the last decoder
    # layer's output (before the final norm: distill's default), read here by a hook on that layer
    from trainer.models.projector import build_projector

    rev = build_projector("mlp2x_gelu", model.llm.config.hidden_size, DIM, reverse=True)
    obj_state = load_tensors(step_dir(run, 1), OBJECTIVES)
    prefix = "distill.reverse.l2.encoder."
    rev.load_state_dict({k[len(prefix) :]: v for k, v in obj_state.items() if k.startswith(prefix)})
    seen = []
    hook = model.llm.model.layers[-1].register_forward_hook(
        lambda _m, _a, output: seen.append(output[0] if isinstance(output, tuple) else output)
    )
    with torch.no_grad():
        model(batch)
        hook.remove()
        start, num = int(batch["visual_start_B"][0]), batch["feats_BPD"].shape[1]
        h = seen[0][:, start : start + num]
        expected = M.reverse_cosine(rev(h), batch["feats_BPD"])
    assert data["objectives"]["distill/reverse_cos/encoder"] == pytest.approx(expected, abs=1e-5)


def test_trainer_compare_puts_two_runs_side_by_side(shards, runs, tmp_path, cache_dir):
    from PIL import Image

    run_a, run_b = runs["lm"], runs["sea"]
    out = tmp_path / "cmp"
    cfg_a = R.EvalConfig(run=str(run_a), shards=str(shards), out=str(out), samples=3, pictures=2, layers=(2,))
    cfg_b = dataclasses.replace(cfg_a, run=str(run_b))
    payload = R.run_compare(cfg_a, cfg_b)
    assert payload["pictures"][:2] == ["compare-s0-l0.png", "compare-s1-l0.png"]
    for name in payload["pictures"]:
        assert (out / name).stat().st_size > 2000
    single = 256
    assert Image.open(out / "compare-s0-l2.png").size == (2 * single + 12, single + int(128 * 0.6))
    md = (out / "metrics.md").read_text().splitlines()
    assert md[2] == "| measure | llava | sea |"
    assert any(line.startswith("| hit@1 @ l0 |") for line in md)
    assert any(line.startswith("| distill/reverse_cos/encoder | nan |") for line in md)  # A has no distill
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    assert [r["counts"]["samples"] for r in runs] == [3, 3]


def test_cli_eval_and_its_errors(shards, runs, tmp_path, capsys):
    from trainer.cli import main

    run = runs["lm"]
    out = tmp_path / "ev"
    argv = ["eval", str(run), "--shards", str(shards), "--out", str(out), "--samples", "2", "--layers", "1"]
    assert main(argv + ["--pictures", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "metrics.json")
    assert sorted(p.name for p in out.glob("*.png")) == ["curves.png", "words-s0-l0.png", "words-s0-l1.png"]
    assert json.loads((out / "metrics.json").read_text())["objectives"] == {}  # no distill in this run
    assert main(["eval", str(run), "--shards", str(shards), "--out", str(out), "--layers", "5"]) == 3
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == ["trainer eval: error: --layers 5: the LLM has layers 0..2 (0 = projector output)"]
    assert "Traceback" not in err
    assert main(["eval", "--shards", str(shards), "--out", str(out)]) == 3
    assert "trainer eval RUN" in capsys.readouterr().err
