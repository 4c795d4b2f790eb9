"""The `pipeline` console script: label/info/show/stats through main(); one-line errors for user mistakes."""

from __future__ import annotations

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
    out = root / "out"
    rc = main(
        [
            "label",
            "--config",
            "jobs/label-demo.yaml",
            "--input",
            str(photo_dataset),
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
            "--progress",
            "false",
            "--cache-dir",
            str(cache_dir),
        ]
    )
    assert rc == 0
    return out


def test_label_writes_contract_files(labelled):
    for name in (S.MANIFEST, S.WORDLIST, S.REJECTS, S.CONFIG, "shard-000000.tar", "shard-000002.tar"):
        assert (labelled / name).is_file(), name
    cfg = (labelled / S.CONFIG).read_text()
    assert "encoder: tiny-clip" in cfg and "top_k: 5" in cfg, "the preset + flags resolved into config.yaml"


def test_info(labelled, capsys):
    assert main(["info", str(labelled)]) == 0
    text = capsys.readouterr().out
    assert "tiny-clip" in text and "7 in 3 shards, 0 rejects" in text and "top-5 by cos" in text
    assert "20 words" in text


def test_stats_match_a_direct_count(labelled, capsys):
    assert main(["stats", str(labelled), "--top", "3"]) == 0
    text = capsys.readouterr().out
    st = label_stats(labelled)
    # independent count straight from the shards
    labels = np.concatenate(
        [s["labels"] for p in S.read_manifest(labelled).shard_paths(labelled) for s in S.iter_tar(p)]
    )
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


def test_bad_flag_is_argparse_error(capsys):
    assert main(["label", "--no-such-flag", "1"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    assert main(["label", "--help"]) == 0
    assert "--samples-per-shard" in capsys.readouterr().out
