"""``basic``: BASIC (Tang et al., ICCV 2025): the LLM's own shallow layers supervise the projector output.

Inputs (see ``base.py``): ``out.visual_BPd`` (V, with grad), ``out.hidden_BLPd[l]`` for l = 1..k,
``out.text_to_visual_BP`` (text->image attention of layers 1..k, from ``trainer.models.attention``) and
``out.embed_Nd`` (E). Outputs: ``basic_das_loss`` and ``basic_sds_loss`` (weights lambda_1, lambda_2).

    V_hat = sum_{l=1..k} w_l H_l,  w_l = l^2 / sum_j j^2          target, detached
    a_i   = text->patch attention averaged over heads, text tokens and layers 1..k, sum_i a_i = 1   detached
    L_das = mean_b sum_i a_i || v_i/|v_i| - v_hat_i/|v_hat_i| ||^2
    L_sds = mean_b sum_i a_i KL( softmax(v_hat_i E^T) || softmax(v_i E^T) )

The SDS term needs two P x N softmaxes per image (576 x 152k fp32 = 350 MB each for Qwen2); ``sds_loss``
processes ``chunk_size`` rows at a time in a custom autograd Function that computes each chunk's loss and its
gradient together (the loss is a scalar) and keeps no softmax for the backward, so peak memory is O(chunk x N)
instead of O(P x N) per tensor, with the same three GEMMs per row as plain autograd.

Text-only samples (``has_image_B`` False) are left out: the batch means above run over the image rows of the
micro-batch. A micro-batch without an image gives zeros attached to V (the projector; BASIC owns no
parameter), so every rank still syncs every gradient; its report items are 0.

Letters: B batch, P patches, D/d width, N vocabulary, M flattened rows (B*P), C rows of one chunk, k layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from trainer.objectives.base import Needs, Objective, ObjectiveContext, StepContext, image_mask
from visalign.config import ConfigError


def layer_weights(k: int) -> torch.Tensor:
    """w_l = l^2 / sum_{j=1..k} j^2 for l = 1..k (deeper shallow layers are better refined, so weigh more)."""
    if k < 1:
        raise ValueError(f"BASIC needs at least one layer, got k={k}")
    squares_k = torch.arange(1, k + 1, dtype=torch.float64) ** 2
    return (squares_k / squares_k.sum()).float()


def das_loss(v_BPD: torch.Tensor, v_hat_BPD: torch.Tensor, a_BP: torch.Tensor) -> torch.Tensor:
    """Direction alignment: per sample sum_i a_i || v_i/|v_i| - v_hat_i/|v_hat_i| ||^2, batch mean.

    ``v_hat`` and ``a`` are targets/weights: detached here, so no gradient can reach them.
    """
    v_BPD = F.normalize(v_BPD.float(), dim=-1)
    v_hat_BPD = F.normalize(v_hat_BPD.detach().float(), dim=-1)
    dist_BP = (v_BPD - v_hat_BPD).pow(2).sum(-1)
    return (a_BP.detach().float() * dist_BP).sum(1).mean()


class _ChunkedWeightedKL(torch.autograd.Function):
    """sum_m a_m KL(softmax(t_m E^T) || softmax(v_m E^T)) over rows m, ``chunk`` rows at a time.

    The loss is a scalar, so its gradient is fully known during the forward up to the incoming scalar
    ``grad_out``: each chunk computes its KL *and* its gradient contribution while its two C x N softmaxes
    exist, then frees them. Backward only scales the stored gradients (no recomputation: three GEMMs per
    row, as plain autograd; memory O(C x N) instead of O(M x N)). Gradients:
    d/dv_m = a_m (q_m - p_m) E and d/dE = sum_m a_m (q_m - p_m)^T v_m (only through Q: P is a target).
    """

    @staticmethod
    def forward(ctx, v_MD, t_MD, embed_ND, a_M, chunk: int, need_v: bool, need_e: bool):
        # softmax precision: float32 at least (bf16/fp16 inputs), float64 kept for float64 inputs
        acc = torch.promote_types(v_MD.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=v_MD.device)
        grad_v_MD = torch.empty_like(v_MD) if need_v else None
        grad_e_ND = torch.zeros_like(embed_ND, dtype=acc) if need_e else None
        for lo in range(0, v_MD.shape[0], chunk):
            hi = lo + chunk
            a_C = a_M[lo:hi].to(acc)
            # in-place ops keep at most three C x N buffers alive
            log_q_CN = torch.log_softmax((v_MD[lo:hi] @ embed_ND.T).to(acc), dim=-1)
            log_p_CN = torch.log_softmax((t_MD[lo:hi] @ embed_ND.T).to(acc), dim=-1)
            p_CN = log_p_CN.exp()
            diff_CN = log_p_CN.sub_(log_q_CN)
            # row-wise dot product as a batched GEMV: no fourth C x N temporary for p * diff
            kl_C = (p_CN.unsqueeze(1) @ diff_CN.unsqueeze(2)).reshape(-1)
            total = total + (a_C * kl_C).sum()
            del log_p_CN, diff_CN
            if need_v or need_e:
                # d KL(p||q) / d logits_q = q - p, times the row weight
                coef_CN = log_q_CN.exp_().sub_(p_CN).mul_(a_C[:, None])
                del p_CN
                if need_v:
                    grad_v_MD[lo:hi] = (coef_CN.to(embed_ND.dtype) @ embed_ND).to(v_MD.dtype)
                if need_e:
                    grad_e_ND += coef_CN.T @ v_MD[lo:hi].to(acc)
        ctx.save_for_backward(grad_v_MD, grad_e_ND)
        ctx.embed_dtype = embed_ND.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_v_MD, grad_e_ND = ctx.saved_tensors
        grad_v = grad_v_MD * grad_out.to(grad_v_MD.dtype) if grad_v_MD is not None else None
        grad_e = (grad_e_ND * grad_out).to(ctx.embed_dtype) if grad_e_ND is not None else None
        return grad_v, None, grad_e, None, None, None, None


def sds_loss(
    v_BPD: torch.Tensor,
    v_hat_BPD: torch.Tensor,
    embed_ND: torch.Tensor,
    a_BP: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Distribution alignment: per sample sum_i a_i KL(softmax(v_hat_i E^T) || softmax(v_i E^T)), batch mean.

    ``chunk_size``: rows (patches, across the batch) scored at once; None = all rows in one chunk. The value
    and the gradients do not depend on it, only the peak memory does. Gradient flows into ``v`` and (through
    Q only) into ``embed_ND`` when it requires grad; never into ``v_hat`` or ``a``.
    """
    num_batch, num_patches, width = v_BPD.shape
    v_MD = v_BPD.reshape(-1, width)
    t_MD = v_hat_BPD.detach().reshape(-1, width).to(v_MD.dtype)
    embed_ND = embed_ND.to(v_MD.dtype)
    # fold the batch mean into the row weights: sum_b sum_i (a_bi / B) KL_bi
    a_M = a_BP.detach().reshape(-1).float() / num_batch
    chunk = int(chunk_size) if chunk_size else v_MD.shape[0]
    # gradients are computed in the forward only when a backward can follow
    grad_on = torch.is_grad_enabled()
    need_v, need_e = grad_on and v_MD.requires_grad, grad_on and embed_ND.requires_grad
    return _ChunkedWeightedKL.apply(v_MD, t_MD, embed_ND, a_M, max(chunk, 1), need_v, need_e)


@dataclasses.dataclass
class BasicConfig:
    num_layers: int = 0
    """k, the shallow LLM layers whose hidden states form the target; 0 = num_hidden_layers // 2 (at least 1),
    the paper's choice (16 of 32 layers for 7B, 20 of 40 for 13B)"""
    das_weight: float = 1.0
    """lambda_1, weight of the direction loss L_das (paper: 1)"""
    sds_weight: float = 0.01
    """lambda_2, weight of the distribution loss L_sds (paper: 0.01)"""
    sds_chunk_size: int = 64
    """patches scored against the whole vocabulary at once in L_sds (memory only; 0 = all at once). Ours"""
    attention_weighting: bool = True
    """weigh patches by text->image attention (paper); False = uniform 1/P weights (the paper's ablation)"""


class BasicObjective(Objective):
    name = "basic"

    def __init__(self, cfg: BasicConfig, num_llm_layers: int) -> None:
        super().__init__()
        self.cfg = cfg
        k = cfg.num_layers or max(num_llm_layers // 2, 1)
        if not 1 <= k <= num_llm_layers:
            raise ConfigError(f"basic.num_layers={k} but the LLM has {num_llm_layers} layers")
        self.num_layers = k
        self.register_buffer("layer_weights_k", layer_weights(k), persistent=False)
        layers = tuple(range(1, k + 1))
        self.needs = Needs(hidden_layers=layers, attention_layers=layers if cfg.attention_weighting else ())

    @classmethod
    def build(cls, cfg: BasicConfig, ctx: ObjectiveContext) -> BasicObjective:
        return cls(cfg, int(ctx.llm_config.num_hidden_layers))

    @staticmethod
    def loss_weights(cfg: BasicConfig) -> dict[str, float]:
        return {"basic_das_loss": cfg.das_weight, "basic_sds_loss": cfg.sds_weight}

    def target(self, out: Any) -> torch.Tensor:
        """V_hat = sum_l w_l H_l (detached, float32)."""
        v_hat_BPd = None
        for l, w in zip(range(1, self.num_layers + 1), self.layer_weights_k.tolist()):
            term_BPd = w * out.hidden_BLPd[l].detach().float()
            v_hat_BPd = term_BPd if v_hat_BPd is None else v_hat_BPd + term_BPd
        return v_hat_BPd

    def patch_weights(self, out: Any) -> torch.Tensor:
        """a: attention-derived patch weights normalised to sum 1 per sample (detached)."""
        v_BPd = out.visual_BPd
        if not self.cfg.attention_weighting:
            return torch.full(v_BPd.shape[:2], 1.0 / v_BPd.shape[1], device=v_BPd.device)
        att_BP = out.text_to_visual_BP.detach().float()
        return att_BP / att_BP.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)

    def forward(
        self, batch: dict[str, Any], out: Any, step: StepContext
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        v_BPd = out.visual_BPd
        image_B = image_mask(batch, v_BPd.shape[0], v_BPd.device)
        if not bool(image_B.any()):
            zero = v_BPd.sum() * 0.0
            report = {"basic/das": 0.0, "basic/sds": 0.0, "basic/cos_v_vhat": 0.0, "basic/attn_entropy": 0.0}
            return {"basic_das_loss": zero, "basic_sds_loss": zero.clone()}, report
        v_hat_BPd = self.target(out)
        a_BP = self.patch_weights(out)
        if not bool(image_B.all()):
            v_BPd, v_hat_BPd, a_BP = v_BPd[image_B], v_hat_BPd[image_B], a_BP[image_B]
        das = das_loss(v_BPd, v_hat_BPd, a_BP)
        sds = sds_loss(v_BPd, v_hat_BPd, out.embed_Nd, a_BP, chunk_size=self.cfg.sds_chunk_size or None)
        with torch.no_grad():
            cos = F.cosine_similarity(v_BPd.float(), v_hat_BPd, dim=-1).mean()
            # entropy of a over patches relative to uniform: 1 = uniform, near 0 = peaked on few patches
            ent = -(a_BP * a_BP.clamp(min=1e-12).log()).sum(1).mean() / torch.log(
                torch.tensor(float(max(a_BP.shape[1], 2)))
            )
        report = {
            "basic/das": float(das.detach()),
            "basic/sds": float(sds.detach()),
            "basic/cos_v_vhat": float(cos),
            "basic/attn_entropy": float(ent),
        }
        return {"basic_das_loss": das, "basic_sds_loss": sds}, report
