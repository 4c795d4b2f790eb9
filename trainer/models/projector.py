"""Projectors: vision features F [.., D] -> visual tokens V [.., d] in the LLM's input-embedding space.

``build_projector(name, in_dim, out_dim)`` looks the name up in ``PROJECTORS``. ``reverse=True`` builds the
mirrored module used by distillation's reverse projector r (LLM width back to an encoder width): the same
architecture with the dimensions mirrored, called as
``build_projector(name, in_dim=d, out_dim=D, reverse=True)``.

Modules are plain ``nn.Sequential``/``nn.Linear`` with LLaVA's layout (``0`` = first Linear, ``2`` = second),
so the HF LLaVA export maps ``0 -> linear_1`` and ``2 -> linear_2`` directly.
Letters: D encoder feature width, d LLM width.
"""

from __future__ import annotations

from torch import nn

from visalign.registry import Registry

PROJECTORS: Registry = Registry("projector")


@PROJECTORS.register("linear")
def linear(in_dim: int, out_dim: int, reverse: bool = False) -> nn.Module:
    """One Linear(D, d) (LLaVA-1.0); mirrored it is Linear(d, D), i.e. the same call."""
    return nn.Linear(in_dim, out_dim)


@PROJECTORS.register("mlp2x_gelu")
def mlp2x_gelu(in_dim: int, out_dim: int, reverse: bool = False) -> nn.Module:
    """LLaVA-1.5: Linear(D, d) -> GELU -> Linear(d, d).

    Mirrored (in=d, out=D): Linear(d, d) -> GELU -> Linear(d, D). The mirror keeps the square layer on the
    LLM side, as the forward projector has it.
    """
    if reverse:
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def build_projector(name: str, in_dim: int, out_dim: int, reverse: bool = False) -> nn.Module:
    """Build projector ``name`` mapping width ``in_dim`` to ``out_dim``; unknown names list the valid ones."""
    factory = PROJECTORS[name]  # raises UnknownNameError listing valid names
    if int(in_dim) <= 0 or int(out_dim) <= 0:
        raise ValueError(
            f"projector {name!r}: in_dim and out_dim must be positive, got {in_dim} and {out_dim}"
        )
    return factory(int(in_dim), int(out_dim), reverse=reverse)
