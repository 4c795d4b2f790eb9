"""`--image-aspect pad|crop|resize`: what a non-square image becomes before the encoder's own preprocessing.

``pad`` is LLaVA-1.5's ``expand2square`` with the processor's mean colour. The references here never call
``visalign.images.Preprocess``: the padded square is built with PIL by hand and handed to the backend's own
processor (HF's PIL image processor, open_clip's torchvision transform), then to the encoder's forward; the
features ``pipeline label`` cached must equal those. LLaVA's convention itself is cross-checked against
transformers' ``LlavaImageProcessorPil(do_pad=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import LabelConfig
from pipeline.driver import run_label
from visalign import shards as S
from visalign.images import CLIP_MEAN, Preprocess, expand_to_square, mean_color

WORDS = "cat dog tree sky cup spoon rocket flower temple helmet flag grass water car road".split()


def hand_padded(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's expand2square written out with PIL: centred, the odd pixel of padding at bottom/right."""
    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory, photo_dataset) -> Path:
    """Non-square photos, landscape and portrait, including odd size differences (67 x 40, 31 x 64)."""
    root = tmp_path_factory.mktemp("aspect")
    src = photo_dataset.parent / "images"
    images = root / "images"
    images.mkdir()
    cat = Image.open(src / "cat.jpg").convert("RGB")
    rocket = Image.open(src / "rocket.jpg").convert("RGB")
    cat.save(images / "cat.png")  # 256 x 170
    rocket.save(images / "rocket.png")  # 170 x 256
    cat.crop((10, 20, 77, 60)).save(images / "wide-odd.png")
    rocket.crop((30, 40, 61, 104)).save(images / "tall-odd.png")
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A photo."}]
    names = ["cat", "rocket", "wide-odd", "tall-odd"]
    recs = [{"id": n, "image": f"{n}.png", "conversations": conv} for n in names]
    (root / "llava.json").write_text(json.dumps(recs))
    (root / "words.txt").write_text("\n".join(WORDS) + "\n")
    return root


def label(root: Path, out: Path, cache_dir, **over) -> dict[str, dict]:
    cfg = LabelConfig(
        encoder="tiny-clip",
        input=str(root / "llava.json"),
        images=str(root / "images"),
        shards=str(out),
        wordlist=str(root / "words.txt"),
        scheduler="synchronous",
        samples_per_shard=3,
        batch_size=3,
        progress=False,
        cache_dir=str(cache_dir),
        **over,
    )
    run_label(cfg)
    m = S.read_manifest(out)
    return {s["meta"]["id"]: s for p in m.shard_paths(out) for s in S.iter_tar(p)}


def originals(root: Path) -> dict[str, Image.Image]:
    return {p.stem: Image.open(p).convert("RGB") for p in sorted((root / "images").glob("*.png"))}


def backend_pixels(encoder, backend: str, image: Image.Image) -> torch.Tensor:
    """The backend's own processor, not ours: HF's PIL image processor or open_clip's transform."""
    if backend == "open_clip":
        return encoder.reference_transform(image)
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil.from_pretrained(encoder.path)
    return torch.as_tensor(proc(image, return_tensors="pt")["pixel_values"][0])


@pytest.mark.parametrize("backend", ["hf", "open_clip"])
def test_pad_features_equal_the_forward_on_the_hand_padded_image(
    tmp_path, odd_dataset, cache_dir, backend, capsys
):
    from pipeline.encoders import load_encoder

    samples = label(odd_dataset, tmp_path / "out", cache_dir, backend=backend, image_aspect="pad")
    enc = load_encoder("tiny-clip", backend=backend, cache_dir=str(cache_dir)).eval()
    color = tuple(int(x * 255) for x in enc.preprocess_spec.mean)
    assert color == (122, 116, 104), "CLIP's mean colour, truncated as LLaVA-1.5 does"
    images = originals(odd_dataset)
    ids = sorted(images)
    padded = torch.stack([backend_pixels(enc, backend, hand_padded(images[i], color)) for i in ids])
    cropped = torch.stack([backend_pixels(enc, backend, images[i]) for i in ids])
    with torch.no_grad():
        want_BPD = enc(padded, feature_layer=-2).feats_BPD.float()
        crop_BPD = enc(cropped, feature_layer=-2).feats_BPD.float()
    got_BPD = torch.from_numpy(np.stack([samples[i]["feat"] for i in ids]).astype(np.float32))
    diff = (got_BPD - want_BPD.half().float()).abs().max().item()
    with capsys.disabled():
        print(
            f"\n[{backend}] pad features vs forward on the hand-padded image: max |diff| = {diff:.3g} "
            f"(features up to {want_BPD.abs().max().item():.3g}; pad vs crop max |diff| "
            f"{(got_BPD - crop_BPD).abs().max().item():.3g})"
        )
    torch.testing.assert_close(got_BPD, want_BPD.half().float(), atol=2e-3, rtol=2e-3)
    assert (got_BPD - crop_BPD).abs().max() > 0.1, (
        "padding must change the features, else this proves nothing"
    )
    m = S.read_manifest(tmp_path / "out")
    assert m.encoder.preprocess["aspect"] == "pad" and m.encoder.preprocess["pad_color"] == [122, 116, 104]


def test_llava_processor_pads_as_we_do(odd_dataset, cache_dir):
    """transformers' LLaVA processor (do_pad) and our Preprocess give the same pixels: one convention."""
    from transformers import LlavaImageProcessorPil

    from pipeline.encoders import load_encoder

    enc = load_encoder("tiny-clip", backend="hf", cache_dir=str(cache_dir))
    size = enc.image_size
    proc = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(enc.preprocess_spec.std),
    )
    ours = enc.preprocess_spec.with_aspect("pad")
    for image in originals(odd_dataset).values():
        ref = torch.as_tensor(proc(image, return_tensors="pt")["pixel_values"][0])
        torch.testing.assert_close(ours(image), ref, rtol=0, atol=1e-5)


def test_resize_squashes_and_crop_stays_the_default(tmp_path, odd_dataset, cache_dir):
    from pipeline.encoders import load_encoder

    enc = load_encoder("tiny-clip", backend="hf", cache_dir=str(cache_dir)).eval()
    size = enc.image_size
    images = originals(odd_dataset)
    ids = sorted(images)
    squashed = torch.stack(
        [backend_pixels(enc, "hf", images[i].resize((size, size), Image.Resampling.BICUBIC)) for i in ids]
    )
    with torch.no_grad():
        want_BPD = enc(squashed, feature_layer=-2).feats_BPD.float().half().float()
    samples = label(odd_dataset, tmp_path / "resize", cache_dir, image_aspect="resize")
    got_BPD = torch.from_numpy(np.stack([samples[i]["feat"] for i in ids]).astype(np.float32))
    torch.testing.assert_close(got_BPD, want_BPD, atol=2e-3, rtol=2e-3)
    assert S.read_manifest(tmp_path / "resize").encoder.preprocess["aspect"] == "resize"

    assert LabelConfig(encoder="x", input="i", shards="o").image_aspect == "crop"
    crop = label(odd_dataset, tmp_path / "crop", cache_dir)
    cropped = torch.stack([backend_pixels(enc, "hf", images[i]) for i in ids])
    with torch.no_grad():
        crop_BPD = enc(cropped, feature_layer=-2).feats_BPD.float().half().float()
    got_crop = torch.from_numpy(np.stack([crop[i]["feat"] for i in ids]).astype(np.float32))
    torch.testing.assert_close(got_crop, crop_BPD, atol=2e-3, rtol=2e-3)
    spec = S.read_manifest(tmp_path / "crop").encoder.preprocess
    assert spec["aspect"] == "crop" and spec["pad_color"] is None


def test_pictures_redraw_the_padded_view(tmp_path, odd_dataset, cache_dir):
    """`pipeline show` / `trainer eval` pictures: the manifest's geometry reproduces the padded square."""
    from visalign.pictures import encoder_view, view_geometry

    samples = label(odd_dataset, tmp_path / "out", cache_dir, image_aspect="pad")
    m = S.read_manifest(tmp_path / "out")
    geometry = view_geometry(m)
    assert geometry == (64, "shortest", "floor", "pad", (122, 116, 104))
    for ident, image in originals(odd_dataset).items():
        view, found = encoder_view(samples[ident]["meta"]["source"], *geometry)
        want = hand_padded(image, (122, 116, 104)).resize((64, 64), Image.Resampling.BICUBIC)
        assert found and np.array_equal(np.asarray(view), np.asarray(want)), ident
    # the mean colour fills the padding band of the wide image (rows 0.. of a 67 x 40 image padded to 67)
    top_row = np.asarray(encoder_view(samples["wide-odd"]["meta"]["source"], *geometry)[0])[0]
    assert (np.abs(top_row.astype(int) - [122, 116, 104]).max(-1) <= 1).all()


@pytest.mark.parametrize("size", [(67, 40), (40, 67), (31, 64), (64, 64)])
def test_expand_to_square_centres_with_the_extra_pixel_bottom_right(size):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    got = np.asarray(expand_to_square(Image.fromarray(arr), (1, 2, 3)))
    side = max(size)
    want = np.empty((side, side, 3), dtype=np.uint8)
    want[:] = (1, 2, 3)
    top, left = (side - size[1]) // 2, (side - size[0]) // 2
    want[top : top + size[1], left : left + size[0]] = arr
    assert np.array_equal(got, want)


def test_preprocess_record_round_trips():
    spec = Preprocess(64, CLIP_MEAN, (0.5, 0.5, 0.5), aspect="pad")
    assert spec.pad_color == mean_color(CLIP_MEAN) == (122, 116, 104)
    assert Preprocess.from_dict(spec.to_dict()) == spec
    assert Preprocess(64, (0.5,) * 3, (0.5,) * 3, "squash").with_aspect("pad").pad_color == (127, 127, 127)
    # a schema-2 record without aspect fields (none written so) and a crop spec both read back as crop
    old = {k: v for k, v in spec.to_dict().items() if k not in ("aspect", "pad_color")}
    assert Preprocess.from_dict(old).aspect == "crop"
    with pytest.raises(ValueError, match="aspect"):
        Preprocess(64, CLIP_MEAN, CLIP_MEAN, aspect="square")


def test_the_llava15_preset_pads():
    from visalign.config import resolve

    jobs = Path(__file__).resolve().parents[1] / "jobs"
    cfg = resolve(LabelConfig, {"config": jobs / "label-clip.yaml", "input": "x.json", "shards": "out"})
    assert cfg.encoder == "clip" and cfg.image_aspect == "pad"
    stage1 = resolve(LabelConfig, {"config": jobs / "label-clip-558k.yaml", "input": "x.json", "shards": "o"})
    assert stage1.encoder == "clip" and stage1.image_aspect == "crop"
