"""``trainer export --format hf-llava``: a run's checkpoint -> a ``LlavaForConditionalGeneration`` folder.

Input: a run folder (latest checkpoint) or a checkpoint folder (``trainer.checkpoint`` layout).
Output: ``OUT/`` that ``LlavaForConditionalGeneration.from_pretrained(OUT)`` and
``AutoProcessor.from_pretrained(OUT)`` load:

* vision tower: the encoder the shards' manifest names, reloaded with transformers
  (``trainer.models.vision.load_tower``; its fingerprint must equal the manifest's);
  ``vision_feature_layer`` = the manifest's ``feature_layer``; ``vision_feature_select_strategy`` =
  ``default`` (drop CLS) for CLIP towers, ``full`` for SigLIP.
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

import torch

from trainer.models.vision import VISION_TOWERS, image_processor, llava_vision_state, load_tower
from visalign.errors import VisalignError

# our projector layout (nn.Sequential indices) -> HF LlavaMultiModalProjector
PROJECTOR_KEYS = {
    "mlp2x_gelu": {
        "0.weight": "linear_1.weight",
        "0.bias": "linear_1.bias",
        "2.weight": "linear_2.weight",
        "2.bias": "linear_2.bias",
    }
}
EXPORT_INFO = "visalign_export.json"


class ExportError(VisalignError):
    """A checkpoint that HF LLaVA cannot represent, with what to change."""


def _projector_state(name: str, projector: torch.nn.Module) -> dict[str, torch.Tensor]:
    if name not in PROJECTOR_KEYS:
        raise ExportError(
            f"projector {name!r} has no HF LLaVA equivalent (LlavaMultiModalProjector is Linear-GELU-Linear); "
            "train with --projector mlp2x_gelu to export"
        )
    ours = projector.state_dict()
    if set(ours) != set(PROJECTOR_KEYS[name]):
        raise ExportError(f"checkpoint projector keys {sorted(ours)} do not match {name!r}")
    return {f"model.multi_modal_projector.{PROJECTOR_KEYS[name][k]}": v for k, v in ours.items()}


def export_hf_llava(
    run_or_ckpt: str | Path, out: str | Path, step: int | None = None, encoder_path: str | None = None
) -> Path:
    """Write the HF LLaVA folder; returns ``out``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from trainer.data.conversations import IMAGE_TOKEN
    from trainer.models.build import load_trained

    out = Path(out)
    if (out / "config.json").exists():
        raise ExportError(f"{out} already holds a model (config.json); choose another --out or remove it")
    run = load_trained(run_or_ckpt, step, with_objectives=False)
    manifest = run.manifest
    # refuse what HF LLaVA cannot hold before the (slow) tower load
    projector_state = _projector_state(run.train_cfg.model.projector, run.vlm.projector)
    tower, model_type, tower_path = load_tower(manifest.encoder, encoder_path)
    vision_config, vision_state = llava_vision_state(tower)
    num_states = int(vision_config.num_hidden_layers) + 1
    if not -num_states <= int(manifest.encoder.feature_layer) < num_states:
        raise ExportError(
            f"HF LLaVA cannot express the shards' feature layer {manifest.encoder.feature_layer} "
            f"({num_states} hidden states)"
        )
    if vision_config.model_type not in VISION_TOWERS:
        raise ExportError(
            f"vision tower type {vision_config.model_type!r} has no known HF LLaVA feature strategy; "
            f"supported: {sorted(VISION_TOWERS)}"
        )
    strategy, num_extra = VISION_TOWERS[vision_config.model_type]

    llm, tokenizer = run.vlm.llm, run.tokenizer
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
        image_processor=image_processor(tower_path, model_type, int(vision_config.image_size)),
        tokenizer=tokenizer,
        patch_size=int(vision_config.patch_size),
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=num_extra,
        chat_template=getattr(tokenizer, "chat_template", None),
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(out)
    info = {
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "stage": run.state.get("stage"),
        "objective": run.state.get("objective"),
        "llm": run.state["llm"],
        "projector": run.train_cfg.model.projector,
        "encoder": manifest.encoder.name,
        "encoder_fingerprint": manifest.encoder.fingerprint,
        "image_token_index": image_id,
        "num_image_tokens": manifest.num_patches,
    }
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=1))
    return out
