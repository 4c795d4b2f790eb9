"""The ``hf`` backend: a transformers ``CLIPModel`` or ``SiglipModel`` folder -> ``VisionEncoder``.

Input: a local checkpoint folder (``config.json`` with ``model_type`` "clip" or "siglip", weights, tokenizer
and image-processor files) or a hub id (only with network or a warm HF cache). Output: an eval-mode encoder
whose single vision forward gives the LLaVA features and the joint-space patch embeddings:

* CLIP:   feats = ``hidden_states[layer][:, 1:]``;
          joint = ``visual_projection(post_layernorm(hidden_states[-1][:, 1:]))``;
          ``dense="maskclip"`` recomputes the last block with its attention replaced by the value path;
          ``dense="surgery"`` takes the patches of CLIP Surgery's v-v path (``surgery.py``) instead;
          image = ``visual_projection(post_layernorm(hidden_states[-1][:, 0]))`` (CLIP's image embedding).
* SigLIP: feats = ``hidden_states[layer]`` (no CLS);
          joint = ``head(post_layernorm(hidden_states[-1]))`` applied to every token as a length-1 sequence.

The fingerprint is ``visalign.hashing.hf_fingerprint`` of the full model: ``trainer export`` recomputes it
from the same folder with transformers alone (``trainer/models/vision.py``).

Letters: B batch, S square side, T tokens (with CLS), P patches, D vision width, E joint width, L text length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.encoders.base import EncoderError, EncoderOutput, VisionEncoder, check_options
from pipeline.encoders.surgery import hf_surgery_tokens
from visalign.hashing import hf_identity_config
from visalign.images import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, Preprocess

HF_MODEL_TYPES = ("clip", "siglip")


def read_model_type(path: str | Path) -> str:
    """``model_type`` of a local HF checkpoint folder, with errors that say what is wrong."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise EncoderError(
            f"{path} is not an HF checkpoint folder (no config.json): point path= at a folder saved with "
            "save_pretrained (e.g. a local copy of openai/clip-vit-large-patch14-336)"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise EncoderError(
            f"{config_file}: model_type {model_type!r} is not supported; the hf backend loads full "
            f"{' / '.join(HF_MODEL_TYPES)} models (vision + text towers)"
        )
    return model_type


def _image_processor_spec(model_type: str, vision_config, path: str | Path | None) -> Preprocess:
    """Preprocess settings from the folder's ``preprocessor_config.json`` (falls back to the family's)."""
    size = int(vision_config.image_size)
    settings: dict[str, Any] = {}
    proc_file = Path(path) / "preprocessor_config.json" if path else None
    if proc_file is not None and proc_file.is_file():
        settings = json.loads(proc_file.read_text())
    if model_type == "clip":
        mean, std, mode = CLIP_MEAN, CLIP_STD, "shortest"
    else:
        mean, std, mode = SIGLIP_MEAN, SIGLIP_STD, "squash"
    mean = tuple(settings.get("image_mean", mean))
    std = tuple(settings.get("image_std", std))
    if isinstance(settings.get("size"), dict):  # old configs store a bare int: keep the family's mode
        mode = "shortest" if "shortest_edge" in settings["size"] else "squash"
    if int(settings.get("resample", 3)) != 3:
        raise EncoderError(f"{proc_file}: only bicubic resampling (resample=3) is reproduced by preprocess")
    return Preprocess(image_size=size, mean=mean, std=std, resize_mode=mode, crop_rounding="floor")


class HFVisionEncoder(VisionEncoder):
    backend = "hf"

    def __init__(
        self,
        name: str,
        path: str | Path,
        dense: str = "none",
        text_context: int | None = None,
        model_type: str | None = None,
        surgery_depth: int | None = None,
    ):
        super().__init__()
        from transformers import AutoTokenizer

        local = Path(path).is_dir()
        model_type = read_model_type(path) if local else model_type
        if model_type not in HF_MODEL_TYPES:
            raise EncoderError(f"{name}: cannot tell whether {path} is a CLIP or SigLIP model")
        is_clip = model_type == "clip"
        check_options(name, dense, text_context, is_clip, surgery_depth)
        if is_clip:
            from transformers import CLIPModel as model_cls
        else:
            from transformers import SiglipModel as model_cls
        # fp32 on load whatever the checkpoint stores: the caller casts (e.g. fp16 on GPU) after the
        # fingerprint is taken, so the same weights always give the same fingerprint.
        self.model = (
            model_cls.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=False)
            .eval()
            .requires_grad_(False)
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        self.model_type = model_type
        self.name = name
        self.path = str(path)
        self.family = model_type
        self.text_context = int(text_context) if text_context is not None else None
        vision_config = self.model.config.vision_config
        self.image_size = int(vision_config.image_size)
        side = self.image_size // int(vision_config.patch_size)
        self.patch_grid = (side, side)
        self.feature_dim = int(vision_config.hidden_size)
        self.num_layers = int(vision_config.num_hidden_layers)
        self.set_dense(dense, surgery_depth)
        self.num_prefix = 1 if is_clip else 0  # CLIP prepends a CLS token; SigLIP has none
        self.joint_dim = int(self.model.config.projection_dim) if is_clip else self.feature_dim
        self.preprocess_spec = _image_processor_spec(model_type, vision_config, path if local else None)
        self.fingerprint()

    # ------------------------------------------------------------------ vision
    def forward(self, pixels_BCHW: Tensor, feature_layer: int = -2) -> EncoderOutput:
        self.check_feature_layer(feature_layer)
        self.check_pixels(pixels_BCHW)
        vision = self.model.vision_model
        states_BTD = encoder_hidden_states(vision, pixels_BCHW.to(self.model_dtype))
        feats_BPD = states_BTD[feature_layer][:, self.num_prefix :]
        last_BTD = states_BTD[-1]
        if self.model_type == "clip":
            project = self.model.visual_projection
            image_BE = project(vision.post_layernorm(last_BTD[:, 0]))
            if self.dense == "maskclip":
                last_BTD = maskclip_hf_layer(vision.encoder.layers[-1], states_BTD[-2])
            elif self.dense == "surgery":
                last_BTD = hf_surgery_tokens(vision.encoder.layers, states_BTD, self.surgery_depth)
            joint_BPE = project(vision.post_layernorm(last_BTD[:, 1:]))
            return EncoderOutput(feats_BPD=feats_BPD, joint_BPE=joint_BPE, image_BE=image_BE)
        joint_BPE = siglip_head_per_token(vision.head, vision.post_layernorm(last_BTD))
        return EncoderOutput(feats_BPD=feats_BPD, joint_BPE=joint_BPE)

    # ------------------------------------------------------------------ text
    def _tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        if self.model_type == "clip":
            # Causal mask + end-token pooling: padding to the longest text in the batch (or truncating the
            # context to ``text_context``) leaves every embedding unchanged, and is much faster than 77.
            max_length = self.text_context or int(self.model.config.text_config.max_position_embeddings)
            return self.tokenizer(
                texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
            )
        # SigLIP was trained on a fixed padded context and pools its last position: always pad fully.
        max_length = int(self.model.config.text_config.max_position_embeddings)
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"]}

    def _encode_text_batch(self, texts: list[str], device: torch.device) -> Tensor:
        enc = {k: v.to(device) for k, v in self._tokenize(texts).items()}
        feats = self.model.get_text_features(**enc)
        return getattr(feats, "pooler_output", feats)  # transformers 5 returns an output object, 4.x a tensor

    # ------------------------------------------------------------------ identity / export
    def _fingerprint_parts(self):
        return hf_identity_config(self.model.config.to_dict()), self.model.state_dict()


def encoder_hidden_states(vision, pixels_BCHW: Tensor) -> list[Tensor]:
    """HF's ``hidden_states`` of a CLIP/SigLIP vision transformer (encoder input, then each layer's output).

    Collected with hooks because ``output_hidden_states`` is honoured by the inner transformer in
    transformers 5 but, for SigLIP in 4.x, only by the outer ``PreTrainedModel`` (the inner one returns None).
    """
    states_BTD: list[Tensor] = []

    def encoder_input(_module, args, kwargs):
        states_BTD.append(kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[0])

    def layer_output(_module, _args, output):
        states_BTD.append(output[0] if isinstance(output, tuple) else output)

    handles = [vision.encoder.register_forward_pre_hook(encoder_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(layer_output) for layer in vision.encoder.layers]
    try:
        vision(pixel_values=pixels_BCHW)
    finally:
        for handle in handles:
            handle.remove()
    return states_BTD


def maskclip_hf_layer(layer, hidden_BTD: Tensor) -> Tensor:
    """A CLIP encoder layer with its attention replaced by the value path (MaskCLIP, Zhou et al. 2022).

    q-k attention mixes every token with the global context, which blurs per-patch semantics; routing each
    token through v-proj -> out-proj alone keeps it local. Residual and MLP are kept, as in MaskCLIP's code.
    """
    attn = layer.self_attn
    value_BTD = attn.out_proj(attn.v_proj(layer.layer_norm1(hidden_BTD)))
    hidden_BTD = hidden_BTD + value_BTD
    return hidden_BTD + layer.mlp(layer.layer_norm2(hidden_BTD))


def siglip_head_per_token(head, tokens_BPD: Tensor) -> Tensor:
    """Apply a MAP pooling head to each token alone (a length-1 sequence) -> ``[B, P, E]``.

    With one key the attention weight is 1, so each patch lands in the joint space through the same
    value/out projections, LayerNorm and MLP that produce the pooled image embedding.
    """
    B, P, D = tokens_BPD.shape
    pooled_NE = head(tokens_BPD.reshape(B * P, 1, D))
    return pooled_NE.reshape(B, P, -1)
