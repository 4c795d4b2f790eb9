"""``trainer export --format hf-llava``: a run's checkpoint -> a ``LlavaForConditionalGeneration`` folder.

Input: a run folder (latest checkpoint) or a checkpoint folder (``trainer.checkpoint`` layout).
Output: ``OUT/`` that ``LlavaForConditionalGeneration.from_pretrained(OUT)`` and
``AutoProcessor.from_pretrained(OUT)`` load:

* vision tower: the encoder the shards' manifest names, reloaded with the HF backend
  (``load_encoder(name, backend="hf", path=...)``; its fingerprint must equal the manifest's), placed by the
  encoder's own ``hf_llava_vision()``; ``vision_feature_layer`` = the manifest's ``feature_layer``;
  ``vision_feature_select_strategy`` = ``default`` (drop CLS) for CLIP towers, ``full`` for SigLIP.
* projector: ``mlp2x_gelu`` layers ``0`` / ``2`` -> ``multi_modal_projector.linear_1`` / ``linear_2``.
  A ``linear`` projector has no HF LLaVA equivalent (its projector is always Linear-GELU-Linear): refused.
* LLM: the run's LLM with the trained weights of the checkpoint (finetune) and its embeddings (and head)
  resized by one row for the ``<image>`` token (``image_token_index``); the new rows are zero: HF LLaVA
  overwrites the ``<image>`` embeddings with image features, and a zero head row keeps its logit at 0.
* processor: ``LlavaProcessor`` (the tower's image processor + the LLM tokenizer with ``<image>``, patch size,
  feature strategy, ``num_additional_image_tokens``, the tokenizer's chat template).

Objective modules (reverse projectors, SEA temperature) are not exported. Letters: N vocabulary, d LLM width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.shards import Manifest
from trainer import checkpoint as ckpt_io

# our projector layout (nn.Sequential indices) -> HF LlavaMultiModalProjector
PROJECTOR_KEYS = {
    "mlp2x_gelu": {
        "0.weight": "linear_1.weight",
        "0.bias": "linear_1.bias",
        "2.weight": "linear_2.weight",
        "2.bias": "linear_2.bias",
    }
}
# vision config model_type -> (feature select strategy, tokens before the patches that the strategy drops)
VISION_TOWERS = {"clip_vision_model": ("default", 1), "siglip_vision_model": ("full", 0)}
EXPORT_INFO = "visalign_export.json"


class ExportError(ValueError):
    """A checkpoint that HF LLaVA cannot represent, with what to change."""


def _load_vision(manifest: Manifest, cache_dir: str | None):
    from pipeline.encoders import load_encoder

    info = manifest.encoder
    if info.backend != "hf":
        raise ExportError(
            f"the shards were labelled with encoder {info.name!r} on the {info.backend!r} backend; "
            "HF LLaVA needs an HF vision tower: relabel with --backend hf and retrain to export"
        )
    encoder = load_encoder(info.name, backend="hf", path=info.path, cache_dir=cache_dir)
    if encoder.fingerprint() != info.fingerprint:
        raise ExportError(
            f"encoder {info.name!r} now has fingerprint {encoder.fingerprint()} but the shards were made "
            f"with {info.fingerprint}: point the manifest's encoder path at the tower that made the shards"
        )
    try:
        encoder.check_feature_layer(int(info.feature_layer))
    except ValueError as err:
        raise ExportError(f"HF LLaVA cannot express the shards' feature layer: {err}") from err
    vision_config, vision_state, image_processor = encoder.hf_llava_vision()
    if vision_config.model_type not in VISION_TOWERS:
        raise ExportError(
            f"vision tower type {vision_config.model_type!r} has no known HF LLaVA feature strategy; "
            f"supported: {sorted(VISION_TOWERS)}"
        )
    return encoder, vision_config, vision_state, image_processor


def _projector_state(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if name not in PROJECTOR_KEYS:
        raise ExportError(
            f"projector {name!r} has no HF LLaVA equivalent (LlavaMultiModalProjector is "
            "Linear-GELU-Linear); "
            "train with --projector mlp2x_gelu to export"
        )
    ours = {k[len("projector.") :]: v for k, v in tensors.items() if k.startswith("projector.")}
    if set(ours) != set(PROJECTOR_KEYS[name]):
        raise ExportError(f"checkpoint projector keys {sorted(ours)} do not match {name!r}")
    return {f"model.multi_modal_projector.{PROJECTOR_KEYS[name][k]}": v for k, v in ours.items()}


def load_trained_llm(state: dict[str, Any], tensors: dict[str, torch.Tensor], cache_dir: str | None):
    """The run's LLM with the checkpoint's trained LLM weights (finetune) applied."""
    from trainer.models.llm import load_llm

    llm, tokenizer = load_llm(state["llm"], cache_dir=cache_dir)
    trained = {k[len("llm.") :]: v for k, v in tensors.items() if k.startswith("llm.")}
    if trained:
        missing_in_model = sorted(set(trained) - set(llm.state_dict()))
        if missing_in_model:
            raise ExportError(
                f"checkpoint LLM weights {missing_in_model[:3]}... do not fit LLM {state['llm']!r}"
            )
        llm.load_state_dict(trained, strict=False)
    return llm, tokenizer


def export_hf_llava(
    run_or_ckpt: str | Path, out: str | Path, step: int | None = None, cache_dir: str | None = None
) -> Path:
    """Write the HF LLaVA folder; returns ``out``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from trainer.data.conversations import IMAGE_TOKEN

    out = Path(out)
    if (out / "config.json").exists():
        raise ExportError(f"{out} already holds a model (config.json); choose another --out or remove it")
    ckpt = ckpt_io.resolve_checkpoint(run_or_ckpt, step)
    state = ckpt_io.read_state(ckpt)
    manifest = Manifest.from_dict(state["manifest"])
    tensors = ckpt_io.load_tensors(ckpt, ckpt_io.MODEL)
    encoder, vision_config, vision_state, image_processor = _load_vision(manifest, cache_dir)
    projector_state = _projector_state(state["projector"], tensors)
    strategy, num_extra = VISION_TOWERS[vision_config.model_type]

    llm, tokenizer = load_trained_llm(state, tensors, cache_dir)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    num_old = llm.get_input_embeddings().weight.shape[0]
    num_new = max(num_old, image_id + 1, len(tokenizer))
    if num_new > num_old:
        llm.resize_token_embeddings(num_new, mean_resizing=False)
        with torch.no_grad():
            llm.get_input_embeddings().weight[num_old:] = 0
            if llm.get_output_embeddings() is not None:
                llm.get_output_embeddings().weight[num_old:] = 0

    text_config = llm.config
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_id,
        image_seq_length=manifest.num_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=int(manifest.encoder.feature_layer),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    model = LlavaForConditionalGeneration(config)
    base = getattr(llm, llm.base_model_prefix)  # the decoder stack (LlamaModel, Qwen2Model, ...)
    weights = dict(vision_state)
    weights.update(projector_state)
    weights.update({f"model.language_model.{k}": v for k, v in base.state_dict().items()})
    weights["lm_head.weight"] = llm.get_output_embeddings().weight.detach()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or missing:
        raise ExportError(
            f"HF LLaVA layout mismatch in this transformers version: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(vision_config.patch_size),
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=num_extra,
        chat_template=getattr(tokenizer, "chat_template", None),
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(out)
    info = {
        "checkpoint": str(ckpt),
        "step": state["step"],
        "stage": state.get("stage"),
        "objective": state.get("objective"),
        "llm": state["llm"],
        "projector": state["projector"],
        "encoder": manifest.encoder.name,
        "encoder_fingerprint": manifest.encoder.fingerprint,
        "image_token_index": image_id,
        "num_image_tokens": manifest.num_patches,
    }
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=1))
    return out
