"""Vision-encoder registry: name -> factory -> ``VisionEncoder`` (see ``base.py`` for the interface).

Names: ``tiny-clip``, ``tiny-siglip`` (random-init, built once into the cache, both backends),
``random-vit-b16`` (CLIP ViT-B/16 sizes, random init, hf), ``clip`` (CLIP ViT-L/14-336, LLaVA-1.5's tower),
``siglip`` (SigLIP-SO400M/14-384). A local HF CLIP/SigLIP checkpoint folder is accepted as a name too.
Backends: ``hf`` (transformers, the default) and ``open_clip``. Options: ``dense`` ("none" | "maskclip" |
"surgery", CLIP towers), ``surgery_depth`` (with "surgery") and ``text_context`` (truncate the CLIP text
context for speed on single words). ``encoder_family`` tells a CLIP tower from a SigLIP one without loading
it (the label score's default follows the family).

Experts (``--experts``): ``parse_expert`` reads ``[NAME=]SOURCE``, where SOURCE is a name above, a local HF
CLIP/SigLIP folder, or ``hf:<folder or hub id>`` for any HF vision backbone (``backbone.py``: DINOv2, SAM's
ViT, SigLIP/CLIP vision towers, ...); ``load_expert`` loads it.

Only torch/transformers-level imports happen here; open_clip and timm are imported inside the open_clip
backend when it is asked for, so the trainer (which imports this for export) never pulls them.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from pipeline.encoders.base import BACKENDS, DENSE_MODES, EncoderError, EncoderOutput, VisionEncoder
from visalign.cache import build_once, default_cache_dir
from visalign.registry import Registry, UnknownNameError

__all__ = [
    "BACKENDS",
    "DENSE_MODES",
    "ENCODERS",
    "EncoderError",
    "EncoderOutput",
    "ExpertSpec",
    "VisionEncoder",
    "encoder_family",
    "load_encoder",
    "load_expert",
    "parse_expert",
]

ENCODERS = Registry("encoder")

# Real towers: (hf hub id, open_clip model name, open_clip pretrained tag, open_clip load kwargs).
REAL = {
    "clip": ("openai/clip-vit-large-patch14-336", "ViT-L-14-336", "openai", {"force_quick_gelu": True}),
    "siglip": ("google/siglip-so400m-patch14-384", "ViT-SO400M-14-SigLIP-384", "webli", {}),
}


def _backend(name: str, backend: str | None, allowed: tuple[str, ...] = BACKENDS) -> str:
    backend = backend or "hf"
    if backend not in allowed:
        raise EncoderError(
            f"encoder {name!r}: backend {backend!r} is not available; use one of {list(allowed)}"
        )
    return backend


def _tiny_folder(name: str, backend: str, cache_dir: str | Path | None) -> Path:
    """Build (once, atomically) and return the cache folder of a random-init tower."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "encoders" / f"{name}-{backend}"
    if backend == "hf":
        from pipeline.encoders.tiny import build_hf

        return build_once(target, lambda tmp: build_hf(name, tmp))
    from pipeline.encoders.tiny import build_openclip

    return build_once(target, lambda tmp: build_openclip(name, tmp))


def _tiny_factory(name: str):
    def factory(backend=None, path=None, cache_dir=None, **options) -> VisionEncoder:
        backend = _backend(name, backend)
        folder = Path(path) if path is not None else _tiny_folder(name, backend, cache_dir)
        if backend == "hf":
            from pipeline.encoders.hf import HFVisionEncoder

            return HFVisionEncoder(name, folder, **options)
        from pipeline.encoders.openclip import load_openclip_tiny

        return load_openclip_tiny(name, folder, **options)

    factory.__name__ = f"load_{name.replace('-', '_')}"
    return factory


def _real_factory(name: str):
    hub_id, oc_name, oc_tag, oc_kwargs = REAL[name]

    def factory(backend=None, path=None, cache_dir=None, **options) -> VisionEncoder:
        backend = _backend(name, backend)
        if path is not None and not Path(path).exists():
            raise EncoderError(f"encoder {name!r}: --encoder_path {path} does not exist")
        try:
            return load(backend, path, cache_dir, **options)
        except (OSError, RuntimeError) as err:
            if path is not None or not _looks_like_no_weights(err):
                raise
            source = hub_id if backend == "hf" else f"open_clip {oc_name} / {oc_tag}"
            raise EncoderError(
                f"encoder {name!r}: the weights ({source}) are neither in the local cache nor reachable "
                f"(offline or no network). Download them on a machine with network (hf: `huggingface-cli "
                f"download {hub_id}`) and pass --encoder_path /path/to/the/folder (or the open_clip weights "
                "file with --backend open_clip)"
            ) from err

    def load(backend, path, cache_dir, **options) -> VisionEncoder:
        if backend == "hf":
            from pipeline.encoders.hf import HFVisionEncoder

            model_type = "clip" if name == "clip" else "siglip"
            return HFVisionEncoder(name, path or hub_id, model_type=model_type, **options)
        from pipeline.encoders.openclip import OpenCLIPVisionEncoder

        return OpenCLIPVisionEncoder(
            name,
            oc_name,
            pretrained=str(path) if path else oc_tag,
            cache_dir=cache_dir,
            load_kwargs=oc_kwargs,
            **options,
        )

    factory.__name__ = f"load_{name}"
    return factory


def _looks_like_no_weights(err: BaseException) -> bool:
    """transformers (OSError "couldn't connect ... cached files") and open_clip (RuntimeError "Failed to
    download") both say 'not cached and no hub'; other errors (a corrupt file, a bad option) pass through."""
    text = str(err).lower()
    return any(s in text for s in ("connect", "download", "cached files", "offline", "not found"))


def _random_vit_b16(backend=None, path=None, cache_dir=None, **options) -> VisionEncoder:
    _backend("random-vit-b16", backend, allowed=("hf",))
    from pipeline.encoders.hf import HFVisionEncoder

    folder = Path(path) if path is not None else _tiny_folder("random-vit-b16", "hf", cache_dir)
    return HFVisionEncoder("random-vit-b16", folder, **options)


for _name in ("tiny-clip", "tiny-siglip"):
    ENCODERS.register(_name)(_tiny_factory(_name))
for _name in REAL:
    ENCODERS.register(_name)(_real_factory(_name))
ENCODERS.register("random-vit-b16")(_random_vit_b16)


def load_encoder(
    name: str,
    backend: str | None = None,
    path: str | None = None,
    cache_dir: str | None = None,
    **options,
) -> VisionEncoder:
    """The encoder ``name`` (a registry name or a local HF CLIP/SigLIP folder), eval mode, no grad.

    ``path`` points a registry name at local weights (HF folder; open_clip weights file); ``cache_dir``
    is where tiny towers are built (default ``default_cache_dir()``).
    ``options``: ``dense``, ``surgery_depth``, ``text_context``.
    """
    valid_options = {"dense", "text_context", "surgery_depth"}
    unknown = sorted(set(options) - valid_options)
    if unknown:
        raise EncoderError(f"unknown encoder option(s) {unknown}; valid options: {sorted(valid_options)}")
    options = {k: v for k, v in options.items() if v is not None}
    if name not in ENCODERS:
        if Path(name).is_dir():
            from pipeline.encoders.hf import HFVisionEncoder

            _backend(name, backend, allowed=("hf",))
            encoder = HFVisionEncoder(str(name), path or name, **options)
            return encoder.eval().requires_grad_(False)
        try:
            ENCODERS[name]
        except UnknownNameError as err:
            raise UnknownNameError(f"{err}; or pass a local HF CLIP/SigLIP checkpoint folder") from None
    encoder = ENCODERS[name](backend=backend, path=path, cache_dir=cache_dir, **options)
    return encoder.eval().requires_grad_(False)


FAMILY_OF_NAME = {
    "tiny-clip": "clip",
    "random-vit-b16": "clip",
    "clip": "clip",
    "tiny-siglip": "siglip",
    "siglip": "siglip",
}


def encoder_family(name: str) -> str:
    """``clip`` or ``siglip`` for a registry name or a local HF checkpoint folder, without loading weights."""
    if name in FAMILY_OF_NAME:
        return FAMILY_OF_NAME[name]
    if Path(name).is_dir():
        from pipeline.encoders.hf import read_model_type

        return read_model_type(name)
    ENCODERS[name]  # raises UnknownNameError listing the valid names
    raise EncoderError(f"encoder {name!r}: its family (clip or siglip) is not known")


# ---- experts ---------------------------------------------------------------------------------------------
EXPERT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
"""expert names become tar members ``expert.<name>.npy``: no dots, slashes or spaces"""
RESERVED_EXPERT_NAMES = ("encoder",)
"""``encoder`` is the distillation target name of the labelling tower itself"""


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
    name: str
    """the name in the shards (``expert.<name>.npy``) and the manifest"""
    source: str
    """a registry name, a local HF CLIP/SigLIP folder, or ``hf:<folder or hub id>``"""

    @property
    def is_backbone(self) -> bool:
        from pipeline.encoders.backbone import HF_PREFIX

        return self.source.startswith(HF_PREFIX)


def parse_expert(spec: str) -> ExpertSpec:
    """``[NAME=]SOURCE`` -> ``ExpertSpec``. Without ``NAME=`` the name is the registry name, or the last part
    of a folder / hub id with characters outside ``[A-Za-z0-9_-]`` made ``_`` (``hf:facebook/dinov2-small``
    -> ``dinov2-small``)."""
    from pipeline.encoders.backbone import HF_PREFIX

    spec = str(spec).strip()
    name, sep, source = spec.partition("=")
    if not sep or not EXPERT_NAME.match(name):
        name, source = "", spec
    where = f"--experts {spec!r}"
    if source.startswith(HF_PREFIX):
        target = source[len(HF_PREFIX) :].strip()
        if not target:
            raise EncoderError(f"{where}: hf: needs a folder or hub id after it (hf:/models/dinov2-small)")
        source = HF_PREFIX + target
        default = target.rstrip("/\\").replace("\\", "/").split("/")[-1]
    elif source in ENCODERS:
        default = source
    else:
        default = source.rstrip("/").split("/")[-1]
    name = name or re.sub(r"[^A-Za-z0-9_-]", "_", default)
    if not EXPERT_NAME.match(name) or name in RESERVED_EXPERT_NAMES:
        raise EncoderError(
            f"{where}: expert name {name!r} cannot be used (letters, digits, '_' and '-' only; "
            f"{', '.join(RESERVED_EXPERT_NAMES)} is reserved): give one with NAME=SOURCE"
        )
    return ExpertSpec(name=name, source=source)


def load_expert(spec: ExpertSpec | str, cache_dir: str | None = None):
    """The expert's model, eval mode, no grad: an ``HFBackbone`` for ``hf:``, else a ``VisionEncoder``."""
    spec = parse_expert(spec) if isinstance(spec, str) else spec
    if spec.is_backbone:
        from pipeline.encoders.backbone import HF_PREFIX, HFBackbone

        return HFBackbone(spec.name, spec.source[len(HF_PREFIX) :]).eval().requires_grad_(False)
    return load_encoder(spec.source, cache_dir=cache_dir)
