"""Words drawn on patch cells over the image as the encoder saw it: one helper for both halves.

* ``encoder_view(source, *view_geometry(manifest))``: the sample's image re-read from the source recorded
  in its shard json (a path, or ``<tar>::<member>``), padded/resized/cropped exactly as the encoder saw it
  (``visalign.images.Preprocess`` geometry, recorded in the manifest); a grey canvas when the source is gone.
* ``word_grid_image(image, words_HW, status_HW)``: SEA Figure 1 style: one word centred in each patch cell,
  coloured by a status (``trainer eval``: green when the nearest word is one of the patch's CLIP labels, red
  when not, white when the patch has no label; ``pipeline show``: the top CLIP label, white).

Needs only PIL and matplotlib's bundled DejaVu font (no Dask, no FAISS: the trainer imports it).
Letters: H x W patch grid (rows x columns), S encoder input side in pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

HIT, MISS, UNLABELLED = "hit", "miss", "none"
COLOURS = {HIT: (90, 230, 90), MISS: (255, 90, 90), UNLABELLED: (255, 255, 255), None: (255, 255, 255)}
GREY = (128, 128, 128)


def resize_mode_for(encoder_name: str) -> str:
    """CLIP-family towers resize the short side and centre-crop; SigLIP squashes (their processors)."""
    return "squash" if "siglip" in encoder_name.lower() else "shortest"


def view_geometry(manifest) -> tuple[int, str, str, str, tuple[int, int, int] | None]:
    """``(image_size, resize_mode, crop_rounding, aspect, pad_color)`` of the shards' encoder.

    Exact from the preprocessing the manifest records (``encoder.preprocess``, including how a non-square
    image was made square: ``crop``, ``pad`` with ``pad_color``, ``resize``); manifests written before it
    was recorded fall back to the family: SigLIP squashes, the rest resize the short side and centre-crop
    with HF's floor rounding.
    """
    from visalign.images import Preprocess

    enc = manifest.encoder
    spec = getattr(enc, "preprocess", None)
    if spec:
        pre = Preprocess.from_dict(spec)
        return pre.image_size, pre.resize_mode, pre.crop_rounding, pre.aspect, pre.pad_color
    return int(enc.image_size), resize_mode_for(enc.name), "floor", "crop", None


def encoder_view(
    source: str | None,
    image_size: int,
    resize_mode: str = "shortest",
    crop_rounding: str = "floor",
    aspect: str = "crop",
    pad_color: Sequence[int] | None = None,
) -> tuple[Image.Image, bool]:
    """``(RGB image S x S as the encoder saw it, found)``; a grey S x S canvas and ``False`` if unreadable.

    The arguments are ``view_geometry``'s; ``pad`` without a colour pads with grey (only the manifest knows
    the encoder's mean).
    """
    from visalign.images import Preprocess, read_source

    if source:
        try:
            img = read_source(source)
        except Exception:  # missing file, moved tar, corrupt bytes: the picture still gets drawn
            img = None
        if img is not None:
            color = tuple(pad_color) if pad_color is not None else (GREY if aspect == "pad" else None)
            pre = Preprocess(
                image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize_mode, crop_rounding, aspect, color
            )
            return pre.square(img), True
    return Image.new("RGB", (image_size, image_size), GREY), False


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # matplotlib ships DejaVu Sans, so every machine that can plot can also draw legible scalable text
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, max_w: int, start: int, smallest: int = 7):
    """Largest font (<= start) at which ``text`` fits ``max_w``; at the smallest size, cut with '…'."""
    for size in range(start, smallest - 1, -1):
        font = _font(size)
        if draw.textlength(text, font=font) <= max_w:
            return text, font
    font = _font(smallest)
    while len(text) > 1 and draw.textlength(text + "…", font=font) > max_w:
        text = text[:-1]
    return text + "…", font


def _fit_lines(draw: ImageDraw.ImageDraw, word: str, max_w: int, start: int):
    """One line, or the word split in two hyphenated halves when that lets the font be >= 1.3x larger."""
    text, font = _fit(draw, word, max_w, start)
    if len(word) >= 8:
        cut = (len(word) + 1) // 2
        halves = [word[:cut] + "-", word[cut:]]
        longest = max(halves, key=lambda h: draw.textlength(h, font=_font(start)))
        _, font2 = _fit(draw, longest, max_w, min(start, max_w // 2))
        if font2.size >= 1.3 * font.size:
            return "\n".join(halves), font2
    return text, font


def word_grid_image(
    image: Image.Image | None,
    words_HW: Sequence[Sequence[str]],
    status_HW: Sequence[Sequence[str | None]] | None = None,
    cell_px: int | None = None,
    title: str | None = None,
    dim: float = 0.45,
) -> Image.Image:
    """The image cut into the H x W patch grid with one word centred in each cell.

    ``cell_px`` defaults to about 1400 px of total width (48..128 px a cell) so a 24 x 24 grid stays
    readable; the photo is darkened by ``dim`` and words get a black outline so any colour reads on it.
    """
    H, W = len(words_HW), len(words_HW[0])
    cell = cell_px or max(48, min(128, 1400 // W))
    grid_w, grid_h = W * cell, H * cell
    bg = (
        (image or Image.new("RGB", (grid_w, grid_h), GREY))
        .convert("RGB")
        .resize((grid_w, grid_h), Image.BICUBIC)
    )
    bg = Image.blend(bg, Image.new("RGB", bg.size, (0, 0, 0)), dim)
    title_h = int(cell * 0.6) if title else 0
    canvas = Image.new("RGB", (grid_w, grid_h + title_h), (20, 20, 20))
    canvas.paste(bg, (0, title_h))
    draw = ImageDraw.Draw(canvas)
    if title:
        text, font = _fit(draw, title, grid_w - 8, max(12, int(title_h * 0.6)))
        draw.text((grid_w / 2, title_h / 2), text, font=font, fill=(255, 255, 255), anchor="mm")
    for r in range(1, H):
        draw.line([(0, title_h + r * cell), (grid_w, title_h + r * cell)], fill=(200, 200, 200), width=1)
    for c in range(1, W):
        draw.line([(c * cell, title_h), (c * cell, title_h + grid_h)], fill=(200, 200, 200), width=1)
    start = max(8, int(cell * 0.3))
    stroke = 2 if cell >= 64 else 1
    for r in range(H):
        for c in range(W):
            word = str(words_HW[r][c])
            if not word:
                continue
            text, font = _fit_lines(draw, word, cell - 2 * stroke - 4, start)
            colour = COLOURS[status_HW[r][c] if status_HW is not None else None]
            centre = (c * cell + cell / 2, title_h + r * cell + cell / 2)
            # a thick outline would swallow small glyphs
            width = stroke if font.size >= 14 else 1
            draw.multiline_text(
                centre,
                text,
                font=font,
                fill=colour,
                anchor="mm",
                align="center",
                spacing=0,
                stroke_width=width,
                stroke_fill=(0, 0, 0),
            )
    return canvas
