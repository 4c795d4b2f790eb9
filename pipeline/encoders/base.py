"""The vision-encoder interface shared by every backend, plus the pieces all backends reuse.

A ``VisionEncoder`` takes images and returns, from ONE forward of the vision tower, two per-patch outputs:

* ``feats_BPD``: the LLaVA input features, hidden states of layer ``feature_layer`` (HF ``hidden_states``
  indexing: 0 = embeddings after the pre-norm, -1 = last block, default -2 = second-to-last), patch tokens
  only;
* ``joint_BPE``: per-patch embeddings in the joint image-text space (not normalised), comparable with
  ``encode_text`` output for patch labelling.

Also here: ``Preprocess`` (PIL + numpy image -> normalised tensor, thread-safe, no model, reproducing the
backend's own processor), the weight fingerprint, the model cache location and the atomic build helper
used for tiny models.

Letters: B batch, C channels, H/W pixels, S square input side, P patches, D feature width, E joint width,
N texts.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from pipeline.shards import EncoderInfo

BACKENDS = ("hf", "open_clip")
DENSE_MODES = ("none", "maskclip")

# CLIP (OpenAI) and SigLIP normalisation constants, as in the HF / open_clip processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass
class EncoderOutput:
    feats_BPD: Tensor
    """hidden states of layer ``feature_layer``, patch tokens only (no CLS), in the model's dtype"""
    joint_BPE: Tensor
    """per-patch embeddings in the joint image-text space, not normalised"""


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Image -> ``[3, S, S]`` float32 tensor, the same arithmetic as the backend's own processor.

    Pure PIL + numpy so it runs in loader threads without the model (and without torchvision).
    ``resize_mode="shortest"``: bicubic resize of the short side to S, then a centre crop (CLIP);
    ``"squash"``: bicubic resize straight to S x S (SigLIP). The crop offset differs between the backends'
    processors when the excess is odd: HF floors ``(h - S) // 2``, torchvision rounds ``round((h - S) / 2)``.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    crop_rounding: str = "floor"

    def __post_init__(self):
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"Preprocess.resize_mode {self.resize_mode!r}: use 'shortest' or 'squash'")
        if self.crop_rounding not in ("floor", "round"):
            raise ValueError(f"Preprocess.crop_rounding {self.crop_rounding!r}: use 'floor' or 'round'")

    def __call__(self, image: Image.Image) -> Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess expects a PIL.Image.Image, got {type(image).__name__}")
        image = image.convert("RGB")
        size = self.image_size
        width, height = image.size
        if self.resize_mode == "squash":
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        else:
            # short side -> size, long side truncated, as both HF and torchvision compute it
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(size * long / short)
            new_w, new_h = (size, new_long) if width <= height else (new_long, size)
            if (new_w, new_h) != (width, height):
                image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
            if self.crop_rounding == "floor":
                top, left = (new_h - size) // 2, (new_w - size) // 2
            else:
                top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
        pixels_HWC = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        pixels_HWC = (pixels_HWC - mean) / std
        return torch.from_numpy(np.ascontiguousarray(pixels_HWC.transpose(2, 0, 1)))


def default_cache_dir() -> Path:
    """``$VISALIGN_CACHE`` or ``~/.cache/visalign``; tiny models live under ``<cache>/encoders/``."""
    env = os.environ.get("VISALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "visalign"


_COMPLETE = ".complete"


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` unless ``target`` already holds a finished build; publish it by rename.

    Two processes may build at once (Dask workers, parallel tests): each writes into its own temporary
    sibling folder and renames it into place; the loser of the rename race deletes its copy and uses the
    winner's. A folder without the ``.complete`` marker is a crashed build and is replaced.
    """
    target = Path(target)
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        (tmp / _COMPLETE).write_text("ok\n")
        if target.exists() and not (target / _COMPLETE).is_file():
            shutil.rmtree(target, ignore_errors=True)  # leftover of a crashed build
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def fingerprint_of(config: dict[str, Any], state_dict: dict[str, Tensor]) -> str:
    """sha256 over a JSON config and every tensor (name, dtype, shape, raw bytes), in sorted key order."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # a uint8 view hashes every dtype (bf16 included) without a numpy round trip of the values
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class VisionEncoder(nn.Module, abc.ABC):
    """A frozen vision tower (with its text tower) that yields LLaVA features and joint-space patches.

    Subclasses set the attributes below in ``__init__`` and implement ``forward``, ``encode_text``,
    ``_fingerprint_parts`` and (HF only) ``hf_llava_vision``.
    """

    name: str
    backend: str
    image_size: int
    patch_grid: tuple[int, int]
    feature_dim: int
    joint_dim: int
    num_layers: int
    path: str | None
    dense: str = "none"
    text_context: int | None = None
    preprocess_spec: Preprocess

    def __init__(self):
        super().__init__()
        self._fingerprint: str | None = None

    @property
    def num_patches(self) -> int:
        return int(self.patch_grid[0] * self.patch_grid[1])

    def preprocess(self, image: Image.Image) -> Tensor:
        """PIL image -> ``[3, S, S]`` float32, normalised exactly as the backend's processor (thread-safe)."""
        return self.preprocess_spec(image)

    def check_feature_layer(self, feature_layer: int) -> int:
        """Validate an HF-style hidden-state index (``num_layers + 1`` states) and return it unchanged."""
        num_states = self.num_layers + 1
        if not -num_states <= feature_layer < num_states:
            raise ValueError(
                f"feature_layer={feature_layer} is outside the {num_states} hidden states of {self.name} "
                f"({self.num_layers} layers): use -{num_states}..{num_states - 1} (LLaVA uses -2)"
            )
        return feature_layer

    def check_pixels(self, pixels_BCHW: Tensor) -> None:
        size = self.image_size
        if pixels_BCHW.ndim != 4 or tuple(pixels_BCHW.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixels must be [B, 3, {size}, {size}] for {self.name}, got {tuple(pixels_BCHW.shape)}: "
                "build them with encoder.preprocess(image)"
            )

    @abc.abstractmethod
    def forward(self, pixels_BCHW: Tensor, feature_layer: int = -2) -> EncoderOutput: ...

    text_batch: int = 256
    """texts per text-tower forward in ``encode_text``"""

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """``[N, E]`` text-tower embeddings in the joint space, not normalised, float32; batches internally."""
        from tqdm.auto import tqdm

        if isinstance(texts, str):
            raise TypeError("encode_text expects a list of strings, got a single str")
        device = next(self.parameters()).device
        num_batches = (len(texts) + self.text_batch - 1) // self.text_batch
        out_NE = []
        for batch in tqdm(
            chunks(list(texts), self.text_batch), total=num_batches, desc="text", disable=num_batches < 4
        ):
            out_NE.append(self._encode_text_batch(batch, device).float())
        if not out_NE:
            return torch.zeros(0, self.joint_dim)
        return torch.cat(out_NE)

    @abc.abstractmethod
    def _encode_text_batch(self, texts: list[str], device: torch.device) -> Tensor:
        """One batch of ``encode_text``: ``[n, E]`` joint-space text embeddings."""

    @abc.abstractmethod
    def _fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(config as a JSON-able dict, full state dict) that identify this tower."""

    def fingerprint(self, refresh: bool = False) -> str:
        """sha256 hex over config + all weights. Computed at load time (before any ``.to(dtype)`` cast),
        cached; ``refresh=True`` recomputes from the current weights."""
        if self._fingerprint is None or refresh:
            config, state = self._fingerprint_parts()
            self._fingerprint = fingerprint_of({"backend": self.backend, "config": config}, state)
        return self._fingerprint

    def info(self, feature_layer: int) -> dict[str, Any]:
        """The manifest's ``EncoderInfo`` fields for features taken at ``feature_layer``."""
        self.check_feature_layer(feature_layer)
        return dataclasses.asdict(
            EncoderInfo(
                name=self.name,
                backend=self.backend,
                fingerprint=self.fingerprint(),
                image_size=int(self.image_size),
                feature_layer=int(feature_layer),
                patch_grid=[int(self.patch_grid[0]), int(self.patch_grid[1])],
                feature_dim=int(self.feature_dim),
                joint_dim=int(self.joint_dim),
                path=self.path,
            )
        )

    def hf_llava_vision(self):
        """(vision_config, vision-tower state dict, image processor) for ``LlavaForConditionalGeneration``."""
        raise ValueError(
            f"export needs the hf backend, but {self.name!r} was loaded with backend={self.backend!r}: "
            "relabel with --backend hf (the open_clip weights cannot be converted here)"
        )

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, backend={self.backend!r}, image_size={self.image_size}, "
            f"patch_grid={tuple(self.patch_grid)}, feature_dim={self.feature_dim}, "
            f"joint_dim={self.joint_dim}, "
            f"dense={self.dense!r}"
        )


def check_options(name: str, dense: str, text_context: int | None, is_clip: bool) -> None:
    """Clear errors for options a tower cannot honour."""
    if dense not in DENSE_MODES:
        raise ValueError(f"dense={dense!r} for {name}: use one of {list(DENSE_MODES)}")
    if dense != "none" and not is_clip:
        raise ValueError(f"dense={dense!r} is for CLIP towers; {name} is SigLIP-style: use dense='none'")
    if text_context is not None:
        if not is_clip:
            raise ValueError(
                f"text_context={text_context} for {name}: SigLIP text towers pool the last position of a "
                "fixed-length padded context, so truncating it changes the embeddings; leave it unset"
            )
        if int(text_context) < 3:
            raise ValueError(f"text_context={text_context}: need at least 3 (start, word, end tokens)")


def chunks(items: list[str], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
