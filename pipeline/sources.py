"""Input listing and deterministic partitioning for ``pipeline label``.

Inputs (kind detected from the path):

* ``llava``: a LLaVA-format JSON list of ``{"id", "image", "conversations"}``; images are resolved against
  ``--images`` (default: the JSON's folder). Records keep the file's order.
* ``folder``: a folder of images (recursive, sorted by relative path); an optional caption sidecar with the
  same stem and ``.txt`` (and metadata ``.json``) next to an image. The id is the relative path without
  extension.
* ``tar``: WebDataset/img2dataset tar shards (a ``.tar`` file, or a folder holding ``*.tar``, sorted): members
  ``key.jpg|jpeg|png|webp`` + ``key.txt`` [+ ``key.json``]. The id is the tar's stem + "/" + key.

Output: a list of ``Item`` dicts (plain data only, so Dask ships them cheaply), then ``partition`` cuts
them into fixed-size consecutive slices: the same input and ``samples_per_shard`` always map the same sample
to the same shard index. Malformed records are NOT dropped here: they stay in place with a
``reject`` reason, so positions (and therefore shard membership) never depend on validity.

What is rejected here: LLaVA records that are not objects, have no id, or name an image path that leaves
``--images`` (absolute, or ``..`` above it; ``allow_outside_images`` accepts them), several images, or an
``image`` that is not a path; tar samples without an image member, and the sample a truncated or damaged
tar is cut in (the complete samples before it are kept). A LLaVA record without an ``image`` key is a
text-only sample (``text_only``). Whether a record's text can be trained on is checked when its shard is
labelled (``visalign.samples.check_record``).

An Item: ``{"id", "source", "reject"?, "text_only"?, "conversations"? | "caption_path"? |
"caption_member"?, "meta_path"? | "meta_member"?}``; ``source`` is a file path, ``<tar path>::<member
name>`` for images inside a tar, or ``<json path>#<index>`` for a LLaVA record without a usable image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from visalign.errors import InputError
from visalign.images import TAR_SEP

_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")


def stable_reason(text: str) -> str:
    """A reject reason that is the same on every run and fits one line: object addresses masked."""
    return " ".join(_ADDRESS.sub("0x…", str(text)).split())


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
    input_path: str | Path, images_root: str | Path | None = None, allow_outside_images: bool = False
) -> tuple[str, list[dict[str, Any]]]:
    """``(kind, items)`` for an input path; raises ``InputError`` only when nothing can be read at all."""
    path = Path(input_path)
    kind = detect_kind(path)
    if kind == "llava":
        root = Path(images_root) if images_root else path.parent
        items = _list_llava(path, root, allow_outside_images)
        _check_root(items, root)
    elif kind == "folder":
        if images_root:
            raise InputError("--images is only for a LLaVA JSON input; a folder input is its own image root")
        items = _list_folder(path)
    else:
        items = _list_tars(sorted(path.glob("*.tar")) if path.is_dir() else [path])
    _reject_duplicates(items)
    for item in items:
        if item.get("reject"):
            item.pop("conversations", None)  # a rejected record carries nothing to the workers
    return kind, items


def _image_path(root: Path, image: str, allow_outside: bool) -> tuple[str | None, str | None]:
    """``(source, None)`` for a LLaVA ``image`` path under ``root``, or ``(None, reject reason)``.

    The check is on the path's text (``..`` and absolute paths), not on where symlinks lead: a dataset
    folder linked into the image root by its owner stays usable.
    """
    try:
        os.fsencode(image)
    except UnicodeEncodeError:
        return None, "malformed record: the 'image' path is not valid Unicode text (a lone surrogate?)"
    if "\0" in image:
        return None, "malformed record: the 'image' path holds a NUL character"
    rel = PurePosixPath(image.replace("\\", "/"))
    inside = not rel.is_absolute() and not PureWindowsPath(image).drive
    if inside:
        depth = 0
        for part in rel.parts:
            depth += -1 if part == ".." else (0 if part == "." else 1)
            inside = inside and depth >= 0
    if not inside and not allow_outside:
        return None, (
            f"image path {image[:200]!r} leaves the image root (absolute, or '..' above it): not opened; "
            "move the file under --images, or pass --allow-outside-images to trust the JSON's paths"
        )
    return str(root / image), None


def _list_llava(path: Path, root: Path, allow_outside: bool = False) -> list[dict[str, Any]]:
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
        items.append(item)
        if not isinstance(rec, dict):
            item["reject"] = f"malformed record: expected an object, got {type(rec).__name__}"
            continue
        if ident.startswith("#record-"):
            item["reject"] = "malformed record: missing or empty 'id'"
            continue
        # the conversation itself is checked by the shared validator when the shard is labelled
        item["conversations"] = rec.get("conversations")
        if "image" not in rec:  # LLaVA's own test: no "image" key = a text-only sample (ShareGPT in the mix)
            item["text_only"] = True
            continue
        image = rec["image"]
        if isinstance(image, list):
            item["reject"] = f"{len(image)} images in one record: one image per sample"
        elif not isinstance(image, str) or not image:
            item["reject"] = "malformed record: 'image' must be a non-empty path (omit the key for text only)"
        else:
            source, reason = _image_path(root, image, allow_outside)
            if reason:
                item["reject"] = reason
            else:
                item["source"] = source
    return items


def _check_root(items: list[dict[str, Any]], root: Path, num_probe: int = 20) -> None:
    """Fail fast when the image root is plainly wrong (none of the first images exist): not 1M rejects."""
    probe = [it["source"] for it in items if not it.get("reject") and not it.get("text_only")][:num_probe]
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


def _tar_groups(tar_path: Path) -> tuple[dict[str, dict[str, str]], str | None, str | None]:
    """``(groups, damaged key, reason)`` of one tar: ``{key: {ext: member name}}`` in tar order.

    A tar cut short (no end-of-archive block, or a member whose data runs past the end of the file) or
    with a broken header further on keeps every group before the damage; the group the damage falls in
    (the last one read) is reported as damaged, since its missing members cannot be told apart from absent
    ones.
    """
    groups: dict[str, dict[str, str]] = {}
    size = tar_path.stat().st_size
    reason = None
    last = None
    try:
        with tarfile.open(tar_path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                prefix = member.name[: len(member.name) - len(base)]
                last = prefix + key
                groups.setdefault(last, {})[ext.lower()] = member.name
                if member.offset_data + member.size > size:
                    reason = f"truncated input tar: member {member.name!r} is cut off at byte {size}"
                    break
            else:
                # a complete tar ends with zero blocks after the last member; a cut at a member boundary
                # leaves none
                tar.fileobj.seek(tar.offset)
                if tar.fileobj.read(512) != b"\0" * 512:
                    reason = (
                        f"truncated input tar: no member header or end-of-archive block at byte {tar.offset} "
                        "(the file is cut there, or damaged)"
                    )
    except (tarfile.TarError, OSError, EOFError) as err:
        if not groups:
            raise
        if "unexpected end" in str(err):
            reason = f"truncated input tar: it ends at byte {size}, inside the data of a member"
        else:
            reason = stable_reason(f"damaged input tar: {type(err).__name__}: {err}")
    return groups, (last if reason else None), reason


def _list_tars(tars: list[Path]) -> list[dict[str, Any]]:
    if not tars:
        raise InputError("no .tar shards found in --input")
    items = []
    for tar_path in tars:
        try:
            groups, damaged, reason = _tar_groups(tar_path)
        except (tarfile.TarError, OSError, EOFError) as err:
            reason = stable_reason(f"unreadable tar: {type(err).__name__}: {err}")
            items.append({"id": tar_path.stem, "source": str(tar_path), "reject": reason})
            continue
        for key, members in groups.items():  # insertion order = tar order, deterministic
            ident = f"{tar_path.stem}/{key}"
            image = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
            item: dict[str, Any] = {"id": ident, "source": f"{tar_path}{TAR_SEP}{image or key}"}
            if key == damaged:
                item["reject"] = f"{reason} (the complete samples before it are kept)"
            elif image is None:
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
