"""Deterministic builders for the random-init towers that tests and benchmarks use (no downloads).

Each builder writes a complete checkpoint into a folder that is then loaded back with exactly the code that
loads real weights:

* HF (``tiny-clip``, ``tiny-siglip``, ``random-vit-b16``): ``save_pretrained`` of a ``CLIPModel`` /
  ``SiglipModel`` made from a config under a fixed seed, plus an image processor and a ``CLIPTokenizer``.
  The tokenizer is OpenAI CLIP's own BPE (49,408 tokens), converted from the vocabulary file that ships
  inside the open_clip wheel, so the HF and open_clip towers tokenise identically and nothing is fetched.
  The tiny SigLIP uses that tokenizer too (SigLIP's SentencePiece model cannot be obtained offline).
* open_clip (``tiny-clip``, ``tiny-siglip``): ``<model>.json`` (an open_clip model config, registered with
  ``open_clip.add_model_config``) + ``open_clip_model.safetensors``. The SigLIP-style tower is a timm
  ViT with a MAP head registered with timm under ``visalign_tiny_mapvit``; its open_clip config carries a
  non-SigLIP name and the CLIP tokenizer, because SigLIP-named configs fetch a tokenizer from the hub.

Sizes (64 px, 8 px patches -> 8 x 8 = 64 patches, width 64, 3 vision layers) keep a forward over 8 images
in a few milliseconds on CPU while exercising every code path (CLS handling, layer -2 vs -1, heads).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from visalign.images import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD

SEED = 0
TINY_IMAGE = 64
TINY_PATCH = 8
TINY_WIDTH = 64
TINY_LAYERS = 3
TINY_HEADS = 2
TINY_JOINT_CLIP = 32
TINY_TEXT_LAYERS = 2
CLIP_VOCAB = 49408
CLIP_CONTEXT = 77
TINY_SIGLIP_CONTEXT = 16
BOS_ID, EOS_ID = 49406, 49407

OPENCLIP_WEIGHTS = "open_clip_model.safetensors"
# open_clip model names of the tiny configs (file stem of the json = registered name)
OPENCLIP_TINY_NAMES = {"tiny-clip": "visalign-tiny-clip", "tiny-siglip": "visalign-tiny-mapvit"}
TIMM_TINY_MAPVIT = "visalign_tiny_mapvit"


# ---------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_bpe_file() -> Path:
    """The CLIP BPE merges file shipped inside the open_clip wheel (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "building a tiny HF tower needs the CLIP BPE vocabulary shipped with open_clip: "
            "pip install open_clip_torch (or build the tiny models once on a machine that has it)"
        )
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the open_clip install")
    return path


def build_clip_tokenizer():
    """An HF ``CLIPTokenizer`` with OpenAI CLIP's vocabulary, ids identical to open_clip's SimpleTokenizer."""
    from transformers import CLIPTokenizer

    lines = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # same slice as open_clip
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB and vocab["<|endoftext|>"] == EOS_ID
    # through files: transformers 4.x's CLIPTokenizer takes only file paths, 5.x both
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        merges_text = "#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges)
        (Path(tmp) / "merges.txt").write_text(merges_text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=CLIP_CONTEXT)


# ---------------------------------------------------------------------------- HF towers
def _text_config(context: int, width: int, layers: int, heads: int) -> dict[str, Any]:
    return dict(
        vocab_size=CLIP_VOCAB,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=context,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )


def _vision_config(image: int, patch: int, width: int, layers: int, heads: int) -> dict[str, Any]:
    return dict(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image,
        patch_size=patch,
    )


def build_hf(kind: str, folder: Path) -> None:
    """Write a random-init HF checkpoint of kind (tiny-clip | tiny-siglip | random-vit-b16) into folder."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    torch.manual_seed(SEED)
    if kind == "tiny-clip":
        config = CLIPConfig(
            text_config=_text_config(CLIP_CONTEXT, TINY_WIDTH, TINY_TEXT_LAYERS, TINY_HEADS),
            vision_config=_vision_config(TINY_IMAGE, TINY_PATCH, TINY_WIDTH, TINY_LAYERS, TINY_HEADS),
            projection_dim=TINY_JOINT_CLIP,
        )
        model, image_size = CLIPModel(config), TINY_IMAGE
    elif kind == "random-vit-b16":
        # CLIP ViT-B/16 (openai/clip-vit-base-patch16 sizes), random init: a realistic-cost tower
        config = CLIPConfig(
            text_config=_text_config(CLIP_CONTEXT, 512, 12, 8),
            vision_config=_vision_config(224, 16, 768, 12, 12),
            projection_dim=512,
        )
        model, image_size = CLIPModel(config), 224
    elif kind == "tiny-siglip":
        text = _text_config(TINY_SIGLIP_CONTEXT, TINY_WIDTH, TINY_TEXT_LAYERS, TINY_HEADS)
        text["projection_size"] = TINY_WIDTH  # text head maps into the vision width = the joint space
        config = SiglipConfig(
            text_config=text,
            vision_config=_vision_config(TINY_IMAGE, TINY_PATCH, TINY_WIDTH, TINY_LAYERS, TINY_HEADS),
        )
        model, image_size = SiglipModel(config), TINY_IMAGE
    else:
        raise ValueError(f"no HF builder for {kind!r}")
    model.save_pretrained(folder)
    tokenizer = build_clip_tokenizer()
    if kind == "tiny-siglip":
        tokenizer.model_max_length = TINY_SIGLIP_CONTEXT
    tokenizer.save_pretrained(folder)
    if kind == "tiny-siglip":
        processor = SiglipImageProcessor(
            size={"height": image_size, "width": image_size},
            image_mean=list(SIGLIP_MEAN),
            image_std=list(SIGLIP_STD),
        )
    else:
        processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )
    processor.save_pretrained(folder)


# ---------------------------------------------------------------------------- open_clip towers
def openclip_tiny_config(kind: str) -> dict[str, Any]:
    """The open_clip model config (the json ``add_model_config`` registers) of a tiny tower."""
    if kind == "tiny-clip":
        return {
            "embed_dim": TINY_JOINT_CLIP,
            "vision_cfg": {
                "image_size": TINY_IMAGE,
                "layers": TINY_LAYERS,
                "width": TINY_WIDTH,
                "head_width": TINY_WIDTH // TINY_HEADS,
                "patch_size": TINY_PATCH,
            },
            "text_cfg": {
                "context_length": CLIP_CONTEXT,
                "vocab_size": CLIP_VOCAB,
                "width": TINY_WIDTH,
                "heads": TINY_HEADS,
                "layers": TINY_TEXT_LAYERS,
            },
        }
    if kind == "tiny-siglip":
        # Mirrors ViT-SO400M-14-SigLIP-384.json, minus the hub tokenizer (CLIP BPE instead).
        return {
            "embed_dim": TINY_WIDTH,
            "init_logit_bias": -10,
            "custom_text": True,
            "vision_cfg": {
                "image_size": TINY_IMAGE,
                "timm_model_name": TIMM_TINY_MAPVIT,
                "timm_model_pretrained": False,
                "timm_pool": "map",
                "timm_proj": "none",
            },
            "text_cfg": {
                "context_length": TINY_SIGLIP_CONTEXT,
                "vocab_size": CLIP_VOCAB,
                "width": TINY_WIDTH,
                "heads": TINY_HEADS,
                "layers": TINY_TEXT_LAYERS,
                "no_causal_mask": True,
                "proj_bias": True,
                "pool_type": "last",
                "norm_kwargs": {"eps": 1e-6},
            },
        }
    raise ValueError(f"no open_clip builder for {kind!r}")


def register_timm_tiny_mapvit() -> None:
    """Register the tiny SigLIP-style timm ViT (no CLS, MAP head) so open_clip's TimmModel can build it."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(TIMM_TINY_MAPVIT):
        return

    def visalign_tiny_mapvit(pretrained: bool = False, **kwargs) -> VisionTransformer:
        if pretrained:
            raise ValueError(f"{TIMM_TINY_MAPVIT} has no pretrained weights")
        args = dict(
            img_size=TINY_IMAGE,
            patch_size=TINY_PATCH,
            embed_dim=TINY_WIDTH,
            depth=TINY_LAYERS,
            num_heads=TINY_HEADS,
            class_token=False,
            global_pool="map",
        )
        # timm's create_model passes hub/pretrained bookkeeping that the plain constructor does not take
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict"):
            kwargs.pop(key, None)
        args.update(kwargs)
        return VisionTransformer(**args)

    visalign_tiny_mapvit.__module__ = __name__
    register_model(visalign_tiny_mapvit)


def build_openclip(kind: str, folder: Path) -> None:
    """Write ``<open_clip name>.json`` + ``open_clip_model.safetensors`` of a random-init tiny tower."""
    import open_clip
    from safetensors.torch import save_file

    name = OPENCLIP_TINY_NAMES[kind]
    config_file = folder / f"{name}.json"
    config_file.write_text(json.dumps(openclip_tiny_config(kind), indent=1))
    if kind == "tiny-siglip":
        register_timm_tiny_mapvit()
    open_clip.add_model_config(config_file)
    torch.manual_seed(SEED)
    model = open_clip.create_model(name, pretrained=None)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / OPENCLIP_WEIGHTS))
