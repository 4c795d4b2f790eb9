"""The vision-encoder interface shared by every backend, plus the pieces all backends reuse.

A ``VisionEncoder`` takes images and returns, from ONE forward of the vision tower, two per-patch outputs:

* ``feats_BPD``: the LLaVA input features, hidden states of layer ``feature_layer`` (HF ``hidden_states``
  indexing: 0 = embeddings after the pre-norm, -1 = last block, default -2 = second-to-last), patch tokens
  only;
* ``joint_BPE``: per-patch embeddings in the joint image-text space (not normalised), comparable with
  ``encode_text`` output for patch labelling;
* ``image_BE`` (CLIP towers): the image's own embedding in that space (the class token through the final
  norm and projection, as CLIP computes it), which CLIP Surgery's feature surgery weighs the words with.

Each encoder carries a ``Preprocess`` (``visalign.images``: PIL image -> normalised tensor with the backend's
own arithmetic, thread-safe, no model) and a fingerprint (``visalign.hashing``) recorded in the manifest.

Letters: B batch, C channels, H/W pixels, S square input side, P patches, D feature width, E joint width,
N texts.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from visalign.errors import VisalignError
from visalign.hashing import fingerprint_of
from visalign.images import Preprocess
from visalign.shards import EncoderInfo

BACKENDS = ("hf", "open_clip")
DENSE_MODES = ("none", "maskclip", "surgery")
FAMILIES = ("clip", "siglip")


class EncoderError(VisalignError):
    """An encoder that cannot be loaded or an option it cannot honour, with what to change."""


@dataclasses.dataclass
class EncoderOutput:
    feats_BPD: Tensor
    """hidden states of layer ``feature_layer``, patch tokens only (no CLS), in the model's dtype"""
    joint_BPE: Tensor | None
    """per-patch embeddings in the joint image-text space, not normalised (None for feature-only experts)"""
    image_BE: Tensor | None = None
    """CLIP towers: the image embedding (class token -> final norm -> projection), not normalised"""


class VisionEncoder(nn.Module, abc.ABC):
    """A frozen vision tower (with its text tower) that yields LLaVA features and joint-space patches.

    Subclasses set the attributes below in ``__init__`` and implement ``forward``, ``encode_text`` and
    ``_fingerprint_parts``.
    """

    name: str
    backend: str
    image_size: int
    patch_grid: tuple[int, int]
    feature_dim: int
    joint_dim: int
    num_layers: int
    path: str | None
    family: str
    """clip (a class token, projection head) or siglip (no class token, MAP head): decides the defaults"""
    dense: str = "none"
    surgery_depth: int | None = None
    """with ``dense="surgery"``: the blocks that got the v-v path (requested depth clamped to the tower)"""
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
            raise EncoderError(
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
                preprocess=self.preprocess_spec.to_dict(),
                dense=self.dense,
                surgery_depth=self.surgery_depth,
            )
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
            + (f", surgery_depth={self.surgery_depth}" if self.surgery_depth is not None else "")
        )

    def set_dense(self, dense: str, surgery_depth: int | None) -> None:
        """Record the dense mode (and, for surgery, the effective depth) after ``check_options``."""
        from pipeline.encoders.surgery import SURGERY_DEPTH, effective_depth

        self.dense = dense
        self.surgery_depth = (
            effective_depth(self.num_layers, surgery_depth if surgery_depth is not None else SURGERY_DEPTH)
            if dense == "surgery"
            else None
        )


def check_options(
    name: str, dense: str, text_context: int | None, is_clip: bool, surgery_depth: int | None = None
) -> None:
    """Clear errors for options a tower cannot honour."""
    if dense not in DENSE_MODES:
        raise EncoderError(f"dense={dense!r} for {name}: use one of {list(DENSE_MODES)}")
    if dense != "none" and not is_clip:
        raise EncoderError(
            f"dense={dense!r} is defined for CLIP towers (a class token and q-k attention to replace); "
            f"{name} is SigLIP-style: use dense='none'"
        )
    if surgery_depth is not None and dense != "surgery":
        raise EncoderError(f"surgery_depth={surgery_depth} for {name}: it applies to dense='surgery' only")
    if surgery_depth is not None and (isinstance(surgery_depth, bool) or int(surgery_depth) < 1):
        raise EncoderError(f"surgery_depth={surgery_depth}: the v-v path needs at least one block")
    if text_context is not None:
        if not is_clip:
            raise EncoderError(
                f"text_context={text_context} for {name}: SigLIP text towers pool the last position of a "
                "fixed-length padded context, so truncating it changes the embeddings; leave it unset"
            )
        if int(text_context) < 3:
            raise EncoderError(f"text_context={text_context}: need at least 3 (start, word, end tokens)")


def chunks(items: list[str], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
