"""docs/api.md runs as written: its Python blocks are executed top to bottom in one namespace (as a notebook
would), in a folder holding ``examples/`` and a short ``words.txt``, on the tiny models; then what each
block produced is checked against the files it wrote."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_api_page_runs_as_written(tmp_path, monkeypatch, cache_dir, capsys):
    blocks = python_blocks((ROOT / "docs" / "api.md").read_text(encoding="utf-8"))
    assert len(blocks) == 7  # label, read, train, log, load, evaluate, export
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    shipped = (ROOT / "wordlists" / "english-41k.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "words.txt").write_text("\n".join(shipped[:300]) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    printed = capsys.readouterr().out

    records = json.loads((ROOT / "examples" / "demo" / "llava.json").read_text())
    assert namespace["summary"]["num_images"] == len(records) == namespace["manifest"].num_samples
    assert f"{len(records)} images, 0 rejected, 1 shard(s)" in printed
    first = namespace["first"]
    assert first["feat"].shape == (
        namespace["manifest"].num_patches,
        namespace["manifest"].encoder.feature_dim,
    )
    assert [r["step"] for r in namespace["log"]] == [1, 2]
    assert (tmp_path / "runs" / "demo" / "env.json").is_file() and (
        tmp_path / "runs" / "demo" / "tensorboard"
    ).is_dir()
    assert namespace["loaded"].step == 2
    assert namespace["metrics"]["counts"]["samples"] == 4
    assert (tmp_path / "eval" / "demo" / "metrics.json").is_file()
    # the exported model computes, from the exported projector, what the loaded run's projector computes
    model, vlm = namespace["model"], namespace["vlm"]
    feats_PD = torch.randn(5, namespace["manifest"].encoder.feature_dim)
    with torch.no_grad():
        torch.testing.assert_close(model.model.multi_modal_projector(feats_PD), vlm.projector(feats_PD))
    assert namespace["generated"].shape[1] == namespace["inputs"]["input_ids"].shape[1] + 8
