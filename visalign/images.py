"""Images as both halves see them: decoding and validation, the sources recorded in shards, preprocessing.

``load_image``: bytes or a path in, an RGB ``PIL.Image`` out, or a ``RejectError``.

Rejects (recorded in rejects.parquet, never fatal): missing file, zero-byte file, not an image, truncated or
corrupt data (a full decode is forced with ``.load()`` and ``LOAD_TRUNCATED_IMAGES`` stays False), and
decompression bombs (more than ``max_pixels`` pixels, checked from the header before any pixel is decoded).

Not rejects, converted to RGB: greyscale (L, 1), palette (P), CMYK, alpha (RGBA, LA, P with transparency:
composited on white, as a viewer would show it), 16/32-bit integer greyscale (scaled to 8 bit by the range
of its storage type, not stretched per image) and float images (assumed in [0, 1]). EXIF orientation is
applied so the encoder sees the picture upright.

``read_source(source)``: the image a shard sample's ``source`` names (a path, or ``<tar>::<member>``).

``Preprocess``: image -> normalised ``[3, S, S]`` tensor with the arithmetic of the encoder backends' own
processors (resize + crop geometry, mean/std), after an optional aspect step (``pad``: LLaVA-1.5's
``expand2square`` with the mean colour; ``resize``: squash); pure PIL + numpy, thread-safe, no model. The
manifest records it (``to_dict`` / ``from_dict``), and ``Preprocess.square`` is the geometry alone, which is how
the pictures of ``pipeline show`` / ``trainer eval`` redraw what the encoder saw.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Sane bomb limit: ~100 MP (e.g. 10000 x 10000). PIL's own check stays on; never set it to None.
DEFAULT_MAX_PIXELS = 100_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False


TAR_SEP = "::"
"""``<tar path>::<member name>``: the source of an image read from inside a tar"""


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


def read_tar_members(tar_path: str | Path, names: set[str]) -> dict[str, bytes]:
    """Bytes of the named members of one tar, in a single pass.

    A damaged tar (cut short, a broken header further on) gives the members read before the damage; the
    callers record the missing ones. Members whose data runs past the end of the file are left out.
    """
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(tar_path, "r") as tar:
            for member in tar:
                if member.name in names and member.isfile():
                    f = tar.extractfile(member)
                    out[member.name] = f.read() if f else b""
    except (tarfile.TarError, OSError, EOFError):
        pass  # what was read before the damage stays; the rest is reported missing by the caller
    return out


def read_source(source: str) -> Image.Image:
    """The RGB image a sample's recorded ``source`` names; ``RejectError``/``OSError`` when it is gone."""
    if TAR_SEP in source:
        tar_path, member = source.split(TAR_SEP, 1)
        data = read_tar_members(tar_path, {member}).get(member)
        if data is None:
            raise FileNotFoundError(f"{member} not in {tar_path}")
        return load_image(data)[0]
    return load_image(source)[0]


# CLIP (OpenAI) and SigLIP normalisation constants, as in the HF / open_clip processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


ASPECTS = ("crop", "pad", "resize")
"""what happens to a non-square image before the encoder's own resize: see ``Preprocess``"""


def mean_color(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    """LLaVA-1.5's padding colour: the processor's mean in 0..255, truncated (CLIP -> (122, 116, 104))."""
    return tuple(int(x * 255) for x in mean)  # type: ignore[return-value]


def expand_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's ``expand2square``: the image centred on a square of ``color`` (extra pixel bottom/right)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(color))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Image -> ``[3, S, S]`` float32 torch tensor, the same arithmetic as the backend's own processor.

    Pure PIL + numpy so it runs in loader threads without the model (and without torchvision).
    ``resize_mode="shortest"``: bicubic resize of the short side to S, then a centre crop (CLIP);
    ``"squash"``: bicubic resize straight to S x S (SigLIP). The crop offset differs between the backends'
    processors when the excess is odd: HF floors ``(h - S) // 2``, torchvision rounds ``round((h - S) / 2)``.

    ``aspect`` says what happens to a non-square image first (``pipeline label --image-aspect``):
    ``crop`` nothing (the backend's own geometry above); ``pad`` LLaVA-1.5's ``expand2square``: the image
    centred on a square of ``pad_color`` (default: the mean colour, ``mean_color(mean)``), then the
    backend's geometry (a no-op crop on a square); ``resize`` squash straight to S x S, whatever the
    backend's mode.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    crop_rounding: str = "floor"
    aspect: str = "crop"
    pad_color: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"Preprocess.resize_mode {self.resize_mode!r}: use 'shortest' or 'squash'")
        if self.crop_rounding not in ("floor", "round"):
            raise ValueError(f"Preprocess.crop_rounding {self.crop_rounding!r}: use 'floor' or 'round'")
        if self.aspect not in ASPECTS:
            raise ValueError(f"Preprocess.aspect {self.aspect!r}: use one of {list(ASPECTS)}")
        if self.aspect == "pad":
            color = self.pad_color if self.pad_color is not None else mean_color(self.mean)
            color = tuple(int(c) for c in color)
            if len(color) != 3 or not all(0 <= c <= 255 for c in color):
                raise ValueError(f"Preprocess.pad_color {self.pad_color!r}: three integers in 0..255")
            object.__setattr__(self, "pad_color", color)
        else:
            object.__setattr__(self, "pad_color", None)

    def with_aspect(self, aspect: str) -> Preprocess:
        """The same preprocessing with another aspect handling (the pad colour from this one's mean)."""
        return dataclasses.replace(self, aspect=aspect, pad_color=None)

    def geometry(self) -> Preprocess:
        """Pure geometry (mean 0, std 1: pixels in [0, 1]) that keeps the pad colour: what pictures redraw."""
        return dataclasses.replace(self, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def to_dict(self) -> dict[str, Any]:
        """The manifest's record of this preprocessing (``EncoderInfo.preprocess``)."""
        return {
            "image_size": int(self.image_size),
            "mean": [float(x) for x in self.mean],
            "std": [float(x) for x in self.std],
            "resize_mode": self.resize_mode,
            "crop_rounding": self.crop_rounding,
            "resample": "bicubic",
            "aspect": self.aspect,
            "pad_color": list(self.pad_color) if self.pad_color is not None else None,
        }

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Preprocess:
        """Inverse of ``to_dict``: the manifest's record back to the preprocessing (``aspect`` defaults to
        ``crop``, as every manifest written before it was recorded)."""
        color = spec.get("pad_color")
        return cls(
            image_size=int(spec["image_size"]),
            mean=tuple(float(x) for x in spec["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in spec["std"]),  # type: ignore[arg-type]
            resize_mode=str(spec.get("resize_mode", "shortest")),
            crop_rounding=str(spec.get("crop_rounding", "floor")),
            aspect=str(spec.get("aspect", "crop")),
            pad_color=tuple(int(c) for c in color) if color is not None else None,  # type: ignore[arg-type]
        )

    def square(self, image: Image.Image) -> Image.Image:
        """The RGB ``S x S`` image the encoder sees (geometry only, before normalisation)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess expects a PIL.Image.Image, got {type(image).__name__}")
        image = image.convert("RGB")
        size = self.image_size
        if self.aspect == "pad":
            image = expand_to_square(image, self.pad_color)  # type: ignore[arg-type]
        width, height = image.size
        if self.resize_mode == "squash" or self.aspect == "resize":
            return image.resize((size, size), Image.Resampling.BICUBIC)
        # short side -> size, long side truncated, as both HF and torchvision compute it
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if width <= height else (new_long, size)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        if self.crop_rounding == "floor":
            top, left = (new_h - size) // 2, (new_w - size) // 2
        else:
            top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        return image.crop((left, top, left + size, top + size))

    def __call__(self, image: Image.Image):
        import torch

        pixels_HWC = np.asarray(self.square(image), dtype=np.float32) * np.float32(1 / 255)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        pixels_HWC = (pixels_HWC - mean) / std
        return torch.from_numpy(np.ascontiguousarray(pixels_HWC.transpose(2, 0, 1)))
