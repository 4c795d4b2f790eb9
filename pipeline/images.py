"""Decode and validate one image: bytes or a path in, an RGB ``PIL.Image`` out, or a ``RejectError``.

Rejects (recorded in rejects.parquet, never fatal): missing file, zero-byte file, not an image, truncated or
corrupt data (a full decode is forced with ``.load()`` and ``LOAD_TRUNCATED_IMAGES`` stays False), and
decompression bombs (more than ``max_pixels`` pixels, checked from the header before any pixel is decoded).

Not rejects, converted to RGB: greyscale (L, 1), palette (P), CMYK, alpha (RGBA, LA, P with transparency:
composited on white, as a viewer would show it), 16/32-bit integer greyscale (scaled to 8 bit by the range
of its storage type, not stretched per image) and float images (assumed in [0, 1]). EXIF orientation is
applied so the encoder sees the picture upright.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Sane bomb limit: ~100 MP (e.g. 10000 x 10000). PIL's own check stays on; never set it to None.
DEFAULT_MAX_PIXELS = 100_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False


class RejectError(Exception):
    """An input that is skipped and recorded; ``str()`` is the reason written to rejects.parquet."""


def _open(data: bytes | str | Path) -> Image.Image:
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.exists():
            raise RejectError(f"missing file: {path}")
        if not path.is_file():
            raise RejectError(f"not a file: {path}")
        data = path.read_bytes()
    if len(data) == 0:
        raise RejectError("empty file (0 bytes)")
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise RejectError(f"decompression bomb: {err}") from err
    except Exception as err:  # UnidentifiedImageError, SyntaxError from broken headers, ...
        raise RejectError(f"not an image: {type(err).__name__}: {err}") from err


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (rules in the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr8 = np.clip(arr * 255.0 + 0.5, 0, 255)
        elif mode == "I" and arr.max(initial=0) > 65535:
            arr8 = np.clip(arr / 16843009.0 + 0.5, 0, 255)  # full 32-bit range -> 0..255
        else:
            # 16-bit data (PIL opens 16-bit PNGs as "I" or "I;16"): 65535 -> 255, i.e. divide by 257
            arr8 = np.clip(arr.astype(np.float64) / 257.0 + 0.5, 0, 255)
        return Image.fromarray(arr8.astype(np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(
    data: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, tuple[int, int]]:
    """Fully decode one image; return ``(rgb_image, (orig_width, orig_height))`` or raise ``RejectError``."""
    with warnings.catch_warnings():
        # PIL warns (not raises) between MAX_IMAGE_PIXELS and twice that; our own check below rejects those
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = _open(data)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise RejectError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise RejectError(
            f"decompression bomb: {width}x{height} = {width * height} pixels > limit {max_pixels}"
        )
    try:
        img.load()  # force the full decode: a truncated JPEG only fails here
        img = ImageOps.exif_transpose(img) or img
        rgb = to_rgb(img)
        rgb.load()
    except RejectError:
        raise
    except Exception as err:
        raise RejectError(f"truncated or corrupt image: {type(err).__name__}: {err}") from err
    return rgb, (int(rgb.size[0]), int(rgb.size[1]))  # after EXIF rotation: the size a viewer shows
