"""Experts from any HF vision backbone (``--experts hf:<folder or hub id>``): per-patch features only.

Input: a folder written with ``save_pretrained`` holding the model (``config.json`` + weights) and its image
processor (``preprocessor_config.json``), or a hub id found in the HF cache (``HF_HUB_OFFLINE=1`` is
honoured: nothing is downloaded when it is set). Loaded with ``AutoModel`` and ``AutoImageProcessor``, both
with ``trust_remote_code=False``: a backbone that needs remote code is refused.

Output (``forward``): ``feats_BPD`` = ``hidden_states[feature_layer]`` of the backbone's image tower (HF
indexing: 0 = embeddings, -1 = last block; before any final norm), patch tokens only, row-major on the
backbone's own grid. Tokens in front of the patches are dropped: the class token and, for DINOv2 with
registers and DINOv3, the register tokens (``[CLS, registers..., patches...]``). SAM's ViT has no token
sequence (its hidden states are ``[B, h, w, C]`` maps of the windowed ViT): those are flattened row-major;
its neck (a convolution to the mask decoder's 256 channels, for prompts) is not used.

Preprocessing is the backbone's own image processor (PIL backend where transformers has one: it reproduces
the original PIL recipe exactly and is thread-safe; the torchvision one otherwise), after the run's aspect
step (``pad``: centred on a square of the processor's mean colour; ``resize``: squashed to a square of the
long side). Its output size must not depend on the image (one grid per expert in the manifest); the grid is
read from the processed pixels and the patch size, not from ``config.image_size`` (DINOv2's config says 518
while its processor crops 224).

Supported ``model_type`` s (``LAYOUTS``): ViT-style token sequences whose prefix length the config states,
and SAM's ViT. Anything else (a ConvNet, a model without patch tokens) is refused with a message.

Letters: B batch, T tokens, P patches, D width, H/W pixels.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from pipeline.encoders.base import EncoderError, EncoderOutput
from visalign.hashing import fingerprint_of, hf_identity_config
from visalign.images import ASPECTS, expand_to_square, mean_color

HF_PREFIX = "hf:"


def _registers(config) -> int:
    return int(getattr(config, "num_register_tokens", 0) or 0)


# model_type -> tokens in front of the patches (from the vision config), or None for a [B, h, w, C] map
LAYOUTS: dict[str, Any] = {
    "dinov2": lambda c: 1,
    "dinov2_with_registers": lambda c: 1 + _registers(c),
    "dinov3_vit": lambda c: 1 + _registers(c),
    "vit": lambda c: 1,
    "ijepa": lambda c: 0,
    "clip": lambda c: 1,
    "clip_vision_model": lambda c: 1,
    "siglip": lambda c: 0,
    "siglip_vision_model": lambda c: 0,
    "sam": None,
    "sam_vision_model": None,
}
SPATIAL = ("sam", "sam_vision_model")


def _looks_local(target: str) -> bool:
    return target.startswith(("/", ".", "~")) or Path(target).expanduser().exists()


def _json_safe(data: Any) -> Any:
    return json.loads(json.dumps(data, sort_keys=True, default=str))


@dataclasses.dataclass(frozen=True)
class ProcessorPreprocess:
    """PIL image -> ``[3, H, W]`` pixels: the run's aspect step, then the backbone's own image processor.

    Duck-types ``visalign.images.Preprocess`` where the labelling stage uses it (``with_aspect``,
    ``to_dict``, calling it on an image)."""

    processor: Any
    aspect: str = "crop"
    pad_color: tuple[int, int, int] | None = None

    def with_aspect(self, aspect: str) -> ProcessorPreprocess:
        if aspect not in ASPECTS:
            raise ValueError(f"aspect {aspect!r}: use one of {list(ASPECTS)}")
        mean = getattr(self.processor, "image_mean", None) or (0.0, 0.0, 0.0)
        color = mean_color(tuple(float(x) for x in mean)) if aspect == "pad" else None  # type: ignore[arg-type]
        return dataclasses.replace(self, aspect=aspect, pad_color=color)

    def square(self, image: Image.Image) -> Image.Image:
        """The image after the aspect step, before the processor."""
        image = image.convert("RGB")
        if self.aspect == "pad":
            return expand_to_square(image, self.pad_color)  # type: ignore[arg-type]
        if self.aspect == "resize" and image.size[0] != image.size[1]:
            side = max(image.size)
            return image.resize((side, side), Image.Resampling.BICUBIC)
        return image

    def __call__(self, image: Image.Image) -> Tensor:
        pixels = self.processor(images=self.square(image), return_tensors="pt")["pixel_values"]
        return pixels[0].float()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "hf-image-processor",
            "class": type(self.processor).__name__,
            "config": _json_safe(self.processor.to_dict()),
            "aspect": self.aspect,
            "pad_color": list(self.pad_color) if self.pad_color is not None else None,
        }


class HFBackbone(nn.Module):
    """A frozen HF image backbone whose forward gives per-patch features (no joint space, no text).

    Same surface as a ``VisionEncoder`` where experts use one: ``preprocess_spec``, ``forward(pixels,
    feature_layer).feats_BPD``, ``fingerprint()``, ``expert_info(feature_layer)``."""

    backend = "hf"

    def __init__(self, name: str, target: str):
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        self.name = name
        where = f"expert {HF_PREFIX}{target}"
        local = _looks_local(target)
        source = str(Path(target).expanduser().resolve()) if local else target
        if local and not Path(source).is_dir():
            raise EncoderError(
                f"{where}: {source} does not exist; pass a folder written with save_pretrained (model "
                "and its preprocessor_config.json) or a hub id in the HF cache"
            )
        if local and not (Path(source) / "config.json").is_file():
            raise EncoderError(f"{where}: {source} has no config.json; it is not an HF model folder")
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        except OSError as err:
            raise EncoderError(
                f"{where}: not a local folder and not in the HF cache ({_first_line(err)}); download it on "
                f"a machine with network (`huggingface-cli download {target}`) or pass a local folder"
            ) from None
        except ValueError as err:  # an unknown model_type whose code lives in the repository
            raise EncoderError(
                f"{where}: transformers cannot build it without remote code, which is never run "
                f"({_first_line(err)}); use a backbone transformers implements"
            ) from None
        model_type = str(config.model_type)
        if model_type not in LAYOUTS:
            raise EncoderError(
                f"{where}: model_type {model_type!r} has no patch tokens this pipeline can take (a ViT "
                f"token sequence or SAM's ViT map); supported: {', '.join(sorted(LAYOUTS))}"
            )
        try:
            processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=False, backend="pil")
        except (ValueError, KeyError, ImportError):  # no PIL implementation for this processor
            processor = None
        except OSError:
            raise EncoderError(
                f"{where}: no image processor (preprocessor_config.json) next to the model; save the "
                "backbone's processor with it (processor.save_pretrained(folder))"
            ) from None
        if processor is None:
            processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=False)
        model = AutoModel.from_pretrained(source, dtype=torch.float32, trust_remote_code=False)
        self.model = model.eval().requires_grad_(False)
        # the image tower of two-tower models (CLIP, SigLIP) and of SAM; the model itself otherwise
        self.tower = getattr(model, "vision_model", None) or getattr(model, "vision_encoder", None) or model
        self.processor = processor
        self.model_type = model_type
        self.path = source
        self.target = target
        vision_config = getattr(model.config, "vision_config", None) or model.config
        patch = getattr(vision_config, "patch_size", None)
        if patch is None:
            raise EncoderError(f"{where}: its config has no patch_size; it has no patch tokens")
        self.patch_hw = (int(patch), int(patch)) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
        self.spatial = model_type in SPATIAL
        self.num_prefix = 0 if self.spatial else int(LAYOUTS[model_type](vision_config))
        self.preprocess_spec = ProcessorPreprocess(processor)
        self._probe(where)
        self._fingerprint = fingerprint_of(
            {
                "backend": "hf-backbone",
                "config": hf_identity_config(model.config.to_dict()),
                "processor": [type(processor).__name__, _json_safe(processor.to_dict())],
            },
            self.model.state_dict(),
        )

    def _probe(self, where: str) -> None:
        """Pixel size, grid, width and depth from two blank images of other aspects: the processor's output
        must not depend on the image, and the token count must be prefix + grid."""
        shapes = {tuple(self.preprocess_spec(Image.new("RGB", size, (127, 127, 127))).shape) for size in
                  ((96, 48), (48, 96))}  # fmt: skip
        if len(shapes) != 1:
            raise EncoderError(
                f"{where}: its image processor gives pixels of a size that depends on the image "
                f"({sorted(shapes)}); the manifest holds one grid per expert: use a fixed-size processor"
            )
        (shape,) = shapes
        if len(shape) != 3 or shape[1] % self.patch_hw[0] or shape[2] % self.patch_hw[1]:
            raise EncoderError(
                f"{where}: processed pixels {list(shape)} are not whole patches of {self.patch_hw}"
            )
        self.pixel_shape = shape
        with torch.no_grad():
            states = self._states(torch.zeros(1, *shape))
        self.num_layers = len(states) - 1
        grid = (shape[1] // self.patch_hw[0], shape[2] // self.patch_hw[1])
        last = states[-1]
        if self.spatial:
            grid = (int(last.shape[1]), int(last.shape[2]))
            self.feature_dim = int(last.shape[-1])
        else:
            if last.ndim != 3:
                raise EncoderError(
                    f"{where}: hidden states of shape {list(last.shape)} are not a token sequence"
                )
            found = int(last.shape[1]) - grid[0] * grid[1]
            if found != self.num_prefix:
                raise EncoderError(
                    f"{where}: {last.shape[1]} tokens for a {grid[0]} x {grid[1]} patch grid means {found} "
                    f"tokens before the patches, but its config says {self.num_prefix}"
                )
            self.feature_dim = int(last.shape[-1])
        self.patch_grid = grid
        self.image_size = int(max(shape[1], shape[2]))

    def _states(self, pixels_BCHW: Tensor) -> tuple[Tensor, ...]:
        out = self.tower(pixel_values=pixels_BCHW, output_hidden_states=True)
        states = getattr(out, "hidden_states", None)
        if not states:
            raise EncoderError(f"expert {self.name}: the backbone returns no hidden_states")
        return tuple(states)

    def check_feature_layer(self, feature_layer: int) -> int:
        num_states = self.num_layers + 1
        if not -num_states <= feature_layer < num_states:
            raise EncoderError(
                f"--expert-feature-layer {feature_layer} is outside the {num_states} hidden states of expert "
                f"{self.name} ({self.num_layers} layers): use -{num_states}..{num_states - 1}"
            )
        return feature_layer

    def forward(self, pixels_BCHW: Tensor, feature_layer: int = -2) -> EncoderOutput:
        self.check_feature_layer(feature_layer)
        if tuple(pixels_BCHW.shape[1:]) != self.pixel_shape:
            raise ValueError(
                f"pixels must be [B, {', '.join(map(str, self.pixel_shape))}] for expert {self.name}, got "
                f"{list(pixels_BCHW.shape)}: build them with its preprocess"
            )
        dtype = next(self.model.parameters()).dtype
        state = self._states(pixels_BCHW.to(dtype))[feature_layer]
        if self.spatial:
            feats_BPD = state.flatten(1, 2)  # [B, h, w, C] -> row-major [B, h*w, C]
        else:
            feats_BPD = state[:, self.num_prefix :]
        return EncoderOutput(feats_BPD=feats_BPD, joint_BPE=None)

    def fingerprint(self, refresh: bool = False) -> str:
        return self._fingerprint

    def expert_info(self, feature_layer: int, aspect: str = "crop") -> dict[str, Any]:
        """The manifest's ``ExpertInfo`` fields (minus the name)."""
        self.check_feature_layer(feature_layer)
        return {
            "backend": self.backend,
            "fingerprint": self.fingerprint(),
            "feature_layer": int(feature_layer),
            "patch_grid": [int(self.patch_grid[0]), int(self.patch_grid[1])],
            "feature_dim": int(self.feature_dim),
            "path": self.path,
            "preprocess": self.preprocess_spec.with_aspect(aspect).to_dict(),
            "model_type": self.model_type,
            "prefix_tokens": int(self.num_prefix),
        }


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return re.sub(r"\s+", " ", text[0]) if text else type(err).__name__
