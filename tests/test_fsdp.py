"""FSDP2 as the trainer applies it, against DDP, with 2 CPU processes (gloo) through ``accelerate launch``:
the same per-step losses (bitwise without clipping, 1e-5 with it: only the gradient-norm summation order
differs), the same final weights, sharded checkpoints that really hold half of every tensor per process,
exact stop/resume, export and eval from a sharded checkpoint on one process, a label-less rank, LoRA, and the
multi-node launch. Also the memory estimate (the docs table is the estimate's output).

The first test runs in the default suite (one launch, four short runs); the others are slow-marked.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from tests.launching import FSDP_CONFIG, accelerate, read_log, run_many, run_trainer
from trainer import checkpoint as ckpt_io


def common_args(shards, run, *extra) -> list[str]:
    return [
        "--shards", str(shards), "--output", str(run), "--llm", "tiny-llm", "--objective", "sea+basic+distill",
        "--max-steps", "4", "--batch-size", "2", "--lr", "1e-2", "--save-every", "4",
        "--data.shuffle_buffer", "4", "--logging.progress", "false", "--logging.tensorboard", "false",
        "--optim.warmup_ratio", "0", *extra,
    ]  # fmt: skip


def loss_keys(record: dict) -> list[str]:
    return sorted(k for k in record if k.endswith("_loss"))


def assert_losses_close(a: list[dict], b: list[dict], rel: float = 1e-5, abs_: float = 1e-7) -> float:
    """Per step, every *_loss within ``rel`` (or ``abs_`` for near-zero terms such as BASIC's SDS); returns
    the largest relative difference of the total loss."""
    assert len(a) == len(b) and a
    worst = 0.0
    for ra, rb in zip(a, b):
        assert loss_keys(ra) == loss_keys(rb)
        for key in loss_keys(ra):
            assert ra[key] == pytest.approx(rb[key], rel=rel, abs=abs_), (ra["step"], key, ra[key], rb[key])
        worst = max(worst, abs(ra["total_loss"] - rb["total_loss"]) / abs(rb["total_loss"]))
    return worst


def final_weights(run) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return ckpt_io.read_weights(ckpt_io.resolve_checkpoint(run))


def test_fsdp_matches_ddp_step_by_step(tiny_shards, cache_dir, tmp_path):
    """Stage 2, sea+basic+distill, 2 processes: FSDP2 == DDP. Without clipping bitwise (losses and every
    final weight); with clipping within 1e-5 relative. The FSDP run's checkpoint is sharded: each process
    wrote its own half of every tensor (not DDP in disguise)."""
    shards = tiny_shards(num_samples=8, samples_per_shard=2)
    runs = {
        f"{strategy}-{clip}": common_args(
            shards,
            tmp_path / f"{strategy}-{clip}",
            "--stage",
            "finetune",
            "--parallel.strategy",
            strategy,
            "--optim.max_grad_norm",
            "1.0" if clip == "clip" else "0",
        )  # fmt: skip
        for strategy in ("ddp", "fsdp")
        for clip in ("clip", "noclip")
    }
    run_many(accelerate(), list(runs.values()), cache_dir, tmp_path)

    ddp, fsdp = read_log(tmp_path / "ddp-noclip"), read_log(tmp_path / "fsdp-noclip")
    for ra, rb in zip(ddp, fsdp):
        assert {k: ra[k] for k in loss_keys(ra)} == {k: rb[k] for k in loss_keys(rb)}, ra["step"]
    (wa, oa), (wb, ob) = final_weights(tmp_path / "ddp-noclip"), final_weights(tmp_path / "fsdp-noclip")
    assert wa.keys() == wb.keys() and oa.keys() == ob.keys() and any(k.startswith("llm.") for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and all(torch.equal(oa[k], ob[k]) for k in oa)

    worst = assert_losses_close(read_log(tmp_path / "fsdp-clip"), read_log(tmp_path / "ddp-clip"))
    assert worst < 1e-5
    clipped = read_log(tmp_path / "ddp-clip")
    assert all(r["grad_norm"] > 1.0 for r in clipped)  # clipping was really active
    for ra, rb in zip(read_log(tmp_path / "fsdp-clip"), clipped):
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)

    ckpt = ckpt_io.resolve_checkpoint(tmp_path / "fsdp-clip")
    assert ckpt_io.read_state(ckpt)["format"] == "sharded"
    files = sorted((ckpt / ckpt_io.SHARDED).glob("*.safetensors"))
    assert len(files) == 2
    rows = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            rows.append(f.get_slice("vlm.llm.model.embed_tokens.weight").get_shape()[0])
    whole, _ = final_weights(tmp_path / "fsdp-clip")
    assert sum(rows) == whole["llm.model.embed_tokens.weight"].shape[0] and rows[0] == rows[1]
    assert ckpt_io.read_state(ckpt_io.resolve_checkpoint(tmp_path / "ddp-clip"))["format"] == "gathered"
    assert math.isfinite(worst)


def test_memory_estimate_follows_sharding():
    """The estimate divides what FSDP shards by the process count and nothing else: checked on the element
    counts of a real module, stage 1 (frozen LLM sharded or replicated) and stage 2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.memory import MemoryPlan, estimate_memory
    from trainer.models.build import TrainModule
    from trainer.models.projector import build_projector
    from trainer.models.vlm import VisualLM, apply_stage

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    vlm = VisualLM(LlamaForCausalLM(config), build_projector("mlp2x_gelu", 32, 64))
    module = TrainModule(vlm, torch.nn.ModuleDict())
    llm_n = sum(p.numel() for p in vlm.llm.parameters())
    proj_n = sum(p.numel() for p in vlm.projector.parameters())

    apply_stage(vlm, "pretrain")
    one = estimate_memory(module, MemoryPlan("ddp", 1))
    assert (one.trainable, one.frozen) == (proj_n, llm_n)
    assert (one.parameters, one.gradients, one.optimizer) == (4 * (llm_n + proj_n), 4 * proj_n, 12 * proj_n)
    sharded = estimate_memory(module, MemoryPlan("fsdp", 4))
    assert sharded.parameters == pytest.approx(one.parameters / 4, rel=1e-3)
    replicated = estimate_memory(module, MemoryPlan("fsdp", 4, shard_frozen_llm=False))
    assert replicated.parameters == pytest.approx(4 * llm_n + 4 * proj_n / 4, rel=1e-3)
    vlm.llm.to(torch.bfloat16)
    assert estimate_memory(module, MemoryPlan("ddp", 1)).parameters == 2 * llm_n + 4 * proj_n

    vlm.llm.to(torch.float32)
    apply_stage(vlm, "finetune")
    full = estimate_memory(module, MemoryPlan("ddp", 8))
    assert full.optimizer == 12 * (llm_n + proj_n)  # DDP: every process holds all of it
    assert estimate_memory(module, MemoryPlan("fsdp", 8)).optimizer == pytest.approx(
        full.optimizer / 8, rel=1e-2
    )
    ckpt = estimate_memory(module, MemoryPlan("ddp", 1, batch_size=4, seq_len=512, checkpointing=True))
    plain = estimate_memory(module, MemoryPlan("ddp", 1, batch_size=4, seq_len=512))
    assert ckpt.activations < plain.activations


def test_docs_memory_table_is_the_estimate():
    """docs/scaling.md's table is exactly what ``benchmarks/bench_memory.py table`` prints now."""
    from benchmarks.bench_memory import TABLE_BEGIN, TABLE_END, memory_table
    from tests.launching import REPO

    text = (REPO / "docs" / "scaling.md").read_text()
    inside = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()
    assert inside == memory_table().strip()


def all_tensors(run, step=None) -> dict[str, torch.Tensor]:
    """Every tensor of a run's checkpoint (weights, objective modules, optimizer moments), whole."""
    return ckpt_io.read_tensors(ckpt_io.resolve_checkpoint(run, step))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, unequal[:5]


def untied_llm(tmp_path) -> str:
    """A random 2-layer Llama with an untied LM head (as Vicuna and Qwen2-7B), tiny-llm's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.models.llm import load_llm

    _, tokenizer = load_llm("tiny-llm")
    folder = tmp_path / "untied-llm"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_fsdp_variants_match_ddp(tiny_shards, cache_dir, tmp_path):
    """One launch, every variant against its DDP twin (no clipping, so equal means bitwise): stage 1 with the
    frozen LLM sharded or replicated, frozen weights in bf16, gradient accumulation (holding full gradients:
    bitwise; reduce-scattering every micro-batch: rounding), activation checkpointing under both (the same
    updates as without), LoRA, an untied LM head; and bf16 mixed precision (FSDP's gathered bf16 weights vs
    DDP's autocast: equal to bf16 precision, float32 master weights kept)."""
    shards = tiny_shards(num_samples=8, samples_per_shard=2)
    untied = untied_llm(tmp_path)
    base = ["--max-steps", "3", "--optim.max_grad_norm", "0"]
    variants = {
        "s1": ["--stage", "pretrain"],
        "s1-replicated": ["--stage", "pretrain", "--parallel.shard_frozen_llm", "false"],
        "s1-bf16": ["--stage", "pretrain", "--model.dtype", "bf16"],
        "s2": ["--stage", "finetune"],
        "s2-ckpt": ["--stage", "finetune", "--gradient-checkpointing"],
        "s2-accum": ["--stage", "finetune", "--grad-accum", "2", "--batch-size", "1"],
        "s2-accum-hold": ["--stage", "finetune", "--grad-accum", "2", "--batch-size", "1",
                          "--parallel.reduce_every_micro_batch", "false"],
        "s2-untied": ["--stage", "finetune", "--llm", untied],
        "lora": ["--stage", "finetune", "--model.lora.rank", "4", "--model.lora.dropout", "0.1"],
        "s2-bf16": ["--stage", "finetune", "--mixed-precision", "bf16"],
    }  # fmt: skip
    runs = []
    for name, flags in variants.items():
        for strategy in ("ddp", "fsdp"):
            if strategy == "ddp" and name in ("s1-replicated", "s2-accum-hold"):
                continue  # FSDP-only settings: compared with the plain DDP run
            runs.append(common_args(shards, tmp_path / f"{strategy}-{name}", *base, *flags,
                                    "--parallel.strategy", strategy))  # fmt: skip
    run_many(accelerate(), runs, cache_dir, tmp_path, timeout=1200)

    def losses(run):
        return [{k: r[k] for k in loss_keys(r)} for r in read_log(tmp_path / run)]

    bitwise = {
        "fsdp-s1": "ddp-s1", "fsdp-s1-replicated": "ddp-s1", "fsdp-s1-bf16": "ddp-s1-bf16", "fsdp-s2": "ddp-s2",
        "fsdp-s2-accum-hold": "ddp-s2-accum", "ddp-s2-ckpt": "ddp-s2", "fsdp-s2-ckpt": "fsdp-s2",
        "fsdp-s2-untied": "ddp-s2-untied", "fsdp-lora": "ddp-lora",
    }  # fmt: skip
    for a, b in bitwise.items():
        assert losses(a) == losses(b), (a, b)
        assert_same_tensors(all_tensors(tmp_path / a), all_tensors(tmp_path / b))
    assert losses("ddp-s1-bf16") != losses("ddp-s1")  # bf16 frozen weights really computed in bf16
    worst = assert_losses_close(read_log(tmp_path / "fsdp-s2-accum"), read_log(tmp_path / "ddp-s2-accum"))
    assert worst < 1e-5
    # bf16 compute: FSDP gathers bf16 weights, DDP autocasts; both keep float32 master weights and moments,
    # and agree to bf16 precision (not bitwise: the two cast different tensors)
    assert losses("fsdp-s2-bf16") != losses("fsdp-s2") and losses("ddp-s2-bf16") != losses("ddp-s2")
    assert assert_losses_close(read_log(tmp_path / "fsdp-s2-bf16"), read_log(tmp_path / "ddp-s2-bf16"),
                               rel=2e-2, abs_=1e-4) < 2e-2  # fmt: skip
    assert {t.dtype for t in all_tensors(tmp_path / "fsdp-s2-bf16").values()} == {torch.float32}
    lora = all_tensors(tmp_path / "fsdp-lora")
    assert any("lora_B" in k for k in lora) and not any(
        ".base_layer." in k for k in lora if k.startswith("vlm.")
    )


@pytest.mark.slow
def test_fsdp_stop_resume_export_eval(tiny_shards, cache_dir, tmp_path):
    """Both stages under `accelerate launch --config_file jobs/accelerate/fsdp.yaml` (strategy auto -> fsdp),
    with the periodic held-out evaluation: a --stop-after + --resume run equals the uninterrupted one (every
    log record, every tensor of the last checkpoint, optimizer moments included); stage 2 starts from the
    FSDP stage-1 projector (--init-projector); the same runs under DDP give the same losses and evaluations
    (1e-5); `trainer export` and `trainer eval` of the FSDP run, on one process, equal those of the DDP run."""
    from pipeline.encoders import load_encoder
    from tests.test_trainer_export import clip_shards
    from trainer.cli import main

    encoder = load_encoder("tiny-clip", backend="hf")
    shards = clip_shards(tiny_shards, encoder)
    heldout = clip_shards(tiny_shards, encoder)
    ev = ["--eval.shards", str(heldout), "--eval.every", "2", "--eval.samples", "3", "--eval.batch_size", "2"]

    def args(name, stage, *extra):
        init = ["--init-projector", str(tmp_path / name.replace("s2", "s1").replace("-parts", ""))]
        return common_args(shards, tmp_path / name, "--stage", stage, "--objective", "sea+distill",
                           "--batch-size", "1", *ev, *(init if stage == "finetune" else []), *extra)  # fmt: skip

    fsdp = accelerate(FSDP_CONFIG)
    run_many(fsdp, [args("fsdp-s1", "pretrain"), args("fsdp-s1-parts", "pretrain", "--stop-after", "2")],
             cache_dir, tmp_path)  # fmt: skip
    run_many(fsdp, [args("fsdp-s1-parts", "pretrain", "--resume"), args("fsdp-s2", "finetune"),
                    args("fsdp-s2-parts", "finetune", "--stop-after", "2")], cache_dir, tmp_path)  # fmt: skip
    run_trainer(fsdp, args("fsdp-s2-parts", "finetune", "--resume"), cache_dir)
    run_many(accelerate(), [args("ddp-s1", "pretrain"), args("ddp-s2", "finetune")], cache_dir, tmp_path)

    for stage in ("s1", "s2"):
        whole, parts = tmp_path / f"fsdp-{stage}", tmp_path / f"fsdp-{stage}-parts"
        assert ckpt_io.read_state(ckpt_io.resolve_checkpoint(whole))["parallel"]["strategy"] == "fsdp"
        assert read_log(parts) == read_log(whole) and len(read_log(whole)) == 4 + 2  # 4 steps + 2 evaluations
        assert_same_tensors(all_tensors(parts), all_tensors(whole))
        assert any(k.startswith("state.") for k in all_tensors(whole))
        fsdp_log, ddp_log = read_log(whole), read_log(tmp_path / f"ddp-{stage}")
        steps = [r for r in fsdp_log if "total_loss" in r], [r for r in ddp_log if "total_loss" in r]
        assert assert_losses_close(*steps) < 1e-5
        evals = [r for r in fsdp_log if "total_loss" not in r], [r for r in ddp_log if "total_loss" not in r]
        for ra, rb in zip(*evals):
            assert ra.keys() == rb.keys() and len(ra) > 5
            assert all(ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6) for k in ra), ra["step"]

    # --init-projector read the FSDP stage-1 checkpoint (sharded) on one process
    from trainer.models.build import build_train_module, init_projector, load_trained

    s1_weights, _ = ckpt_io.read_weights(ckpt_io.resolve_checkpoint(tmp_path / "fsdp-s1"))
    loaded = load_trained(tmp_path / "fsdp-s1", with_objectives=False)
    assert all(
        torch.equal(v, s1_weights[f"projector.{k}"]) for k, v in loaded.vlm.projector.state_dict().items()
    )
    module, _ = build_train_module(loaded.train_cfg, loaded.manifest, None, with_objectives=False)
    init_projector(module, tmp_path / "fsdp-s1", "mlp2x_gelu", loaded.manifest)
    assert all(
        torch.equal(v, s1_weights[f"projector.{k}"]) for k, v in module.vlm.projector.state_dict().items()
    )

    # export and eval on one process: FSDP run vs DDP run
    from transformers import LlavaForConditionalGeneration

    logits = {}
    for strategy in ("fsdp", "ddp"):
        out = tmp_path / f"hf-{strategy}"
        assert (
            main(["export", str(tmp_path / f"{strategy}-s2"), "--format", "hf-llava", "--out", str(out)]) == 0
        )
        hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
        g = torch.Generator().manual_seed(0)
        image_id = hf.config.image_token_index
        ids = torch.cat(
            [torch.tensor([[image_id] * encoder.num_patches]), torch.randint(10, 900, (1, 12), generator=g)],
            1,
        )
        pixels = torch.randn(1, 3, encoder.image_size, encoder.image_size, generator=g)
        with torch.no_grad():
            logits[strategy] = hf(
                input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)
            ).logits
        assert main(["eval", str(tmp_path / f"{strategy}-s2"), "--shards", str(heldout), "--out",
                     str(tmp_path / f"eval-{strategy}"), "--samples", "3", "--pictures", "0"]) == 0  # fmt: skip
    # the clipped runs' weights differ by the gradient norm's summation order (~1e-7 relative)
    torch.testing.assert_close(logits["fsdp"], logits["ddp"], rtol=1e-5, atol=1e-5)
    assert logits["ddp"].std() > 1e-2
    ma = json.loads((tmp_path / "eval-fsdp" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "eval-ddp" / "metrics.json").read_text())
    for layer, row in mb["per_layer"].items():
        for name, value in row.items():
            assert ma["per_layer"][layer][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (layer, name)


@pytest.mark.slow
def test_a_label_less_rank_under_fsdp(tiny_shards, cache_dir, tmp_path):
    """Rank 1's first micro-batch supervises no token and the LM head is untied: under FSDP every rank still
    reduces the same buffers (zeros for what it did not use), so the run neither hangs nor fails; rank 0's
    gradient still reaches the head."""
    import subprocess

    from tests.launching import REPO, launch_env

    shards = tiny_shards(num_samples=8, samples_per_shard=2)
    for objective in ("lm", "sea+basic+distill"):
        run = tmp_path / objective
        args = common_args(shards, run, "--stage", "finetune", "--llm", untied_llm(tmp_path), "--objective",
                           objective, "--max-steps", "2", "--parallel.strategy", "fsdp")  # fmt: skip
        out = subprocess.run([*accelerate(), str(REPO / "tests" / "label_less_run.py"), *args],
                             env=launch_env(cache_dir), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        log = read_log(run)
        assert len(log) == 2 and all(math.isfinite(r["total_loss"]) for r in log)
        from trainer.models.llm import load_llm

        initial, _ = load_llm(str(tmp_path / "untied-llm"))
        head = all_tensors(run)["vlm.llm.lm_head.weight"]
        assert not torch.equal(head, initial.lm_head.weight)
