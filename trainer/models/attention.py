"""Cheap text -> visual attention probabilities for BASIC's patch weights, without eager attention.

HF returns attention probabilities only from eager attention, which materialises every layer's full
``[B, H, T, T]`` matrix and is much slower than SDPA. BASIC only needs, for layers ``1..k``, the probability
mass that the *text* queries put on the *visual* keys, averaged over heads and text queries. So we register
an attention function ``"visalign_sdpa"`` with transformers' ``AttentionInterface``: it always runs the stock
SDPA kernel for the layer output (same numerics, same gradients), and, only while ``capture_text_to_visual``
is active and only for the requested layers, additionally computes under ``no_grad``

    softmax(q_text K^T * scaling + mask)[..., visual keys]      (text query rows only, in chunks)

which costs O(chunk x T) transient memory instead of keeping O(T x T) for every layer. The model's attention
implementation is switched to ``"visalign_sdpa"`` inside the context and restored afterwards; anything
built on ``AttentionInterface`` (Llama, Qwen2, Mistral, ...) works.

Inputs of ``capture_text_to_visual``: the HF causal LM, ``layers`` (1-based as ``H_l``: layer l is decoder
layer index l-1), ``visual_start_B`` (first visual position per sample; -1 for a sample without visual
tokens, a text-only one), ``num_visual`` (P) and ``text_query_mask_BT`` (True at text positions whose
attention is averaged).
Output: ``holder.result_BP`` (float32) = mean over heads, masked text queries and ``layers`` of the
attention probability on visual key ``start + p``; not normalised per sample (BASIC does that). The row of a
sample without visual tokens, or without a text query, is zero.

Letters: B batch, H attention heads, T sequence, Q text query rows, C rows of one chunk, P visual tokens,
h head dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "visalign_sdpa"
CHUNK_ELEMENTS = 1 << 25
"""text-query logits (B x H x rows x T) scored at once: bounds the transient extra memory to two float32
buffers of this many elements (2 x 128 MiB), whatever the batch and sequence"""


class TextToVisualCapture:
    """What one active capture needs, and what it accumulates (one entry per captured layer)."""

    def __init__(
        self, layers: Sequence[int], visual_start_B: torch.Tensor, num_visual: int, text_query_mask_BT
    ):
        self.layers = {int(layer) for layer in layers}
        self.visual_start_B = visual_start_B
        self.num_visual = int(num_visual)
        self.text_query_mask_BT = text_query_mask_BT.bool()
        # keyed by layer so that a second call for the same layer (e.g. activation-checkpoint recomputation
        # while the context is still open) overwrites instead of being counted twice
        self.per_layer_BP: dict[int, torch.Tensor] = {}

    @property
    def result_BP(self) -> torch.Tensor:
        missing = self.layers - set(self.per_layer_BP)
        if missing:
            raise RuntimeError(
                f"text->visual attention was not captured for layer(s) {sorted(missing)}: the model did "
                f"not run them through the '{IMPLEMENTATION}' attention function "
                "(is it built on AttentionInterface?)"
            )
        return torch.stack([self.per_layer_BP[layer] for layer in sorted(self.layers)]).mean(0)


_ACTIVE: list[TextToVisualCapture] = []


def text_to_visual_probs(
    query_BHTh: torch.Tensor,
    key_BHTh: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    visual_start_B: torch.Tensor,
    num_visual: int,
    text_query_mask_BT: torch.Tensor,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Mean over heads and masked text queries of softmax(q k^T * scaling + mask) at the visual keys: [B, P].

    ``key_BHTh`` must already have as many heads as the query (GQA expanded). ``attention_mask`` is what HF
    hands an attention function: None (plain causal), a bool ``[B|1, 1, T, T]`` (True = attend) or an additive
    float mask. Only the text query rows are scored (gathered, padded to the batch's largest count), in chunks
    of at most ``chunk_elements`` logits (default ``CHUNK_ELEMENTS``).
    """
    num_batch, num_heads, num_tokens, head_dim = query_BHTh.shape
    device = query_BHTh.device
    text_mask_BT = text_query_mask_BT.to(device).bool()
    num_text_B = text_mask_BT.sum(1)
    num_rows = int(num_text_B.max())
    sum_BP = torch.zeros(num_batch, num_visual, device=device, dtype=torch.float32)
    if num_rows == 0:
        return sum_BP
    # text positions first, in order (stable sort), then the batch's largest text count
    pos_BQ = torch.argsort((~text_mask_BT).to(torch.int8), dim=1, stable=True)[:, :num_rows]
    start_B = visual_start_B.to(device).long()
    has_visual_B = start_B >= 0
    # a row without visual tokens reads keys 0..P-1 (clamped to the sequence) and is zeroed at the end
    valid_BQ = (torch.arange(num_rows, device=device)[None] < num_text_B[:, None]) & has_visual_B[:, None]
    visual_idx_BP = start_B.clamp(min=0)[:, None] + torch.arange(num_visual, device=device)[None]
    visual_idx_BP = visual_idx_BP.clamp(max=num_tokens - 1)
    key_pos_T = torch.arange(num_tokens, device=device)
    key_BHhT = key_BHTh.float().transpose(2, 3)
    if attention_mask is not None:
        attention_mask = attention_mask[..., :num_tokens].expand(num_batch, 1, num_tokens, num_tokens)
    budget = chunk_elements or CHUNK_ELEMENTS
    chunk = max(1, budget // (num_batch * num_heads * num_tokens))
    for lo in range(0, num_rows, chunk):
        pos_BC = pos_BQ[:, lo : lo + chunk]
        num_chunk = pos_BC.shape[1]
        q_BHCh = query_BHTh.gather(
            2, pos_BC[:, None, :, None].expand(num_batch, num_heads, num_chunk, head_dim)
        )
        logits_BHCT = torch.matmul(q_BHCh.float(), key_BHhT).mul_(scaling)
        if attention_mask is None:
            allowed_B1CT = key_pos_T[None, None, None, :] <= pos_BC[:, None, :, None]
            logits_BHCT.masked_fill_(~allowed_B1CT, float("-inf"))
        else:
            rows_B1CT = attention_mask.gather(
                2, pos_BC[:, None, :, None].expand(num_batch, 1, num_chunk, num_tokens)
            )
            if rows_B1CT.dtype == torch.bool:
                logits_BHCT.masked_fill_(~rows_B1CT, float("-inf"))
            else:
                logits_BHCT.add_(rows_B1CT.float())
        probs_BHCT = torch.softmax(logits_BHCT, dim=-1)
        del logits_BHCT
        # fully masked rows (left padding) would be NaN; they are padding rows here, zero them
        probs_BHCT.nan_to_num_(nan=0.0)
        index_BHCP = visual_idx_BP[:, None, None, :].expand(num_batch, num_heads, num_chunk, num_visual)
        visual_BHCP = probs_BHCT.gather(-1, index_BHCP)
        sum_BP += (visual_BHCP.sum(1) * valid_BQ[:, lo : lo + chunk, None].float()).sum(1)
    return sum_BP / (num_heads * num_text_B.clamp(min=1).float()[:, None])  # zero rows stay zero


def visalign_sdpa_forward(module, query, key, value, attention_mask, *args: Any, **kwargs: Any):
    """Stock SDPA for the output; plus the text->visual probabilities of this layer while a capture is on."""
    if _ACTIVE:
        capture = _ACTIVE[-1]
        layer = int(getattr(module, "layer_idx", -1)) + 1
        if layer in capture.layers:
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = query.shape[-1] ** -0.5
            with torch.no_grad():
                key_full = repeat_kv(key, getattr(module, "num_key_value_groups", 1))
                capture.per_layer_BP[layer] = text_to_visual_probs(
                    query.detach(),
                    key_full.detach(),
                    attention_mask,
                    float(scaling),
                    capture.visual_start_B,
                    capture.num_visual,
                    capture.text_query_mask_BT,
                )
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


AttentionInterface.register(IMPLEMENTATION, visalign_sdpa_forward)
# the mask builder is looked up by the same name: ours wants exactly what SDPA gets
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _configs(llm: torch.nn.Module) -> list[Any]:
    """Every distinct HF config inside ``llm`` (a VLM nests the text config in the top one)."""
    seen: dict[int, Any] = {}
    for module in llm.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def capture_text_to_visual(
    llm: torch.nn.Module,
    layers: Sequence[int],
    visual_start_B: torch.Tensor,
    num_visual: int,
    text_query_mask_BT: torch.Tensor,
) -> Iterator[TextToVisualCapture]:
    """Run the forward inside this context; afterwards ``holder.result_BP`` holds the averaged probabilities.

    The model's attention implementation is switched to ``visalign_sdpa`` only for the duration (the
    forward output is bit-identical to SDPA) and restored on exit, even on error.
    """
    holder = TextToVisualCapture(layers, visual_start_B, num_visual, text_query_mask_BT)
    configs = _configs(llm)
    saved = [config._attn_implementation for config in configs]
    for config in configs:
        # set the internal attribute directly: set_attn_implementation re-validates against hub kernels and
        # warns; the name is registered above, which is all the dispatch needs
        config._attn_implementation_internal = IMPLEMENTATION
    _ACTIVE.append(holder)
    try:
        yield holder
    finally:
        _ACTIVE.remove(holder)
        for config, impl in zip(configs, saved):
            config._attn_implementation_internal = impl
