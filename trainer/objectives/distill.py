"""``distill``: visual-token self-distillation through a reverse projector (Bao et al., Meta).

A reverse projector r (the projector's architecture, widths mirrored: ``build_projector(..., reverse=True)``)
maps the LLM's hidden states at the visual positions H_n (default: the last layer) back into a vision feature
space; the loss is ``mean_i (1 - cos(r(H_n)_i, F_i))`` against the cached features F. With expert encoders in
the shards (``batch["experts"][name]``), one reverse projector per target and the losses are summed:

    L_distill = sum_{e in {encoder} + experts} mean_{b,i} (1 - cos(r_e(H_n)_bi, F^e_bi))

Inputs: ``out.hidden_BLPd[n]``, ``batch["feats_BPD"]``, ``batch["experts"]``. Output: ``distill_loss``
(weight alpha = 0.1), report ``distill/cos_<target>`` (mean cosine per target).

An expert whose patch grid differs from the LLM's visual grid: by default its feature map is resized to the
LLM's grid (bilinear, ``align_corners=False``) so every visual token gets exactly one target per expert and
no gradient passes through the interpolation (``resize="target"``, our choice; the paper does not say).
``resize="prediction"`` instead resizes r_e(H_n) to the expert's grid, keeping the expert's features exact.

The reverse projectors are trained with the model and saved in checkpoints, never exported.

Text-only samples (``has_image_B`` False) are left out of the means above. The reverse projectors still run
on every row, so a micro-batch without an image gives a zero attached to every reverse projector and, through
H_n, to the LLM and the projector (every rank syncs every gradient); its report items are 0.
Letters: B batch, P visual tokens (LLM grid), P_e expert patches, D/D_e feature widths, d LLM width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainer.objectives.base import Needs, Objective, ObjectiveContext, StepContext, image_mask
from visalign.config import ConfigError

ENCODER_TARGET = "encoder"
"""name of the main encoder's target (its features are ``batch["feats_BPD"]``)"""


def cosine_loss(pred_BPD: torch.Tensor, target_BPD: torch.Tensor) -> torch.Tensor:
    """mean over all (sample, patch) of 1 - cos(pred, target); the target is a fixed teacher (detached)."""
    cos_BP = F.cosine_similarity(pred_BPD.float(), target_BPD.detach().float(), dim=-1, eps=1e-8)
    return (1.0 - cos_BP).mean()


def resize_tokens(x_BPD: torch.Tensor, grid_hw: tuple[int, int], new_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a row-major token grid [B, h*w, D] -> [B, h'*w', D]."""
    num_batch, _, width = x_BPD.shape
    if tuple(grid_hw) == tuple(new_hw):
        return x_BPD
    x_BDhw = x_BPD.transpose(1, 2).reshape(num_batch, width, *grid_hw)
    y_BDhw = F.interpolate(x_BDhw.float(), size=tuple(new_hw), mode="bilinear", align_corners=False)
    return y_BDhw.reshape(num_batch, width, -1).transpose(1, 2).to(x_BPD.dtype)


def square_grid(num_patches: int) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches are not a square grid; the manifest must give patch_grid")
    return side, side


def _module_key(name: str) -> str:
    # nn.ModuleDict keys may not contain dots; expert names are free-form
    return name.replace(".", "_")


@dataclasses.dataclass
class DistillConfig:
    weight: float = 0.1
    """alpha, weight of L_distill (paper: 0.1, its best in the recipe ablation)"""
    layer: int = -1
    """LLM layer n whose visual hidden states are mapped back (H_n, 1-based as hidden_states[n]); -1 = the
    last layer (paper default)"""
    experts: bool = True
    """also distil into every expert encoder the shards carry (one reverse projector each, losses summed)"""
    resize: Literal["target", "prediction"] = "target"
    """when an expert's patch grid differs from the LLM's: bilinearly resize the expert features to the LLM
    grid ('target') or the reverse-projected tokens to the expert grid ('prediction'). Our choice; the paper
    is silent"""


class DistillObjective(Objective):
    name = "distill"

    def __init__(
        self,
        cfg: DistillConfig,
        projector: str,
        llm_width: int,
        num_llm_layers: int,
        targets: dict[str, tuple[int, tuple[int, int] | None]],
        grid_hw: tuple[int, int] | None,
    ) -> None:
        """``targets``: {name: (feature width, patch grid or None)}; the main encoder is ENCODER_TARGET."""
        super().__init__()
        from trainer.models.projector import build_projector

        self.cfg = cfg
        self.layer = num_llm_layers if cfg.layer == -1 else int(cfg.layer)
        if not 1 <= self.layer <= num_llm_layers:
            raise ConfigError(f"distill.layer={cfg.layer} but the LLM has {num_llm_layers} layers")
        self.grid_hw = tuple(grid_hw) if grid_hw else None
        self.target_grids = {name: (tuple(g) if g else None) for name, (_, g) in targets.items()}
        self.reverse = nn.ModuleDict(
            {
                _module_key(name): build_projector(projector, in_dim=llm_width, out_dim=width, reverse=True)
                for name, (width, _) in targets.items()
            }
        )
        self.needs = Needs(hidden_layers=(self.layer,))

    @classmethod
    def build(cls, cfg: DistillConfig, ctx: ObjectiveContext) -> DistillObjective:
        manifest = ctx.manifest
        grid = tuple(manifest.encoder.patch_grid) if manifest is not None else None
        targets: dict[str, tuple[int, tuple[int, int] | None]] = {
            ENCODER_TARGET: (int(ctx.feature_dim), grid)
        }
        if cfg.experts and manifest is not None:
            for expert in manifest.experts:
                if expert.name == ENCODER_TARGET:
                    raise ConfigError(f"an expert may not be called {ENCODER_TARGET!r}: the name is reserved")
                targets[expert.name] = (int(expert.feature_dim), tuple(expert.patch_grid))
        return cls(
            cfg,
            ctx.projector,
            int(ctx.llm_config.hidden_size),
            int(ctx.llm_config.num_hidden_layers),
            targets,
            grid,
        )

    @staticmethod
    def loss_weights(cfg: DistillConfig) -> dict[str, float]:
        return {"distill_loss": cfg.weight}

    def pairs(self, batch: dict[str, Any], out: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{target: (prediction, target features)}`` on a common grid (after the configured resizing)."""
        h_BPd = out.hidden_BLPd[self.layer]
        num_patches = h_BPd.shape[1]
        grid_hw = self.grid_hw or square_grid(num_patches)
        experts = batch.get("experts") or {}
        found = {}
        for name, grid_e in self.target_grids.items():
            if name == ENCODER_TARGET:
                target_BPD = batch["feats_BPD"]
            elif name in experts:
                target_BPD = experts[name]
            else:
                raise KeyError(
                    f"distill: the batch has no features for expert {name!r} (have {sorted(experts)})"
                )
            reverse = self.reverse[_module_key(name)]
            # frozen LLM weights may be stored in bf16 (--model.dtype) while the reverse projector trains in fp32
            pred_BPD = reverse(h_BPd.to(next(reverse.parameters()).dtype))
            if target_BPD.shape[1] != num_patches or (grid_e and tuple(grid_e) != tuple(grid_hw)):
                grid_e = grid_e or square_grid(target_BPD.shape[1])
                if self.cfg.resize == "target":
                    target_BPD = resize_tokens(target_BPD, grid_e, grid_hw)
                else:
                    pred_BPD = resize_tokens(pred_BPD, grid_hw, grid_e)
            found[name] = (pred_BPD, target_BPD)
        return found

    def forward(
        self, batch: dict[str, Any], out: Any, step: StepContext
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        total = None
        report: dict[str, float] = {}
        pairs = self.pairs(batch, out)
        image_B = image_mask(batch, out.hidden_BLPd[self.layer].shape[0], out.hidden_BLPd[self.layer].device)
        if not bool(image_B.any()):
            for name, (pred_BPD, _) in pairs.items():
                report[f"distill/cos_{name}"] = 0.0
                zero = pred_BPD.sum() * 0.0
                total = zero if total is None else total + zero
            return {"distill_loss": total}, report
        for name, (pred_BPD, target_BPD) in pairs.items():
            if not bool(image_B.all()):
                pred_BPD, target_BPD = pred_BPD[image_B], target_BPD[image_B]
            loss = cosine_loss(pred_BPD, target_BPD)
            report[f"distill/cos_{name}"] = 1.0 - float(loss.detach())
            total = loss if total is None else total + loss
        return {"distill_loss": total}, report

    def eval_measures(self, batch: dict[str, Any], out: Any) -> dict[str, tuple[float, float]]:
        """The mean cosine between reverse-projected visual tokens and each target's features, weighted by
        the number of (sample, patch) pairs it was measured on (image samples only)."""
        measures = {}
        image_B = image_mask(batch, out.hidden_BLPd[self.layer].shape[0], out.hidden_BLPd[self.layer].device)
        if not bool(image_B.any()):
            return measures
        for name, (pred_BPD, target_BPD) in self.pairs(batch, out).items():
            pred_BPD, target_BPD = pred_BPD[image_B], target_BPD[image_B]
            cos = 1.0 - float(cosine_loss(pred_BPD, target_BPD))
            measures[f"reverse_cos/{name}"] = (cos, float(pred_BPD.shape[0] * pred_BPD.shape[1]))
        return measures
