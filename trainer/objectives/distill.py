"""``distill``: visual-token self-distillation through a reverse projector (Bao et al., Meta).

A reverse projector r (the projector's architecture, widths mirrored: ``build_projector(..., reverse=True)``)
maps the LLM's visual tokens after layer n, H_n, back into a vision feature space, and a loss pulls the result
towards the cached features F of that space. One reverse projector per (layer, target):

    L_distill = 1/|layers| sum_{n in layers} sum_{e in targets} mean_{b,i} loss(r_{n,e}(H_n)_bi, F^e_bi)
    loss      = 1 - cos (paper)  |  mean over channels of the squared error ('mse', the paper's Table 7)

* ``targets``: ``native`` (the encoder whose features the projector reads, ``batch["feats_BPD"]``, target name
  ``encoder``), ``native+experts`` (and every expert in the manifest, ``batch["experts"][name]``: the paper's
  Eq. 7 sums over sources), or ``experts`` (the expert encoders only: Table 8's external-expert row).
* ``layer``: one layer (the paper; default the last) or several (ours: the losses are averaged over layers,
  so a one-item list is the paper's loss and alpha keeps its meaning; a sum would only rescale alpha).
* ``norm``: what "the output of the n-th layer" is for the last layer. ``pre`` (default, the paper's text) is
  the last decoder layer's output, the input of the LLM's final norm, caught by a hook in the same forward
  (``out.prenorm_BPd``); ``post`` is HF's ``hidden_states[L]``, which HF records *after* the final norm.
  Layers n < L are always the layer's own output (nothing normalises them).

Inputs: ``out.hidden_BLPd[n]`` / ``out.prenorm_BPd``, ``batch["feats_BPD"]``, ``batch["experts"]``. Output:
``distill_loss`` (weight alpha = 0.1), report ``distill/cos_<target>`` (mean cosine per target, and
``distill/mse_<target>`` with ``loss=mse``), with ``/l<n>`` appended when several layers are distilled.

An expert whose patch grid differs from the LLM's visual grid: by default its feature map is resized to the
LLM's grid (bilinear, ``align_corners=False``) so every visual token gets exactly one target per expert and
no gradient passes through the interpolation (``resize="target"``, our choice; the paper does not say).
``resize="prediction"`` instead resizes r_e(H_n) to the expert's grid, keeping the expert's features exact.

The reverse projectors are trained with the model and saved in checkpoints (``reverse.l<n>.<target>``), never
exported; a run started with ``--init-projector`` from an earlier run takes over that run's reverse
projectors for the same (layer, target) (``carry_reverse``), so stage 2 continues stage 1's.

Text-only samples (``has_image_B`` False) are left out of the means above. The reverse projectors still run
on every row, so a micro-batch without an image gives a zero attached to every reverse projector and, through
H_n, to the LLM and the projector (every rank syncs every gradient); its report items are 0.
Letters: B batch, P visual tokens (LLM grid), P_e expert patches, D/D_e feature widths, d LLM width.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainer.objectives.base import Needs, Objective, ObjectiveContext, StepContext, image_mask
from visalign.config import ConfigError

log = logging.getLogger(__name__)

ENCODER_TARGET = "encoder"
"""name of the main (native) encoder's target (its features are ``batch["feats_BPD"]``)"""
TARGETS = ("native", "native+experts", "experts")
LOSSES = ("cosine", "mse")


def cosine_loss(pred_BPD: torch.Tensor, target_BPD: torch.Tensor) -> torch.Tensor:
    """mean over all (sample, patch) of 1 - cos(pred, target); the target is a fixed teacher (detached)."""
    cos_BP = F.cosine_similarity(pred_BPD.float(), target_BPD.detach().float(), dim=-1, eps=1e-8)
    return (1.0 - cos_BP).mean()


def mse_loss(pred_BPD: torch.Tensor, target_BPD: torch.Tensor) -> torch.Tensor:
    """mean over all (sample, patch, channel) of (pred - target)^2 (torch's MSELoss); target detached."""
    return F.mse_loss(pred_BPD.float(), target_BPD.detach().float())


LOSS_FUNCTIONS = {"cosine": cosine_loss, "mse": mse_loss}


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


def _layer_key(layer: int) -> str:
    return f"l{layer}"


@dataclasses.dataclass
class DistillConfig:
    weight: float = 0.1
    """alpha, weight of L_distill (paper: 0.1, its best in the recipe ablation)"""
    layer: tuple[int, ...] = (-1,)
    """LLM layer(s) n whose visual hidden states are mapped back (H_n, 1-based as hidden_states[n]; -1 = the
    last layer, the paper's default; its Table 6 tries 7/14/21/28 of 28). Several (e.g. 15,30): one reverse
    projector per layer and target, losses averaged over the layers (ours)"""
    norm: Literal["pre", "post"] = "pre"
    """the last layer's state: 'pre' = the last decoder layer's output, before the LLM's final norm (the paper:
    "the output of the n-th layer"); 'post' = HF's hidden_states[L], after the final norm. Layers below the
    last are never normalised"""
    loss: Literal["cosine", "mse"] = "cosine"
    """'cosine' = 1 - cos (paper); 'mse' = mean squared error over channels (the paper's Table 7 ablation)"""
    targets: Literal["native", "native+experts", "experts"] = "native+experts"
    """feature spaces distilled into: the native encoder's, the native and every expert in the shards (losses
    summed, paper Eq. 7), or the experts only (the paper's Table 8 external-expert row)"""
    experts: bool | None = None
    """deprecated, use targets: false = 'native', true = 'native+experts'"""
    resize: Literal["target", "prediction"] = "target"
    """when an expert's patch grid differs from the LLM's: bilinearly resize the expert features to the LLM
    grid ('target') or the reverse-projected tokens to the expert grid ('prediction'). Our choice; the paper
    is silent"""
    carry_reverse: bool = True
    """with --init-projector RUN: start the reverse projectors from RUN's checkpoint (those it has for the
    same layer and target), so stage 2 continues stage 1's distillation; false = fresh ones. Ours"""


def resolve_targets(cfg: DistillConfig) -> str:
    """``targets`` with the deprecated ``experts`` switch folded in (a contradiction is an error)."""
    if cfg.targets not in TARGETS:
        raise ConfigError(f"distill.targets={cfg.targets!r}: expected one of {', '.join(TARGETS)}")
    if cfg.experts is None:
        return cfg.targets
    implied = "native+experts" if cfg.experts else "native"
    if cfg.targets not in (implied, "native+experts"):
        raise ConfigError(
            f"distill.experts={cfg.experts} contradicts distill.targets={cfg.targets}; drop distill.experts "
            "(deprecated) and set distill.targets"
        )
    return implied


def resolve_layers(layers: Any, num_llm_layers: int) -> tuple[int, ...]:
    """Configured layers -> 1-based layer numbers (-1 = the last), in the given order; errors name the fix."""
    given = (layers,) if isinstance(layers, int) else tuple(layers)
    if not given:
        raise ConfigError("distill.layer is empty: give at least one LLM layer (-1 = the last)")
    resolved = []
    for layer in given:
        n = num_llm_layers if int(layer) == -1 else int(layer)
        if not 1 <= n <= num_llm_layers:
            raise ConfigError(
                f"distill.layer={layer} but the LLM has layers 1..{num_llm_layers}; use -1 for the last"
            )
        if n in resolved:
            raise ConfigError(f"distill.layer lists layer {n} twice ({list(given)}); list each layer once")
        resolved.append(n)
    return tuple(resolved)


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

        if cfg.loss not in LOSSES:
            raise ConfigError(f"distill.loss={cfg.loss!r}: expected one of {', '.join(LOSSES)}")
        if cfg.norm not in ("pre", "post"):
            raise ConfigError(f"distill.norm={cfg.norm!r}: expected pre or post")
        if not targets:
            raise ConfigError("distill has no target to distil into; set distill.targets native")
        self.cfg = cfg
        self.num_llm_layers = num_llm_layers
        self.layers = resolve_layers(cfg.layer, num_llm_layers)
        self.loss_fn = LOSS_FUNCTIONS[cfg.loss]
        self.grid_hw = tuple(grid_hw) if grid_hw else None
        self.target_grids = {name: (tuple(g) if g else None) for name, (_, g) in targets.items()}
        self.reverse = nn.ModuleDict(
            {
                _layer_key(layer): nn.ModuleDict(
                    {
                        _module_key(name): build_projector(
                            projector, in_dim=llm_width, out_dim=width, reverse=True
                        )
                        for name, (width, _) in targets.items()
                    }
                )
                for layer in self.layers
            }
        )
        self.prenorm_last = cfg.norm == "pre" and num_llm_layers in self.layers
        hidden = tuple(sorted(n for n in self.layers if not (self.prenorm_last and n == num_llm_layers)))
        self.needs = Needs(hidden_layers=hidden, final_norm_input=self.prenorm_last)

    @classmethod
    def build(cls, cfg: DistillConfig, ctx: ObjectiveContext) -> DistillObjective:
        targets_mode = resolve_targets(cfg)
        manifest = ctx.manifest
        grid = tuple(manifest.encoder.patch_grid) if manifest is not None else None
        targets: dict[str, tuple[int, tuple[int, int] | None]] = {}
        if targets_mode != "experts":
            targets[ENCODER_TARGET] = (int(ctx.feature_dim), grid)
        experts = list(manifest.experts) if manifest is not None else []
        if targets_mode != "native":
            for expert in experts:
                if expert.name == ENCODER_TARGET:
                    raise ConfigError(f"an expert may not be called {ENCODER_TARGET!r}: the name is reserved")
                targets[expert.name] = (int(expert.feature_dim), tuple(expert.patch_grid))
        if targets_mode == "experts" and not experts:
            raise ConfigError(
                "distill.targets=experts but the shards carry no expert features (manifest 'experts' is "
                "empty): label with an expert encoder, or use distill.targets native+experts"
            )
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

    # -----------------------------------------------------------------------------------------------------
    def states(self, out: Any) -> dict[int, torch.Tensor]:
        """``{n: H_n at the visual positions [B, P, d]}`` as configured (the last layer pre or post norm)."""
        found = {}
        for layer in self.layers:
            if self.prenorm_last and layer == self.num_llm_layers:
                found[layer] = out.prenorm_BPd
            else:
                found[layer] = out.hidden_BLPd[layer]
        return found

    def _suffix(self, layer: int) -> str:
        # names stay those of the paper's one-layer form; a layer suffix only when several are distilled
        return f"/l{layer}" if len(self.layers) > 1 else ""

    def pairs(
        self, batch: dict[str, Any], out: Any
    ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """``{(layer, target): (prediction, target features)}`` on a common grid (after the configured
        resizing)."""
        experts = batch.get("experts") or {}
        found = {}
        for layer, h_BPd in self.states(out).items():
            num_patches = h_BPd.shape[1]
            grid_hw = self.grid_hw or square_grid(num_patches)
            reverse = self.reverse[_layer_key(layer)]
            for name, grid_e in self.target_grids.items():
                if name == ENCODER_TARGET:
                    target_BPD = batch["feats_BPD"]
                elif name in experts:
                    target_BPD = experts[name]
                else:
                    raise KeyError(
                        f"distill: the batch has no features for expert {name!r} (have {sorted(experts)})"
                    )
                head = reverse[_module_key(name)]
                # frozen LLM weights may be stored in bf16 (--model.dtype) while the reverse projector trains in fp32
                pred_BPD = head(h_BPd.to(next(head.parameters()).dtype))
                if target_BPD.shape[1] != num_patches or (grid_e and tuple(grid_e) != tuple(grid_hw)):
                    grid_e = grid_e or square_grid(target_BPD.shape[1])
                    if self.cfg.resize == "target":
                        target_BPD = resize_tokens(target_BPD, grid_e, grid_hw)
                    else:
                        pred_BPD = resize_tokens(pred_BPD, grid_hw, grid_e)
                found[(layer, name)] = (pred_BPD, target_BPD)
        return found

    def forward(
        self, batch: dict[str, Any], out: Any, step: StepContext
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        report: dict[str, float] = {}
        pairs = self.pairs(batch, out)
        first_BPD = next(iter(pairs.values()))[0]
        image_B = image_mask(batch, first_BPD.shape[0], first_BPD.device)
        per_layer: dict[int, torch.Tensor] = {}
        if not bool(image_B.any()):
            for (layer, name), (pred_BPD, _) in pairs.items():
                report[f"distill/cos_{name}{self._suffix(layer)}"] = 0.0
                if self.cfg.loss == "mse":
                    report[f"distill/mse_{name}{self._suffix(layer)}"] = 0.0
                zero = pred_BPD.sum() * 0.0
                per_layer[layer] = zero if layer not in per_layer else per_layer[layer] + zero
        else:
            for (layer, name), (pred_BPD, target_BPD) in pairs.items():
                if not bool(image_B.all()):
                    pred_BPD, target_BPD = pred_BPD[image_B], target_BPD[image_B]
                loss = self.loss_fn(pred_BPD, target_BPD)
                suffix = self._suffix(layer)
                if self.cfg.loss == "cosine":
                    report[f"distill/cos_{name}{suffix}"] = 1.0 - float(loss.detach())
                else:
                    report[f"distill/cos_{name}{suffix}"] = 1.0 - float(
                        cosine_loss(pred_BPD.detach(), target_BPD)
                    )
                    report[f"distill/mse_{name}{suffix}"] = float(loss.detach())
                per_layer[layer] = loss if layer not in per_layer else per_layer[layer] + loss
        total = sum(per_layer.values()) / len(per_layer)
        return {"distill_loss": total}, report

    def eval_measures(self, batch: dict[str, Any], out: Any) -> dict[str, tuple[float, float]]:
        """Per (layer, target): the mean cosine between reverse-projected visual tokens and the target's
        features (``reverse_cos/<target>``, ``/l<n>`` appended with several layers), and with ``loss=mse`` the
        mean squared error (``reverse_mse/<target>``), weighted by the (sample, patch) pairs measured (image
        samples only)."""
        measures = {}
        pairs = self.pairs(batch, out)
        first_BPD = next(iter(pairs.values()))[0]
        image_B = image_mask(batch, first_BPD.shape[0], first_BPD.device)
        if not bool(image_B.any()):
            return measures
        for (layer, name), (pred_BPD, target_BPD) in pairs.items():
            pred_BPD, target_BPD = pred_BPD[image_B], target_BPD[image_B]
            weight = float(pred_BPD.shape[0] * pred_BPD.shape[1])
            suffix = self._suffix(layer)
            measures[f"reverse_cos/{name}{suffix}"] = (1.0 - float(cosine_loss(pred_BPD, target_BPD)), weight)
            if self.cfg.loss == "mse":
                measures[f"reverse_mse/{name}{suffix}"] = (float(mse_loss(pred_BPD, target_BPD)), weight)
        return measures

    def carry_over(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load the reverse projectors ``state`` (an earlier run's distill tensors) has for this run's (layer,
        target) pairs; the others keep their fresh initialisation (logged). Returns the carried module names."""
        if not self.cfg.carry_reverse:
            return []
        carried, fresh = [], []
        for layer_key, per_target in self.reverse.items():
            for target_key, module in per_target.items():
                prefix = f"reverse.{layer_key}.{target_key}."
                found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                name = f"{layer_key}.{target_key}"
                if not found:
                    fresh.append(name)
                    continue
                own = module.state_dict()
                if set(found) != set(own) or any(found[k].shape != own[k].shape for k in own):
                    raise ConfigError(
                        f"the reverse projector {name} of --init-projector has other shapes than this run's "
                        "(another projector or feature width): pass --objectives.distill.carry-reverse false"
                    )
                module.load_state_dict(found, strict=True)
                carried.append(name)
        if carried:
            log.info("distill: reverse projectors %s carried over from --init-projector", ", ".join(carried))
        if fresh:
            log.warning(
                "distill: --init-projector holds no reverse projector for %s; they start fresh",
                ", ".join(fresh),
            )
        return carried
