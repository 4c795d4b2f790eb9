"""Hugging Face hub ids as model locations: resolved through the local HF cache, with the download command
named when the hub cannot be reached.

``resolve_hub_id(repo_id, what)`` -> what ``from_pretrained`` should load: the id itself when the hub may be
contacted (``from_pretrained`` downloads or revalidates), the cached snapshot folder when it may not
(``HF_HUB_OFFLINE=1``), and a ``ConfigError`` naming the download command when an offline id is not cached.
Used for ``--llm`` and for an encoder the shards' manifest records by hub id.
"""

from __future__ import annotations

import os

from visalign.config import ConfigError

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """Whether the hub must not be contacted (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read now)."""
    return any(
        os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def download_command(repo_id: str) -> str:
    """The command that puts ``repo_id`` into the HF cache, for the installed huggingface_hub."""
    try:
        import huggingface_hub

        major = int(huggingface_hub.__version__.split(".")[0])
    except (ImportError, ValueError):
        major = 0
    # huggingface_hub 1.0 replaced the `huggingface-cli` script by `hf`
    return f"hf download {repo_id}" if major >= 1 else f"huggingface-cli download {repo_id}"


def cached_snapshot(repo_id: str) -> str | None:
    """The folder of ``repo_id``'s cached snapshot (default revision), or None when it is not cached."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, an invalid id, a partial snapshot: all mean "not usable offline"
        return None


def resolve_hub_id(repo_id: str, what: str, alternative: str = "") -> str:
    """``repo_id`` (online) or its cached snapshot folder (offline); offline and not cached -> ConfigError."""
    if not hub_offline():
        return repo_id
    snapshot = cached_snapshot(repo_id)
    if snapshot is not None:
        return snapshot
    also = f", or {alternative}" if alternative else ""
    raise ConfigError(
        f"{what} {repo_id!r} is not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1): "
        f"download it first with `{download_command(repo_id)}` on a machine with network{also}"
    )
