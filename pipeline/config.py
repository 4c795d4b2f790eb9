"""``LabelConfig``: every setting of ``pipeline label``, a typed dataclass parsed by ``visalign.config``.

Defaults < ``--config jobs/label-*.yaml`` < flags. Each field's docstring is its ``--help`` text. The resolved
config is written to ``OUT/config.yaml`` before any work starts.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass
class LabelConfig:
    encoder: str
    """vision encoder registry name (tiny-clip, tiny-siglip, clip, siglip, random-vit-b16) or a local HF
    CLIP/SigLIP folder"""
    input: str
    """a LLaVA-format JSON, a folder of images (+ same-stem .txt captions) or img2dataset-style .tar shards"""
    shards: str
    """output folder OUT for shard-*.tar, manifest.json, wordlist.txt, rejects.parquet, config.yaml"""
    images: str | None = None
    """image root for a LLaVA JSON's relative image paths (default: the JSON's folder)"""
    allow_outside_images: bool = False
    """accept LLaVA image paths that are absolute or climb above --images with '..' (off: such records are
    rejects and never opened)"""
    backend: str | None = None
    """encoder backend: hf or open_clip (default: the encoder's own default)"""
    encoder_path: str | None = None
    """local checkpoint folder/file for the encoder (default: the registry's)"""
    image_aspect: Literal["crop", "pad", "resize"] = "crop"
    """non-square images: crop (the encoder processor's own geometry: CLIP centre-crops, SigLIP squashes),
    pad (LLaVA-1.5's expand2square: centred on a square of the encoder's mean colour, then the processor)
    or resize (squash to a square)"""
    feature_layer: int = -2
    """hidden-state index cached as feat.npy (HF indexing: -1 last block, -2 LLaVA's second-to-last)"""
    wordlist: str | None = None
    """newline-separated word list (default: the shipped wordlists/english-41k.txt)"""
    lowercase: bool = True
    """lowercase the word list while normalising it"""
    templates: list[str] = dataclasses.field(default_factory=list)
    """prompt templates with {} for the word, e.g. 'a photo of a {}.' (averaged); empty = the bare word"""
    top_k: int = 10
    """labels kept per patch"""
    score: Literal["cos", "neg-cos"] | None = None
    """label score: cos or neg-cos; unset = the encoder family's default: neg-cos for CLIP towers (SEA ranks
    by -cos in CLIP's space, following CLIP Surgery), cos for SigLIP (SEA is silent there). The manifest
    records the value and whether it was the default"""
    dense: str = "none"
    """dense joint-space patch features (CLIP towers only): none, maskclip (the last block's attention
    replaced by its value path) or surgery (CLIP Surgery: v-v attention in the last --surgery-depth blocks
    plus feature surgery)"""
    surgery_depth: int = 6
    """with --dense surgery: the last blocks that get the v-v path (CLIP Surgery's code: 6 for every ViT);
    clamped to the tower's depth, the manifest records the effective value"""
    feature_surgery: bool | None = None
    """with --dense surgery: rank words by CLIP Surgery's feature-surgery score (per-image word weights minus
    the feature all words share) instead of the plain cosine; unset = on with --dense surgery"""
    store_images: bool = False
    """also store each image file's bytes in the shards (image.<ext>), for training with the vision encoder
    online"""
    text_context: int | None = None
    """truncate the CLIP text context to this many tokens (faster word embeddings for short words)"""
    experts: list[str] = dataclasses.field(default_factory=list)
    """extra expert encoders whose features are cached as expert.<name>.npy, comma-separated [NAME=]SOURCE:
    an encoder name above, a local HF CLIP/SigLIP folder, or hf:<folder or hub id> for any HF vision
    backbone (DINOv2, SAM, ...: its own image processor and patch grid)"""
    expert_feature_layer: int = -2
    """hidden-state index of the expert encoders' features (HF indexing, before any final norm)"""
    scheduler: str = "local"
    """synchronous (in-process), local (a LocalCluster of --workers processes) or a tcp://host:port address"""
    workers: int = 2
    """worker processes of the local scheduler (one per GPU on GPU nodes)"""
    samples_per_shard: int = 1000
    """input samples per output shard (rejects count: shard membership never depends on validity)"""
    batch_size: int = 32
    """images per encoder forward"""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda"""
    search_backend: str = "auto"
    """exact top-k search: bf16 (bfloat16 screen + float64 re-score of the candidates), torch (the same with
    a float32 screen), faiss (IndexFlatIP, float32), or auto (bf16 where torch has bf16 kernels, else faiss
    if installed, else torch)"""
    threads: int | None = None
    """torch and FAISS compute threads per worker process (default: the cores this process may use divided
    by the worker processes on the machine: --workers for the local scheduler, each machine's count on a
    tcp:// cluster; synchronous keeps torch's default unless set)"""
    decode_threads: int = 4
    """threads decoding and preprocessing images ahead of the forward, per worker"""
    max_image_pixels: int = 100_000_000
    """images with more pixels are rejected as decompression bombs"""
    overwrite: bool = False
    """clear an OUT made with different settings instead of refusing"""
    cache_dir: str | None = None
    """cache of models and word embeddings (default: $VISALIGN_CACHE or ~/.cache/visalign)"""
    progress: bool = True
    """show progress bars"""
