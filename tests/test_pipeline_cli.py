"""The `pipeline` console script: label/info/show/stats through main(); one-line errors for user mistakes.

The labelled input is the bundled photos plus two text-only records (no "image" key), as in LLaVA's mix.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.inspect import label_stats
from visalign import shards as S

WORDS = (
    "cat dog car tree house sky cloud sun flower grass water boat bird fish horse cup spoon "
    "helmet flag rocket"
)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, photo_dataset, cache_dir):
    root = tmp_path_factory.mktemp("cli")
    (root / "words.txt").write_text(WORDS.replace(" ", "\n"))
    records = json.loads(photo_dataset.read_text())
    chat = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]
    records[2:2] = [{"id": "chat-1", "conversations": chat}, {"id": "chat-2", "conversations": chat}]
    (root / "mix.json").write_text(json.dumps(records))
    out = root / "out"
    rc = main(
        [
            "label",
            "--config",
            "jobs/label-demo.yaml",
            "--input",
            str(root / "mix.json"),
            "--images",
            str(photo_dataset.parent / "images"),
            "--shards",
            str(out),
            "--wordlist",
            str(root / "words.txt"),
            "--samples-per-shard",
            "3",
            "--top-k",
            "5",
            "--score",
            "cos",
            "--progress",
            "false",
            "--cache-dir",
            str(cache_dir),
        ]
    )
    assert rc == 0
    return out


def test_label_writes_contract_files(labelled):
    import pyarrow.parquet as pq
    import yaml

    cfg = yaml.safe_load((labelled / S.CONFIG).read_text())
    assert (cfg["top_k"], cfg["samples_per_shard"]) == (5, 3)  # flags beat label-demo.yaml (10, 100)
    assert (cfg["encoder"], cfg["backend"], cfg["batch_size"]) == ("tiny-clip", "hf", 16)  # from the preset
    assert pq.read_table(labelled / S.REJECTS).num_rows == 0


def test_info(labelled, capsys):
    assert main(["info", str(labelled)]) == 0
    text = capsys.readouterr().out
    assert "tiny-clip" in text and "top-5 by cos (given)" in text and "20 words" in text
    assert "9 in 3 shards (7 with an image, 2 text-only), 0 rejects" in text
    sizes = sum((labelled / f"shard-{i:06d}.tar").stat().st_size for i in range(3))
    assert f"{sizes / 1e3:.2f} kB of shards ({sizes / 7 / 1e3:.2f} kB per image sample)" in text
    assert "crop, then shortest resize to 64 px" in text


def test_text_only_samples_in_the_shards_and_manifest(labelled):
    m = S.read_manifest(labelled)
    assert (m.num_samples, m.num_text_only, m.schema_version) == (9, 2, 3)
    per_shard = []
    for info, path in zip(m.shards, m.shard_paths(labelled)):
        samples = list(S.iter_tar(path))
        text_only = [s for s in samples if "feat" not in s]
        per_shard.append(len(text_only))
        assert info.num_samples == len(samples) and info.num_text_only == len(text_only)
        assert info.num_bytes == path.stat().st_size and info.sha256 == S.sha256_file(path)
        for s in text_only:  # the json member alone: text, no image fields
            assert set(s) == {"__key__", "meta"} and s["meta"]["has_image"] is False
            assert "source" not in s["meta"] and "orig_size" not in s["meta"]
    assert per_shard == [1, 1, 0], "input order kept: records 2 and 3 of 9, three per shard"
    ids = [s["meta"]["id"] for p in m.shard_paths(labelled) for s in S.iter_tar(p)]
    assert ids[:5] == ["astronaut", "cat", "chat-1", "chat-2", "coffee"]


def test_stats_match_a_direct_count(labelled, capsys):
    assert main(["stats", str(labelled), "--top", "3"]) == 0
    text = capsys.readouterr().out
    st = label_stats(labelled)
    # independent count straight from the shards
    samples = [s for p in S.read_manifest(labelled).shard_paths(labelled) for s in S.iter_tar(p)]
    labels = np.concatenate([s["labels"] for s in samples if "labels" in s])
    assert st["num_samples"] == 9 and st["num_text_only"] == 2 == sum("labels" not in s for s in samples)
    assert st["num_patches"] == labels.shape[0] == 7 * 64
    assert st["top1_words_used"] == len(set(labels[:, 0][labels[:, 0] >= 0].tolist()))
    assert st["any_words_used"] == len(set(labels[labels >= 0].tolist()))
    assert st["absent_share"] == pytest.approx((labels < 0).mean())
    top_word, top_count = st["top_words"][0]
    counts = np.bincount(labels[:, 0][labels[:, 0] >= 0], minlength=20)
    assert top_count == counts.max() and S.read_wordlist(labelled)[int(counts.argmax())] == top_word
    assert "word list use" in text and top_word in text


def test_show_draws_the_encoder_view(labelled, tmp_path):
    png = tmp_path / "cat.png"
    assert main(["show", str(labelled), "--key", "cat", "--out", str(png), "--cell", "48"]) == 0
    img = Image.open(png)
    assert img.size == (8 * 48, 8 * 48)  # tiny-clip: 8x8 patches
    arr = np.asarray(img).astype(int)
    assert (arr[:, 48] == 200).all(), "grid line between the first two columns"
    assert arr.std() > 20
    # the top label of the first patch is written in its cell: white glyph pixels there, none in a blank run
    first_cell = arr[4:44, 4:44]
    assert ((first_cell == 255).all(-1)).sum() > 10


def test_show_refuses_a_text_only_sample(labelled, tmp_path, capsys):
    assert main(["show", str(labelled), "--key", "chat-1", "--out", str(tmp_path / "x.png")]) == 3
    err = capsys.readouterr().err.strip()
    assert "'chat-1'" in err and "text-only" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (
            ["label", "--encoder", "tiny-clip", "--input", "/nonexistent.json", "--shards", "/tmp/x"],
            "does not exist",
        ),
        (
            ["label", "--encoder", "no-such", "--input", "{photos}", "--shards", "{tmp}/o"],
            "valid names: clip",
        ),
        (["label", "--input", "{photos}", "--shards", "{tmp}/o"], "--encoder"),
        (["label", "--encoder", "tiny-clip", "--input", "{photos}", "--shards", "{tmp}/o"], "--images"),
        (
            [
                "label",
                "--encoder",
                "tiny-clip",
                "--top-k",
                "ten",
                "--input",
                "{photos}",
                "--shards",
                "{tmp}/o",
            ],
            "top_k",
        ),
        (["info", "{tmp}"], "manifest.json"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_user_errors_are_one_line(argv, needle, tmp_path, photo_dataset, capsys, cache_dir):
    argv = [a.format(photos=photo_dataset, tmp=tmp_path) for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert needle in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
        ("--samples-per-shard", "-3", "--samples-per-shard must be >= 1, got -3"),
        ("--top-k", "0", "--top-k must be >= 1, got 0"),
        ("--workers", "0", "--workers must be >= 1, got 0"),
        ("--decode-threads", "0", "--decode-threads must be >= 1, got 0"),
        ("--max-image-pixels", "0", "--max-image-pixels must be >= 1, got 0"),
        ("--text-context", "2", "--text-context must be >= 3"),
        ("--image-aspect", "square", "image_aspect"),
        ("--score", "dot", "score"),
        ("--dense", "gradcam", "--dense 'gradcam'"),
        ("--search-backend", "annoy", "--search-backend 'annoy'"),
        ("--batch-size", "1.5", "batch_size"),
    ],
)
def test_bad_numbers_and_choices_are_one_line_before_any_work(flag, value, needle, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["label", "--encoder", "tiny-clip", "--input", "x.json", "--shards", str(out), flag, value]
    assert main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists(), "a refused configuration leaves no output folder behind"


def test_bad_flag_is_argparse_error(capsys):
    assert main(["label", "--no-such-flag", "1"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    assert main(["label", "--help"]) == 0
    assert "--samples-per-shard" in capsys.readouterr().out


def test_top_k_above_the_word_count_is_refused(tmp_path, photo_dataset, capsys, cache_dir):
    (tmp_path / "w.txt").write_text("cat\ndog\n")
    argv = ["label", "--encoder", "tiny-clip", "--input", str(photo_dataset), "--images",
            str(photo_dataset.parent / "images"), "--shards", str(tmp_path / "o"), "--wordlist",
            str(tmp_path / "w.txt"), "--top-k", "3", "--cache-dir", str(cache_dir), "--progress", "false"]  # fmt: skip
    assert main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert "--top-k 3 is more than the 2 words" in err and len(err.splitlines()) == 1
    assert not list((tmp_path / "o").glob("shard-*")), "refused before any shard"
