"""The vision tower as the trainer sees it: an HF CLIP/SigLIP checkpoint, checked against the shards' manifest.

The pipeline labelled the shards with a tower whose identity (name, backend, path or hub id, fingerprint) and
preprocessing the manifest records. The trainer needs that tower again to hand it on (``trainer export``
places it in the HF LLaVA folder) and, with ``--model.vision.mode frozen|train``, to compute the projector's
input online from the shards' stored images (``VisionTower``). Either runs anywhere the tower's weights can
be found:

* ``locate_tower(encoder, path)``: where the weights are: ``path`` (``--encoder-path``) if given, else the
  folder the manifest records if it exists on this machine, else the hub id it records (through the HF cache
  when offline). A recorded local folder that is gone is refused with a message naming ``--encoder-path``.
* ``load_tower``: loads it with transformers alone (no ``pipeline`` import, no Dask, no open_clip),
  recomputes the fingerprint exactly as the pipeline does (``visalign.hashing.hf_fingerprint``, the same in
  transformers 4.57 and 5.x) and refuses a different tower.
* ``llava_vision_state``: its vision weights under the key names a ``LlavaForConditionalGeneration`` of the
  running transformers version holds in memory (tests; the export writes the portable on-disk names).
* ``image_processor_config``: the ``preprocessor_config.json`` of an HF ``LlavaImageProcessor`` that repeats
  the manifest's preprocessing (resize, crop or pad to square, mean/std), with the gaps it cannot close.
* ``VisionTower`` / ``build_vision_tower``: the part of the tower that the LLaVA features depend on
  (embeddings, CLIP's pre-norm, the blocks up to ``feature_layer``), as a trainable module whose
  ``features(pixels_BCHW, image_B)`` equals the pipeline's ``feat.npy`` computation: HF
  ``hidden_states[feature_layer]`` with the prefix tokens dropped (CLIP: the CLS token; SigLIP: none).
  ``require_stored_images`` refuses shards that carry no images.

Letters: B batch, I image rows of the batch, C channels, S square side, T tower tokens (prefix + patches),
P patches, D tower width.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from visalign.errors import VisalignError
from visalign.hashing import hf_fingerprint
from visalign.images import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD

log = logging.getLogger(__name__)

# LlavaForConditionalGeneration holds the tower as ``model.vision_tower`` (AutoModel of the vision config).
LLAVA_VISION_PREFIX = "model.vision_tower."
# vision config model_type -> (feature select strategy, tokens before the patches that the strategy drops)
VISION_TOWERS = {"clip_vision_model": ("default", 1), "siglip_vision_model": ("full", 0)}
MODEL_TYPES = ("clip", "siglip")
# PIL resampling filters by the names the manifest records
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
# owner/name as the hub spells repositories (a lone name is a legacy hub id too, but also a relative path)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class TowerError(VisalignError):
    """The tower the shards were labelled with cannot be found or is not the same one."""


def _is_local_path(where: str) -> bool:
    return where.startswith(("/", ".", "~", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", where))


def locate_tower(encoder: Any, path: str | None = None) -> str:
    """The folder (or, online, the hub id) holding the manifest's tower; refuses what cannot be loaded here."""
    if encoder.backend != "hf":
        raise TowerError(
            f"the shards were labelled with encoder {encoder.name!r} on the {encoder.backend!r} backend; "
            "HF LLaVA needs an HF vision tower: relabel with --backend hf and retrain to export"
        )
    if path is not None:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise TowerError(
                f"--encoder-path {path} is not an HF checkpoint folder (no config.json): point it at a copy "
                f"of the tower that labelled the shards ({encoder.name!r})"
            )
        return str(folder)
    recorded = encoder.path
    if not recorded:
        raise TowerError(
            f"the manifest records no location for encoder {encoder.name!r}: pass --encoder-path DIR "
            "(its HF folder; the fingerprint is checked)"
        )
    recorded = str(recorded)
    if Path(recorded).expanduser().exists():
        return str(Path(recorded).expanduser())
    if _is_local_path(recorded) or not _HUB_ID.match(recorded):
        raise TowerError(
            f"the shards were labelled with encoder {encoder.name!r} from {recorded}, which is not on this "
            "machine: pass --encoder-path DIR, a copy of that tower (its fingerprint is checked)"
        )
    from trainer.models.hub import resolve_hub_id

    return resolve_hub_id(recorded, f"encoder {encoder.name!r}: hub id", "pass --encoder-path DIR")


def load_tower(encoder: Any, path: str | None = None):
    """``(model, model_type, where)``: the full HF CLIP/SigLIP model (fp32, eval) of the manifest's
    ``encoder``; ``path`` overrides where it is read from.

    Refuses towers labelled through another backend (their weights are not an HF checkpoint), folders that
    are not CLIP/SigLIP, and any tower whose fingerprint differs from the one the shards record.
    """
    where = locate_tower(encoder, path)
    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(where, trust_remote_code=False).model_type
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TowerError(f"cannot read the config of encoder {encoder.name!r} at {where}: {first}") from err
    if model_type not in MODEL_TYPES:
        raise TowerError(f"{where} is not an HF CLIP or SigLIP checkpoint folder (model_type {model_type!r})")
    if model_type == "clip":
        from transformers import CLIPModel as model_cls
    else:
        from transformers import SiglipModel as model_cls
    try:
        model = model_cls.from_pretrained(where, dtype=torch.float32).eval().requires_grad_(False)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TowerError(
            f"cannot load the vision tower of encoder {encoder.name!r} from {where}: {first}"
        ) from err
    fingerprint = hf_fingerprint(model)
    # manifests written before the identity became version-independent record the older form
    if encoder.fingerprint not in (fingerprint, hf_fingerprint(model, portable=False)):
        raise TowerError(
            f"the tower at {where} has fingerprint {fingerprint[:12]}, but the shards were made with "
            f"{encoder.fingerprint[:12]}: point --encoder-path at the weights that labelled the shards"
        )
    return model, model_type, where


def vision_weights(model: Any) -> dict[str, torch.Tensor]:
    """The vision transformer's weights, keyed relative to it (``embeddings.*``, ``encoder.*``, ...), as both
    transformers versions name them inside ``CLIPModel.vision_model`` / ``SiglipModel.vision_model``."""
    return {k: v.detach() for k, v in model.vision_model.state_dict().items()}


def llava_vision_state(model: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(vision_config, state_dict)``: keys are the names the tower has inside a
    ``LlavaForConditionalGeneration`` of this transformers version, ready for ``load_state_dict``."""
    from transformers import AutoModel

    vision_config = model.config.vision_config
    ours = vision_weights(model)
    # transformers 5 flattened CLIPVisionModel (no ``vision_model.`` level in memory), 4.x has it: ask the
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
    return vision_config, {f"{LLAVA_VISION_PREFIX}{inner}{k}": v.clone() for k, v in ours.items()}


def tower_preprocess(where: str, model_type: str, image_size: int) -> dict[str, Any]:
    """The preprocessing of a schema-1 manifest (which did not record it), as the pipeline derived it: the
    tower folder's ``preprocessor_config.json`` (mean, std, resize mode), else the family's defaults."""
    settings: dict[str, Any] = {}
    proc_file = Path(where) / "preprocessor_config.json"
    if proc_file.is_file():
        settings = json.loads(proc_file.read_text())
    mean, std, mode = (
        (CLIP_MEAN, CLIP_STD, "shortest") if model_type == "clip" else (SIGLIP_MEAN, SIGLIP_STD, "squash")
    )
    if isinstance(settings.get("size"), dict):
        mode = "shortest" if "shortest_edge" in settings["size"] else "squash"
    return {
        "image_size": int(image_size),
        "mean": [float(x) for x in settings.get("image_mean", mean)],
        "std": [float(x) for x in settings.get("image_std", std)],
        "resize_mode": mode,
        "crop_rounding": "floor",
        "resample": "bicubic",
        "aspect": "crop",
    }


def image_processor_config(preprocess: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(preprocessor_config.json content, gaps)`` for an HF ``LlavaImageProcessor`` that repeats
    ``preprocess`` (the manifest's ``encoder.preprocess``).

    ``aspect: pad`` pads to a square first (LLaVA's ``expand2square``: centred, floor offsets), then resizes;
    ``resize`` / ``resize_mode: squash`` resizes straight to S x S; ``crop`` resizes the short side to S and
    centre-crops (floor offsets). ``gaps`` names what the HF processor cannot repeat exactly: a pad colour
    other than ``int(255 x mean)`` (the only one LlavaImageProcessor uses) and torchvision-style crop rounding.
    """
    size = int(preprocess["image_size"])
    mean = [float(x) for x in preprocess["mean"]]
    std = [float(x) for x in preprocess["std"]]
    aspect = preprocess.get("aspect") or "crop"
    if aspect not in ("crop", "pad", "resize"):
        raise TowerError(
            f"the manifest's preprocessing has aspect {aspect!r}; this version knows crop, pad, resize"
        )
    resample = str(preprocess.get("resample", "bicubic")).lower()
    if resample not in RESAMPLE:
        raise TowerError(
            f"the manifest's preprocessing resamples with {resample!r}; known: {sorted(RESAMPLE)}"
        )
    squash = aspect == "resize" or (aspect == "crop" and preprocess.get("resize_mode") == "squash")
    gaps = []
    if aspect == "pad":
        hf_colour = [int(m * 255) for m in mean]
        wanted = [int(c) for c in (preprocess.get("pad_color") or hf_colour)]
        if wanted != hf_colour:
            gaps.append(
                f"the shards padded non-square images with colour {wanted}; HF's LlavaImageProcessor pads with "
                f"int(255 x image_mean) = {hf_colour}, so padded borders differ"
            )
    if aspect == "crop" and not squash and preprocess.get("crop_rounding", "floor") != "floor":
        gaps.append(
            "the shards centre-cropped with rounded offsets (torchvision); HF's PIL processors floor them, "
            "a one-pixel shift for images whose excess is odd"
        )
    config = {
        "image_processor_type": "LlavaImageProcessor",
        "processor_class": "LlavaProcessor",
        "do_convert_rgb": True,
        "do_pad": aspect == "pad",
        "do_resize": True,
        "size": {"height": size, "width": size} if squash else {"shortest_edge": size},
        "resample": RESAMPLE[resample],
        "do_center_crop": not squash,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
    }
    return config, gaps


# ---------------------------------------------------------------------------------------------------------
# the tower online: --model.vision.mode frozen | train
# ---------------------------------------------------------------------------------------------------------

ONLINE_MODES = ("frozen", "train")


def require_stored_images(manifest: Any, shards: Any, mode: str) -> None:
    """Refuse shards without their images for an online tower (one line naming the fix)."""
    from visalign.shards import ShardFormatError

    if mode in ONLINE_MODES and not getattr(manifest, "stores_images", False):
        raise ShardFormatError(
            f"--model.vision.mode {mode} runs the tower on the shards' images, but {shards} was labelled "
            "without them: relabel with `pipeline label --store-images` (or use --model.vision.mode cached)"
        )
    if mode in ONLINE_MODES and not manifest.encoder.preprocess:
        raise ShardFormatError(
            f"{shards}: the manifest records no preprocessing (encoder.preprocess); relabel with this "
            "version's `pipeline label --store-images`"
        )


def _block_args(block: nn.Module) -> tuple[None, ...]:
    """The mask arguments of one encoder block called without masks: 4.x's CLIP block also takes a causal
    mask (and returns a tuple, 5.x the tensor)."""
    params = inspect.signature(block.forward).parameters
    return (None, None) if "causal_attention_mask" in params else (None,)


def _hidden(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class VisionTower(nn.Module):
    """The labelling tower's path to the LLaVA features, as a module of ``VisualLM`` (``vlm.vision``).

    Holds only what ``hidden_states[feature_layer]`` depends on: ``embeddings``, CLIP's ``pre_layrnorm``, and
    ``layers`` = the first ``n`` encoder blocks (``n`` = the index of the feature layer among the ``L + 1``
    hidden states). Blocks after it, the final norm and the heads never reach the features: kept out, they
    neither cost memory nor leave trainable parameters without gradients (which DDP would refuse). Parameter
    names are the HF ones below ``vision_model`` (``layers.i`` = ``encoder.layers.i``): ``hf_state``.

    ``tuned``: the weights train (mode ``train``), or were trained (a run's checkpoint). A frozen tower runs
    under ``no_grad``. The tower always computes in eval mode (CLIP and SigLIP have no dropout at their
    default settings, and eval mode is what labelled the shards and what an HF LLaVA runs).
    """

    def __init__(
        self,
        vision_model: nn.Module,
        model_type: str,
        feature_layer: int,
        tuned: bool = False,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise TowerError(f"the online tower must be CLIP or SigLIP, got model_type {model_type!r}")
        blocks = vision_model.encoder.layers
        num_states = len(blocks) + 1
        if not -num_states <= int(feature_layer) < num_states:
            raise TowerError(
                f"feature layer {feature_layer} is outside the tower's {num_states} hidden states"
            )
        self.num_used = int(feature_layer) % num_states
        self.feature_layer = int(feature_layer)
        self.model_type = model_type
        self.num_prefix = VISION_TOWERS[f"{model_type}_vision_model"][1]
        self.embeddings = vision_model.embeddings
        self.pre_layrnorm = getattr(vision_model, "pre_layrnorm", None)  # CLIP's, SigLIP has none
        self.layers = nn.ModuleList(list(blocks)[: self.num_used])
        self.block_args = _block_args(blocks[0])
        self.tuned = bool(tuned)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.requires_grad_(self.tuned)
        super().train(False)

    def train(self, mode: bool = True) -> VisionTower:
        return super().train(False)  # always eval: see the class docstring

    def forward(self, pixels_BCHW: Tensor) -> Tensor:
        """-> features ``[B, P, D]``: ``hidden_states[feature_layer]`` without the prefix tokens."""
        grad = contextlib.nullcontext() if self.tuned else torch.no_grad()
        with grad:
            dtype = self.embeddings.patch_embedding.weight.dtype
            hidden_BTD = self.embeddings(pixels_BCHW.to(dtype))
            if self.pre_layrnorm is not None:
                hidden_BTD = self.pre_layrnorm(hidden_BTD)
            recompute = self.gradient_checkpointing and torch.is_grad_enabled()
            for layer in self.layers:
                if recompute:
                    out = checkpoint(layer, hidden_BTD, *self.block_args, use_reentrant=False)
                else:
                    out = layer(hidden_BTD, *self.block_args)
                hidden_BTD = _hidden(out)
            return hidden_BTD[:, self.num_prefix :]

    def features(self, pixels_BCHW: Tensor, image_B: Tensor) -> Tensor:
        """Features of a dense batch ``[B, P, D]``: the tower runs on the image rows only, text-only rows get
        zeros. A batch without an image runs it on one (blank) row whose output is multiplied by zero, so
        every rank runs the same modules (FSDP gathers the tower's weights; DDP expects a gradient for every
        trainable one)."""
        num_batch = pixels_BCHW.shape[0]
        rows_I = image_B.to(pixels_BCHW.device).nonzero().squeeze(1)
        if rows_I.numel() == num_batch:
            return self(pixels_BCHW)
        if rows_I.numel() == 0:
            feats_1PD = self(pixels_BCHW[:1]) * 0
            return feats_1PD.expand(num_batch, -1, -1)
        feats_IPD = self(pixels_BCHW.index_select(0, rows_I))
        zeros_BPD = feats_IPD.new_zeros(num_batch, *feats_IPD.shape[1:])
        return zeros_BPD.index_copy(0, rows_I, feats_IPD)

    def hf_state(self) -> dict[str, Tensor]:
        """The weights under the names they have inside ``CLIPModel.vision_model`` /
        ``SiglipModel.vision_model`` (``vision_weights``): ``layers.i.*`` -> ``encoder.layers.i.*``."""
        return {
            (f"encoder.{name}" if name.startswith("layers.") else name): value.detach()
            for name, value in self.state_dict().items()
        }


def build_vision_tower(
    encoder: Any,
    tuned: bool,
    path: str | None = None,
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    num_patches: int | None = None,
) -> VisionTower:
    """The manifest's tower (``load_tower``: located, fingerprint-checked) cut to its feature path, in
    ``dtype`` (trainable weights stay float32)."""
    model, model_type, where = load_tower(encoder, path)
    tower = VisionTower(
        model.vision_model,
        model_type,
        int(encoder.feature_layer),
        tuned=tuned,
        gradient_checkpointing=gradient_checkpointing,
    )
    config = model.config.vision_config
    patches = (int(config.image_size) // int(config.patch_size)) ** 2
    if num_patches is not None and patches != num_patches:
        raise TowerError(
            f"the tower at {where} gives {patches} patches per image but the shards hold {num_patches}: "
            "point --model.vision.path at the weights that labelled the shards"
        )
    if not tuned:
        tower.to(dtype)
    del model  # the text tower, the heads and the blocks after the feature layer are released
    used = sum(p.numel() for p in tower.parameters())
    log.info(
        "vision tower %s from %s online (%s): hidden layer %d (%d of its blocks), %s parameters",
        encoder.name, where, "trained" if tuned else "frozen", tower.feature_layer, tower.num_used, f"{used:,}",
    )  # fmt: skip
    return tower
