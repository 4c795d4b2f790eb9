"""LoRA for stage 2 through PEFT: adapters injected into the LLM in place, the stage that trains them, and the
merge that turns an adapted LLM back into a plain one (export).

Input: the causal LM inside ``VisualLM`` and ``LoraConfig`` (rank, alpha, dropout, target modules).
Output: the same LLM object with ``peft.tuners.lora`` layers in place of the targeted ``nn.Linear``s
(parameter names gain ``.base_layer.`` and ``.lora_A.default.`` / ``.lora_B.default.``).

Why not keep PEFT's ``PeftModel`` wrapper: ``VisualLM`` calls ``llm.base_model`` for hidden states, and on a
``PeftModel`` that is the ``LoraModel`` whose forward is the whole causal LM (logits, no hidden states). The
injected layers live in the LLM itself, so ``get_peft_model(...)`` is only used for its side effect.

Adapters stay float32 when the base weights are stored in bf16 (PEFT upcasts them), so they are trained with
float32 master weights like every trainable tensor. ``lora_B`` starts at zero: at step 0 the adapted LLM
equals the base LLM. Letters: r rank, d LLM width.
"""

from __future__ import annotations

import logging

from torch import nn

from visalign.config import ConfigError

log = logging.getLogger(__name__)

ADAPTER_MARK = "lora_"
"""substring of every adapter parameter name (``lora_A``, ``lora_B``)"""


def linear_names(llm: nn.Module) -> list[str]:
    """Names (last component) of the LLM's linear layers that may carry adapters; the LM head excluded."""
    head = llm.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in llm.named_modules()
            if isinstance(m, nn.Linear) and m is not head
        }
    )


def add_adapters(llm: nn.Module, rank: int, alpha: float, dropout: float, target_modules) -> int:
    """Inject LoRA adapters into ``llm`` in place (random ``lora_A`` from the global RNG, zero ``lora_B``);
    returns the number of adapter parameters."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError as err:
        raise ConfigError(
            "--model.lora.rank needs the 'peft' package: pip install 'visalign[lora]' (or pip install peft)"
        ) from err
    valid = linear_names(llm)
    unknown = sorted(set(target_modules) - set(valid))
    if unknown:
        raise ConfigError(
            f"--model.lora.target_modules {unknown} are not linear layers of this LLM; valid: {', '.join(valid)}"
        )
    config = PeftLoraConfig(
        r=int(rank), lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none"
    )
    get_peft_model(llm, config)  # replaces the target layers inside ``llm``; the wrapper is not kept
    num = sum(p.numel() for n, p in llm.named_parameters() if ADAPTER_MARK in n)
    log.info(
        "LoRA r=%d alpha=%g on %s: %s adapter parameters", rank, alpha, ",".join(target_modules), f"{num:,}"
    )
    return num


def has_adapters(module: nn.Module) -> bool:
    return any(ADAPTER_MARK in n for n, _ in module.named_parameters())


def train_adapters_only(vlm: nn.Module) -> dict[str, int]:
    """The LoRA stage: the LLM frozen except its adapters; the projector trains. Returns and logs the counts."""
    vlm.llm.requires_grad_(False)
    for name, p in vlm.llm.named_parameters():
        if ADAPTER_MARK in name:
            p.requires_grad_(True)
    vlm.projector.requires_grad_(True)
    trainable = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in vlm.parameters() if not p.requires_grad)
    log.info("stage finetune (LoRA): %s trainable, %s frozen parameters", f"{trainable:,}", f"{frozen:,}")
    return {"trainable": trainable, "frozen": frozen}


def merge_adapters(llm: nn.Module) -> int:
    """Fold every adapter into its base weight (W + B A alpha/r) and put the plain layer back: the LLM then has
    exactly the modules and parameter names of the base model. Returns the number of merged layers."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(llm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)  # raises on non-finite merged weights
            parent, _, child = name.rpartition(".")
            setattr(llm.get_submodule(parent) if parent else llm, child, module.get_base_layer())
            merged += 1
    if "peft_config" in vars(llm):
        del llm.peft_config
    return merged
