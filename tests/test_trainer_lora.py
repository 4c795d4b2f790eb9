"""LoRA for stage 2 (PEFT): what trains and how many parameters, exact resume, per-group learning rates, and the
merge that `trainer export` / `trainer eval` get from ``load_trained`` (merged logits equal adapter logits;
the HF LLaVA export of a LoRA run equals the adapted model). Also ``--model.dtype`` for frozen weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from trainer import checkpoint as ckpt_io
from trainer.cli import main, parse_run_args
from trainer.train import Trainer

pytest.importorskip("peft")

BASE = [
    "--llm",
    "tiny-llm",
    "--batch-size",
    "2",
    "--logging.progress",
    "false",
    "--logging.tensorboard",
    "false",
]
LORA = [
    "--stage",
    "finetune",
    "--model.lora.rank",
    "4",
    "--model.lora.alpha",
    "8",
    "--model.lora.dropout",
    "0.1",
]


@pytest.fixture
def shards(tiny_shards, cache_dir):
    return tiny_shards(num_samples=8, samples_per_shard=3)


def config(shards, run, *extra):
    return parse_run_args(["--shards", str(shards), "--output", str(run), *BASE, *extra])


def read_log(run):
    drop = ("samples_per_s", "tokens_per_s", "peak_mem_mib")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def test_lora_trains_adapters_and_projector_only(shards, tmp_path):
    """Trainable = r x (in + out) per targeted linear layer + the projector; after two steps exactly those
    changed, and the projector and the adapters move at their own learning rates."""
    trainer = Trainer(config(shards, tmp_path / "r", *LORA, "--max-steps", "2", "--lr", "1e-2",
                             "--optim.projector_lr", "1e-3", "--optim.warmup_ratio", "0"))  # fmt: skip
    llm_cfg = trainer.vlm.llm.config
    d, inter, layers = llm_cfg.hidden_size, llm_cfg.intermediate_size, llm_cfg.num_hidden_layers
    head_dim = d // llm_cfg.num_attention_heads
    kv = llm_cfg.num_key_value_heads * head_dim
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]  # q k v o gate up down
    adapters = layers * sum(4 * (i + o) for i, o in shapes)
    projector = sum(p.numel() for p in trainer.vlm.projector.parameters())
    trainable = {n: p for n, p in trainer.vlm.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in trainable.items() if "lora_" in n) == adapters
    assert sum(p.numel() for p in trainable.values()) == adapters + projector
    assert all("lora_" in n or n.startswith("projector.") for n in trainable)
    names = [g["name"] for g in trainer.raw_optimizer().param_groups]
    assert names == ["model/decay", "projector/decay", "projector/no_decay"]

    before = {n: p.detach().clone() for n, p in trainer.vlm.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.vlm.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)  # lora_B starts at zero, so lora_A first moves at step 2
    log = read_log(tmp_path / "r")
    assert log[0]["lr"] == pytest.approx(1e-2) and log[0]["projector_lr"] == pytest.approx(1e-3)


def test_lora_resume_is_exact(shards, tmp_path):
    common = ["run", "--shards", str(shards), *BASE, *LORA, "--max-steps", "4", "--save-every", "2",
              "--lr", "1e-2", "--optim.projector_lr", "2e-3"]  # fmt: skip
    assert main([*common, "--output", str(tmp_path / "whole")]) == 0
    assert main([*common, "--output", str(tmp_path / "parts"), "--stop-after", "2"]) == 0
    assert main([*common, "--output", str(tmp_path / "parts"), "--resume"]) == 0
    assert read_log(tmp_path / "parts") == read_log(tmp_path / "whole")
    for name in (ckpt_io.MODEL, ckpt_io.OPTIMIZER_TENSORS):
        a = load_file(ckpt_io.step_dir(tmp_path / "whole", 4) / name)
        b = load_file(ckpt_io.step_dir(tmp_path / "parts", 4) / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = load_file(ckpt_io.step_dir(tmp_path / "whole", 4) / ckpt_io.MODEL)
    assert any("lora_B" in k for k in saved) and not any("base_layer" in k for k in saved)


def test_merged_llm_equals_the_adapted_one(shards, tmp_path):
    """``load_trained`` merges the adapters: no LoRA module or name is left, and the logits equal those of
    the model with adapters (which differ from the base LLM's: the adapters were trained)."""
    from trainer.models.build import load_trained
    from trainer.models.llm import load_llm

    run = tmp_path / "r"
    assert main(["run", "--shards", str(shards), *BASE, *LORA, "--max-steps", "3", "--lr", "5e-2",
                 "--output", str(run)]) == 0  # fmt: skip
    adapted = load_trained(run, merge_lora=False, with_objectives=False).vlm
    merged = load_trained(run, with_objectives=False).vlm
    base, _ = load_llm("tiny-llm")
    assert set(merged.llm.state_dict()) == set(base.state_dict())
    assert not any("lora" in n for n, _ in merged.named_modules())
    g = torch.Generator().manual_seed(0)
    ids_BT = torch.randint(10, 1000, (2, 24), generator=g)
    batch = {
        "input_ids_BT": ids_BT,
        "labels_BT": ids_BT,
        "attention_mask_BT": torch.ones_like(ids_BT),
        "visual_start_B": torch.tensor([1, 3]),
        "feats_BPD": torch.randn(2, 16, 32, generator=g),
    }
    with torch.no_grad():
        a = adapted(batch, return_logits=True).logits_BTN
        m = merged(batch, return_logits=True).logits_BTN
        merged.llm.load_state_dict(base.state_dict())
        b = merged(batch, return_logits=True).logits_BTN
    assert (a - m).abs().max() < 1e-5
    assert (a - b).abs().max() > 1e-3  # the adapters matter: the comparison above is not vacuous


def test_lora_export_is_the_adapted_model(tiny_shards, tmp_path, cache_dir):
    """`trainer export` of a LoRA run: a plain HF LLaVA folder whose LLM weights are the merged ones."""
    from tests.test_trainer_export import clip_shards
    from trainer.models.build import load_trained

    pytest.importorskip("open_clip")
    from pipeline.encoders import load_encoder

    encoder = load_encoder("tiny-clip", backend="hf")
    shards = clip_shards(tiny_shards, encoder)
    run = tmp_path / "r"
    assert main(["run", "--shards", str(shards), *BASE, *LORA, "--max-steps", "2", "--lr", "5e-2",
                 "--output", str(run)]) == 0  # fmt: skip
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf-llava", "--out", str(out)]) == 0
    from transformers import LlavaForConditionalGeneration

    merged = load_trained(run, with_objectives=False).vlm.llm
    hf = LlavaForConditionalGeneration.from_pretrained(out)
    assert not any("lora" in n for n, _ in hf.named_parameters())
    ours = merged.model.layers[0].self_attn.q_proj.weight
    theirs = hf.get_decoder().layers[0].self_attn.q_proj.weight
    assert torch.equal(ours, theirs)
    base = load_trained(run, merge_lora=False, with_objectives=False).vlm.llm.model.layers[0].self_attn.q_proj
    assert not torch.equal(theirs, base.base_layer.weight)  # the adapter was folded in


def test_frozen_llm_weights_in_bf16(shards, tmp_path):
    """--model.dtype bf16: stage 1 stores the frozen LLM in bf16 (half the bytes), the projector and objective
    modules stay float32, every objective runs, and the memory estimate counts 2 bytes per frozen weight."""
    run = tmp_path / "r"
    trainer = Trainer(config(shards, run, "--model.dtype", "bf16", "--objective", "sea+basic+distill",
                             "--max-steps", "2", "--lr", "1e-2"))  # fmt: skip
    assert {p.dtype for p in trainer.vlm.llm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.vlm.projector.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.objectives.parameters()} == {torch.float32}
    frozen = sum(p.numel() for p in trainer.vlm.llm.parameters())
    assert trainer.memory_estimate.frozen == frozen
    trainer.train()
    log = read_log(run)
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in log) and "skipped" not in log[-1]
    recorded = json.loads((run / "memory.json").read_text())["bytes"]
    projector = sum(p.numel() for p in trainer.vlm.projector.parameters())
    objectives = sum(p.numel() for p in trainer.objectives.parameters())
    assert recorded["parameters"] == 2 * frozen + 4 * (projector + objectives)
    # full fine-tuning keeps float32 master weights whatever --model.dtype says
    ft = Trainer(config(shards, tmp_path / "ft", "--model.dtype", "bf16", "--stage", "finetune"))
    assert {p.dtype for p in ft.vlm.llm.parameters()} == {torch.float32}
    ft.close()
    lora = Trainer(config(shards, tmp_path / "lora", "--model.dtype", "bf16", *LORA))
    dtypes = {("lora_" in n, p.dtype) for n, p in lora.vlm.llm.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    lora.close()
