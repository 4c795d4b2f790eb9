"""BASIC's layer weighting (the paper's Table 4: w_i increasing, constant, decreasing) and the number k of
shallow layers (its Figure 6), each against the paper's formulas written out here and a plain weighted sum of
the layers' hidden states read by hooks on the decoder layers.

Letters: B batch, P patches, d LLM width, k layers.
"""

from __future__ import annotations

import types

import pytest
import torch

from tests.test_objectives_train import FEAT_DIM, GRID, make_batch
from trainer.objectives import ObjectiveContext, ObjectivesConfig, build_objectives
from trainer.objectives.base import StepContext
from trainer.objectives.basic import BasicConfig, das_loss, layer_weights
from visalign.config import ConfigError, from_dict


def paper_weights(k: int, weighting: str) -> list[float]:
    """The paper's Sec. 5.3 (ii), with its l/2 written k: dec (l/2 - i + 1)^2 / sum i^2, const 1/(l/2),
    inc i^2 / sum i^2, for i = 1..l/2."""
    total = sum(i * i for i in range(1, k + 1))
    if weighting == "increasing":
        return [i * i / total for i in range(1, k + 1)]
    if weighting == "decreasing":
        return [(k - i + 1) ** 2 / total for i in range(1, k + 1)]
    return [1.0 / k] * k


@pytest.mark.parametrize("weighting", ["increasing", "constant", "decreasing"])
@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_layer_weights_are_the_papers(k, weighting):
    got = layer_weights(k, weighting)
    assert got.dtype == torch.float32 and got.shape == (k,)
    torch.testing.assert_close(got.double(), torch.tensor(paper_weights(k, weighting), dtype=torch.float64))
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-6)


def test_default_weighting_is_increasing_and_unknown_names_are_refused():
    assert BasicConfig().layer_weighting == "increasing"
    torch.testing.assert_close(layer_weights(4), layer_weights(4, "increasing"))
    with pytest.raises(ValueError, match="unknown layer weighting 'linear'"):
        layer_weights(3, "linear")
    with pytest.raises(ConfigError, match=r"basic.layer_weighting: 'linear' is not one of"):
        from_dict(BasicConfig, {"layer_weighting": "linear"}, "basic")


@pytest.fixture(scope="module")
def setup(cache_dir):
    from trainer.models.llm import load_llm
    from trainer.models.projector import build_projector
    from trainer.models.vlm import VisualLM

    llm, tokenizer = load_llm("tiny-llm", cache_dir=cache_dir)
    torch.manual_seed(0)
    vlm = VisualLM(llm, build_projector("mlp2x_gelu", FEAT_DIM, llm.config.hidden_size))
    return vlm, make_batch(tokenizer)


def build_basic(vlm, **fields):
    ctx = ObjectiveContext(
        llm_config=vlm.llm.config,
        projector="mlp2x_gelu",
        feature_dim=FEAT_DIM,
        manifest=types.SimpleNamespace(encoder=types.SimpleNamespace(patch_grid=list(GRID))),
    )
    return build_objectives("basic", ObjectivesConfig(basic=BasicConfig(**fields)), ctx)["basic"]


def layer_outputs(vlm, batch):
    """{l: [B, P, d]} H_l at the visual positions from a plain LLM forward: decoder layer outputs read by
    hooks, except H_L, which BASIC takes as HF returns it (hidden_states[L], after the final norm)."""
    outputs = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for layer in vlm.llm.model.layers
    ]
    try:
        res = vlm.llm.model(
            inputs_embeds=vlm.embed(batch),
            attention_mask=batch["attention_mask_BT"],
            output_hidden_states=True,
        )
    finally:
        for hook in hooks:
            hook.remove()
    outputs[-1] = vlm.llm.model.norm(outputs[-1])
    torch.testing.assert_close(outputs[-1], res.hidden_states[-1])
    idx_BP = batch["visual_start_B"][:, None] + torch.arange(batch["feats_BPD"].shape[1])
    rows_B1 = torch.arange(idx_BP.shape[0])[:, None]
    return {l: o[rows_B1, idx_BP] for l, o in enumerate(outputs, start=1)}


@pytest.mark.parametrize("weighting", ["increasing", "constant", "decreasing"])
@pytest.mark.parametrize("k", [1, 2])
def test_target_and_das_equal_the_plain_weighted_sum(setup, k, weighting):
    """tiny-llm has 2 layers: k = 1 (its default, half) and k = 2 (all) with every weighting; V_hat is the
    paper's weights times the layer outputs, and L_das with uniform patch weights is recomputed by hand."""
    vlm, batch = setup
    obj = build_basic(vlm, num_layers=k, layer_weighting=weighting, attention_weighting=False)
    assert obj.needs.hidden_layers == tuple(range(1, k + 1)) and obj.num_layers == k
    with torch.no_grad():
        out = vlm(batch, obj.needs)
        losses, _ = obj(batch, out, StepContext())
        states = layer_outputs(vlm, batch)
    weights = paper_weights(k, weighting)
    v_hat = sum(w * states[l] for l, w in zip(range(1, k + 1), weights))
    torch.testing.assert_close(obj.target(out), v_hat, rtol=1e-5, atol=1e-6)
    v = out.visual_BPd
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    num_patches = v.shape[1]
    plain_das = ((unit(v) - unit(v_hat)) ** 2).sum(-1).sum(1).div(num_patches).mean()
    torch.testing.assert_close(losses["basic_das_loss"], plain_das, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(das_loss(v, v_hat, torch.full(v.shape[:2], 1.0 / num_patches)), plain_das)


def test_weightings_give_different_targets(setup):
    vlm, batch = setup
    with torch.no_grad():
        targets = {}
        for weighting in ("increasing", "constant", "decreasing"):
            obj = build_basic(vlm, num_layers=2, layer_weighting=weighting)
            targets[weighting] = obj.target(vlm(batch, obj.needs))
    assert not torch.allclose(targets["increasing"], targets["constant"])
    assert not torch.allclose(targets["constant"], targets["decreasing"])


@pytest.mark.parametrize("k", [3, -1])
def test_k_outside_the_llm_is_a_one_line_error(setup, k):
    with pytest.raises(ConfigError, match=rf"basic.num_layers={k} but the LLM has 2 layers: use 1..2") as err:
        build_basic(setup[0], num_layers=k)
    assert "\n" not in str(err.value)
