"""``basic``: BASIC (Tang et al., ICCV 2025): the LLM's own shallow layers supervise the projector output.

Inputs (see ``base.py``): ``out.visual_BPd`` (V, with grad), ``out.hidden_BLPd[l]`` for l = 1..k,
``out.text_to_visual_BP`` (text->image attention of layers 1..k, from ``trainer.models.attention``) and
``out.embed_Nd`` (E). Outputs: ``basic_das_loss`` and ``basic_sds_loss`` (weights lambda_1, lambda_2).

    V_hat = sum_{l=1..k} w_l H_l,  w_l = l^2 / sum_j j^2          target, detached (``layer_weighting``:
                                                                  also 1/k or (k-l+1)^2 / sum_j j^2)
    a_i   = text->patch attention averaged over heads, text tokens and layers 1..k, sum_i a_i = 1   detached
    L_das = mean_b sum_i a_i || v_i/|v_i| - v_hat_i/|v_hat_i| ||^2
    L_sds = mean_b sum_i a_i KL( softmax(v_hat_i E^T) || softmax(v_i E^T) )

The SDS term needs two P x N softmaxes per image (576 x 152k fp32 = 350 MB each for Qwen2); ``sds_loss``
processes ``chunk_size`` rows at a time in a custom autograd Function that computes each chunk's loss and its
gradient together (the loss is a scalar) and keeps no softmax for the backward, so peak memory is O(chunk x N)
instead of O(P x N) per tensor, with the same three GEMMs per row as plain autograd (four when E trains).
Those GEMMs cost about as much as a whole 0.5B LLM's forward; ``sds_mode="rows"`` (ours; the paper is
silent) scores only ``sds_rows`` patches per sample drawn with probability a_i by systematic sampling, an
unbiased estimate of the same loss and gradients at ~sds_rows / P of the cost.

Text-only samples (``has_image_B`` False) are left out: the batch means above run over the image rows of the
micro-batch. A micro-batch without an image gives zeros attached to V (the projector; BASIC owns no
parameter), so every rank still syncs every gradient; its report items are 0.

Letters: B batch, P patches, D/d width, N vocabulary, M flattened rows (B*P), C rows of one chunk, K columns of
one vocabulary block, R drawn rows, k layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F

from trainer.objectives.base import Needs, Objective, ObjectiveContext, StepContext, image_mask
from visalign.config import ConfigError

LAYER_WEIGHTINGS = ("increasing", "constant", "decreasing")
"""the paper's three layer weightings (its Table 4)"""


def layer_weights(k: int, weighting: str = "increasing") -> torch.Tensor:
    """w_l for l = 1..k, summing to 1 (the paper's Table 4, its l/2 written k):

    * ``increasing`` (paper default): w_l = l^2 / sum_{j=1..k} j^2 (deeper shallow layers are better refined);
    * ``constant``: w_l = 1 / k;
    * ``decreasing``: w_l = (k - l + 1)^2 / sum_{j=1..k} j^2 (the increasing weights in reverse order).
    """
    if k < 1:
        raise ValueError(f"BASIC needs at least one layer, got k={k}")
    if weighting not in LAYER_WEIGHTINGS:
        raise ValueError(f"unknown layer weighting {weighting!r}; valid: {', '.join(LAYER_WEIGHTINGS)}")
    if weighting == "constant":
        return torch.full((k,), 1.0 / k, dtype=torch.float64).float()
    squares_k = torch.arange(1, k + 1, dtype=torch.float64) ** 2
    if weighting == "decreasing":
        squares_k = squares_k.flip(0)
    return (squares_k / squares_k.sum()).float()


def das_loss(v_BPD: torch.Tensor, v_hat_BPD: torch.Tensor, a_BP: torch.Tensor) -> torch.Tensor:
    """Direction alignment: per sample sum_i a_i || v_i/|v_i| - v_hat_i/|v_hat_i| ||^2, batch mean.

    ``v_hat`` and ``a`` are targets/weights: detached here, so no gradient can reach them.
    """
    v_BPD = F.normalize(v_BPD.float(), dim=-1)
    v_hat_BPD = F.normalize(v_hat_BPD.detach().float(), dim=-1)
    dist_BP = (v_BPD - v_hat_BPD).pow(2).sum(-1)
    return (a_BP.detach().float() * dist_BP).sum(1).mean()


SDS_MODES = ("exact", "rows")

VOCAB_BLOCKS = 8
"""the vocabulary is processed in this many column blocks for the logit GEMMs and the KL sums: each block
temporary is 1/8 of the chunk's logits, and a chunk costs a bounded number of operations whatever N"""


class _ChunkedWeightedKL(torch.autograd.Function):
    """sum_m w_m KL(softmax(t_m E^T) || softmax(v_m E^T)) over rows m, ``chunk`` rows at a time.

    The loss is a scalar, so its gradient is fully known during the forward up to the incoming scalar
    ``grad_out``: each chunk computes its KL *and* its gradient contribution while its logits exist. Backward
    only scales the stored gradients in place (no recomputation). Gradients: d/dv_m = w_m (q_m - p_m) E and
    d/dE = sum_m (q_m - p_m)^T w_m v_m (only through Q: P is a target).

    Memory (measured on CPU, where every saving below showed in the peak resident set):
    * every buffer is allocated once per call and reused by every chunk (per-chunk allocations let the heap
      fragment: the resident set grew chunk after chunk);
    * one 2C x N buffer holds the student rows on top and the teacher rows below, so one GEMM reads E once
      for both; it runs per vocabulary block (one x @ E^T into the whole C x N output made the CPU BLAS
      path hold a second output-sized copy at d = 4096; per block that copy is 1/``VOCAB_BLOCKS``);
    * log-softmaxes in place; the KL summed per vocabulary block into two block-sized buffers; ``q - p``
      formed in the same buffer; the row weights applied on the C x d side (never a pass over C x N);
    * dL/dE accumulated with an in-place ``addmm_`` (``+=`` of a product allocates N x d per chunk), and
      backward scales the stored gradients in place (no second P x d or N x d copy).
    Passes over the buffer per chunk: the GEMM writes, log-softmax (3), KL blocks (2 reads + block-local
    work), q - p (3), one GEMM read per gradient.
    """

    @staticmethod
    def forward(ctx, v_MD, t_MD, embed_ND, w_M, chunk: int, need_v: bool, need_e: bool):
        # softmax precision: float32 at least (bf16/fp16 inputs), float64 kept for float64 inputs
        acc = torch.promote_types(v_MD.dtype, torch.float32)
        device, (num_rows, width), vocab = v_MD.device, v_MD.shape, embed_ND.shape[0]
        chunk = max(1, min(chunk, num_rows))
        block = -(-vocab // VOCAB_BLOCKS)
        total = torch.zeros((), dtype=acc, device=device)
        grad_v_MD = torch.empty_like(v_MD, dtype=acc) if need_v else None
        grad_e_ND = torch.zeros_like(embed_ND, dtype=acc) if need_e else None
        logits_2CN = torch.empty(2 * chunk, vocab, dtype=acc, device=device)
        rows_flat = torch.empty(2 * chunk * width, dtype=v_MD.dtype, device=device)
        kl_flat = torch.empty(2, chunk * block, dtype=acc, device=device)
        for lo in range(0, num_rows, chunk):
            rows = min(chunk, num_rows - lo)
            w_C1 = w_M[lo : lo + rows, None].to(acc)
            v_CD = v_MD[lo : lo + rows]
            x_2CD = torch.cat([v_CD, t_MD[lo : lo + rows]], out=rows_flat[: 2 * rows * width].view(-1, width))
            logits = logits_2CN[: 2 * rows]
            for col in range(0, vocab, block):
                if logits.dtype == x_2CD.dtype:
                    torch.matmul(x_2CD, embed_ND[col : col + block].T, out=logits[:, col : col + block])
                else:
                    logits[:, col : col + block] = x_2CD @ embed_ND[col : col + block].T
            torch.log_softmax(logits, dim=-1, out=logits)
            log_q_CN, log_p_CN = logits[:rows], logits[rows:]
            # KL(p || q) per row, one vocabulary block at a time: log p - log q and p in the two buffers
            kl_C = torch.zeros(rows, dtype=acc, device=device)
            for col in range(0, vocab, block):
                lp_CK, lq_CK = log_p_CN[:, col : col + block], log_q_CN[:, col : col + block]
                diff_CK = torch.sub(lp_CK, lq_CK, out=kl_flat[0, : lp_CK.numel()].view(lp_CK.shape))
                p_CK = torch.exp(lp_CK, out=kl_flat[1, : lp_CK.numel()].view(lp_CK.shape))
                kl_C += (p_CK.unsqueeze(1) @ diff_CK.unsqueeze(2)).reshape(-1)
            total = total + (w_C1[:, 0] * kl_C).sum()
            if need_v or need_e:
                # d KL(p||q) / d logits_q = q - p; the row weight is applied on the d-wide side
                diff_CN = log_q_CN.exp_().sub_(log_p_CN.exp_())
                if need_v:
                    grad_CD = grad_v_MD[lo : lo + rows]
                    if embed_ND.dtype == acc:
                        torch.matmul(diff_CN, embed_ND, out=grad_CD)
                    else:
                        grad_CD.copy_(diff_CN.to(embed_ND.dtype) @ embed_ND)
                    grad_CD.mul_(w_C1)
                if need_e:
                    grad_e_ND.addmm_(diff_CN.T, v_CD.to(acc) * w_C1)
        ctx.save_for_backward(
            grad_v_MD.to(v_MD.dtype) if need_v else None,
            grad_e_ND.to(embed_ND.dtype) if need_e else None,
        )
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_v_MD, grad_e_ND = ctx.saved_tensors
        # scaled in place and handed on as the gradients themselves: no second P x d (or N x d) copy at the
        # peak; a second backward through the same graph is refused by autograd's version check
        if grad_v_MD is not None:
            grad_v_MD.mul_(grad_out.to(grad_v_MD.dtype))
        if grad_e_ND is not None:
            grad_e_ND.mul_(grad_out.to(grad_e_ND.dtype))
        return grad_v_MD, None, grad_e_ND, None, None, None, None


def systematic_counts(weights_BP: torch.Tensor, num_rows: int, offset_B: torch.Tensor) -> torch.Tensor:
    """How often each patch is drawn when ``num_rows`` rows are drawn per sample with probability
    proportional to its weight, by systematic sampling: the points ``(offset_b + j) / num_rows``, j = 0..R-1,
    fall into the intervals of the cumulative normalised weights.

    For ``offset_b`` uniform in [0, 1): E[n_bi] = num_rows * w_bi / sum_i w_bi exactly, every n_bi is
    floor or ceil of that (patches with weight >= 1/num_rows of the total are always drawn), sum_i n_bi =
    num_rows, and a patch of weight 0 is never drawn. Samples whose weights sum to 0 get no rows.
    -> int64 [B, P].
    """
    if num_rows < 1:
        raise ValueError(f"num_rows must be at least 1, got {num_rows}")
    weights_BP = weights_BP.detach().double()
    if bool((weights_BP < 0).any()):
        raise ValueError("patch weights must be non-negative")
    num_batch, num_patches = weights_BP.shape
    total_B = weights_BP.sum(1)
    cum_BP = weights_BP.cumsum(1) / total_B.clamp(min=torch.finfo(torch.float64).tiny)[:, None]
    # from the last positive weight on, the cumulative sum is exactly 1: rounding can never hand a point
    # < 1 to a trailing zero-weight patch
    positions_P = torch.arange(num_patches, device=weights_BP.device)
    last_B = torch.where(weights_BP > 0, positions_P, -1).amax(1)
    cum_BP = torch.where(positions_P[None] >= last_B[:, None], 1.0, cum_BP)
    points_BR = (offset_B.to(cum_BP)[:, None] + torch.arange(num_rows, device=cum_BP.device)) / num_rows
    index_BR = torch.searchsorted(cum_BP, points_BR, right=True).clamp_(max=num_patches - 1)
    counts_BP = torch.zeros(num_batch, num_patches, dtype=torch.int64, device=weights_BP.device)
    counts_BP.scatter_add_(1, index_BR, torch.ones_like(index_BR))
    return counts_BP.masked_fill_((total_B <= 0)[:, None], 0)


def sds_loss(
    v_BPD: torch.Tensor,
    v_hat_BPD: torch.Tensor,
    embed_ND: torch.Tensor,
    a_BP: torch.Tensor,
    chunk_size: int | None = None,
    sample_rows: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Distribution alignment: per sample sum_i a_i KL(softmax(v_hat_i E^T) || softmax(v_i E^T)), batch mean.

    ``chunk_size``: rows (patches, across the batch) scored at once; None = all rows in one chunk. The value
    and the gradients do not depend on it, only the peak memory does. Gradient flows into ``v`` and (through
    Q only) into ``embed_ND`` when it requires grad; never into ``v_hat`` or ``a``.

    ``sample_rows``: None = exact (every patch of positive weight scored). An integer R = unbiased estimate
    from R patches per sample drawn with probability a_i / sum_i a_i (``systematic_counts``; the offsets come
    from ``generator``, torch's global CPU generator if None): patch i drawn n_i times enters with weight
    (sum_j a_j) n_i / R, so the expectation of the value and of every gradient is the exact one, and at most
    R distinct patches per sample are scored against the vocabulary (cost ~ R / P of exact).
    """
    num_batch, num_patches, width = v_BPD.shape
    v_MD = v_BPD.reshape(-1, width)
    t_MD = v_hat_BPD.detach().reshape(-1, width).to(v_MD.dtype)
    embed_ND = embed_ND.to(v_MD.dtype)
    a_BP = a_BP.detach().float()
    if sample_rows is not None:
        offset_B = torch.rand(num_batch, generator=generator, dtype=torch.float64)
        counts_BP = systematic_counts(a_BP, int(sample_rows), offset_B.to(a_BP.device))
        a_BP = counts_BP.float() * (a_BP.sum(1, keepdim=True) / int(sample_rows))
    # fold the batch mean into the row weights: sum_b sum_i (a_bi / B) KL_bi
    w_M = a_BP.reshape(-1) / num_batch
    # rows of weight 0 (not drawn, or samples without patch weight) are never scored against the vocabulary;
    # gradients reach v through the row gather
    keep_R = w_M.nonzero().reshape(-1)
    if keep_R.numel() == 0:
        # nothing to score: a zero that stays on the graph (an empty sum: no arithmetic on the values)
        return v_BPD.reshape(-1)[:0].sum(dtype=torch.promote_types(v_BPD.dtype, torch.float32))
    if keep_R.numel() < w_M.numel():
        v_MD, t_MD, w_M = v_MD.index_select(0, keep_R), t_MD.index_select(0, keep_R), w_M[keep_R]
    chunk = int(chunk_size) if chunk_size else v_MD.shape[0]
    # gradients are computed in the forward only when a backward can follow
    grad_on = torch.is_grad_enabled()
    need_v, need_e = grad_on and v_MD.requires_grad, grad_on and embed_ND.requires_grad
    return _ChunkedWeightedKL.apply(v_MD, t_MD, embed_ND, w_M, max(chunk, 1), need_v, need_e)


@dataclasses.dataclass
class BasicConfig:
    num_layers: int = 0
    """k, the shallow LLM layers 1..k whose hidden states form the target; 0 = num_hidden_layers // 2 (at least
    1), the paper's choice (16 of 32 layers for 7B, 20 of 40 for 13B; its Figure 6 tries k = 4, 8, ..., 32)"""
    layer_weighting: Literal["increasing", "constant", "decreasing"] = "increasing"
    """w_l over layers 1..k: 'increasing' = l^2 / sum j^2 (paper), 'constant' = 1/k, 'decreasing' =
    (k - l + 1)^2 / sum j^2 (the paper's Table 4 ablation)"""
    das_weight: float = 1.0
    """lambda_1, weight of the direction loss L_das (paper: 1)"""
    sds_weight: float = 0.01
    """lambda_2, weight of the distribution loss L_sds (paper: 0.01)"""
    sds_chunk_size: int = 64
    """patches scored against the whole vocabulary at once in L_sds (memory only; 0 = all at once). Ours"""
    sds_mode: Literal["exact", "rows"] = "exact"
    """L_sds over every patch (exact), or an unbiased estimate from ``sds_rows`` patches per sample drawn with
    probability a_i (rows: cost ~ sds_rows / P of exact; same expectation of loss and gradients). Ours"""
    sds_rows: int = 64
    """patches drawn per sample for sds_mode=rows (systematic sampling, reproducible per step and rank)"""
    attention_weighting: bool = True
    """weigh patches by text->image attention (paper); False = uniform 1/P weights (the paper's ablation)"""


class BasicObjective(Objective):
    name = "basic"

    def __init__(self, cfg: BasicConfig, num_llm_layers: int) -> None:
        super().__init__()
        self.cfg = cfg
        k = cfg.num_layers or max(num_llm_layers // 2, 1)
        if not 1 <= k <= num_llm_layers:
            raise ConfigError(
                f"basic.num_layers={k} but the LLM has {num_llm_layers} layers: use 1..{num_llm_layers} "
                "(0 = half of them)"
            )
        if cfg.layer_weighting not in LAYER_WEIGHTINGS:
            raise ConfigError(
                f"basic.layer_weighting={cfg.layer_weighting!r}: expected one of {', '.join(LAYER_WEIGHTINGS)}"
            )
        if cfg.sds_mode == "rows" and cfg.sds_rows < 1:
            raise ConfigError(
                f"basic.sds_rows={cfg.sds_rows} with basic.sds_mode=rows: draw at least 1 patch"
            )
        self.num_layers = k
        self.register_buffer("layer_weights_k", layer_weights(k, cfg.layer_weighting), persistent=False)
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

    def sds(
        self,
        v_BPd: torch.Tensor,
        v_hat_BPd: torch.Tensor,
        embed_Nd: torch.Tensor,
        a_BP: torch.Tensor,
        step: StepContext,
    ) -> torch.Tensor:
        """L_sds in the configured mode; row draws come from ``step.generator``: the same on any device and
        again after a resume."""
        rows = self.cfg.sds_rows if self.cfg.sds_mode == "rows" else None
        return sds_loss(
            v_BPd,
            v_hat_BPd,
            embed_Nd,
            a_BP,
            chunk_size=self.cfg.sds_chunk_size or None,
            sample_rows=rows,
            generator=step.generator("basic/sds") if rows is not None else None,
        )

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
        sds = self.sds(v_BPd, v_hat_BPd, out.embed_Nd, a_BP, step)
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
