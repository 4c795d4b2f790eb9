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
    "astronaut": ("skimage", "astronaut", "An astronaut in a white spacesuit holding a helmet in front of a flag."),
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
                    {"from": "human", "value": "<image>\nDescribe the image briefly." if i % 2 else "<image>"},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
    path = root / "llava.json"
    path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One model cache for the whole session: tiny models are built and saved once, then reloaded."""
    path = tmp_path_factory.mktemp("visalign-cache")
    os.environ["VISALIGN_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def photo_dataset(tmp_path_factory) -> Path:
    """LLaVA-format JSON of the bundled real photos; images under ``<json dir>/images``."""
    return write_photo_dataset(tmp_path_factory.mktemp("photos"))
