"""Decoding and validation: every kind of bad file is a reject with a reason; odd modes convert correctly."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from visalign.images import RejectError, load_image, to_rgb


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny valid PNG whose header claims ``width x height`` pixels (IHDR patched, CRC recomputed)."""
    data = bytearray(_png_bytes(Image.new("L", (8, 8))))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def jpeg_bytes(size=(64, 48), seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_good_jpeg_from_path_and_bytes(tmp_path):
    data = jpeg_bytes()
    (tmp_path / "a.jpg").write_bytes(data)
    img, size = load_image(tmp_path / "a.jpg")
    assert img.mode == "RGB" and size == (64, 48)
    img2, _ = load_image(data)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(img2))


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("zero.jpg", b"", "empty file"),
        ("text.jpg", b"this is not an image at all", "not an image"),
        ("trunc.jpg", jpeg_bytes((256, 256))[:2000], "truncated"),
        ("bomb.png", bomb_png(), "decompression bomb"),
    ],
)
def test_rejects(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RejectError, match=reason):
        load_image(path)


def test_missing_and_limit(tmp_path):
    with pytest.raises(RejectError, match="missing file"):
        load_image(tmp_path / "nope.jpg")
    # the limit is a parameter: a 64x48 image is a "bomb" under a 1000-pixel limit
    with pytest.raises(RejectError, match="decompression bomb"):
        load_image(jpeg_bytes(), max_pixels=1000)


def test_greyscale_and_cmyk():
    grey = Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8), mode="L")
    rgb = np.asarray(load_image(_png_bytes(grey))[0])
    np.testing.assert_array_equal(
        rgb, np.repeat(np.array([[0, 100], [200, 255]], dtype=np.uint8)[..., None], 3, -1)
    )
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=100)
    img, _ = load_image(buf.getvalue())
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60, (r, g, b)


def test_alpha_composited_on_white():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (0, 0, 255, 128))  # half blue over white
    img, _ = load_image(_png_bytes(rgba))
    px = np.asarray(img).astype(int)
    np.testing.assert_array_equal(px[0, 0], [255, 255, 255])
    expected = np.round(np.array([255, 255, 255]) * (1 - 128 / 255) + np.array([0, 0, 255]) * 128 / 255)
    assert np.abs(px[0, 1] - expected).max() <= 1, (px[0, 1], expected)
    la = Image.new("LA", (1, 1), (0, 0))  # transparent black -> white
    assert np.asarray(load_image(_png_bytes(la))[0])[0, 0].tolist() == [255, 255, 255]


def test_16bit_scaled_not_truncated():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(values)  # mode I;16
    img, _ = load_image(_png_bytes(img16))
    got = np.asarray(img)[0, :, 0]
    np.testing.assert_array_equal(got, np.round(values[0] / 257.0).astype(np.uint8))  # 0, 1, 128, 255
    assert to_rgb(Image.fromarray(np.array([[0.5]], dtype=np.float32), mode="F")).getpixel((0, 0)) == (
        128,
        128,
        128,
    )
