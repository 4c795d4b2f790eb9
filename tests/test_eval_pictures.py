"""Pictures: the encoder's view, words on their cells, words land on their cells, plots and tables render."""

from __future__ import annotations

import tarfile

import numpy as np
from PIL import Image

from trainer.evaluate import pictures as pic
from visalign import pictures as words_on_cells


def _quadrants(size=64) -> Image.Image:
    """Red / green / blue / white quadrants: where each cell's colour is known."""
    arr = np.zeros((size, size, 3), np.uint8)
    h = size // 2
    arr[:h, :h] = (255, 0, 0)
    arr[:h, h:] = (0, 255, 0)
    arr[h:, :h] = (0, 0, 255)
    arr[h:, h:] = (255, 255, 255)
    return Image.fromarray(arr)


def test_encoder_view_crops_the_centre_and_falls_back_to_grey(tmp_path):
    # 96 x 64 landscape: short side 64 -> 32, long 96 -> 48, centre crop 32 x 32 drops 8 px each side
    wide = np.zeros((64, 96, 3), np.uint8)
    wide[:, :16] = 255  # a white band that the crop must remove
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    view, found = words_on_cells.encoder_view(str(path), 32, "shortest")
    assert found and view.size == (32, 32)
    assert np.asarray(view)[:, 2:].max() <= 10  # only the black middle is left (edge pixels may ring)
    squashed, _ = words_on_cells.encoder_view(str(path), 32, "squash")
    assert np.asarray(squashed)[:, 0].min() > 200  # squash keeps the white band
    # inside a tar, as `<tar>::<member>`
    with tarfile.open(tmp_path / "imgs.tar", "w") as tar:
        tar.add(path, arcname="k1.png")
    view2, found2 = words_on_cells.encoder_view(f"{tmp_path / 'imgs.tar'}::k1.png", 32, "shortest")
    assert found2 and np.array_equal(np.asarray(view2), np.asarray(view))
    grey, found3 = words_on_cells.encoder_view(str(tmp_path / "gone.jpg"), 32)
    assert not found3 and grey.getpixel((5, 5)) == words_on_cells.GREY
    assert (
        words_on_cells.resize_mode_for("tiny-siglip") == "squash"
        and words_on_cells.resize_mode_for("clip") == "shortest"
    )


def test_word_grid_puts_each_word_on_its_cell():
    words = [["cat", ""], ["", "dog"]]
    status = [[words_on_cells.HIT, None], [None, words_on_cells.MISS]]
    out = words_on_cells.word_grid_image(_quadrants(), words, status, cell_px=80)
    assert out.size == (160, 160)
    arr = np.asarray(out).astype(int)
    # green text pixels only in cell (0, 0), red text pixels only in cell (1, 1); dimmed background elsewhere
    green = (arr[..., 1] > 200) & (arr[..., 0] < 120) & (arr[..., 2] < 120)
    red = (arr[..., 0] > 240) & (arr[..., 1] < 120) & (arr[..., 2] < 120)
    assert green[:80, :80].sum() > 20 and green[:, 80:].sum() == 0 and green[80:].sum() == 0
    assert red[80:, 80:].sum() > 20 and red[:80].sum() == 0 and red[:, :80].sum() == 0


def test_word_grid_long_words_fit_and_title_adds_a_band():
    words = [["incomprehensibilities"] * 3] * 3
    out = words_on_cells.word_grid_image(None, words, cell_px=48, title="layer 0")
    assert out.size == (144, 144 + int(48 * 0.6))
    _assert_grid_with_text_in_every_cell(out, 3, 48, int(48 * 0.6))


def _assert_grid_with_text_in_every_cell(image, grid: int, cell: int, top: int, min_bright: int = 10):
    """Grid lines intact (no glyph crosses a cell border) and bright glyph pixels inside every cell."""
    arr = np.asarray(image).astype(int)
    for k in range(1, grid):
        assert (arr[top:, k * cell] == 200).all(), f"column line {k}"
        assert (arr[top + k * cell, :] == 200).all(), f"row line {k}"
    bright = arr[top:].min(-1) > 150  # anti-aliased small glyphs are rarely pure white
    for r in range(grid):
        for c in range(grid):
            cell_px = bright[r * cell + 1 : (r + 1) * cell, c * cell + 1 : (c + 1) * cell]
            assert cell_px.sum() > min_bright, (r, c)


def test_curves_and_tables(tmp_path):
    curves = {
        "a": {"hit@1": {0: 0.1, 1: 0.2, 2: float("nan")}, "meaningful": {0: 0.5, 1: 0.4}},
        "b": {"hit@1": {0: 0.3}},
    }
    path = pic.plot_layer_curves(curves, tmp_path / "c.png", title="t")
    assert Image.open(path).size == (924, 352)  # two measures: one row of two 4.2 x 3.2 in panels, 110 dpi
    md = pic.markdown_table(["measure", "a", "b"], [["hit@1", 0.12345, float("nan")], ["n", 3, 4]])
    assert md.splitlines() == [
        "| measure | a | b |",
        "|---|---|---|",
        "| hit@1 | 0.123 | nan |",
        "| n | 3 | 4 |",
    ]
    table = Image.open(pic.table_png(["m", "a"], [["x", 0.5]], tmp_path / "t.png"))
    assert table.size == (504, 144)  # 4.2 x 1.2 in at 120 dpi
    assert (np.asarray(table.convert("L")) < 100).sum() > 50  # the cells' text is drawn
    both = pic.side_by_side([Image.new("RGB", (10, 20)), Image.new("RGB", (30, 5))], gap=4)
    assert both.size == (44, 20)


def test_full_llava_grid_renders_at_readable_size():
    out = words_on_cells.word_grid_image(None, [["word"] * 24] * 24)
    assert out.width == 1392 and out.height == 1392  # 58 px per cell: DejaVu >= 8 px fits 'word'
    _assert_grid_with_text_in_every_cell(out, 24, 58, 0, min_bright=50)


def test_view_geometry_falls_back_to_the_encoder_family():
    from types import SimpleNamespace

    enc = SimpleNamespace(name="no-such-siglip", backend="hf", path="/nonexistent", image_size=384)
    assert words_on_cells.view_geometry(SimpleNamespace(encoder=enc)) == (
        384,
        "squash",
        "floor",
        "crop",
        None,
    )
    enc = SimpleNamespace(name="no-such-clip", backend="hf", path="/nonexistent", image_size=336)
    assert words_on_cells.view_geometry(SimpleNamespace(encoder=enc)) == (
        336,
        "shortest",
        "floor",
        "crop",
        None,
    )
