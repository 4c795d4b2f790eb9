"""Hub ids as model locations (``--llm org/name``, an encoder the manifest records by hub id): resolved through
the HF cache offline, and a one-line error naming the download command when the id is not cached.

The HF cache is a temporary folder laid out as huggingface_hub lays it out (``models--org--name/refs/main``
+ ``snapshots/<revision>/``), filled with the tiny models; nothing is fetched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer.cli import main
from visalign.shards import EncoderInfo, read_manifest, write_manifest

REVISION = "0123456789abcdef0123456789abcdef01234567"
BASE = ["--batch-size", "2", "--logging.progress", "false", "--logging.report-to", "none", "--max-steps", "1"]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """``put(repo_id, folder)`` copies a model folder into a private HF cache as a downloaded snapshot."""
    from huggingface_hub import constants

    root = tmp_path / "hf-hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def put(repo_id: str, folder: str | Path) -> Path:
        repo = root / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(REVISION)
        snapshot = repo / "snapshots" / REVISION
        shutil.copytree(folder, snapshot, ignore=shutil.ignore_patterns(".complete"))
        return snapshot

    return put


def test_llm_hub_id_resolves_through_the_cache_offline(hf_cache, tiny_shards, tmp_path, capsys):
    from trainer.models.llm import resolve_llm

    snapshot = hf_cache("acme/tiny-chat", resolve_llm("tiny-llm"))
    assert resolve_llm("acme/tiny-chat") == str(snapshot)
    shards = tiny_shards(num_samples=4)
    run = tmp_path / "run"
    assert main(["run", "--shards", str(shards), "--llm", "acme/tiny-chat", *BASE, "--output", str(run)]) == 0
    assert "llm: acme/tiny-chat" in (run / "config.yaml").read_text()  # the id is recorded, not the path
    assert (run / "checkpoints" / "step-000001").is_dir()

    args = [
        "run",
        "--shards",
        str(shards),
        "--llm",
        "acme/not-downloaded",
        *BASE,
        "--output",
        str(tmp_path / "r2"),
    ]
    assert main(args) == 3
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert "--llm 'acme/not-downloaded' is not in the Hugging Face cache and the hub is offline" in line
    assert "download acme/not-downloaded`" in line  # `hf download ...` (huggingface-cli on older hubs)


def test_download_command_matches_the_installed_hub_client():
    import huggingface_hub

    from trainer.models.hub import download_command

    major = int(huggingface_hub.__version__.split(".")[0])
    expected = "hf download a/b" if major >= 1 else "huggingface-cli download a/b"
    assert download_command("a/b") == expected


def test_encoder_recorded_by_hub_id_exports_from_the_cache(hf_cache, tiny_shards, tmp_path, capsys):
    from pipeline.encoders import load_encoder

    encoder = load_encoder("tiny-clip", backend="hf")
    info = {**encoder.info(-2), "path": "acme/tiny-clip"}
    root = tiny_shards(num_samples=4, P=encoder.num_patches, D=encoder.feature_dim)
    manifest = read_manifest(root)
    manifest.encoder = EncoderInfo(**info)
    write_manifest(root, manifest)
    run = tmp_path / "run"
    assert main(["run", "--shards", str(root), "--llm", "tiny-llm", *BASE, "--output", str(run)]) == 0

    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 3
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert "'acme/tiny-clip' is not in the Hugging Face cache" in line and "pass --encoder-path DIR" in line

    snapshot = hf_cache("acme/tiny-clip", encoder.path)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "visalign_export.json").read_text())["encoder_loaded_from"] == str(
        snapshot
    )
