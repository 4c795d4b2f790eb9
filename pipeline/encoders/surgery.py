"""CLIP Surgery's architecture surgery (Li et al., "CLIP Surgery", arXiv 2304.05653): a second path through
the last blocks of a CLIP ViT whose attention is value-value self-attention and which has no FFN.

Raw CLIP's q-k attention in the last blocks links each patch to semantically unrelated regions ("opposite
visualisation": patch-text similarity maps light up the background). CLIP Surgery keeps the tower as it is
(the "original" path, whose states are the ordinary hidden states) and adds a path that starts at the input
of the first modified block and accumulates, for each of the last ``depth`` blocks ``i``,

    s  <-  s + out_proj_i( softmax_h( v_i v_i^T / sqrt(d_head) ) v_i ),    v_i = ln_1_i(h_i) W_v_i^T + b_v_i

per head ``h``, where ``h_i`` is the ORIGINAL path's input to block ``i`` (both paths read the original
path's normalised state; the surgery path never feeds back). No FFN and no residual MLP on that path; a
block's LayerScale (open_clip ``ls_1``), when it has one, scales the v-v output as it scales the attention
output (identity for every OpenAI CLIP checkpoint). The class token stays the original path's, so the image
embedding is CLIP's own.

This equals the reference implementation's dual path (its blocks return ``[x, x_ori]``), restated from the
states one ordinary forward already produced: the surgery path costs ``depth`` extra v-v attentions, not a
second pass through the tower. The reference modifies the last 6 blocks of every ViT size and has no depth
setting; ``depth`` here defaults to 6 and is clamped to the tower's depth (the tiny towers have 3 blocks).

Letters: B batch, T tokens (CLS first), D width, H heads, d head width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SURGERY_DEPTH = 6
"""the reference code's choice: the last 6 blocks, whatever the ViT size"""


def effective_depth(num_layers: int, depth: int) -> int:
    """The number of blocks that get the v-v path: ``depth`` clamped to the tower's ``num_layers``."""
    if int(depth) < 1:
        raise ValueError(f"surgery depth {depth}: at least one block")
    return min(int(depth), int(num_layers))


def value_attention(value_BTD: Tensor, num_heads: int) -> Tensor:
    """``softmax(v v^T / sqrt(d)) v`` in each of ``num_heads`` heads, heads merged back: ``[B, T, D]``."""
    num_b, num_t, width = value_BTD.shape
    v_BHTd = value_BTD.reshape(num_b, num_t, num_heads, width // num_heads).transpose(1, 2)
    mixed_BHTd = F.scaled_dot_product_attention(v_BHTd, v_BHTd, v_BHTd)  # scale 1/sqrt(d) by default
    return mixed_BHTd.transpose(1, 2).reshape(num_b, num_t, width)


def surgery_tokens(
    states_BTD: Sequence[Tensor],
    depth: int,
    values: Callable[[int, Tensor], Tensor],
    outputs: Callable[[int, Tensor], Tensor],
    num_heads: Callable[[int], int],
) -> Tensor:
    """The surgery path's final tokens ``[B, T, D]``, the class token taken from the original path.

    ``states_BTD``: the tower's hidden states (``[0]`` the input of block 0, ``[i]`` the output of block
    ``i - 1``). For block ``i``: ``values(i, h)`` is its value projection of ``ln_1(h)``, ``outputs(i, x)``
    its attention output projection (with LayerScale, if any), ``num_heads(i)`` its head count.
    """
    num_layers = len(states_BTD) - 1
    first = num_layers - effective_depth(num_layers, depth)
    path_BTD = states_BTD[first]
    for i in range(first, num_layers):
        mixed_BTD = value_attention(values(i, states_BTD[i]), num_heads(i))
        path_BTD = path_BTD + outputs(i, mixed_BTD)
    return torch.cat([states_BTD[-1][:, :1], path_BTD[:, 1:]], dim=1)


def hf_surgery_tokens(layers, states_BTD: Sequence[Tensor], depth: int) -> Tensor:
    """``surgery_tokens`` for a transformers ``CLIPEncoder``'s layers (separate q/k/v projections)."""
    return surgery_tokens(
        states_BTD,
        depth,
        values=lambda i, h: layers[i].self_attn.v_proj(layers[i].layer_norm1(h)),
        outputs=lambda i, x: layers[i].self_attn.out_proj(x),
        num_heads=lambda i: int(layers[i].self_attn.num_heads),
    )


def openclip_surgery_tokens(blocks, states_BTD: Sequence[Tensor], depth: int) -> Tensor:
    """``surgery_tokens`` for open_clip ``ResidualAttentionBlock`` s (packed ``nn.MultiheadAttention``: the
    last third of ``in_proj_weight`` / ``in_proj_bias`` is the value projection)."""

    def values(i: int, h: Tensor) -> Tensor:
        attn = blocks[i].attn
        width = attn.embed_dim
        bias = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
        return F.linear(blocks[i].ln_1(h), attn.in_proj_weight[2 * width :], bias)

    return surgery_tokens(
        states_BTD,
        depth,
        values=values,
        outputs=lambda i, x: blocks[i].ls_1(blocks[i].attn.out_proj(x)),
        num_heads=lambda i: int(blocks[i].attn.num_heads),
    )
