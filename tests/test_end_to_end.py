"""The installed console scripts in a chain on the bundled photos, as a user runs them:

    pipeline label -> trainer run (2 steps) -> trainer export -> trainer eval

Each stage is checked by value against the stage before it: the shards hold one sample per photo with the
encoder's feature shape; the run's checkpoint projector is what the export carries; the exported HF LLaVA,
fed a raw photo through its own processor, computes the same LLaVA features the pipeline cached for that
photo (fp16 storage) and the same image tokens our model computes from the shards; eval's counts match.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo"


def script(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"console script {name!r} is not installed next to {sys.executable}: `make venv`")
    return found


def sh(*argv: str, env: dict[str, str]) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, f"{argv[:2]} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_console_scripts_chain(tmp_path, cache_dir):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from trainer.models.build import load_trained
    from visalign import shards as S

    env = {**os.environ, "VISALIGN_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    shards, run, hf, ev = tmp_path / "shards", tmp_path / "run", tmp_path / "hf", tmp_path / "eval"
    records = json.loads((DEMO / "llava.json").read_text())
    # the head of the shipped list: the text tower embeds 500 words instead of 41k (a test, not a demo)
    words = tmp_path / "words.txt"
    shipped = (ROOT / "wordlists" / "english-41k.txt").read_text(encoding="utf-8").splitlines()
    words.write_text("\n".join(shipped[:500]) + "\n", encoding="utf-8")

    # 1. label: one sample per photo, LLaVA features of the tiny tower's shape
    sh(script("pipeline"), "label", "--config", "jobs/label-demo.yaml", "--input", str(DEMO / "llava.json"),
       "--images", str(DEMO / "images"), "--shards", str(shards), "--wordlist", str(words),
       "--progress", "false", env=env)  # fmt: skip
    manifest = S.read_manifest(shards)
    assert manifest.num_samples == len(records) and manifest.num_rejects == 0
    cached = {s["meta"]["id"]: s for path in manifest.shard_paths(shards) for s in S.iter_tar(path)}
    assert sorted(cached) == sorted(r["id"] for r in records)
    num_patches, width = manifest.num_patches, manifest.encoder.feature_dim
    assert all(s["feat"].shape == (num_patches, width) for s in cached.values())
    assert "tiny-clip" in sh(script("pipeline"), "info", str(shards), env=env)

    # 2. train two steps
    sh(script("trainer"), "run", "--shards", str(shards), "--output", str(run), "--llm", "tiny-llm",
       "--objective", "sea", "--max-steps", "2", "--batch-size", "2", "--logging.progress", "false",
       "--logging.tensorboard", "false", env=env)  # fmt: skip
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["sea_loss"]) for r in log)

    # 3. export: the HF model sees the raw photo as the pipeline did, and projects it as our model does
    assert sh(script("trainer"), "export", str(run), "--out", str(hf), env=env).strip() == str(hf)
    model = LlavaForConditionalGeneration.from_pretrained(hf).eval()
    processor = AutoProcessor.from_pretrained(hf)
    ours = load_trained(run, with_objectives=False)
    key = records[0]["id"]
    image = Image.open(DEMO / "images" / records[0]["image"]).convert("RGB")
    pixels = processor(text="<image>", images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        feats_PD = hidden[manifest.encoder.feature_layer][0, 1:]  # CLIP: drop the class token
        cached_PD = torch.from_numpy(cached[key]["feat"].astype(np.float32))
        # fp16 storage in the shards, and the processor's resize may differ by a pixel level
        assert (feats_PD - cached_PD).abs().mean() < 2e-3 * cached_PD.abs().mean() + 1e-3
        tokens_Pd = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        torch.testing.assert_close(tokens_Pd, ours.vlm.projector(feats_PD), rtol=1e-5, atol=1e-5)

    # 4. eval: the measures of the requested samples, every layer
    sh(script("trainer"), "eval", str(run), "--shards", str(shards), "--out", str(ev), "--samples", "4",
       "--pictures", "1", env=env)  # fmt: skip
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["checkpoint_step"] == 2 and metrics["counts"]["samples"] == 4
    assert metrics["counts"]["visual_tokens"] == 4 * manifest.num_patches
    num_layers = ours.vlm.llm.config.num_hidden_layers
    assert sorted(int(k) for k in metrics["per_layer"]) == list(range(num_layers + 1))
    assert all(0.0 <= row["hit@10"] <= 1.0 for row in metrics["per_layer"].values())
    assert (ev / f"words-{key}-l0.png").is_file()
