"""The ``open_clip`` backend: an open_clip model (CLIP ViT or timm SigLIP-style tower) -> ``VisionEncoder``.

Input: an open_clip model name plus ``pretrained`` (a tag such as "openai", or a local weights file), or a
tiny-tower folder written by ``tiny.build_openclip`` (``<name>.json`` + ``open_clip_model.safetensors``,
registered with ``open_clip.add_model_config`` and loaded with ``create_model_and_transforms``).
Output: an eval-mode encoder whose one tower pass (a block loop equivalent to the tower's own forward) gives

* CLIP tower (``open_clip.transformer.VisionTransformer``): feats = block output ``layer`` minus CLS;
  joint = ``ln_post(last[:, 1:]) @ proj`` (the ``output_tokens`` patch tokens through the projection);
  ``dense="maskclip"`` recomputes the last block with the value path instead of q-k attention;
  ``dense="surgery"`` takes the patches of CLIP Surgery's v-v path (``surgery.py``);
  image = ``ln_post(last[:, 0]) @ proj`` (``encode_image`` of a class-token-pooled tower).
* SigLIP-style timm tower (``TimmModel`` with ``global_pool="map"``): feats = block output ``layer``;
  joint = ``attn_pool(norm(last))`` on each token as a length-1 sequence (then the adapter head, empty here).

open_clip and timm are imported only inside this module's functions (they pull torchvision).

Letters: B batch, T tokens (with CLS), P patches, D vision width, E joint width, L text length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.encoders.base import EncoderError, EncoderOutput, VisionEncoder, check_options
from pipeline.encoders.surgery import openclip_surgery_tokens
from visalign.images import Preprocess


class OpenCLIPVisionEncoder(VisionEncoder):
    backend = "open_clip"

    def __init__(
        self,
        name: str,
        model_name: str,
        pretrained: str | None,
        cache_dir: str | Path | None = None,
        load_kwargs: dict[str, Any] | None = None,
        dense: str = "none",
        text_context: int | None = None,
        path: str | None = None,
        surgery_depth: int | None = None,
    ):
        super().__init__()
        import open_clip

        if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
            raise EncoderError(f"{name}: open_clip weights file {pretrained} does not exist")
        model, _, preprocess_val = open_clip.create_model_and_transforms(
            model_name,
            pretrained=pretrained,
            cache_dir=str(cache_dir) if cache_dir else None,
            **(load_kwargs or {}),
        )
        self.model = model.eval().requires_grad_(False)
        self.reference_transform = preprocess_val  # the backend's own preprocess (tests compare against it)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name = model_name
        self.model_config = open_clip.get_model_config(model_name) or {}
        visual = self.model.visual
        self.is_clip = hasattr(visual, "transformer") and hasattr(visual, "class_embedding")
        self.is_timm = hasattr(visual, "trunk")
        if not (self.is_clip or self.is_timm):
            raise EncoderError(
                f"{name}: open_clip tower {type(visual).__name__} is neither a ViT nor a timm ViT"
            )
        check_options(name, dense, text_context, self.is_clip, surgery_depth)
        # CLIP's image embedding is ln_post(class token) @ proj; other poolings have no such token
        self.cls_pooled = self.is_clip and not (
            getattr(visual, "attn_pool", None) is not None
            or getattr(visual, "pool_type", "tok") != "tok"
            or getattr(visual, "final_ln_after_pool", False)
        )
        if dense == "surgery" and self.is_clip and not self.cls_pooled:
            raise EncoderError(
                f"{name}: dense='surgery' needs a tower whose image embedding is its class token through "
                "ln_post (this open_clip tower pools otherwise); use dense='none' or 'maskclip'"
            )
        self.name = name
        self.family = "clip" if self.is_clip else "siglip"
        self.path = (
            path if path is not None else (pretrained if pretrained and Path(pretrained).exists() else None)
        )
        self.text_context = int(text_context) if text_context is not None else None
        if self.is_clip:
            self.blocks = list(visual.transformer.resblocks)
            self.num_prefix = 1
            self.feature_dim = int(visual.transformer.width)
            self.joint_dim = int(visual.proj.shape[1]) if visual.proj is not None else self.feature_dim
            grid = tuple(visual.grid_size)
        else:
            trunk = visual.trunk
            if getattr(trunk, "attn_pool", None) is None:
                raise EncoderError(
                    f"{name}: timm tower has no MAP head (attn_pool); not a SigLIP-style tower"
                )
            self.blocks = list(trunk.blocks)
            self.num_prefix = int(trunk.num_prefix_tokens)
            self.feature_dim = int(trunk.embed_dim)
            self.joint_dim = (
                int(self.model.text.text_projection.out_features)
                if hasattr(getattr(self.model, "text", None), "text_projection")
                else self.feature_dim
            )
            grid = tuple(trunk.patch_embed.grid_size)
        self.patch_grid = (int(grid[0]), int(grid[1]))
        self.num_layers = len(self.blocks)
        self.set_dense(dense, surgery_depth)
        cfg = visual.preprocess_cfg
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        if cfg.get("interpolation", "bicubic") != "bicubic" or cfg.get("resize_mode", "shortest") not in (
            "shortest",
            "squash",
        ):
            raise EncoderError(f"{name}: preprocess {cfg} is not reproduced (bicubic shortest/squash only)")
        self.image_size = int(size)
        # torchvision's CenterCrop rounds the offset (HF floors it)
        self.preprocess_spec = Preprocess(
            image_size=self.image_size,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            resize_mode=cfg.get("resize_mode", "shortest"),
            crop_rounding="round",
        )
        self.fingerprint()

    # ------------------------------------------------------------------ vision
    def _embed(self, pixels_BCHW: Tensor) -> Tensor:
        visual = self.model.visual
        if self.is_clip:
            return visual._embeds(pixels_BCHW)  # conv -> +CLS -> +pos -> (patch dropout) -> ln_pre
        trunk = visual.trunk
        x = trunk.patch_embed(pixels_BCHW)
        x = trunk._pos_embed(x)
        x = trunk.patch_drop(x)
        return trunk.norm_pre(x)

    def forward(self, pixels_BCHW: Tensor, feature_layer: int = -2) -> EncoderOutput:
        self.check_feature_layer(feature_layer)
        self.check_pixels(pixels_BCHW)
        visual = self.model.visual
        x_BTD = self._embed(pixels_BCHW.to(self.model_dtype))
        # states[0] = embeddings, states[i] = output of block i: the HF hidden_states convention
        states_BTD = [x_BTD]
        for block in self.blocks:
            x_BTD = block(x_BTD)
            states_BTD.append(x_BTD)
        feats_BPD = states_BTD[feature_layer][:, self.num_prefix :]
        if self.is_clip:
            last_BTD = states_BTD[-1]

            def project(tokens_BXD: Tensor) -> Tensor:
                normed = visual.ln_post(tokens_BXD)
                return normed @ visual.proj if visual.proj is not None else normed

            image_BE = project(last_BTD[:, 0]) if self.cls_pooled else None
            if self.dense == "maskclip":
                last_BTD = maskclip_openclip_block(self.blocks[-1], states_BTD[-2])
            elif self.dense == "surgery":
                if not all(isinstance(b.attn, torch.nn.MultiheadAttention) for b in self.blocks):
                    raise EncoderError(
                        "dense='surgery' needs standard open_clip ViT blocks (packed nn.MultiheadAttention)"
                    )
                last_BTD = openclip_surgery_tokens(self.blocks, states_BTD, self.surgery_depth)
            joint_BPE = project(last_BTD[:, 1:])
            return EncoderOutput(feats_BPD=feats_BPD, joint_BPE=joint_BPE, image_BE=image_BE)
        else:
            trunk = visual.trunk
            tokens_BPD = trunk.norm(states_BTD[-1])[:, self.num_prefix :]
            B, P, D = tokens_BPD.shape
            pooled_NE = visual.head(trunk.fc_norm(trunk.attn_pool(tokens_BPD.reshape(B * P, 1, D))))
            joint_BPE = pooled_NE.reshape(B, P, -1)
        return EncoderOutput(feats_BPD=feats_BPD, joint_BPE=joint_BPE)

    # ------------------------------------------------------------------ text
    def _clip_text(self, tokens_BL: Tensor) -> Tensor:
        """open_clip ``CLIP.encode_text`` with the positional embedding and causal mask sliced to L."""
        model = self.model
        num_ctx = tokens_BL.shape[1]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens_BL).to(cast) + model.positional_embedding[:num_ctx].to(cast)
        mask = model.attn_mask[:num_ctx, :num_ctx] if model.attn_mask is not None else None
        x = model.ln_final(model.transformer(x, attn_mask=mask))
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens_BL.argmax(dim=-1)]  # end token = max id
        proj = model.text_projection
        return proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj

    def _encode_text_batch(self, texts: list[str], device: torch.device) -> Tensor:
        if self.is_clip and self.text_context:
            return self._clip_text(self.tokenizer(texts, context_length=self.text_context).to(device))
        return self.model.encode_text(self.tokenizer(texts).to(device))

    def _fingerprint_parts(self):
        return {"model_name": self.model_name, "model_cfg": self.model_config}, self.model.state_dict()


def maskclip_openclip_block(block, hidden_BTD: Tensor) -> Tensor:
    """An open_clip ``ResidualAttentionBlock`` with q-k attention replaced by its value path (MaskCLIP).

    ``nn.MultiheadAttention`` packs q, k, v projections in ``in_proj_weight``; the last third is v.
    """
    attn = block.attn
    if not isinstance(attn, torch.nn.MultiheadAttention) or attn.in_proj_weight is None:
        raise EncoderError(
            "dense='maskclip' needs a standard open_clip ViT block (packed nn.MultiheadAttention)"
        )
    width = attn.embed_dim
    w_v = attn.in_proj_weight[2 * width :]
    b_v = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
    value_BTD = attn.out_proj(F.linear(block.ln_1(hidden_BTD), w_v, b_v))
    hidden_BTD = hidden_BTD + block.ls_1(value_BTD)
    return hidden_BTD + block.ls_2(block.mlp(block.ln_2(hidden_BTD)))


def load_openclip_tiny(name: str, folder: str | Path, **options) -> OpenCLIPVisionEncoder:
    """Load a tiny tower folder: register its json with open_clip, then load the safetensors weights."""
    import open_clip

    from pipeline.encoders.tiny import OPENCLIP_TINY_NAMES, OPENCLIP_WEIGHTS, register_timm_tiny_mapvit
    from visalign.images import SIGLIP_MEAN, SIGLIP_STD

    folder = Path(folder)
    model_name = OPENCLIP_TINY_NAMES[name]
    config_file, weights = folder / f"{model_name}.json", folder / OPENCLIP_WEIGHTS
    for needed in (config_file, weights):
        if not needed.is_file():
            raise EncoderError(f"{name}: {needed} missing; delete {folder} to rebuild the tiny tower")
    load_kwargs: dict[str, Any] = {}
    if name == "tiny-siglip":
        register_timm_tiny_mapvit()
        # SigLIP preprocessing (open_clip's webli pretrained cfg): squash resize, mean = std = 0.5
        load_kwargs = dict(image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, image_resize_mode="squash")
    open_clip.add_model_config(config_file)
    return OpenCLIPVisionEncoder(
        name, model_name, pretrained=str(weights), load_kwargs=load_kwargs, path=str(folder), **options
    )
