"""BASIC's vocabulary KL: the exact chunked Function at its edges, and the row-sampled estimate's expectation.

The row-sampled loss is linear in the draw counts n_bi, so it is unbiased exactly when E[n_bi] = R a_bi /
sum_i a_bi: that expectation is computed here by integrating over the sampling offset (the counts are piecewise
constant in it), and the loss for given counts is checked against a plain weighted sum; a Monte-Carlo check
over seeds covers the whole path through ``sds_loss``.

Letters: B batch, P patches, D width, N vocabulary, R drawn rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.objectives import BasicConfig
from trainer.objectives.base import StepContext
from trainer.objectives.basic import BasicObjective, sds_loss, systematic_counts
from visalign.config import ConfigError


def _kl_BP(v_BPD, vh_BPD, e_ND):
    """KL(softmax(vh E^T) || softmax(v E^T)) per patch, plain autograd over full softmaxes."""
    log_q = torch.log_softmax(v_BPD @ e_ND.T, -1)
    log_p = torch.log_softmax(vh_BPD @ e_ND.detach().T, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _expected_counts(weights_BP, num_rows):
    """E over the offset u ~ U[0, 1) of systematic_counts, integrated exactly: the counts only change where a
    point (u + j) / R crosses a cumulative weight, i.e. at u = frac(R * cum_i)."""
    cum_BP = weights_BP.double().cumsum(1) / weights_BP.double().sum(1, keepdim=True).clamp(min=1e-300)
    expected_BP = torch.zeros_like(cum_BP)
    for b in range(weights_BP.shape[0]):
        cuts = sorted({0.0, 1.0} | {float(math.modf(num_rows * c)[0]) for c in cum_BP[b].tolist()})
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            if hi - lo < 1e-15:
                continue
            offset = torch.full((1,), (lo + hi) / 2, dtype=torch.float64)
            counts_P = systematic_counts(weights_BP[b : b + 1], num_rows, offset)[0]
            expected_BP[b] += (hi - lo) * counts_P.double()
    return expected_BP


def test_systematic_counts_have_the_exact_expectation_and_bounds():
    # patch weights with zeros inside and at the end, one dominant patch, and a sample with no weight at all
    weights_BP = torch.tensor(
        [
            [0.05, 0.0, 0.4, 0.13, 0.02, 0.3, 0.1, 0.0],
            [1.0, 2.0, 3.0, 0.0, 4.0, 5.0, 6.0, 7.0],
            [0.0] * 8,
        ]
    )
    for num_rows in (1, 3, 5, 16):
        expected_BP = _expected_counts(weights_BP, num_rows)
        target_BP = (
            num_rows * weights_BP.double() / weights_BP.double().sum(1, keepdim=True).clamp(min=1e-300)
        )
        torch.testing.assert_close(expected_BP, target_BP, rtol=0, atol=1e-9)
        for seed in range(50):
            offset_B = torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            counts_BP = systematic_counts(weights_BP, num_rows, offset_B)
            assert counts_BP[:2].sum(1).tolist() == [num_rows, num_rows]
            assert counts_BP[2].sum() == 0  # no weight, no rows
            assert (counts_BP[weights_BP == 0] == 0).all()
            # every count is the floor or the ceiling of its expectation
            assert ((counts_BP[:2] - target_BP[:2]).abs() < 1).all()
    with pytest.raises(ValueError, match="non-negative"):
        systematic_counts(torch.tensor([[0.5, -0.1]]), 2, torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 1"):
        systematic_counts(weights_BP, 0, torch.zeros(3, dtype=torch.float64))


def test_row_sampled_loss_and_gradients_equal_the_count_weighted_sum():
    """For one draw: value and gradients (into V and E) == sum_b sum_i (S_b n_bi / R) KL_bi / B."""
    torch.manual_seed(0)
    num_batch, num_patches, width, vocab, num_rows = 3, 9, 5, 23, 4
    v = torch.randn(num_batch, num_patches, width, dtype=torch.float64, requires_grad=True)
    vh = torch.randn(num_batch, num_patches, width, dtype=torch.float64)
    e = torch.randn(vocab, width, dtype=torch.float64, requires_grad=True)
    a = torch.rand(num_batch, num_patches)
    a[1, 3:] = 0.0
    a[2] *= 5.0  # weights need not sum to 1: the sample's total scales its rows
    loss = sds_loss(
        v, vh, e, a, chunk_size=2, sample_rows=num_rows, generator=torch.Generator().manual_seed(7)
    )
    g_v, g_e = torch.autograd.grad(loss, (v, e))

    offset_B = torch.rand(num_batch, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    counts_BP = systematic_counts(a, num_rows, offset_B)
    weight_BP = counts_BP.double() * a.double().sum(1, keepdim=True) / num_rows
    ref = (weight_BP * _kl_BP(v, vh, e)).sum() / num_batch
    r_v, r_e = torch.autograd.grad(ref, (v, e))
    # the row weights are float32 (as the patch weights are): agreement to float32 rounding
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(g_v, r_v, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_e, r_e, rtol=1e-6, atol=1e-9)
    # only drawn patches receive gradient
    assert (g_v.abs().sum(-1)[counts_BP == 0] == 0).all()
    assert (g_v.abs().sum(-1)[counts_BP > 0] > 0).all()


def test_row_sampled_estimate_is_unbiased_over_seeds():
    """Mean of the estimate and of its gradient over many draws within 4 standard errors of the exact ones."""
    torch.manual_seed(1)
    num_batch, num_patches, width, vocab, num_rows, draws = 2, 12, 6, 40, 3, 400
    v = torch.randn(num_batch, num_patches, width, dtype=torch.float64, requires_grad=True)
    vh = 2.0 * torch.randn(num_batch, num_patches, width, dtype=torch.float64)
    e = torch.randn(vocab, width, dtype=torch.float64)
    a = torch.softmax(2.0 * torch.randn(num_batch, num_patches), -1)
    exact = sds_loss(v, vh, e, a)
    (g_exact,) = torch.autograd.grad(exact, v)
    values, grads = [], []
    for seed in range(draws):
        est = sds_loss(v, vh, e, a, sample_rows=num_rows, generator=torch.Generator().manual_seed(seed))
        values.append(est.item())
        grads.append(torch.autograd.grad(est, v)[0])
    values_S, grads_S = torch.tensor(values, dtype=torch.float64), torch.stack(grads)
    assert values_S.std() > 0.01 * exact.item()  # it does sample
    assert abs(values_S.mean() - exact.item()) < 4 * values_S.std() / math.sqrt(draws)
    # the gradient, along three fixed directions (a patch of tiny weight may go undrawn in every draw, so
    # per-element spreads can be 0; its share of a projection is as tiny as its weight)
    dirs_3BPD = torch.randn(3, *v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    proj_S3 = torch.einsum("sbpd,kbpd->sk", grads_S, dirs_3BPD)
    exact_3 = torch.einsum("bpd,kbpd->k", g_exact, dirs_3BPD)
    assert ((proj_S3.mean(0) - exact_3).abs() < 4 * proj_S3.std(0) / math.sqrt(draws)).all()
    assert (proj_S3.std(0) > 0).all()


def test_zero_weight_patches_are_never_scored():
    """Exact mode skips rows of weight 0 (text-only samples carry no patch weight): an inf there does not
    poison the loss, and a batch without any weight gives a graph-connected 0."""
    torch.manual_seed(2)
    v = torch.randn(2, 4, 3, dtype=torch.float64)
    vh, e = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    a = torch.rand(2, 4)
    a[1] = 0.0
    v[1, 2] = float("inf")
    v.requires_grad_(True)
    loss = sds_loss(v, vh, e, a, chunk_size=3)
    ref = (a[:1].double() * _kl_BP(v[:1], vh[:1], e)).sum() / 2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    (g,) = torch.autograd.grad(loss, v)
    assert torch.isfinite(g).all() and (g[1] == 0).all()
    for rows in (None, 3):
        none = sds_loss(v, vh, e, torch.zeros(2, 4), sample_rows=rows)
        assert none.item() == 0.0 and none.requires_grad
        (g,) = torch.autograd.grad(none, v)
        assert (g == 0).all()


def test_low_precision_inputs_score_in_float32():
    """bf16 V, V_hat and E: logits are cast into the float32 buffer per vocabulary block, the softmaxes run in
    float32, the gradients come back in bf16; both close to a float64 reference."""
    torch.manual_seed(3)
    v64 = torch.randn(2, 5, 16, dtype=torch.float64)
    vh64, e64, a = (
        torch.randn(2, 5, 16, dtype=torch.float64),
        torch.randn(50, 16, dtype=torch.float64),
        torch.rand(2, 5),
    )
    v = v64.to(torch.bfloat16).requires_grad_(True)
    e = e64.to(torch.bfloat16).requires_grad_(True)
    loss = sds_loss(v, vh64.to(torch.bfloat16), e, a, chunk_size=3)
    assert loss.dtype == torch.float32
    g_v, g_e = torch.autograd.grad(loss, (v, e))
    assert g_v.dtype == torch.bfloat16 and g_e.dtype == torch.bfloat16
    # reference on the bf16-rounded values, in float64
    v_r = v.detach().double().requires_grad_(True)
    e_r = e.detach().double().requires_grad_(True)
    ref = (a.double() * _kl_BP(v_r, vh64.to(torch.bfloat16).double(), e_r)).sum() / 2
    r_v, r_e = torch.autograd.grad(ref, (v_r, e_r))
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    # bf16 logits carry ~3 significant digits: agreement at the percent level of the largest gradient
    torch.testing.assert_close(g_v.double(), r_v, rtol=5e-2, atol=2e-2 * r_v.abs().max().item())
    torch.testing.assert_close(g_e.double(), r_e, rtol=5e-2, atol=2e-2 * r_e.abs().max().item())


def test_objective_draws_rows_from_the_step_generator():
    """sds_mode=rows: the draw depends only on (seed, step, rank, micro-step), so a resumed run repeats it."""
    torch.manual_seed(4)
    obj = BasicObjective(BasicConfig(sds_mode="rows", sds_rows=3, sds_chunk_size=2), num_llm_layers=4)
    v = torch.randn(2, 10, 4, requires_grad=True)
    vh, e, a = torch.randn(2, 10, 4), torch.randn(15, 4), torch.softmax(torch.randn(2, 10), -1)
    step = StepContext(step=5, seed=3)
    value = obj.sds(v, vh, e, a, step)
    direct = sds_loss(v, vh, e, a, chunk_size=2, sample_rows=3, generator=step.generator("basic/sds"))
    assert value.item() == direct.item()
    assert obj.sds(v, vh, e, a, StepContext(step=5, seed=3)).item() == value.item()
    others = {obj.sds(v, vh, e, a, StepContext(step=s, seed=3)).item() for s in range(6, 12)}
    assert len(others - {value.item()}) >= 3  # other steps draw other rows
    exact = BasicObjective(BasicConfig(sds_chunk_size=2), num_llm_layers=4).sds(v, vh, e, a, step)
    assert exact.item() == pytest.approx(sds_loss(v, vh, e, a).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="sds_rows"):
        BasicObjective(BasicConfig(sds_mode="rows", sds_rows=0), num_llm_layers=4)
