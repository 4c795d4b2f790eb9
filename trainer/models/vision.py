"""The vision tower as the trainer sees it: an HF CLIP/SigLIP checkpoint, checked against the shards' manifest.

The pipeline labelled the shards with a tower whose identity (name, backend, path, fingerprint) the manifest
records. The trainer needs that tower again only to hand it on: ``trainer export`` places it in the HF LLaVA
folder. ``load_tower`` loads it with transformers alone (no ``pipeline`` import, no Dask, no open_clip),
recomputes the fingerprint exactly as the pipeline does (``visalign.hashing.hf_fingerprint``) and refuses a
different tower. ``llava_vision_state`` maps its vision weights onto ``LlavaForConditionalGeneration``'s keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from visalign.errors import VisalignError
from visalign.hashing import hf_fingerprint
from visalign.images import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD

# LlavaForConditionalGeneration holds the tower as ``model.vision_tower`` (AutoModel of the vision config).
LLAVA_VISION_PREFIX = "model.vision_tower."
# vision config model_type -> (feature select strategy, tokens before the patches that the strategy drops)
VISION_TOWERS = {"clip_vision_model": ("default", 1), "siglip_vision_model": ("full", 0)}
MODEL_TYPES = ("clip", "siglip")


class TowerError(VisalignError):
    """The tower the shards were labelled with cannot be found or is not the same one."""


def _model_type(path: str) -> str | None:
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text()).get("model_type")
    return None


def load_tower(encoder: Any, path: str | None = None):
    """The full HF CLIP/SigLIP model (fp32, eval) of the manifest's ``encoder``; ``path`` overrides where.

    Refuses towers labelled through another backend (their weights are not an HF checkpoint), folders that
    are not CLIP/SigLIP, and any tower whose fingerprint differs from the one the shards record.
    """
    if encoder.backend != "hf":
        raise TowerError(
            f"the shards were labelled with encoder {encoder.name!r} on the {encoder.backend!r} backend; "
            "HF LLaVA needs an HF vision tower: relabel with --backend hf and retrain to export"
        )
    where = path or encoder.path
    if not where:
        raise TowerError(f"the manifest records no location for encoder {encoder.name!r}: pass its HF folder")
    model_type = _model_type(where)
    if model_type is None and not Path(where).exists():
        model_type = "siglip" if "siglip" in str(encoder.name).lower() else "clip"  # a hub id (warm HF cache)
    if model_type not in MODEL_TYPES:
        raise TowerError(f"{where} is not an HF CLIP or SigLIP checkpoint folder (model_type {model_type!r})")
    if model_type == "clip":
        from transformers import CLIPModel as model_cls
    else:
        from transformers import SiglipModel as model_cls
    try:
        model = model_cls.from_pretrained(str(where), dtype=torch.float32).eval().requires_grad_(False)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TowerError(
            f"cannot load the vision tower of encoder {encoder.name!r} from {where}: {first}"
        ) from err
    fingerprint = hf_fingerprint(model)
    if fingerprint != encoder.fingerprint:
        raise TowerError(
            f"the tower at {where} has fingerprint {fingerprint[:12]}, but the shards were made with "
            f"{encoder.fingerprint[:12]}: point at the weights that labelled the shards"
        )
    return model, model_type, str(where)


def llava_vision_state(model: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(vision_config, state_dict)``: keys are the names the tower has inside a
    ``LlavaForConditionalGeneration`` of this transformers version, ready for ``load_state_dict``."""
    from transformers import AutoModel

    vision_config = model.config.vision_config
    ours = model.vision_model.state_dict()
    # transformers 5 flattened CLIPVisionModel (no ``vision_model.`` level in memory), 4.x had it: ask the
    # class LLaVA builds (on the meta device, no memory) which layout it uses.
    with torch.device("meta"):
        tower_keys = set(AutoModel.from_config(vision_config).state_dict())
    if tower_keys == set(ours):
        inner = ""
    elif tower_keys == {f"vision_model.{k}" for k in ours}:
        inner = "vision_model."
    else:
        raise RuntimeError(
            f"cannot map the vision tower onto the layout of {type(vision_config).__name__}'s model in this "
            "transformers version"
        )
    return vision_config, {f"{LLAVA_VISION_PREFIX}{inner}{k}": v.detach().clone() for k, v in ours.items()}


def image_processor(path: str, model_type: str, image_size: int):
    """The tower folder's own image processor, else the family's at ``image_size``."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        pass
    if model_type == "clip":
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=list(SIGLIP_MEAN),
        image_std=list(SIGLIP_STD),
    )
