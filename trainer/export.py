"""``trainer export``: a run's checkpoint -> a folder other tools load.

Input: a run folder (latest checkpoint) or a checkpoint folder (``trainer.checkpoint`` layout).
Formats (``export(run, out, format=...)``):

* ``hf-llava``: a ``LlavaForConditionalGeneration`` folder that transformers 4.57 (the declared floor) and
  5.x both load with identical logits, with ``AutoProcessor`` (``LlavaProcessor``) and a model card:

  - ``model.safetensors``, written here in the key layout every version reads (the llava-hf hub layout):
    ``language_model.model.*`` (the run's LLM, trained weights after a finetune stage),
    ``language_model.lm_head.weight`` (only when the head is not tied to the embeddings),
    ``vision_tower.vision_model.*`` (the tower the shards' manifest names, reloaded with transformers and
    checked by fingerprint: ``trainer.models.vision``; a run with ``--model.vision.mode train`` overwrites
    the embeddings and blocks it trained with their tuned values, the card names both fingerprints),
    ``multi_modal_projector.linear_{1,2}.*`` (the
    ``mlp2x_gelu`` projector's layers ``0`` / ``2``; a ``linear`` projector has no HF LLaVA form: refused).
    The embeddings (and an untied head) get zero rows up to the ``<image>`` id when it lies outside the
    vocabulary: HF LLaVA overwrites those embeddings with image features, and a zero head row keeps the
    ``<image>`` logit at 0. Tensors are cast to ``--dtype`` (fp32, bf16 or fp16).
  - ``config.json``: ``LlavaConfig`` with ``vision_feature_layer`` = the manifest's feature layer,
    ``vision_feature_select_strategy`` ``default`` (drop CLS) for CLIP and ``full`` for SigLIP, the
    ``<image>`` id under both its 4.x and 5.x names, and the LLM's rotary settings in both forms
    (``trainer.models.portable``).
  - the processor: ``preprocessor_config.json`` (an HF ``LlavaImageProcessor`` that repeats the manifest's
    preprocessing, padding to square when the shards did), ``processor_config.json``, the tokenizer files
    (with ``<image>``) and ``chat_template.jinja``, which accepts plain strings with ``<image>`` and HF
    content lists.
  - ``README.md`` (model card: base LLM and encoder, objectives and weights, steps, the shards' manifest
    digest, versions, usage) and ``visalign_export.json`` (the same facts, machine-readable).

* ``llava-projector``: the projector alone as LLaVA's ``mm_projector.bin`` (``torch.save`` of a plain dict of
  tensors named ``model.mm_projector.<LLaVA's Sequential keys>``), what LLaVA's ``--pretrain_mm_mlp_adapter``
  loads for its stage 2, plus a README with the matching LLaVA flags. Needs only the checkpoint.

The output is written into a hidden sibling folder and renamed into place when complete, so a folder named
``--out`` is never half written. Objective modules (reverse projectors, SEA temperature) are not exported.
Letters: N vocabulary, d LLM width, D vision width.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trainer.data.conversations import inference_chat_template, text_format
from trainer.models.portable import portable_chat_template, portable_tokenizer_config, with_legacy_rope
from trainer.models.vision import (
    VISION_TOWERS,
    image_processor_config,
    load_tower,
    tower_preprocess,
    vision_weights,
)
from visalign.errors import VisalignError
from visalign.hashing import digest_of

log = logging.getLogger(__name__)

FORMATS = ("hf-llava", "llava-projector")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
EXPORT_INFO = "visalign_export.json"
CARD = "README.md"
MM_PROJECTOR = "mm_projector.bin"

# our projector layout (nn.Sequential indices) -> HF LlavaMultiModalProjector
PROJECTOR_KEYS = {
    "mlp2x_gelu": {
        "0.weight": "linear_1.weight",
        "0.bias": "linear_1.bias",
        "2.weight": "linear_2.weight",
        "2.bias": "linear_2.bias",
    }
}
# LLaVA's projector types whose state-dict keys equal ours (nn.Linear / nn.Sequential(Linear, GELU, Linear))
LLAVA_PROJECTORS = {"linear": ("weight", "bias"), "mlp2x_gelu": ("0.weight", "0.bias", "2.weight", "2.bias")}


class ExportError(VisalignError):
    """A checkpoint the chosen format cannot represent, or an output folder that cannot be written."""


def _torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ExportError(f"--dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A hidden sibling folder that becomes ``out`` only when the block completes."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not empty; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield stage
        if out.exists():
            out.rmdir()  # an empty folder the user made for us
        os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def export(
    run_or_ckpt: str | Path,
    out: str | Path,
    format: str = "hf-llava",
    dtype: str = "fp32",
    step: int | None = None,
    encoder_path: str | None = None,
) -> Path:
    """Export a run (latest checkpoint, or ``step``) in ``format``; returns ``out``."""
    if format == "hf-llava":
        return export_hf_llava(run_or_ckpt, out, step=step, encoder_path=encoder_path, dtype=dtype)
    if format == "llava-projector":
        return export_llava_projector(run_or_ckpt, out, step=step, dtype=dtype)
    raise ExportError(f"--format {format!r} is not one of {list(FORMATS)}")


# ---------------------------------------------------------------------------------------------------------
# facts shared by both formats
# ---------------------------------------------------------------------------------------------------------


def _run_facts(ckpt: Path, state: dict[str, Any], train_cfg: Any, manifest: Any) -> dict[str, Any]:
    """What the model card and ``visalign_export.json`` say about the run."""
    from trainer.objectives import objective_weights, parse_spec
    from visalign import __version__

    names = parse_spec(train_cfg.objective)
    enc = manifest.encoder
    return {
        "visalign_version": __version__,
        "checkpoint": str(ckpt),
        "step": int(state["step"]),
        "max_steps": int(train_cfg.optim.max_steps),
        "stage": state.get("stage", train_cfg.stage),
        "objective": "+".join(names),
        "loss_weights": objective_weights(train_cfg.objectives, names),
        "llm": state.get("llm", train_cfg.model.llm),
        "projector": train_cfg.model.projector,
        "encoder": {
            "name": enc.name,
            "backend": enc.backend,
            "path": enc.path,
            "fingerprint": enc.fingerprint,
            "feature_layer": int(enc.feature_layer),
            "image_size": int(enc.image_size),
            "patch_grid": list(enc.patch_grid),
        },
        "shards": {
            "manifest_digest": digest_of(manifest.to_dict()),
            "settings_digest": manifest.config_digest,
            "num_samples": int(manifest.num_samples),
            "wordlist_sha256": manifest.wordlist.sha256,
            "schema_version": int(manifest.schema_version),
        },
    }


def _card_table(facts: dict[str, Any], rows: list[tuple[str, str]]) -> str:
    enc, shards = facts["encoder"], facts["shards"]
    weights = ", ".join(f"{k.removesuffix('_loss')} x {v:g}" for k, v in facts["loss_weights"].items())
    base = [
        ("base LLM", f"`{facts['llm']}`"),
        (
            "vision encoder",
            f"`{enc['name']}` ({enc['backend']} backend, `{enc['path']}`), fingerprint `{enc['fingerprint'][:16]}`, "
            f"hidden layer {enc['feature_layer']}, {enc['image_size']} px, {enc['patch_grid'][0]} x "
            f"{enc['patch_grid'][1]} patches",
        ),
        ("projector", f"`{facts['projector']}`"),
        ("stage", facts["stage"]),
        ("objectives (loss weights)", weights),
        ("steps", f"{facts['step']} of {facts['max_steps']}"),
        (
            "training shards",
            f"manifest digest `sha256:{shards['manifest_digest']}`, {shards['num_samples']} samples, "
            f"word list `sha256:{shards['wordlist_sha256'][:16]}`",
        ),
        *rows,
        ("visalign", facts["visalign_version"]),
    ]
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in base)


# ---------------------------------------------------------------------------------------------------------
# hf-llava
# ---------------------------------------------------------------------------------------------------------


def _projector_state(name: str, projector: torch.nn.Module) -> dict[str, torch.Tensor]:
    if name not in PROJECTOR_KEYS:
        raise ExportError(
            f"projector {name!r} has no HF LLaVA equivalent (LlavaMultiModalProjector is Linear-GELU-Linear); "
            "train with --projector mlp2x_gelu to export, or export --format llava-projector"
        )
    ours = projector.state_dict()
    if set(ours) != set(PROJECTOR_KEYS[name]):
        raise ExportError(f"checkpoint projector keys {sorted(ours)} do not match {name!r}")
    return {f"multi_modal_projector.{PROJECTOR_KEYS[name][k]}": v for k, v in ours.items()}


def _padded_rows(weight_Nd: torch.Tensor, num_rows: int) -> torch.Tensor:
    weight_Nd = weight_Nd.detach()
    if num_rows <= weight_Nd.shape[0]:
        return weight_Nd
    extra = weight_Nd.new_zeros(num_rows - weight_Nd.shape[0], weight_Nd.shape[1])
    return torch.cat([weight_Nd, extra])


def _llm_state(llm: Any, num_rows: int) -> tuple[dict[str, torch.Tensor], bool]:
    """``(on-disk LLM weights, tied)``: the decoder stack under ``language_model.model.`` (the prefix LLaVA's
    conversion maps in every version), its input embeddings padded to ``num_rows``; the head only if untied."""
    base = getattr(llm, llm.base_model_prefix)
    embed_Nd = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings()
    tied = head is None or head.weight is embed_Nd
    # "model" is the base of Llama, Qwen2, Mistral, Gemma, ...: the hub layout; any other base keeps the
    # in-memory names, which both versions also read unchanged
    prefix = "language_model.model." if llm.base_model_prefix == "model" else "model.language_model."
    embed_key = next(k for k, p in base.named_parameters() if p is embed_Nd)
    state = {prefix + k: v.detach() for k, v in base.state_dict().items()}
    state[prefix + embed_key] = _padded_rows(embed_Nd, num_rows)
    if not tied:
        head_key = (
            "language_model.lm_head.weight" if prefix.startswith("language_model") else "lm_head.weight"
        )
        state[head_key] = _padded_rows(head.weight, num_rows)
    return state, tied


def _memory_key(disk_key: str, vision_inner: str) -> str:
    """The running version's in-memory name of an on-disk key (its load-time conversion, for a self-check)."""
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("vision_tower.vision_model.", f"model.vision_tower.{vision_inner}"),
    ):
        if disk_key.startswith(old):
            return new + disk_key[len(old) :]
    return disk_key


def _check_layout(config_dict: dict[str, Any], weights: dict[str, torch.Tensor], tied: bool) -> None:
    """Every weight the running transformers' LlavaForConditionalGeneration expects is written, nothing else
    (built on the meta device: no memory, no time)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        expected = set(LlavaForConditionalGeneration(LlavaConfig(**config_dict)).state_dict())
    inner = "vision_model." if any(k.startswith("model.vision_tower.vision_model.") for k in expected) else ""
    written = {_memory_key(k, inner) for k in weights}
    missing = sorted(expected - written - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(written - expected)
    if missing or unexpected:
        raise RuntimeError(f"HF LLaVA layout mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _llava_config(
    tower: Any, llm: Any, num_rows: int, image_id: int, manifest: Any, dtype: torch.dtype, tied: bool
) -> dict[str, Any]:
    from transformers import LlavaConfig

    vision_config = tower.config.vision_config
    num_states = int(vision_config.num_hidden_layers) + 1
    layer = int(manifest.encoder.feature_layer)
    if not -num_states <= layer < num_states:
        raise ExportError(
            f"HF LLaVA cannot express the shards' feature layer {layer} ({num_states} hidden states)"
        )
    if vision_config.model_type not in VISION_TOWERS:
        raise ExportError(
            f"vision tower type {vision_config.model_type!r} has no known HF LLaVA feature strategy; "
            f"supported: {sorted(VISION_TOWERS)}"
        )
    strategy, _ = VISION_TOWERS[vision_config.model_type]
    text_config = llm.config.to_dict()
    text_config["vocab_size"] = num_rows
    text_config["tie_word_embeddings"] = tied
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config,
        image_token_index=image_id,
        image_seq_length=manifest.num_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    ).to_dict()
    config["text_config"] = with_legacy_rope(config["text_config"])
    # the <image> id under 4.x's and 5.x's names; the dtype under 4.56+'s and older names
    config["image_token_index"] = config["image_token_id"] = image_id
    config["dtype"] = config["torch_dtype"] = DTYPE_NAMES[dtype]
    for sub in ("text_config", "vision_config"):
        config[sub]["dtype"] = config[sub]["torch_dtype"] = DTYPE_NAMES[dtype]
    config["architectures"] = ["LlavaForConditionalGeneration"]
    config.pop("transformers_version", None)
    return config


def _write_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Tokenizer files with the portable chat template, in the form both transformers versions read."""
    tokenizer.chat_template = portable_chat_template(getattr(tokenizer, "chat_template", None))
    tokenizer.save_pretrained(folder)
    portable_tokenizer_config(folder)
    config_path = folder / "tokenizer_config.json"
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    if "chat_template" in cfg:  # one copy, in chat_template.jinja, read by tokenizer and processor alike
        cfg.pop("chat_template")
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    (folder / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    for stale in ("chat_template.json",):
        (folder / stale).unlink(missing_ok=True)


def _hf_card(facts: dict[str, Any], gaps: list[str], dtype: str) -> str:
    llm = str(facts["llm"])
    front = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [llava, visalign]",
    ]
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", llm) and not Path(llm).exists():  # a hub id
        front.append(f"base_model: {llm}")
    front.append("---")
    tuned = facts["encoder"].get("tuned_fingerprint")
    tower_row = (
        [("vision tower weights", f"trained with the LLM (`--model.vision.mode train`): fingerprint `{tuned[:16]}`, "
          "started from the labelling tower above")]
        if tuned else []
    )  # fmt: skip
    table = _card_table(
        facts,
        [
            *tower_row,
            (
                "weights",
                f"{dtype}; `<image>` id {facts['image_token_index']}, {facts['num_image_tokens']} image tokens",
            ),
            ("loads in", "transformers >= 4.57.6 (4.x and 5.x read the same files)"),
        ],
    )
    preprocessing = (
        "`AutoProcessor` repeats the preprocessing the shards were made with "
        f"({facts['preprocess_summary']}). transformers 4.x uses the PIL image processor, the same arithmetic "
        "as training; transformers 5 defaults to the torchvision backend, which differs by about one grey level: "
        'pass `backend="pil"` to `AutoProcessor.from_pretrained` for the exact pixels.'
    )
    if gaps:
        preprocessing += "\n\nDifferences from training the HF processor cannot avoid:\n" + "".join(
            f"\n- {g}" for g in gaps
        )
    usage = """```python
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained(FOLDER, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(FOLDER)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)  # or "<image>\\nWhat is ..." strings
inputs = processor(text=prompt, images=Image.open("photo.jpg").convert("RGB"), return_tensors="pt")
print(processor.decode(model.generate(**inputs, max_new_tokens=32)[0, inputs["input_ids"].shape[1]:]))
```"""
    return "\n".join(
        [
            *front,
            "",
            "# LLaVA model trained with visalign",
            "",
            "A `LlavaForConditionalGeneration` (vision encoder -> MLP projector -> LLM) whose visual tokens were "
            "trained with visalign's objectives.",
            "",
            table,
            "## Usage",
            "",
            usage,
            "",
            "## Preprocessing",
            "",
            preprocessing,
            "",
            "`visalign_export.json` holds the same facts machine-readably.",
            "",
        ]
    )


def _preprocess_summary(preprocess: dict[str, Any]) -> str:
    aspect = preprocess.get("aspect") or "crop"
    size = preprocess["image_size"]
    how = {
        "pad": f"pad to square, then resize to {size} x {size}",
        "resize": f"resize to {size} x {size}",
        "crop": (
            f"resize to {size} x {size}"
            if preprocess.get("resize_mode") == "squash"
            else f"resize the short side to {size}, centre-crop {size} x {size}"
        ),
    }[aspect]
    return (
        f"{how}, {preprocess.get('resample', 'bicubic')}, mean {preprocess['mean']}, std {preprocess['std']}"
    )


def _tuned_tower(tower: Any, trained: Any) -> str | None:
    """Put a run's trained vision weights (``VisionTower``, mode ``train``) into the full ``tower`` loaded from
    the manifest's record; returns the fingerprint of the result (None: the run did not train its tower)."""
    from visalign.hashing import hf_fingerprint

    if trained is None or not trained.tuned:
        return None
    tuned = trained.hf_state()
    loaded = tower.vision_model.load_state_dict(tuned, strict=False)
    if loaded.unexpected_keys:
        raise RuntimeError(
            f"the trained tower's weights do not fit its HF model: {loaded.unexpected_keys[:5]}"
        )
    log.info("vision tower: %d trained tensors of the run replace the labelling tower's", len(tuned))
    return hf_fingerprint(tower)


def export_hf_llava(
    run_or_ckpt: str | Path,
    out: str | Path,
    step: int | None = None,
    encoder_path: str | None = None,
    dtype: str = "fp32",
) -> Path:
    """Write the HF LLaVA folder (module docstring); returns ``out``."""
    from safetensors.torch import save_file

    from trainer.data.conversations import IMAGE_TOKEN
    from trainer.models.build import load_trained

    out, torch_dtype = Path(out), _torch_dtype(dtype)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not empty; choose another --out or remove it")
    run = load_trained(run_or_ckpt, step, with_objectives=False, encoder_path=encoder_path)
    manifest = run.manifest
    # refuse what HF LLaVA cannot hold before the (slow) tower load
    projector_state = _projector_state(run.train_cfg.model.projector, run.vlm.projector)
    tower, model_type, where = load_tower(manifest.encoder, encoder_path)
    tuned_fingerprint = _tuned_tower(tower, run.vlm.vision)
    preprocess = manifest.encoder.preprocess or tower_preprocess(
        where, model_type, int(tower.config.vision_config.image_size)
    )
    image_config, gaps = image_processor_config(preprocess)
    for gap in gaps:
        log.warning("exported processor: %s", gap)

    llm, tokenizer = run.vlm.llm, run.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    num_rows = max(llm.get_input_embeddings().weight.shape[0], image_id + 1, len(tokenizer))
    llm_state, tied = _llm_state(llm, num_rows)
    config = _llava_config(tower, llm, num_rows, image_id, manifest, torch_dtype, tied)
    weights = dict(llm_state)
    weights.update({f"vision_tower.vision_model.{k}": v for k, v in vision_weights(tower).items()})
    weights.update(projector_state)
    _check_layout(config, weights, tied)
    # own storage per tensor (safetensors refuses shared memory), cast to the requested precision
    weights = {k: v.detach().to(torch_dtype).contiguous().clone() for k, v in weights.items()}

    vision_config = tower.config.vision_config
    strategy, num_extra = VISION_TOWERS[vision_config.model_type]
    processor_config = {
        "processor_class": "LlavaProcessor",
        "image_token": IMAGE_TOKEN,
        "patch_size": int(vision_config.patch_size),
        "vision_feature_select_strategy": strategy,
        "num_additional_image_tokens": num_extra,
    }
    # prompt the exported model in the format it was trained on (vicuna_v1, chatml, llama_3, or the LLM's own)
    fmt = text_format(run.train_cfg.data, run.train_cfg.stage)
    trained_template = inference_chat_template(fmt, tokenizer)
    if trained_template is not None:
        tokenizer.chat_template = trained_template
    elif fmt.template == "tokenizer" and fmt.system_prompt == "":
        log.warning(
            "the run dropped the LLM's default system prompt (--data.system-prompt ''); the exported chat "
            "template is the LLM's own and inserts it: pass a system message when prompting the export"
        )
    facts = _run_facts(run.checkpoint, run.state, run.train_cfg, manifest)
    facts["encoder"]["tuned_fingerprint"] = tuned_fingerprint
    facts.update(
        conversation_format=fmt.template,
        format="hf-llava",
        dtype=dtype,
        image_token_index=image_id,
        num_image_tokens=manifest.num_patches,
        encoder_loaded_from=where,
        preprocess=preprocess,
        preprocess_gaps=gaps,
        preprocess_summary=_preprocess_summary(preprocess),
    )
    with _staged(out) as stage:
        save_file(weights, str(stage / "model.safetensors"), metadata={"format": "pt"})
        (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(llm, "generation_config", None) is not None:
            llm.generation_config.save_pretrained(stage)
        _write_tokenizer(tokenizer, stage)
        (stage / "preprocessor_config.json").write_text(
            json.dumps(image_config, indent=2, sort_keys=True) + "\n"
        )
        (stage / "processor_config.json").write_text(
            json.dumps(processor_config, indent=2, sort_keys=True) + "\n"
        )
        (stage / CARD).write_text(_hf_card(facts, gaps, dtype), encoding="utf-8")
        (stage / EXPORT_INFO).write_text(json.dumps(facts, indent=1) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------
# llava-projector
# ---------------------------------------------------------------------------------------------------------


def llava_projector_state(
    name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """``{"model.mm_projector.<key>": tensor}`` from a checkpoint's ``projector.*`` tensors."""
    if name not in LLAVA_PROJECTORS:
        raise ExportError(
            f"projector {name!r} has no LLaVA equivalent; LLaVA knows {sorted(LLAVA_PROJECTORS)}"
        )
    ours = {k[len("projector.") :]: v for k, v in tensors.items() if k.startswith("projector.")}
    if set(ours) != set(LLAVA_PROJECTORS[name]):
        raise ExportError(f"checkpoint projector keys {sorted(ours)} do not match LLaVA's {name!r}")
    # a clone per tensor: torch.save writes whole storages, and each must hold only its own tensor
    return {
        f"model.mm_projector.{k}": v.detach().to(dtype).contiguous().clone() for k, v in sorted(ours.items())
    }


def export_llava_projector(
    run_or_ckpt: str | Path, out: str | Path, step: int | None = None, dtype: str = "fp32"
) -> Path:
    """Write ``OUT/mm_projector.bin`` (LLaVA's stage-1 adapter file) and a README; returns ``out``."""
    from trainer import checkpoint as ckpt_io
    from trainer.models.build import train_config_of
    from visalign.shards import Manifest

    out, torch_dtype = Path(out), _torch_dtype(dtype)
    ckpt = ckpt_io.resolve_checkpoint(run_or_ckpt, step)
    state = ckpt_io.read_state(ckpt)
    train_cfg = train_config_of(ckpt, state)
    manifest = Manifest.from_dict(state["manifest"])
    name = train_cfg.model.projector
    if train_cfg.model.vision.mode == "train":
        log.warning(
            "%s trained its vision tower; mm_projector.bin holds the projector alone, which expects the tuned "
            "tower's features: export --format hf-llava to keep both",
            ckpt,
        )
    tensors = llava_projector_state(name, ckpt_io.load_tensors(ckpt), torch_dtype)
    facts = _run_facts(ckpt, state, train_cfg, manifest)
    enc = facts["encoder"]
    first = tensors[f"model.mm_projector.{LLAVA_PROJECTORS[name][0]}"]
    hidden, width = int(first.shape[0]), int(first.shape[1])
    facts.update(format="llava-projector", dtype=dtype, mm_hidden_size=width, hidden_size=hidden)
    flags = (
        f"--pretrain_mm_mlp_adapter {MM_PROJECTOR} --mm_projector_type {name} "
        f"--mm_vision_select_layer {enc['feature_layer']} --mm_vision_select_feature patch "
        f"--vision_tower {enc['path'] or enc['name']}"
    )
    table = _card_table(
        facts,
        [
            ("file", f"`{MM_PROJECTOR}`: {', '.join(f'`{k}`' for k in tensors)} ({dtype})"),
            ("sizes", f"mm_hidden_size {width} (vision width), hidden_size {hidden} (the LLM's)"),
        ],
    )
    card = "\n".join(
        [
            "# LLaVA stage-1 projector trained with visalign",
            "",
            table,
            "## Use with LLaVA's code base",
            "",
            "Start LLaVA's stage 2 from this projector with the same vision tower (the fingerprint above), "
            f"the same LLM family (hidden size {hidden}) and these flags:",
            "",
            f"```\n{flags}\n```",
            "",
            "The file is a plain `dict` of tensors (`torch.load(path, weights_only=True)` reads it); LLaVA "
            "strips everything up to `mm_projector.` and loads the rest into its projector strictly.",
            "",
        ]
    )
    with _staged(out) as stage:
        torch.save(tensors, stage / MM_PROJECTOR)
        (stage / CARD).write_text(card, encoding="utf-8")
        (stage / EXPORT_INFO).write_text(json.dumps(facts, indent=1) + "\n")
    return out
