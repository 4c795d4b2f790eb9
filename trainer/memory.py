"""Memory per process of a training configuration, estimated from the model's parameter list, and measured.

``estimate_memory(module, plan)`` -> ``MemoryEstimate`` (bytes): parameters, gradients, optimiser state,
compute copies (FSDP's gathered groups, or autocast's casts under DDP) and activations. ``trainer run``
prints it before the first step (``Trainer``), and ``benchmarks/bench_memory.py`` computes the table of
docs/scaling.md with the same function from meta-device models of the real shapes (no weights needed).
``reset_peak`` / ``peak_mib`` measure what a run really uses (GPU: allocated memory; CPU: resident set size).

The rules (docs/scaling.md lists them with the table):
* trainable parameters are float32 master weights (4 B), their gradients float32 (4 B), AdamW keeps two
  float32 moments (8 B) and its (foreach) step makes one float32 temporary per element (4 B); frozen
  parameters cost their storage dtype only (``--model.dtype``);
* FSDP divides every sharded tensor by the process count; a frozen LLM kept whole (``shard_frozen_llm``
  false) is not divided; accumulating without reducing every micro-batch adds full-size float32 gradients;
* FSDP gathers the root group (embeddings, final norm, LM head, projector, objective modules) from forward to
  the end of backward and about two decoder layers at a time, in the compute dtype, plus their gradients
  (and a float32 copy of those for the reduction when the compute dtype is narrower);
  DDP under autocast keeps compute-dtype copies of the trainable weights during the forward;
* activations per token and decoder layer of a Llama-style block (hidden h, key/value width h_kv, MLP width
  I, compute bytes c): c x (7 h + 3 h_kv + 4 I) + 8 h (the norms' float32 upcasts); with activation
  checkpointing c x h per layer plus one layer recomputed in full; plus the LM head's largest logits chunk
  (float32, with its gradient and softmax). Attention with SDPA/flash keeps no T x T matrix.
* an online vision tower (``--model.vision.mode``, ``vlm.vision``): its parameters count like the rest
  (a trained one: float32 + gradients + AdamW; a frozen one: its storage dtype), and its activations for
  ``batch_size`` images of T_v tokens (prefix + patches) through its n blocks (width h_v, MLP width I_v):
  trained, c x (8 h_v + 2 I_v) per token and block kept for backward (with checkpointing c x h_v per block
  plus one block in full); frozen (no_grad), one block's worth at a time. Under FSDP every tower block is
  a group gathered like a decoder layer.
Not counted: the CUDA context and allocator fragmentation (keep ~10% free), the data loader, the framework.

Letters: B micro-batch, T tokens per sequence, N vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import torch
from torch import nn

GIB = 2**30
MIB = 2**20
LOGITS_CHUNK_ELEMENTS = 1 << 26  # VisualLM.nll_chunk_elements


@dataclasses.dataclass
class MemoryPlan:
    """How the run holds the model: everything the estimate needs besides the parameter list."""

    strategy: str = "ddp"
    """'ddp' (also one process) or 'fsdp'"""
    world_size: int = 1
    shard_frozen_llm: bool = True
    compute_dtype: torch.dtype = torch.float32
    """the dtype weights compute in (mixed precision bf16/fp16, else float32)"""
    reduce_every_micro_batch: bool = True
    grad_accum: int = 1
    batch_size: int = 1
    seq_len: int = 2048
    checkpointing: bool = False


@dataclasses.dataclass
class MemoryEstimate:
    parameters: int
    gradients: int
    optimizer: int
    compute_copies: int
    activations: int
    trainable: int
    """trainable parameter elements (whole model)"""
    frozen: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.compute_copies + self.activations

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items()}
        out["total"] = self.total
        return out

    def describe(self, plan: MemoryPlan) -> str:
        def gib(n: int) -> str:
            return f"{n / GIB:.2f} GiB"

        where = f"{plan.strategy} over {plan.world_size} process(es)"
        return (
            f"memory per process ({where}; estimate, without framework and allocator overhead): "
            f"parameters {gib(self.parameters)} ({self.trainable:,} trainable, {self.frozen:,} frozen), "
            f"gradients {gib(self.gradients)}, optimizer state {gib(self.optimizer)}, "
            f"compute copies {gib(self.compute_copies)}, activations {gib(self.activations)} "
            f"(micro-batch {plan.batch_size} x {plan.seq_len} tokens"
            f"{', checkpointed' if plan.checkpointing else ''}), total {gib(self.total)}"
        )


def _groups(module: nn.Module) -> tuple[list[list[nn.Parameter]], list[nn.Parameter]]:
    """(parameters of each FSDP group gathered on its own: decoder layers, and an online vision tower's
    blocks and the rest of it; the rest = the root group); tied parameters counted once."""
    from trainer.parallel import decoder_layers

    layers = [list(layer.parameters()) for layer in decoder_layers(module.vlm.llm)]
    tower = getattr(module.vlm, "vision", None)
    if tower is not None:
        blocks = [list(block.parameters()) for block in tower.layers]
        in_blocks = {id(p) for params in blocks for p in params}
        layers += [*blocks, [p for p in tower.parameters() if id(p) not in in_blocks]]
    in_layers = {id(p) for params in layers for p in params}
    root = [p for p in module.parameters() if id(p) not in in_layers]
    return layers, root


def _llm_shape(module: nn.Module) -> tuple[int, int, int, int, int]:
    config = module.vlm.llm.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return hidden, kv, int(config.intermediate_size), int(config.num_hidden_layers), int(config.vocab_size)


def activation_bytes(module: nn.Module, plan: MemoryPlan) -> int:
    hidden, kv, inter, num_layers, vocab = _llm_shape(module)
    c = torch.empty((), dtype=plan.compute_dtype).element_size()
    tokens = plan.batch_size * plan.seq_len
    per_layer = tokens * (c * (7 * hidden + 3 * kv + 4 * inter) + 8 * hidden)
    if plan.checkpointing:
        layers = num_layers * tokens * c * hidden + per_layer
    else:
        layers = num_layers * per_layer
    embeddings = 2 * tokens * hidden * c  # the input embeddings and the final hidden states
    logits = 3 * 4 * min(tokens * vocab, LOGITS_CHUNK_ELEMENTS)
    return layers + embeddings + logits


def vision_activation_bytes(module: nn.Module, plan: MemoryPlan) -> int:
    """Activations of an online vision tower for ``plan.batch_size`` images (0 without one)."""
    tower = getattr(module.vlm, "vision", None)
    if tower is None or not len(tower.layers):
        return 0
    fc1 = tower.layers[0].mlp.fc1
    hidden, inter = int(fc1.in_features), int(fc1.out_features)
    tokens = plan.batch_size * int(tower.embeddings.position_embedding.num_embeddings)
    c = torch.empty((), dtype=plan.compute_dtype).element_size()
    block = tokens * c * (8 * hidden + 2 * inter)
    io = 2 * tokens * c * hidden  # the embeddings' output and the features
    if not tower.tuned:
        return block + io
    if plan.checkpointing:
        return len(tower.layers) * tokens * c * hidden + block + io
    return len(tower.layers) * block + io


def estimate_memory(module: nn.Module, plan: MemoryPlan) -> MemoryEstimate:
    """Bytes one process holds for ``module`` (a ``TrainModule``, unwrapped: real, or on the meta device)."""
    fsdp = plan.strategy == "fsdp" and plan.world_size > 1
    world = plan.world_size if fsdp else 1
    llm_params = {id(p) for p in module.vlm.llm.parameters()}
    c = torch.empty((), dtype=plan.compute_dtype).element_size()

    def sharded(p: nn.Parameter) -> bool:
        return fsdp and (p.requires_grad or plan.shard_frozen_llm or id(p) not in llm_params)

    params = grads = optim = 0
    trainable = frozen = 0
    seen: set[int] = set()
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        share = math.ceil(p.numel() / world) if sharded(p) else p.numel()
        params += share * p.element_size()
        if p.requires_grad:
            trainable += p.numel()
            grads += share * 4
            optim += share * (8 + 4)  # two moments + the step's temporary
        else:
            frozen += p.numel()
    copies = 0
    if fsdp:
        layers, root = _groups(module)

        def gathered(group: list[nn.Parameter]) -> int:
            weights = sum(p.numel() * min(c, p.element_size()) for p in group if sharded(p))
            grad = sum(p.numel() * (c + (4 if c < 4 else 0)) for p in group if p.requires_grad)
            return weights + grad

        copies = gathered(root) + 2 * max((gathered(g) for g in layers), default=0)
        if plan.grad_accum > 1 and not plan.reduce_every_micro_batch:
            grads += trainable * 4
    elif c < 4:  # autocast: compute-dtype copies of the float32 trainable weights during the forward
        copies = trainable * c
    activations = activation_bytes(module, plan) + vision_activation_bytes(module, plan)
    return MemoryEstimate(params, grads, optim, copies, activations, trainable, frozen)


# ---------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------


def reset_peak() -> None:
    """Start a new peak: GPU allocator statistics, or the resident-set high-water mark (Linux)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM
        except OSError:
            pass


def peak_mib() -> float:
    """Peak memory of this process since ``reset_peak``: GPU allocated, or resident set (VmHWM) on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / MIB
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


__all__ = [
    "MemoryEstimate",
    "MemoryPlan",
    "activation_bytes",
    "estimate_memory",
    "peak_mib",
    "reset_peak",
    "vision_activation_bytes",
]
