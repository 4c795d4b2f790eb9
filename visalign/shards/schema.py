"""The schema of the on-disk contract between ``pipeline`` and ``trainer``: names, manifest, version.

Documented in docs/shards.md. The one writer is ``visalign.shards.writer``, the one reader
``visalign.shards.reader``; this module only says what the files are called and what the manifest holds.

Layout of an output root ``OUT/``::

    OUT/manifest.json        Manifest below; written last, atomically: a root without it is not finished
    OUT/wordlist.txt         the normalised word list the labels index into (line i = word id i)
    OUT/rejects.parquet      id, source, reason of every input that was skipped
    OUT/config.yaml          the resolved LabelConfig
    OUT/settings.json        the content-changing settings + digest (a rerun with others is refused)
    OUT/shard-000000.tar     WebDataset shards; written as .tar.tmp and renamed when complete
    OUT/shard-000000.json    per-shard stats sidecar (its presence + checksum marks the shard done)

Each sample in a shard (``__key__`` = sample id, made tar-safe). An image sample:

    feat.npy     float16 [P, D]   LLM-input features (encoder hidden layer ``feature_layer``, patch tokens)
    labels.npy   int32   [P, K]   word ids into wordlist.txt, -1 = absent (score < 0 or fewer than K words)
    scores.npy   float16 [P, K]   label scores, descending per row (absent slots hold -inf)
    expert.<name>.npy  float16 [P_e, D_e]   optional features of extra expert encoders (distillation)
    image.<ext>  bytes            optional (schema 3, ``manifest.stores_images``): the image file as read
    json         {"id", "source", "orig_size": [w, h], "conversations": [...]} or {"caption": ...}

A text-only sample (schema 2; LLaVA's instruction mix has ~6% of them) has the ``json`` member alone, with
``"has_image": false`` and no ``source``. The manifest counts them (``num_text_only``, per shard too).

Letters: P patches, D feature width, K top-k slots.

Versions: 1 = image samples only, no preprocessing record, no shard sizes; 2 = adds text-only samples,
``num_text_only``, ``ShardInfo.num_bytes`` and ``EncoderInfo.preprocess`` (with the aspect handling); 3 = adds
the image bytes (``image.<ext>`` members, ``stores_images``), ``score_source``, ``feature_surgery``, the dense
mode of the labelling tower (``EncoderInfo.dense``, ``surgery_depth``) and each expert's preprocessing and
token layout (``ExpertInfo.preprocess``, ``model_type``, ``prefix_tokens``). Readers
accept every version in ``READABLE_VERSIONS`` (fields a version lacks take their defaults) and refuse others
with a message. Only the standard library here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from visalign.errors import VisalignError

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
WORDLIST = "wordlist.txt"
REJECTS = "rejects.parquet"
CONFIG = "config.yaml"
SETTINGS = "settings.json"
SHARD_PATTERN = "shard-{:06d}.tar"
SIDECAR_PATTERN = "shard-{:06d}.json"

FEAT = "feat.npy"
LABELS = "labels.npy"
SCORES = "scores.npy"
META = "json"
EXPERT_PREFIX = "expert."  # expert.<name>.npy
IMAGE_PREFIX = "image."  # image.<ext>: the image file's own bytes (schema 3, --store-images)


class ShardFormatError(VisalignError):
    """Shards this version cannot read, or a manifest that contradicts what a run expects."""


@dataclasses.dataclass
class EncoderInfo:
    name: str
    backend: str
    fingerprint: str
    """sha256 over the encoder's config and weights: two roots with the same fingerprint used the same tower."""
    image_size: int
    feature_layer: int
    patch_grid: list[int]
    feature_dim: int
    joint_dim: int
    path: str | None = None
    feature_dtype: str = "float16"
    preprocess: dict[str, Any] | None = None
    """how images became pixels: ``image_size``, ``mean``, ``std``, ``resize_mode`` (shortest | squash),
    ``crop_rounding`` (floor | round), ``resample`` (bicubic), ``aspect`` (crop | pad | resize: what happens to
    a non-square image first) and ``pad_color`` ([r, g, b], with ``pad``); lets eval pictures and exports
    reproduce it without the tower. None in schema-1 manifests"""
    dense: str | None = None
    """how the joint-space patches that were labelled were computed: none, maskclip or surgery (None before
    schema 3). ``feat.npy`` is the tower's own hidden state whatever this says"""
    surgery_depth: int | None = None
    """with dense surgery: the number of last blocks that got CLIP Surgery's v-v path (the requested depth
    clamped to the tower's); None otherwise"""


@dataclasses.dataclass
class ExpertInfo:
    name: str
    backend: str
    fingerprint: str
    feature_layer: int
    patch_grid: list[int]
    feature_dim: int
    path: str | None = None
    preprocess: dict[str, Any] | None = None
    """how images became the expert's pixels (schema 3): a ``Preprocess.to_dict()`` for the registry towers;
    for an HF backbone (``hf:``) ``{"kind": "hf-image-processor", "class", "config", "aspect", "pad_color"}``:
    the aspect step, then that image processor. None before schema 3"""
    model_type: str | None = None
    """the HF ``model_type`` of an ``hf:`` backbone (dinov2, sam_vision_model, ...); None for registry towers"""
    prefix_tokens: int | None = None
    """tokens dropped before the patches (CLS, registers); None where not recorded"""


@dataclasses.dataclass
class WordlistInfo:
    source: str
    """the path the user gave (informational); the copy in OUT/wordlist.txt is what ids index into"""
    sha256: str
    """sha256 of the normalised list (OUT/wordlist.txt)"""
    count: int


@dataclasses.dataclass
class ShardInfo:
    name: str
    num_samples: int
    """samples in the tar, text-only ones included"""
    sha256: str
    num_rejects: int = 0
    num_text_only: int = 0
    num_bytes: int | None = None
    """size of the tar (None in schema-1 manifests): a cheap first check before the checksum"""


@dataclasses.dataclass
class Manifest:
    encoder: EncoderInfo
    wordlist: WordlistInfo
    templates: list[str]
    score_sign: str
    """'cos' or 'neg-cos' (SEA/CLIP Surgery negate the cosine for CLIP)"""
    top_k: int
    shards: list[ShardInfo]
    num_samples: int
    num_rejects: int
    experts: list[ExpertInfo] = dataclasses.field(default_factory=list)
    num_text_only: int = 0
    """samples without an image (their text trains the LM term only)"""
    config_digest: str = ""
    """sha256 of the settings that change shard content; a rerun with another digest is refused"""
    tool_version: str = ""
    created: str = ""
    score_source: str | None = None
    """where ``score_sign`` came from: 'user' (``--score``) or 'family-default' (the encoder family's default:
    neg-cos for CLIP towers, cos for SigLIP). None before schema 3"""
    feature_surgery: bool = False
    """labels ranked by CLIP Surgery's feature-surgery score (per-image word weights minus the redundant
    feature) instead of the plain cosine"""
    stores_images: bool = False
    """every image sample also carries its image file's bytes as ``image.<ext>`` (``--store-images``)"""
    schema_version: int = SCHEMA_VERSION

    @property
    def num_patches(self) -> int:
        return int(self.encoder.patch_grid[0] * self.encoder.patch_grid[1])

    def shard_paths(self, root: str | Path) -> list[Path | str]:
        """Where the shards are: paths under a local root, URLs (str) under a URL root (``remote.py``)."""
        from visalign.shards.remote import join

        return [join(root, s.name) for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise ShardFormatError(
                f"shard schema version {version!r}, but this visalign reads versions {list(READABLE_VERSIONS)}: "
                "relabel with this version's `pipeline label`, or install the visalign that wrote them"
            )
        try:
            data = dict(data)
            data["encoder"] = EncoderInfo(**data["encoder"])
            data["wordlist"] = WordlistInfo(**data["wordlist"])
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            data["experts"] = [ExpertInfo(**e) for e in data.get("experts", [])]
            return cls(**data)
        except (KeyError, TypeError) as err:
            raise ShardFormatError(
                f"manifest of schema {version} does not have the fields this version expects ({err}): "
                "it is damaged or was edited by hand; rerun `pipeline label` to rewrite it"
            ) from None


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def sidecar_name(index: int) -> str:
    return SIDECAR_PATTERN.format(index)
