"""What one transformers version makes of visalign's outputs; ``tests/test_compat.py`` runs it under the
declared floor (a subprocess, ``devtools/transformers_floor.py``) and in-process under the project's version,
then compares the two.

    python tests/compat_probe.py JOB.json OUT_PREFIX      -> OUT_PREFIX.json + OUT_PREFIX.npz

A job (JSON) may hold:

* ``exports``: ``[{"name", "folder", "image"}]``: each HF LLaVA export is loaded (fp32, loading info), run
  on fixed ids + pixels drawn from numpy's seeded generator (the same inputs in every version), its
  ``AutoProcessor`` renders string / content-list / multi-turn chats, preprocesses ``image`` (a photo
  file) and greedily generates from it with a content-list prompt.
* ``towers``: ``[{"name", "folder"}]``: the fingerprint of each HF CLIP/SigLIP folder, and the LLaVA
  features the pipeline's hf backend takes from it (layer -2) for fixed pixels.
* ``commands``: ``[{"name", "argv"}]``: ``trainer`` command lines run in this process (training, export).

Only numpy, torch, PIL, transformers and the project are imported, so the same file runs in both versions.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

QUESTION = "What is in the image?"
LIST_CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
STRING_CHAT = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
MULTI_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": "And the colour?"},
]
NEW_TOKENS = 6


def fixed_inputs(config: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids with the image tokens, pixels, text-only ids)`` from a seeded generator: version-independent."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    has_cls = vision.model_type == "clip_vision_model"
    num_image = side * side + (1 if has_cls and config.vision_feature_select_strategy == "full" else 0)
    rng = np.random.default_rng(1234)
    image_id = config.image_token_index
    text = rng.integers(5, min(config.text_config.vocab_size, 1500), size=12)
    text = np.where(text == image_id, 5, text)
    ids = np.concatenate([text[:4], np.full(num_image, image_id), text[4:]])[None]
    pixels = rng.standard_normal((1, 3, vision.image_size, vision.image_size)).astype(np.float32)
    return torch.from_numpy(ids).long(), torch.from_numpy(pixels), torch.from_numpy(text[None]).long()


def probe_export(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    name, folder = spec["name"], spec["folder"]
    model, info = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    text_config = model.config.text_config
    rope = getattr(text_config, "rope_parameters", None) or {}
    report: dict[str, Any] = {
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "image_token_index": int(model.config.image_token_index),
        "rope_theta": float(rope.get("rope_theta") or getattr(text_config, "rope_theta", 0.0)),
        "tied": model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(),
    }
    ids, pixels, text_ids = fixed_inputs(model.config)
    with torch.no_grad():
        arrays[f"{name}.logits"] = model(
            input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)
        ).logits.numpy()
        arrays[f"{name}.text_logits"] = model(input_ids=text_ids).logits.numpy()

    import transformers

    # transformers 5 defaults to the torchvision image backend; "pil" is the arithmetic 4.x uses by default
    kwargs = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
    processor = AutoProcessor.from_pretrained(folder, **kwargs)
    report["processor"] = [type(processor).__name__, type(processor.image_processor).__name__]
    report["chat"] = {
        "list": processor.apply_chat_template(LIST_CHAT, add_generation_prompt=True),
        "string": processor.apply_chat_template(STRING_CHAT, add_generation_prompt=True),
        "multi": processor.apply_chat_template(MULTI_CHAT),
        "tokenizer_list": processor.tokenizer.apply_chat_template(
            LIST_CHAT, tokenize=False, add_generation_prompt=True
        ),
    }
    image = Image.open(spec["image"]).convert("RGB")
    inputs = processor(text=report["chat"]["list"], images=image, return_tensors="pt")
    report["input_names"] = sorted(inputs)
    arrays[f"{name}.pixel_values"] = inputs["pixel_values"].numpy()
    if kwargs:  # what a transformers 5 user gets without asking for the PIL backend
        default = AutoProcessor.from_pretrained(folder)
        arrays[f"{name}.pixel_values_default"] = default(
            text=report["chat"]["list"], images=image, return_tensors="pt"
        )["pixel_values"].numpy()
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    new_ids = generated[0, inputs["input_ids"].shape[1] :]
    arrays[f"{name}.input_ids"] = inputs["input_ids"].numpy()
    arrays[f"{name}.generated"] = new_ids.numpy()
    report["generated_text"] = processor.decode(new_ids, skip_special_tokens=True)
    return report


def probe_tower(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    from pipeline.encoders.hf import HFVisionEncoder
    from visalign.hashing import hf_fingerprint

    encoder = HFVisionEncoder(spec["name"], spec["folder"])
    rng = np.random.default_rng(7)
    pixels = torch.from_numpy(
        rng.standard_normal((2, 3, encoder.image_size, encoder.image_size)).astype(np.float32)
    )
    with torch.no_grad():
        arrays[f"{spec['name']}.feats"] = encoder(pixels, -2).feats_BPD.numpy()
    return {"fingerprint": hf_fingerprint(encoder.model), "pipeline_fingerprint": encoder.fingerprint()}


def run_job(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every item of ``job``; a failing item records its error and the next one still runs."""
    import transformers

    report: dict[str, Any] = {"transformers": transformers.__version__}
    arrays: dict[str, np.ndarray] = {}

    def attempt(section: str, name: str, fn, *args) -> None:
        try:
            report.setdefault(section, {})[name] = fn(*args)
        except Exception as err:  # recorded, so the comparison names every failure at once
            report.setdefault(section, {})[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            report[section][name]["traceback"] = traceback.format_exc()[-3000:]

    def command(argv: list[str]) -> int:
        from trainer.cli import main

        return main(list(argv))

    for spec in job.get("commands", []):
        attempt("commands", spec["name"], command, spec["argv"])
    for spec in job.get("towers", []):
        attempt("towers", spec["name"], probe_tower, spec, arrays)
    for spec in job.get("exports", []):
        attempt("exports", spec["name"], probe_export, spec, arrays)
    return report, arrays


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    report, arrays = run_job(job)
    np.savez(argv[1] + ".npz", **arrays)
    Path(argv[1] + ".json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
