"""Objective registry: ``--objective sea+distill`` -> the LM term plus each named auxiliary objective.

Every run optimises ``L = L_lm + sum_k weight_k * L_k``: the papers all add their term to the language-model
loss, so ``lm`` is always present and ``--objective lm`` is plain LLaVA training. Adding an objective = one
module (an ``Objective`` subclass with a ``Config`` dataclass and a ``build(cfg, ctx)`` classmethod) + one
entry in ``OBJECTIVES`` + a field in ``ObjectivesConfig`` + tests. Nothing in the loop changes.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from trainer.objectives.base import Needs, Objective, ObjectiveContext
from trainer.objectives.basic import BasicConfig, BasicObjective
from trainer.objectives.distill import DistillConfig, DistillObjective
from trainer.objectives.lm import LMConfig, LMObjective
from trainer.objectives.sea import SeaConfig, SeaObjective
from visalign.config import ConfigError
from visalign.registry import Registry

OBJECTIVES: Registry = Registry("objective")
OBJECTIVES["lm"] = LMObjective
OBJECTIVES["sea"] = SeaObjective
OBJECTIVES["basic"] = BasicObjective
OBJECTIVES["distill"] = DistillObjective


@dataclasses.dataclass
class ObjectivesConfig:
    """Per-objective settings; only the objectives named in ``--objective`` are built."""

    lm: LMConfig = dataclasses.field(default_factory=LMConfig)
    sea: SeaConfig = dataclasses.field(default_factory=SeaConfig)
    """SEA: contrast sampled patch tokens with their label words' LLM embeddings (objectives/sea.py)"""
    basic: BasicConfig = dataclasses.field(default_factory=BasicConfig)
    """BASIC: shallow LLM layers supervise the projector output (trainer/objectives/basic.py)"""
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    """reverse-projector self-distillation into the encoder (and expert) features (objectives/distill.py)"""


def parse_spec(spec: str) -> list[str]:
    """``"sea+distill"`` -> ``["lm", "sea", "distill"]`` (``lm`` always first, no duplicates)."""
    names = [n.strip() for n in spec.replace(",", "+").split("+") if n.strip()]
    if not names:
        raise ConfigError("--objective is empty; use e.g. 'lm', 'sea' or 'sea+basic+distill'")
    for name in names:
        OBJECTIVES[name]  # raises with the list of valid names
    return ["lm"] + [n for i, n in enumerate(names) if n != "lm" and n not in names[:i]]


def build_objectives(spec: str, cfg: ObjectivesConfig, ctx: ObjectiveContext) -> nn.ModuleDict:
    """Instantiate the objectives of ``spec``; their union of ``needs`` tells the model what to compute."""
    return nn.ModuleDict({name: OBJECTIVES[name].build(getattr(cfg, name), ctx) for name in parse_spec(spec)})


def union_needs(objectives: nn.ModuleDict) -> Needs:
    needs = Needs()
    for obj in objectives.values():
        needs = needs.union(obj.needs)
    return needs


def objective_weights(cfg: ObjectivesConfig, names: list[str]) -> dict[str, float]:
    """``{"<loss key>": weight}`` for every ``*_loss`` key the named objectives return."""
    weights: dict[str, float] = {}
    for name in names:
        weights.update(OBJECTIVES[name].loss_weights(getattr(cfg, name)))
    return weights


__all__ = [
    "OBJECTIVES",
    "BasicConfig",
    "DistillConfig",
    "LMConfig",
    "SeaConfig",
    "Needs",
    "Objective",
    "ObjectiveContext",
    "ObjectivesConfig",
    "build_objectives",
    "objective_weights",
    "parse_spec",
    "union_needs",
]
