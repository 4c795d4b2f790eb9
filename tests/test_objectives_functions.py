"""The objectives' pure loss functions against plain reference computations written out here.

Letters: B batch, P patches, D width, N vocabulary, M pairs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.objectives.basic import das_loss, layer_weights, sds_loss
from trainer.objectives.distill import cosine_loss, resize_tokens
from trainer.objectives.sea import contrastive_loss


def test_contrastive_loss_matches_loop_reference():
    torch.manual_seed(0)
    v_MD, t_MD, scale = torch.randn(6, 5), torch.randn(6, 5), 7.5
    cos = [[float(v_MD[i] @ t_MD[j] / (v_MD[i].norm() * t_MD[j].norm())) for j in range(6)] for i in range(6)]
    total = 0.0
    for i in range(6):
        row = [scale * cos[i][j] for j in range(6)]
        col = [scale * cos[j][i] for j in range(6)]
        total += -(row[i] - math.log(sum(math.exp(x) for x in row)))
        total += -(col[i] - math.log(sum(math.exp(x) for x in col)))
    expected = total / (2 * 6)
    assert contrastive_loss(v_MD, t_MD, scale).item() == pytest.approx(expected, rel=1e-5)
    # orthogonal matched pairs (any norm) at the clamp-level scale: loss ~ 0; swapped pairs: large
    eye = torch.eye(6)
    assert contrastive_loss(eye, 3.0 * eye, 100.0).item() < 1e-30
    assert contrastive_loss(eye, eye.flip(0), 100.0).item() > 99.0


def test_layer_weights_quadratic():
    w = layer_weights(4)
    expected = torch.tensor([1.0, 4.0, 9.0, 16.0]) / 30.0
    torch.testing.assert_close(w, expected)
    assert layer_weights(1).tolist() == [1.0]
    with pytest.raises(ValueError):
        layer_weights(0)


def test_das_loss_matches_reference():
    torch.manual_seed(1)
    v, vh, a = torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.rand(3, 4)
    per_sample = []
    for b in range(3):
        s = 0.0
        for i in range(4):
            diff = v[b, i] / v[b, i].norm() - vh[b, i] / vh[b, i].norm()
            s += float(a[b, i]) * float((diff**2).sum())
        per_sample.append(s)
    assert das_loss(v, vh, a).item() == pytest.approx(sum(per_sample) / 3, rel=1e-5)


def _sds_reference(v, vh, e, a):
    total = 0.0
    for b in range(v.shape[0]):
        for i in range(v.shape[1]):
            p = torch.softmax(vh[b, i] @ e.T, -1)
            q = torch.softmax(v[b, i] @ e.T, -1)
            total = total + a[b, i] * (p * (p.log() - q.log())).sum()
    return total / v.shape[0]


def test_sds_loss_matches_reference_and_chunking_is_exact():
    torch.manual_seed(2)
    v = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    vh, e, a = (
        torch.randn(2, 5, 6, dtype=torch.float64),
        torch.randn(11, 6, dtype=torch.float64),
        torch.rand(2, 5),
    )
    ref = _sds_reference(v, vh, e, a.double())
    (g_ref,) = torch.autograd.grad(ref, v)
    for chunk in (None, 1, 3, 7, 100):
        loss = sds_loss(v, vh, e, a, chunk_size=chunk)
        (g,) = torch.autograd.grad(loss, v)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6), chunk
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-9)


def test_sds_gradient_into_embeddings_only_through_q():
    torch.manual_seed(3)
    v = torch.randn(2, 4, 5, dtype=torch.float64)
    vh, a = torch.randn(2, 4, 5, dtype=torch.float64), torch.rand(2, 4)
    e = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    loss = sds_loss(v, vh, e, a, chunk_size=3)
    (g,) = torch.autograd.grad(loss, e)
    # reference: P is a target built from a detached copy of E; only Q carries the gradient
    e2 = e.detach().clone().requires_grad_(True)
    p_fixed = torch.softmax(vh @ e.detach().T, -1)
    q = torch.log_softmax(v @ e2.T, -1)
    ref = (a.double()[..., None] * p_fixed * (p_fixed.log() - q)).sum() / 2
    (g_ref,) = torch.autograd.grad(ref, e2)
    torch.testing.assert_close(g, g_ref)


def test_no_gradient_reaches_basic_targets_or_weights():
    torch.manual_seed(4)
    v = torch.randn(2, 3, 4, requires_grad=True)
    vh = torch.randn(2, 3, 4, requires_grad=True)
    a = torch.rand(2, 3, requires_grad=True)
    e = torch.randn(7, 4)
    (das_loss(v, vh, a) + sds_loss(v, vh, e, a, chunk_size=2)).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert vh.grad is None and a.grad is None


def test_cosine_loss_matches_reference_and_resize_is_bilinear():
    torch.manual_seed(5)
    pred, target = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    cos = [
        float(pred[b, i] @ target[b, i] / (pred[b, i].norm() * target[b, i].norm()))
        for b in range(2)
        for i in range(4)
    ]
    assert cosine_loss(pred, target).item() == pytest.approx(sum(1 - c for c in cos) / 8, rel=1e-5)
    # a linear ramp resized with align_corners=False stays a ramp: check against interpolate on the grid
    x_BPD = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)
    y = resize_tokens(x_BPD, (4, 4), (2, 2))
    ref = F.interpolate(x_BPD.reshape(1, 4, 4)[:, None], size=(2, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y.reshape(2, 2), ref.reshape(2, 2))
    assert y.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_chunked_sds_keeps_no_patch_by_vocabulary_tensor_for_backward():
    """What autograd holds between forward and backward: naive keeps P x N softmaxes, chunked only P x D."""
    torch.manual_seed(6)
    num_patches, vocab, width = 20, 1000, 8
    v = torch.randn(1, num_patches, width, requires_grad=True)
    vh, e, a = torch.randn(1, num_patches, width), torch.randn(vocab, width), torch.rand(1, num_patches)

    def largest_saved(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            loss = fn()
        loss.backward()
        return max(sizes)

    def naive_loss():
        log_q, log_p = torch.log_softmax(v @ e.T, -1), torch.log_softmax(vh @ e.T, -1)
        return (a * (log_p.exp() * (log_p - log_q)).sum(-1)).sum()

    naive = largest_saved(naive_loss)
    chunked = largest_saved(lambda: sds_loss(v, vh, e, a, chunk_size=4))
    assert naive == num_patches * vocab
    assert chunked == num_patches * width  # only dL/dv, computed in the forward
