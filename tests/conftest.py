"""Shared fixtures: offline, CPU-only, tiny models cached once per session, real photos from wheels.

Every test runs with ``HF_HUB_OFFLINE=1`` and a private ``VISALIGN_CACHE`` so nothing is fetched and nothing
leaks between runs. Tiny models are built from a fixed seed, saved under the session cache and loaded back
through the same ``from_pretrained`` / open_clip code path as real checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Real photos that ship inside the scikit-image / scikit-learn wheels, with hand-written captions.
PHOTOS = {
    "astronaut": (
        "skimage",
        "astronaut",
        "An astronaut in a white spacesuit holding a helmet in front of a flag.",
    ),
    "cat": ("skimage", "chelsea", "A ginger tabby cat looking to the side."),
    "coffee": ("skimage", "coffee", "A cup of coffee on a saucer with a spoon."),
    "rocket": ("skimage", "rocket", "A rocket standing on a launch pad under a blue sky."),
    "motorcycle": ("skimage", "stereo_motorcycle", "A red motorcycle parked in a garage."),
    "china": ("sklearn", "china.jpg", "A Chinese temple with a curved roof among trees."),
    "flower": ("sklearn", "flower.jpg", "A pink flower with a yellow center and a bee."),
}


def _load_photo(source: str, name: str) -> np.ndarray:
    if source == "skimage":
        import skimage.data

        img = getattr(skimage.data, name)()
        return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle returns (left, right, disp)
    from sklearn.datasets import load_sample_image

    return load_sample_image(name)


def write_photo_dataset(root: Path, names: list[str] | None = None, max_side: int = 256) -> Path:
    """Write JPEGs of the bundled photos under ``root/images`` and a LLaVA-format JSON; return the JSON path."""
    from PIL import Image

    names = names or list(PHOTOS)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i, key in enumerate(names):
        source, name, caption = PHOTOS[key]
        img = Image.fromarray(_load_photo(source, name)).convert("RGB")
        img.thumbnail((max_side, max_side))  # keep tests fast; real runs take any size
        img.save(images / f"{key}.jpg", quality=90)
        records.append(
            {
                "id": key,
                "image": f"{key}.jpg",
                "conversations": [
                    {
                        "from": "human",
                        "value": "<image>\nDescribe the image briefly." if i % 2 else "<image>",
                    },
                    {"from": "gpt", "value": caption},
                ],
            }
        )
    path = root / "llava.json"
    path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """One model cache for the whole session: tiny models are built and saved once, then reloaded. Autouse,
    so no test reads or writes the user's $VISALIGN_CACHE."""
    path = tmp_path_factory.mktemp("visalign-cache")
    os.environ["VISALIGN_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def photo_dataset(tmp_path_factory) -> Path:
    """LLaVA-format JSON of the bundled real photos; images under ``<json dir>/images``."""
    return write_photo_dataset(tmp_path_factory.mktemp("photos"))


def write_tiny_shards(
    root: Path,
    num_samples: int = 6,
    samples_per_shard: int = 2,
    P: int = 16,
    D: int = 32,
    K: int = 4,
    feature_layer: int = -2,
    fingerprint: str = "enc-fp",
    words=None,
    text_only=(),
    record_sizes: bool = True,
    edit_meta=None,
    experts=None,
) -> Path:
    """Synthetic label shards through the contract's one writer (no encoder, no Dask): random features,
    labels, alternating caption / conversation samples; the samples at the positions in ``text_only`` are
    text-only (json alone). ``record_sizes=False`` leaves ``num_bytes`` out of the manifest, as schema 1 did;
    ``edit_meta(i, meta) -> meta`` rewrites sample i's record (broken records of old shards); ``experts``
    ``{name: ((h, w), D_e)}`` adds random expert features (``expert.<name>.npy``, drawn from their own stream,
    so the other arrays stay those of a run without experts) and lists them in the manifest. Deterministic in
    its arguments."""
    from visalign import shards as S

    rng = np.random.default_rng(0)
    expert_rng = np.random.default_rng(1)
    experts = dict(experts or {})
    root.mkdir(parents=True, exist_ok=True)
    words = words or [f"word{i}" for i in range(20)]
    S.write_wordlist(words, root / S.WORDLIST)
    infos = []
    for first in range(0, num_samples, samples_per_shard):
        ids = range(first, min(first + samples_per_shard, num_samples))
        with S.ShardWriter(root, len(infos)) as writer:
            for i in ids:
                scores = -np.sort(-rng.random((P, K)), axis=1).astype(np.float16)
                meta = {"id": f"s{i:04d}", "source": "synthetic", "orig_size": [32, 32]}
                if i % 2:
                    meta["caption"] = f"a photo of word{i % 20} and word{(i * 7) % 20}"
                else:
                    meta["conversations"] = [
                        {"from": "human", "value": "<image>\nWhat is this?"},
                        {"from": "gpt", "value": f"It shows word{i % 20}."},
                    ]
                feat = rng.standard_normal((P, D)).astype(np.float16)
                labels = rng.integers(0, len(words), (P, K)).astype(np.int32)
                if edit_meta is not None:
                    meta = edit_meta(i, meta)
                if i in text_only:
                    del meta["source"], meta["orig_size"]
                    if "conversations" in meta:
                        meta["conversations"][0]["value"] = "What is word" + str(i % 20) + "?"
                    writer.write_text_only(f"s{i:04d}", meta)
                else:
                    arrays = {
                        name: expert_rng.standard_normal((grid[0] * grid[1], dim)).astype(np.float16)
                        for name, (grid, dim) in experts.items()
                    }
                    writer.write(f"s{i:04d}", feat, labels, scores, meta, experts=arrays or None)
            stats = writer.close()
        info = S.shard_info(root, stats)
        if not record_sizes:
            info.num_bytes = None
        infos.append(info)
    side = int(round(P**0.5))
    manifest = S.Manifest(
        encoder=S.EncoderInfo(
            name="synthetic",
            backend="hf",
            fingerprint=fingerprint,
            image_size=side * 4,
            feature_layer=feature_layer,
            patch_grid=[side, P // side],
            feature_dim=D,
            joint_dim=D,
        ),
        wordlist=S.WordlistInfo(
            source="synthetic", sha256=S.sha256_file(root / S.WORDLIST), count=len(words)
        ),
        templates=["{}"],
        score_sign="cos",
        top_k=K,
        shards=infos,
        num_samples=num_samples,
        num_rejects=0,
        num_text_only=len(set(text_only) & set(range(num_samples))),
        experts=[
            S.ExpertInfo(
                name=name,
                backend="hf",
                fingerprint=f"{name}-fp",
                feature_layer=-2,
                patch_grid=list(grid),
                feature_dim=dim,
            )
            for name, (grid, dim) in experts.items()
        ],
    )
    S.write_manifest(root, manifest)
    return root


@pytest.fixture
def tiny_shards(tmp_path):
    """Factory: ``tiny_shards(num_samples=6, samples_per_shard=2, P=16, D=32, K=4, ...)`` -> shards root."""
    counter = iter(range(1000))

    def make(**kw) -> Path:
        return write_tiny_shards(tmp_path / f"shards{next(counter)}", **kw)

    return make
