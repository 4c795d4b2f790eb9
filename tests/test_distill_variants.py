"""The distillation switches of the paper (Bao et al.): layers (Table 6), the last layer before or after the
final norm, cosine or MSE (Table 7), native and/or expert targets (Table 8), and the reverse projectors carried
from stage 1 into stage 2.

Every loss is checked against a plain computation written here (hidden states read by hooks on the decoder
layers, the loss formulas spelled out); the training runs go through the real ``Trainer``.
Letters: B batch, T sequence, P patches (4 x 4 grid), D feature width, d LLM width.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F

from tests.test_objectives_train import EXPERT_DIM, FEAT_DIM, GRID, WORDS, make_batch
from trainer.objectives import ObjectiveContext, ObjectivesConfig, build_objectives, union_needs
from trainer.objectives.base import StepContext
from trainer.objectives.distill import DistillConfig
from visalign.config import ConfigError, from_dict

EXPERT = "dino.v2"


@pytest.fixture(scope="module")
def setup(cache_dir, tmp_path_factory):
    from trainer.models.llm import load_llm
    from trainer.models.projector import build_projector
    from trainer.models.vlm import VisualLM

    root = tmp_path_factory.mktemp("shards")
    (root / "wordlist.txt").write_text("".join(w + "\n" for w in WORDS))
    llm, tokenizer = load_llm("tiny-llm", cache_dir=cache_dir)
    torch.manual_seed(0)
    vlm = VisualLM(llm, build_projector("mlp2x_gelu", FEAT_DIM, llm.config.hidden_size))
    return vlm, tokenizer, make_batch(tokenizer)


def context(vlm, experts=True):
    expert_list = (
        [types.SimpleNamespace(name=EXPERT, feature_dim=EXPERT_DIM, patch_grid=[2, 2])] if experts else []
    )
    manifest = types.SimpleNamespace(
        encoder=types.SimpleNamespace(patch_grid=list(GRID)), experts=expert_list
    )
    return ObjectiveContext(
        llm_config=vlm.llm.config, projector="mlp2x_gelu", feature_dim=FEAT_DIM, manifest=manifest
    )


def distill(vlm, with_experts=True, **fields):
    cfg = ObjectivesConfig(distill=DistillConfig(**fields))
    torch.manual_seed(1)
    return build_objectives("distill", cfg, context(vlm, with_experts))["distill"]


def reference_states(vlm, batch):
    """{n: [B, P, d]} layer outputs at the visual positions, read by hooks on the decoder layers (no norm),
    and HF's hidden_states[L] (after the final norm), from one plain forward of the LLM."""
    llm = vlm.llm
    outputs = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for layer in llm.model.layers
    ]
    try:
        res = llm.model(
            inputs_embeds=vlm.embed(batch),
            attention_mask=batch["attention_mask_BT"],
            output_hidden_states=True,
        )
    finally:
        for hook in hooks:
            hook.remove()
    idx_BP = batch["visual_start_B"][:, None] + torch.arange(batch["feats_BPD"].shape[1])
    gather = lambda s_BTd: s_BTd[torch.arange(s_BTd.shape[0])[:, None], idx_BP]  # noqa: E731
    pre = {n: gather(o) for n, o in enumerate(outputs, start=1)}
    return pre, gather(res.hidden_states[-1])


def plain_cos_loss(a, b):
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return (1 - cos).mean()


def plain_mse_loss(a, b):
    return ((a - b) ** 2).mean()


def upsample_expert(x_BPD):
    """the 2 x 2 expert grid bilinearly resized to the 4 x 4 LLM grid (align_corners=False)"""
    x = x_BPD.transpose(1, 2).reshape(x_BPD.shape[0], -1, 2, 2)
    return F.interpolate(x, size=GRID, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)


def test_prenorm_state_is_the_final_norm_input_of_the_same_forward(setup):
    from trainer.models.vlm import Needs

    vlm, _, batch = setup
    calls = []
    hook = vlm.llm.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = vlm(batch, Needs(hidden_layers=(2,), final_norm_input=True))
    hook.remove()
    assert len(calls) == 1  # one forward: the pre-norm state comes from a hook, not a second pass
    with torch.no_grad():
        pre, post = reference_states(vlm, batch)
    torch.testing.assert_close(out.prenorm_BPd, pre[2], rtol=0, atol=0)
    torch.testing.assert_close(out.hidden_BLPd[2], post, rtol=0, atol=0)  # HF's L-th state: after the norm
    torch.testing.assert_close(vlm.llm.model.norm(out.prenorm_BPd), post)
    assert (out.prenorm_BPd - post).abs().max() > 0.1


CASES = {
    # layers {L/2, L} (tiny-llm: L = 2), the last one before the final norm, MSE, native + expert
    "layers-pre-mse": dict(layer=(1, -1), norm="pre", loss="mse", targets="native+experts"),
    # the behaviour before these switches: last layer after the final norm, cosine, native + expert
    "last-post-cosine": dict(layer=(-1,), norm="post", loss="cosine", targets="native+experts"),
    # Table 8's external-expert row
    "experts-only": dict(layer=(-1,), norm="pre", loss="cosine", targets="experts"),
    "native-layer1": dict(layer=(1,), norm="post", loss="cosine", targets="native"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_distill_loss_equals_plain_reference(setup, case):
    vlm, _, batch = setup
    fields = CASES[case]
    obj = distill(vlm, **fields)
    with torch.no_grad():
        out = vlm(batch, union_needs(torch.nn.ModuleDict({"distill": obj})))
        losses, report = obj(batch, out, StepContext())
        pre, post = reference_states(vlm, batch)
    layers = [2 if n == -1 else n for n in fields["layer"]]
    targets = {"encoder": batch["feats_BPD"], EXPERT: upsample_expert(batch["experts"][EXPERT])}
    if fields["targets"] == "experts":
        del targets["encoder"]
    if fields["targets"] == "native":
        del targets[EXPERT]
    plain = plain_mse_loss if fields["loss"] == "mse" else plain_cos_loss
    per_layer = []
    for n in layers:
        h = post if (n == 2 and fields["norm"] == "post") else pre[n]
        per_layer.append(
            sum(plain(obj.reverse[f"l{n}"][t.replace(".", "_")](h), f) for t, f in targets.items())
        )
    expected = sum(per_layer) / len(per_layer)
    torch.testing.assert_close(losses["distill_loss"], expected, rtol=1e-5, atol=1e-6)
    suffix = (lambda n: f"/l{n}") if len(layers) > 1 else (lambda n: "")
    expected_keys = {f"distill/cos_{t}{suffix(n)}" for n in layers for t in targets}
    if fields["loss"] == "mse":
        expected_keys |= {f"distill/mse_{t}{suffix(n)}" for n in layers for t in targets}
    assert set(report) == expected_keys


def test_one_reverse_projector_per_layer_and_target_and_what_is_asked_of_the_model(setup):
    vlm, _, batch = setup
    obj = distill(vlm, layer=(1, -1), norm="pre")
    names = {f"{layer}.{target}" for layer, per in obj.reverse.items() for target in per}
    assert names == {"l1.encoder", "l1.dino_v2", "l2.encoder", "l2.dino_v2"}
    assert (obj.needs.hidden_layers, obj.needs.final_norm_input) == ((1,), True)
    post = distill(vlm, layer=(1, 2), norm="post")
    assert (post.needs.hidden_layers, post.needs.final_norm_input) == ((1, 2), False)
    only = distill(vlm, targets="experts")
    assert {f"{k}.{t}" for k, per in only.reverse.items() for t in per} == {"l2.dino_v2"}
    # the gradient of the averaged loss reaches the projector and every reverse projector
    out = vlm(batch, obj.needs)
    obj(batch, out, StepContext())[0]["distill_loss"].backward()
    for name, param in list(vlm.projector.named_parameters()) + list(obj.named_parameters()):
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    vlm.zero_grad()


def test_eval_measures_per_layer_and_target(setup):
    vlm, _, batch = setup
    obj = distill(vlm, layer=(1, 2), loss="mse")
    with torch.no_grad():
        out = vlm(batch, obj.needs)
        measures = obj.eval_measures(batch, out)
        pre, _ = reference_states(vlm, batch)
    targets = {"encoder": batch["feats_BPD"], EXPERT: upsample_expert(batch["experts"][EXPERT])}
    expected = {}
    for n in (1, 2):
        for t, f in targets.items():
            pred = obj.reverse[f"l{n}"][t.replace(".", "_")](pre[n]).detach()
            expected[f"reverse_cos/{t}/l{n}"] = 1 - float(plain_cos_loss(pred, f))
            expected[f"reverse_mse/{t}/l{n}"] = float(plain_mse_loss(pred, f))
    assert set(measures) == set(expected)
    for key, value in expected.items():
        assert measures[key][0] == pytest.approx(value, abs=1e-5), key
        assert measures[key][1] == 2 * 16


@pytest.mark.parametrize(
    "fields,with_experts,message",
    [
        (dict(layer=(0,)), True, "distill.layer=0 but the LLM has layers 1..2"),
        (dict(layer=(3,)), True, "distill.layer=3 but the LLM has layers 1..2"),
        (dict(layer=(-1, 2)), True, "lists layer 2 twice"),
        (dict(layer=()), True, "distill.layer is empty"),
        (dict(targets="experts"), False, "distill.targets=experts but the shards carry no expert features"),
        (dict(experts=False, targets="experts"), True, "contradicts distill.targets=experts"),
    ],
)
def test_bad_settings_are_one_line_errors(setup, fields, with_experts, message):
    with pytest.raises(ConfigError) as err:
        distill(setup[0], with_experts=with_experts, **fields)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_settings_parse_from_yaml_and_flags():
    # YAML scalar and list, the flag's comma list, the deprecated switch of recorded configs
    assert from_dict(DistillConfig, {"layer": 28}).layer == (28,)
    assert from_dict(DistillConfig, {"layer": [14, 28]}).layer == (14, 28)
    assert from_dict(DistillConfig, {"layer": "14,28"}).layer == (14, 28)
    old = from_dict(DistillConfig, {"weight": 0.1, "layer": -1, "experts": True, "resize": "target"})
    assert old.layer == (-1,) and old.experts is True
    for key, value in (("loss", "l1"), ("norm", "mid"), ("targets", "all")):
        with pytest.raises(ConfigError, match=f"distill.{key}: {value!r} is not one of"):
            from_dict(DistillConfig, {key: value}, "distill")


def test_deprecated_experts_switch_maps_onto_targets(setup):
    vlm = setup[0]
    assert {t for per in distill(vlm, experts=False).reverse.values() for t in per} == {"encoder"}
    assert {t for per in distill(vlm, experts=True).reverse.values() for t in per} == {"encoder", "dino_v2"}


# -------------------------------------------------------------------------------------------------------------
# real runs: the Trainer on shards with an expert
# -------------------------------------------------------------------------------------------------------------

RUN_BASE = ["--llm", "tiny-llm", "--batch-size", "2", "--lr", "1e-2", "--logging.progress", "false",
            "--logging.tensorboard", "false", "--data.shuffle_buffer", "1", "--objective", "distill"]  # fmt: skip


@pytest.fixture(scope="module")
def expert_shards(tmp_path_factory, cache_dir):
    from tests.conftest import write_tiny_shards

    return write_tiny_shards(
        tmp_path_factory.mktemp("expert-shards"),
        num_samples=4,
        samples_per_shard=2,
        experts={EXPERT: ((2, 2), 24)},
    )


def run_trainer(shards, run, *extra):
    from trainer.cli import parse_run_args
    from trainer.train import Trainer

    trainer = Trainer(parse_run_args(["--shards", str(shards), "--output", str(run), *RUN_BASE, *extra]))
    trainer.train()
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "name,extra",
    [
        (
            "layers-pre-mse",
            [
                "--objectives.distill.layer",
                "1,2",
                "--objectives.distill.norm",
                "pre",
                "--objectives.distill.loss",
                "mse",
            ],
        ),  # fmt: skip
        ("experts-only", ["--objectives.distill.targets", "experts"]),
    ],
)
def test_trainer_runs_distil_with_finite_decreasing_loss(expert_shards, tmp_path, name, extra):
    """A few steps through the real loop (the same 2 samples every step: 2 of 4 samples, one pass, repeated
    with shuffle buffer 1 and batch 2 -> 2 batches alternate); the distillation loss is finite and falls."""
    records = run_trainer(expert_shards, tmp_path / name, "--max-steps", "8", *extra)
    losses = [r["distill_loss"] for r in records]
    print(name, "distill_loss", [round(v, 5) for v in losses])
    assert all(v == v and abs(v) != float("inf") for v in losses)
    assert losses[-1] < losses[0] and losses[-2] < losses[1]
    keys = set(records[-1])
    if name == "experts-only":
        assert "distill/cos_dino.v2" in keys and not any("encoder" in k for k in keys)
    else:
        assert {"distill/mse_encoder/l1", "distill/mse_dino.v2/l2", "distill/cos_encoder/l2"} <= keys


def test_stage2_starts_from_the_stage1_reverse_projectors(expert_shards, tmp_path):
    """--init-projector carries the reverse projectors of the same (layer, target) into stage 2, tensor for
    tensor; the others start fresh; carry_reverse false keeps them all fresh; a resume of stage 2 takes its
    own checkpoint's; the checkpoint's model weights (all that export reads) hold no reverse projector;
    trainer eval measures each layer and target."""
    from safetensors.torch import load_file

    from trainer import checkpoint as ckpt_io
    from trainer.cli import main, parse_run_args
    from trainer.train import Trainer

    stage1 = tmp_path / "stage1"
    run_trainer(expert_shards, stage1, "--max-steps", "2", "--objectives.distill.layer", "1,2")
    saved = load_file(ckpt_io.resolve_checkpoint(stage1) / ckpt_io.OBJECTIVES)
    assert {k.split(".")[2] + "." + k.split(".")[3] for k in saved} == {
        "l1.encoder",
        "l1.dino_v2",
        "l2.encoder",
        "l2.dino_v2",
    }

    def stage2(name, *extra):
        args = [
            "--shards",
            str(expert_shards),
            "--output",
            str(tmp_path / name),
            *RUN_BASE,
            "--stage",
            "finetune",
        ]
        return Trainer(parse_run_args([*args, "--init-projector", str(stage1), "--max-steps", "2", *extra]))

    trainer = stage2("stage2", "--objectives.distill.layer", "2,1")
    state = {f"distill.{k}": v for k, v in trainer.objectives["distill"].state_dict().items()}
    assert set(state) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key  # step 0 of stage 2 = the end of stage 1
    trainer.train()
    after = {f"distill.{k}": v for k, v in trainer.objectives["distill"].state_dict().items()}
    assert any(not torch.equal(after[k], saved[k]) for k in saved)  # and stage 2 trains them on

    # only the deepest layer in stage 2: carried; a layer stage 1 did not distil starts fresh
    partial = stage2("partial", "--objectives.distill.layer", "2").objectives["distill"]
    for key, tensor in partial.state_dict().items():
        assert torch.equal(tensor, saved[f"distill.{key}"]), key
    fresh = stage2("fresh", "--objectives.distill.carry-reverse", "false").objectives["distill"]
    assert not any(
        torch.equal(t, saved[f"distill.{k}"]) for k, t in fresh.state_dict().items() if k.endswith("weight")
    )

    # resume: the stage-2 checkpoint wins over --init-projector
    resumed = stage2("stage2", "--objectives.distill.layer", "2,1", "--resume")
    ckpt = load_file(ckpt_io.resolve_checkpoint(tmp_path / "stage2") / ckpt_io.OBJECTIVES)
    for key, tensor in resumed.objectives["distill"].state_dict().items():
        assert torch.equal(tensor, ckpt[f"distill.{key}"]), key
    assert any(not torch.equal(ckpt[k], saved[k]) for k in saved)

    # the checkpoint's model weights (what export reads) hold no reverse projector; trainer eval measures
    # every layer and target
    model = load_file(ckpt_io.resolve_checkpoint(tmp_path / "stage2") / ckpt_io.MODEL)
    assert model and not any("reverse" in k or k.startswith("distill") for k in model)
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "stage2"), "--shards", str(expert_shards), "--out", str(out),
                 "--samples", "2", "--pictures", "0"]) == 0  # fmt: skip
    objectives = json.loads((out / "metrics.json").read_text())["objectives"]
    assert set(objectives) == {f"distill/reverse_cos/{t}/l{n}" for t in ("encoder", EXPERT) for n in (1, 2)}
    assert all(-1 <= v <= 1 for v in objectives.values())


def test_the_documented_ablation_flags_set_what_they_say():
    """Every `--objectives.<name>.<field> VALUE` in docs/objectives.md's ablation table parses on the paper
    preset of its objective and sets that field."""
    import re
    from pathlib import Path

    from trainer.cli import parse_run_args

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "objectives.md").read_text(encoding="utf-8")
    table = text[text.index("## The papers' ablations") :].split("\n## ")[0]
    flags = re.findall(r"`(--objectives\.(\w+)\.([\w-]+)) ([^`]+)`", table)
    assert len(flags) >= 8
    for flag, objective, field, value in flags:
        preset = root / "jobs" / f"pretrain-{objective}.yaml"
        cfg = parse_run_args(["--config", str(preset), "--shards", "S", "--output", "R", flag, value])
        got = getattr(getattr(cfg.objectives, objective), field.replace("-", "_"))
        if isinstance(got, bool):
            assert got == (value == "true"), flag
        elif isinstance(got, tuple):
            assert got == tuple(int(v) for v in value.split(",")), flag
        elif isinstance(got, (int, float)):
            assert got == float(value), flag
        else:
            assert got == value, flag
