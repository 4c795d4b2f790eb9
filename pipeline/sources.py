"""Input listing and deterministic partitioning for ``pipeline label``.

Inputs (kind detected from the path):

* ``llava``: a LLaVA-format JSON list of ``{"id", "image", "conversations"}``; images are resolved against
  ``--images`` (default: the JSON's folder). Records keep the file's order.
* ``folder``: a folder of images (recursive, sorted by relative path); an optional caption sidecar with the
  same stem and ``.txt`` (and metadata ``.json``) next to an image. The id is the relative path without
  extension.
* ``tar``: WebDataset/img2dataset tar shards (a ``.tar`` file, or a folder holding ``*.tar``, sorted): members
  ``key.jpg|jpeg|png|webp`` + ``key.txt`` [+ ``key.json``]. The id is the tar's stem + "/" + key.

Output: a list of ``Item`` dicts (plain strings only, so Dask ships them cheaply), then ``partition`` cuts
them into fixed-size consecutive slices: the same input and ``samples_per_shard`` always map the same sample
to the same shard index. Malformed records are NOT dropped here: they stay in place with a
``reject`` reason, so positions (and therefore shard membership) never depend on validity.

An Item: ``{"id", "source", "reject"?, "conversations"? | "caption_path"? | "caption"?, "meta_path"?}``;
``source`` is a file path, or ``<tar path>::<member name>`` for images inside a tar.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

from visalign.errors import InputError
from visalign.images import TAR_SEP

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def detect_kind(path: Path) -> str:
    if not path.exists():
        raise InputError(
            f"--input {path} does not exist: give a LLaVA JSON, a folder of images or tar shards"
        )
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "llava"
        if path.suffix.lower() == ".tar":
            return "tar"
        raise InputError(
            f"--input {path}: a file must be a LLaVA .json list or a .tar shard; for images use their folder"
        )
    if any(p.suffix == ".tar" for p in path.iterdir()):
        return "tar"
    return "folder"


def list_inputs(
    input_path: str | Path, images_root: str | Path | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """``(kind, items)`` for an input path; raises ``InputError`` only when nothing can be read at all."""
    path = Path(input_path)
    kind = detect_kind(path)
    if kind == "llava":
        root = Path(images_root) if images_root else path.parent
        items = _list_llava(path, root)
        _check_root(items, root)
    elif kind == "folder":
        if images_root:
            raise InputError("--images is only for a LLaVA JSON input; a folder input is its own image root")
        items = _list_folder(path)
    else:
        items = _list_tars(sorted(path.glob("*.tar")) if path.is_dir() else [path])
    _reject_duplicates(items)
    return kind, items


def _list_llava(path: Path, root: Path) -> list[dict[str, Any]]:
    if not root.is_dir():
        raise InputError(
            f"--images {root} is not a folder: give the root that the JSON's image paths are under"
        )
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(
            f"--input {path} is not valid JSON ({err}); expected a LLaVA list of records"
        ) from err
    if not isinstance(records, list):
        raise InputError(f"--input {path} must hold a JSON list of records, got {type(records).__name__}")
    items = []
    for i, rec in enumerate(records):
        rid = rec.get("id") if isinstance(rec, dict) else None
        ident = str(rid) if isinstance(rid, (str, int)) and str(rid) != "" else f"#record-{i}"
        item: dict[str, Any] = {"id": ident, "source": str(path) + f"#{i}"}
        if not isinstance(rec, dict):
            item["reject"] = f"malformed record: expected an object, got {type(rec).__name__}"
        elif ident.startswith("#record-"):
            item["reject"] = "malformed record: missing or empty 'id'"
        elif not isinstance(rec.get("image"), str) or not rec["image"]:
            item["reject"] = "malformed record: missing 'image' (text-only records are not labelled)"
        elif not isinstance(rec.get("conversations"), list) or not all(
            isinstance(t, dict) and isinstance(t.get("value"), str) for t in rec["conversations"]
        ):
            item["reject"] = "malformed record: 'conversations' must be a list of {'from', 'value'} objects"
        else:
            item["source"] = str(root / rec["image"])
            item["conversations"] = rec["conversations"]
        items.append(item)
    return items


def _check_root(items: list[dict[str, Any]], root: Path, num_probe: int = 20) -> None:
    """Fail fast when the image root is plainly wrong (none of the first images exist): not 1M rejects."""
    probe = [it["source"] for it in items if not it.get("reject")][:num_probe]
    if probe and not any(Path(p).exists() for p in probe):
        raise InputError(
            f"none of the first {len(probe)} images exist under the image root {root} (e.g. {probe[0]}): "
            "pass the folder the JSON's 'image' paths are relative to with --images"
        )


def _list_folder(path: Path) -> list[dict[str, Any]]:
    files = sorted(
        (p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    items = []
    for p in files:
        item: dict[str, Any] = {"id": p.relative_to(path).with_suffix("").as_posix(), "source": str(p)}
        for ext, key in ((".txt", "caption_path"), (".json", "meta_path")):
            side = p.with_suffix(ext)
            if side.is_file():
                item[key] = str(side)
        items.append(item)
    return items


def _list_tars(tars: list[Path]) -> list[dict[str, Any]]:
    if not tars:
        raise InputError("no .tar shards found in --input")
    items = []
    for tar_path in tars:
        groups: dict[str, dict[str, str]] = {}
        try:
            with tarfile.open(tar_path, "r") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    prefix = member.name[: len(member.name) - len(base)]
                    groups.setdefault(prefix + key, {})[ext.lower()] = member.name
        except (tarfile.TarError, OSError) as err:
            items.append({"id": tar_path.stem, "source": str(tar_path), "reject": f"unreadable tar: {err}"})
            continue
        for key, members in groups.items():  # insertion order = tar order, deterministic
            ident = f"{tar_path.stem}/{key}"
            image = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
            item: dict[str, Any] = {"id": ident, "source": f"{tar_path}{TAR_SEP}{image or key}"}
            if image is None:
                item["reject"] = f"no image member for key {key!r} (have: {sorted(members)})"
            if "txt" in members:
                item["caption_member"] = members["txt"]
            if "json" in members:
                item["meta_member"] = members["json"]
            items.append(item)
    return items


def _reject_duplicates(items: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for item in items:
        if item.get("reject"):
            continue
        if item["id"] in seen:
            item["reject"] = f"duplicate id {item['id']!r} (the first occurrence is labelled)"
        seen.add(item["id"])


def partition(items: list[dict[str, Any]], samples_per_shard: int) -> list[list[dict[str, Any]]]:
    """Consecutive fixed-size slices (the last may be shorter); position i goes to shard i // size."""
    if samples_per_shard < 1:
        raise InputError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    return [items[i : i + samples_per_shard] for i in range(0, len(items), samples_per_shard)]


def listing_digest(items: list[dict[str, Any]]) -> str:
    """sha256 over ids, sources and reject flags: a changed input under the same path changes it."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item["id"], item["source"], item.get("reject", "")]).encode())
        h.update(b"\n")
    return h.hexdigest()
