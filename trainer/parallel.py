"""How the processes of a run share the model: DDP (Accelerate's ``prepare``) or FSDP2 (``fully_shard``, here).

Inputs: the built ``TrainModule`` (projector + LLM + objective modules, stage applied) and ``ParallelConfig``.
Outputs: the module made fully sharded in place (``apply_fsdp``), a gradient-sync switch for accumulation,
and the state-dict views that checkpoints save and load under either strategy (``model_state``,
``optimizer_state``, ``load_states``).

Why the trainer applies FSDP2 itself rather than through Accelerate's plugin: on a machine without a GPU,
Accelerate turns an FSDP launch into plain multi-process data parallel and wraps the model in DDP, silently;
``fully_shard`` runs on CPU (gloo) and GPU (NCCL) alike, so one code path is tested here and runs there.
Accelerate still launches the processes, places devices, logs, and prepares the optimizer and scheduler; the
sharded model never goes through ``prepare`` (DDP's constructor cannot take DTensor parameters).

Wrapping (torchtitan's recipe): one FSDP group per decoder layer, then the root (``TrainModule``) holding the
embeddings E, the final norm, the LM head, the projector and the objective modules. E must stay in the root
group: the objectives read it inside the forward (SEA targets, BASIC's vocabulary KL) and the chunked LM head
recomputes logits from it in backward; a separate group would free it right after the embedding lookup.
A frozen LLM (stage 1, LoRA's base weights) is sharded like the rest (gathered layer by layer each step) or,
with ``shard_frozen_llm=False``, kept whole on every process (``ignored_params``: never communicated).
An online vision tower (``vlm.vision``, frozen or trained) is sharded too: one group per tower block, then
one for the tower's embeddings (gathered for its forward only, like a decoder layer, never kept in the root).

Mixed precision under FSDP is FSDP's own: parameters gathered in the compute dtype, gradients reduced and
optimiser state kept in float32 (the sharded float32 parameters are the master copies); Accelerate's autocast
is then off. The root does not cast its inputs (the batch holds float32 label scores and features that the
objectives read as they are; the projector casts its input itself).

A micro-batch that leaves a parameter without a gradient on one rank (a label-less sample: no LM-head use)
would make ranks reduce different buffers: ``set_reduce_scatter_unused_params(True)`` sends zeros instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from visalign.config import ConfigError

log = logging.getLogger(__name__)

ACCELERATE_FSDP_ENV = "ACCELERATE_USE_FSDP"
"""set by ``accelerate launch`` for a config with ``distributed_type: FSDP`` (or ``--use_fsdp``)"""


def resolve_strategy(strategy: str) -> str:
    """'auto' -> 'fsdp' when the launcher was given an FSDP config, else 'ddp'."""
    if strategy != "auto":
        return strategy
    return "fsdp" if os.environ.get(ACCELERATE_FSDP_ENV, "false").lower() == "true" else "ddp"


@contextlib.contextmanager
def accelerate_without_fsdp_plugin() -> Iterator[None]:
    """While the ``Accelerator`` is built: hide the launcher's FSDP flag, so Accelerate never wraps the model
    with its own FSDP (GPU) or DDP (CPU) in addition to ours."""
    saved = os.environ.pop(ACCELERATE_FSDP_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[ACCELERATE_FSDP_ENV] = saved


def decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a causal LM (``llm.model.layers`` for Llama/Qwen2/Mistral-style models)."""
    base = getattr(llm, getattr(llm, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(
            f"{type(llm).__name__} has no decoder layer list at .{llm.base_model_prefix}.layers: FSDP wraps one "
            "group per decoder layer; use a Llama/Qwen2-style LM or --parallel.strategy ddp"
        )
    return list(layers)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@dataclasses.dataclass
class ShardingSummary:
    groups: int
    """FSDP groups: sharded decoder layers + the root"""
    local_elements: int
    """parameter elements this process stores"""
    total_elements: int
    """parameter elements of the whole model"""
    replicated_elements: int
    """elements kept whole on every process (a frozen LLM with shard_frozen_llm=False)"""


def apply_fsdp(
    module: nn.Module,
    device: torch.device,
    world_size: int,
    shard_frozen_llm: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> ShardingSummary:
    """Shard ``module`` (a ``TrainModule``) in place over ``world_size`` processes on ``device``'s type.

    Call after the stage (what trains) and activation checkpointing are set, and before the optimizer is
    built: an optimizer made over the unsharded parameters would update tensors FSDP no longer uses.
    ``compute_dtype``: gather parameters in this dtype for compute (bf16), None = as stored.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world_size,))
    reduce_dtype = torch.float32 if compute_dtype is not None else None
    layer_policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=reduce_dtype)
    root_policy = MixedPrecisionPolicy(
        param_dtype=compute_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False
    )
    llm = module.vlm.llm
    replicated: set[nn.Parameter] = set()
    if not shard_frozen_llm:
        replicated = {p for p in llm.parameters() if not p.requires_grad}
        llm.to(device)  # FSDP moves only the parameters it manages
    total = sum(p.numel() for p in module.parameters())
    groups = 0
    tower = getattr(module.vlm, "vision", None)
    if tower is not None:
        for block in tower.layers:
            fully_shard(block, mesh=mesh, mp_policy=layer_policy)
        fully_shard(tower, mesh=mesh, mp_policy=layer_policy)
        groups += len(tower.layers) + 1
    for layer in decoder_layers(llm):
        own = set(layer.parameters())
        if own <= replicated:
            continue  # a wholly frozen, replicated layer: no group, it is never communicated
        fully_shard(layer, mesh=mesh, mp_policy=layer_policy, ignored_params=(own & replicated) or None)
        groups += 1
    fully_shard(module, mesh=mesh, mp_policy=root_policy, ignored_params=replicated or None)
    groups += 1
    module.set_reduce_scatter_unused_params(True)
    # evaluation reads the weights outside the training forward: it must run through the root's hooks
    register_fsdp_forward_method(module, "evaluate")
    local = sum(local_tensor(p).numel() for p in module.parameters())
    return ShardingSummary(groups, local, total, sum(p.numel() for p in replicated))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor, the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def without_gradient_sync(model: nn.Module, accelerator: Any) -> Iterator[None]:
    """No gradient reduction inside (non-final micro-batches of an accumulation window).

    FSDP2 modules have no ``no_sync`` (Accelerate's would silently do nothing): switch their reduction off
    and on again. Under FSDP gradients are then kept unsharded until the sync, so the trainer uses this only
    when ``--parallel.reduce_every_micro_batch false``.
    """
    if is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


# ---------------------------------------------------------------------------------------------------------
# state dicts: the same calls under DDP, FSDP and a single process
# ---------------------------------------------------------------------------------------------------------


def model_state(model: nn.Module, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """``{fqn: tensor}`` of the kept entries (no copies; DTensor shards under FSDP, ``module.`` of DDP
    removed; tied weights appear under every name)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: v for k, v in get_model_state_dict(model).items() if keep(k)}


def optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The optimizer state keyed by parameter name, flattened: (tensors ``state.<fqn>.<name>``, the rest
    ``param_groups.<fqn>.<setting>``: plain values). Initialises the state of a fresh optimizer (a step with
    zero gradients and lr 0), which is what a load needs as a template."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    flat = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True)
    )
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)}
    return tensors, rest


def load_states(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_tensors: dict[str, torch.Tensor],
    optimizer_tensors: dict[str, torch.Tensor] | None,
    optimizer_rest: dict[str, Any] | None,
) -> None:
    """Put loaded values (filled into the templates from ``model_state`` / ``optimizer_state``) back."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, model_tensors, options=StateDictOptions(strict=False))
    if optimizer is not None and optimizer_tensors is not None:
        set_optimizer_state_dict(
            model,
            optimizer,
            {**optimizer_tensors, **(optimizer_rest or {})},
            options=StateDictOptions(flatten_optimizer_state_dict=True),
        )


__all__ = [
    "ShardingSummary",
    "accelerate_without_fsdp_plugin",
    "apply_fsdp",
    "decoder_layers",
    "is_fsdp",
    "load_states",
    "local_tensor",
    "model_state",
    "optimizer_state",
    "resolve_strategy",
    "without_gradient_sync",
]
