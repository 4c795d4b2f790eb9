"""The label score follows the encoder family when ``--score`` is not given, and the manifest says so.

CLIP towers rank by ``neg-cos`` (SEA: "following CLIP Surgery", the cosine is negated in CLIP's space),
SigLIP towers by ``cos`` (SEA is silent there). The settings digest holds the resolved value, so a rerun with
the same value given explicitly resumes; a root written when every tower defaulted to ``cos`` resumes with
``--score cos`` and is refused, with a note saying the default changed, without it. Settings that cannot
work are one-line errors before any output exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import LabelConfig
from pipeline.driver import SettingsMismatchError, run_label
from visalign import shards as S

ROOT = Path(__file__).resolve().parents[1]
WORDS = "cat\ndog\ncup\nsky\ntree\nflag\nrocket\nflower\n"


def cli_label(photo_dataset, out: Path, cache_dir, *extra) -> int:
    words = out.parent / "words.txt"
    words.write_text(WORDS)
    return main(
        ["label", "--input", str(photo_dataset), "--images", str(photo_dataset.parent / "images"),
         "--shards", str(out), "--wordlist", str(words), "--scheduler", "synchronous", "--samples-per-shard",
         "3", "--top-k", "4", "--progress", "false", "--cache-dir", str(cache_dir), *extra]
    )  # fmt: skip


def cfg_of(photo_dataset, out: Path, cache_dir, **over) -> LabelConfig:
    words = out.parent / "words.txt"
    words.write_text(WORDS)
    base = dict(
        encoder="tiny-clip", input=str(photo_dataset), images=str(photo_dataset.parent / "images"),
        shards=str(out), wordlist=str(words), scheduler="synchronous", samples_per_shard=3, top_k=4,
        progress=False, cache_dir=str(cache_dir),
    )  # fmt: skip
    return LabelConfig(**{**base, **over})


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


@pytest.mark.parametrize("encoder,default", [("tiny-clip", "neg-cos"), ("tiny-siglip", "cos")])
def test_no_preset_records_the_family_default(photo_dataset, tmp_path, cache_dir, encoder, default):
    out = tmp_path / "default"
    assert cli_label(photo_dataset, out, cache_dir, "--encoder", encoder) == 0
    m = S.read_manifest(out)
    print(
        f"\n{encoder} without --score: manifest score_sign={m.score_sign!r} score_source={m.score_source!r}"
    )
    assert (m.score_sign, m.score_source, m.feature_surgery) == (default, "family-default", False)
    settings = json.loads((out / S.SETTINGS).read_text())
    assert settings["settings"]["score"] == default and settings["score_source"] == "family-default"
    assert yaml.safe_load((out / S.CONFIG).read_text())["score"] == default
    # the same value given explicitly: the same settings, so a rerun resumes (nothing relabelled) ...
    before = shard_bytes(out)
    summary = run_label(cfg_of(photo_dataset, out, cache_dir, encoder=encoder, score=default))
    assert summary["num_shards_skipped"] == 3 and summary["num_images_this_run"] == 0
    assert shard_bytes(out) == before
    assert S.read_manifest(out).score_source == "user"
    # ... and a fresh explicit run writes the very same shards
    explicit = tmp_path / "explicit"
    run_label(cfg_of(photo_dataset, explicit, cache_dir, encoder=encoder, score=default))
    assert shard_bytes(explicit) == before


def as_schema_2(out: Path) -> None:
    """Rewrite a root's settings.json and manifest as a schema-2 visalign wrote them (no score source, none
    of schema 3's fields): what a user finds in a folder labelled before this version."""
    recorded = json.loads((out / S.SETTINGS).read_text())
    settings = dict(recorded["settings"], schema_version=2)
    for added_in_3 in ("store_images", "surgery_depth", "feature_surgery"):
        del settings[added_in_3]
    S.write_json_atomic(out / S.SETTINGS, {"digest": recorded["digest"], "settings": settings})
    manifest = json.loads((out / S.MANIFEST).read_text())
    for added_in_3 in ("score_source", "feature_surgery", "stores_images"):
        del manifest[added_in_3]
    del manifest["encoder"]["dense"], manifest["encoder"]["surgery_depth"]
    manifest["schema_version"] = 2
    S.write_json_atomic(out / S.MANIFEST, manifest)
    assert S.read_manifest(out).schema_version == 2


def test_a_root_from_the_old_default_resumes_with_the_explicit_score(photo_dataset, tmp_path, cache_dir):
    out = tmp_path / "old"
    run_label(cfg_of(photo_dataset, out, cache_dir, score="cos"))
    as_schema_2(out)
    before = shard_bytes(out)
    with pytest.raises(SettingsMismatchError) as err:
        run_label(cfg_of(photo_dataset, out, cache_dir))  # the new default, neg-cos
    text = str(err.value)
    print(f"\nrerun of a schema-2 root (old default cos) without --score:\n{text}")
    assert 'score: "cos" -> "neg-cos"' in text
    assert "--score was not given" in text and "the default of every tower before schema 3 (cos)" in text
    assert "Pass --score cos to resume it" in text
    assert not any(line.startswith(("  schema_version", "  store_images")) for line in text.splitlines())
    summary = run_label(cfg_of(photo_dataset, out, cache_dir, score="cos"))
    assert summary["num_shards_skipped"] == 3 and summary["num_images_this_run"] == 0
    assert shard_bytes(out) == before
    m = S.read_manifest(out)
    assert (m.schema_version, m.score_sign, m.score_source) == (3, "cos", "user")


def test_a_user_score_is_named_as_such_in_the_refusal(photo_dataset, tmp_path, cache_dir):
    out = tmp_path / "user"
    run_label(cfg_of(photo_dataset, out, cache_dir, encoder="tiny-siglip", score="neg-cos"))
    with pytest.raises(SettingsMismatchError) as err:
        run_label(cfg_of(photo_dataset, out, cache_dir, encoder="tiny-siglip"))
    assert "labelled with neg-cos, given with --score" in str(err.value)


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--encoder", "tiny-siglip", "--dense", "surgery"], "CLIP Surgery is defined for CLIP towers"),
        (["--encoder", "tiny-siglip", "--dense", "maskclip"], "MaskCLIP is defined for CLIP towers"),
        (
            ["--encoder", "tiny-clip", "--feature-surgery", "true"],
            "--feature-surgery true needs --dense surgery",
        ),
        (
            ["--encoder", "tiny-clip", "--dense", "surgery", "--surgery-depth", "0"],
            "--surgery-depth must be >= 1",
        ),
        (["--encoder", "tiny-clip", "--experts", "hf:/no/such/backbone"], "/no/such/backbone does not exist"),
        (["--encoder", "tiny-clip", "--experts", "a=tiny-siglip,a=tiny-clip"], "['a'] appear twice"),
        (["--encoder", "tiny-clip", "--experts", "encoder=tiny-siglip"], "'encoder' cannot be used"),
        (["--encoder", "tiny-clip", "--experts", "tiny-sigclip"], "--experts tiny-sigclip"),
        (["--encoder", "tiny-clip", "--score", "dot"], "score"),
    ],
)
def test_unusable_settings_are_one_line_before_any_work(extra, needle, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["label", "--input", "x.json", "--shards", str(out), *extra]) == 3
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists(), "a refused configuration leaves no output folder behind"


@pytest.mark.parametrize("preset", ["label-clip", "label-clip-558k", "label-demo", "label-siglip"])
def test_presets_leave_the_score_to_the_family(preset):
    from pipeline.encoders import encoder_family
    from pipeline.task import FAMILY_SCORE
    from visalign.config import resolve

    cfg = resolve(LabelConfig, {"config": ROOT / "jobs" / f"{preset}.yaml", "input": "x.json", "shards": "o"})
    assert cfg.score is None
    assert FAMILY_SCORE[encoder_family(cfg.encoder)] == ("cos" if "siglip" in preset else "neg-cos")
