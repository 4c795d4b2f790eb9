"""``benchmarks/gpu.py``: its FLOP count against torch's own counter, and a run through every section on the
CPU at tiny sizes (a check of the script itself, not of speed: no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import types
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forward_flops_equal_torch_flop_counter(gpu):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trainer.models.projector import build_projector

    torch.manual_seed(0)
    shape = gpu.TINY_LLMS["tiny-b"]
    llm = Qwen2ForCausalLM(Qwen2Config(**shape, attn_implementation="eager")).eval()
    projector = build_projector("mlp2x_gelu", 24, shape["hidden_size"])
    lengths = [20, 13]
    mask_BT = torch.zeros(2, 20, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask_BT[b, :n] = 1
    batch = {"attention_mask_BT": mask_BT, "feats_BPD": torch.randn(2, 9, 24), "num_target_tokens": 7}
    parts = gpu.forward_flops(types.SimpleNamespace(llm=llm, projector=projector), batch)

    def counted(fn) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    # one unpadded sequence at a time: the counter sees exactly T tokens and a T x T (full) score matrix,
    # whose causal half is what the script counts
    body = sum(
        counted(lambda n=n: llm.base_model(inputs_embeds=torch.randn(1, n, shape["hidden_size"])))
        for n in lengths
    )
    assert body == parts["linear"] + 2 * parts["attention"]
    head = counted(lambda: llm.lm_head(torch.randn(7, shape["hidden_size"])))
    assert head == parts["head"]
    assert counted(lambda: projector(batch["feats_BPD"])) == parts["projector"]
    # a step: stage 1 = forward + activation gradients, stage 2 adds weight gradients
    s1, s2 = gpu.model_flops(types.SimpleNamespace(llm=llm, projector=projector), batch, "pretrain"), None
    s2 = gpu.model_flops(types.SimpleNamespace(llm=llm, projector=projector), batch, "finetune")
    assert s2 - s1 == parts["linear"] + parts["head"]


def leaves(node, where=""):
    """(path, value) of every leaf; a ``{"skipped": reason}`` dict is one leaf."""
    if isinstance(node, dict) and not (len(node) == 1 and "skipped" in node):
        for key, value in node.items():
            yield from leaves(value, f"{where}/{key}")
    else:
        yield where, node


def test_tiny_cpu_run_reports_every_section(gpu, tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("VISALIGN_CACHE", str(cache_dir))
    threads = torch.get_num_threads()
    out = gpu.main(
        ["--device", "cpu", "--tiny", "--out", str(tmp_path), "--towers", "clip", "--llm-sizes", "tiny-a",
         "--search-backends", "torch", "faiss", "--peak-tflops", "2.0"]
    )  # fmt: skip
    assert torch.get_num_threads() == threads  # --tiny runs on one thread, then gives the caller's back
    report = json.loads((out / "gpu-bench.json").read_text())
    for section in ("label", "trainer", "objectives", "reader"):
        assert report[section], section
        for where, value in leaves(report[section], section):
            if isinstance(value, dict):
                assert isinstance(value["skipped"], str) and value["skipped"], where
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                assert math.isfinite(value), where
    label = report["label"]["clip"]["backends"]
    assert label["torch"]["stage_ips"]["median"] > 0 and label["torch"]["ratio"]["median"] > 0
    assert "skipped" in label["faiss"] or label["faiss"]["ratio"]["median"] > 0
    for stage in ("pretrain", "finetune"):
        row = report["trainer"][f"tiny-a {stage}"]
        assert row["tokens_per_s"] > 0 and 0 < row["train_step_share"] <= 1
        assert row["mfu"] == pytest.approx(row["achieved_tflops"] / 2.0)
    objectives = report["objectives"]["tiny-a"]
    assert set(objectives) == {"lm", "sea", "basic", "distill"} and objectives["lm"]["time_vs_lm"] == 1.0
    assert report["reader"]["workers=0"]["samples_per_s"] > 0
    assert report["reader"]["vs_8_gpus_stage1"] > 0
    # what the CPU cannot measure is said, not left out
    assert any("no GPU" in note or "device cpu" in note for note in report["notes"])
    text = (out / "gpu-bench.md").read_text()
    assert "## Trainer step" in text and "tiny-a" in text and "| clip | torch |" in text
