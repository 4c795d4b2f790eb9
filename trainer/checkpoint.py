"""Checkpoints of a run: write (tmp dir + rename), find the latest complete one, read them back.

Layout of ``RUN/checkpoints/step-NNNNNN/`` (a directory without ``trainer_state.json`` is never used):

    trainer_state.json      step, stage, LLM, projector, the shards' manifest, the resolved config, the format
                            and the non-finite step counters; written last: marks the checkpoint complete
    optimizer.json          the optimizer's non-tensor settings per parameter and the LR scheduler state
    rng-rank{r}.pt          python / numpy / torch (+ CUDA) RNG states of rank r (torch.load weights_only)
    data-rank{r}.json       loader position of rank r (batches consumed + the stream layout it assumes)

and the tensors in one of two formats (``trainer_state.json`` ``format``):

* ``gathered`` (DDP, one process): the main process writes whole tensors.
      model.safetensors       trainable VisualLM parameters (projector; + LLM in finetune; LoRA adapters)
      objectives.safetensors  the objective modules' state (SEA temperature, reverse projectors)
      optimizer.safetensors   AdamW moments and step counts, ``state.<parameter name>.<exp_avg|...>``
* ``sharded`` (FSDP): every process writes its own shards in parallel through torch.distributed.checkpoint's
  safetensors writer; nothing is gathered on one process, and there is no pickled metadata (DCP's default
  ``.metadata`` file is read with ``pickle``): offsets live in each file's safetensors header.
      sharded/shard-0000{r+1}-model-00001-of-00001.safetensors   rank r's pieces of every tensor above,
                              under full names (``vlm.projector.0.weight``, ``objectives.sea.logit_scale``,
                              ``state.vlm.projector.0.weight.exp_avg``)

Both formats load under either strategy and any process count (DCP reshards on load), and a single process
reads either one whole (``read_weights``: export, eval, --init-projector). Multi-node runs need RUN on a
filesystem every node sees. Never unpickles: tensors are safetensors, the rest is JSON or
``torch.load(weights_only=True)``. Older checkpoints (``optimizer.pt``/``scheduler.pt``) are still read.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from visalign.errors import VisalignError

CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"
MODEL = "model.safetensors"
OBJECTIVES = "objectives.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SHARDED = "sharded"
OPTIMIZER = "optimizer.pt"  # older checkpoints
SCHEDULER = "scheduler.pt"  # older checkpoints
GATHERED, SHARDED_FORMAT = "gathered", "sharded"
VLM_PREFIX, OBJECTIVES_PREFIX = "vlm.", "objectives."
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(VisalignError):
    """A missing, incomplete or incompatible checkpoint."""


def step_dir(run: str | Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / STATE).is_file()
    ]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(run_or_ckpt: str | Path, step: int | None = None) -> Path:
    """A checkpoint folder from a run folder (latest, or ``step``) or a checkpoint folder itself."""
    path = Path(run_or_ckpt)
    if (path / STATE).is_file() and step is None:
        return path
    if step is not None:
        ckpt = step_dir(path, step)
        if not (ckpt / STATE).is_file():
            have = ", ".join(p.name for p in list_checkpoints(path)) or "none"
            raise CheckpointError(f"{path} has no complete checkpoint for step {step} (it has: {have})")
        return ckpt
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"{path} is neither a checkpoint folder nor a run with complete checkpoints under {CHECKPOINTS}/"
        )
    return found[-1]


def read_state(ckpt: str | Path) -> dict[str, Any]:
    with open(Path(ckpt) / STATE, encoding="utf-8") as f:
        return json.load(f)


def checkpoint_format(ckpt: str | Path) -> str:
    return read_state(ckpt).get("format", GATHERED)


# ---------------------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """All RNG states of this process in weights_only-loadable types (no numpy arrays, no pickled objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------
# names: one full name per tensor (``vlm.*``, ``objectives.*``, ``state.*``); the gathered files drop the
# ``vlm.`` / ``objectives.`` prefix (as the format always had), the sharded files keep full names
# ---------------------------------------------------------------------------------------------------------


def file_key(name: str, fmt: str) -> str:
    if fmt == GATHERED:
        for prefix in (VLM_PREFIX, OBJECTIVES_PREFIX):
            if name.startswith(prefix):
                return name[len(prefix) :]
    return name


def _split_gathered(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    files: dict[str, dict[str, torch.Tensor]] = {MODEL: {}, OBJECTIVES: {}, OPTIMIZER_TENSORS: {}}
    for name, value in tensors.items():
        if name.startswith(VLM_PREFIX):
            files[MODEL][file_key(name, GATHERED)] = value
        elif name.startswith(OBJECTIVES_PREFIX):
            files[OBJECTIVES][file_key(name, GATHERED)] = value
        else:
            files[OPTIMIZER_TENSORS][name] = value
    seen: set[str] = set()
    for part in files.values():
        clash = seen & set(part)
        if clash:  # the gathered files are read as one namespace
            raise ValueError(f"checkpoint tensor names clash across files: {sorted(clash)[:3]}")
        seen |= set(part)
    return files


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------------


def save_checkpoint(
    accelerator: Any,
    run: str | Path,
    step: int,
    fmt: str,
    tensors: dict[str, torch.Tensor],
    optimizer_rest: dict[str, Any],
    scheduler_state: dict[str, Any],
    data_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Collective: every rank calls it. ``tensors``: full names -> this rank's tensors (whole under
    ``gathered``, DTensor shards under ``sharded``). Files go into ``step-N.tmp``; the main process renames
    it once every rank has written."""
    final = step_dir(run, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a crash mid-save leaves a stale tmp dir
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(capture_rng(), tmp / f"rng-rank{rank}.pt")
    (tmp / f"data-rank{rank}.json").write_text(json.dumps(data_state, indent=1))
    if fmt == SHARDED_FORMAT:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDED), save_distributed=True))
    elif accelerator.is_main_process:
        for name, part in _split_gathered(tensors).items():
            save_file(_cpu(part), tmp / name)
    if accelerator.is_main_process:
        extra = {"optimizer": optimizer_rest, "scheduler": scheduler_state}
        (tmp / OPTIMIZER_JSON).write_text(json.dumps(extra, indent=1))
        (tmp / STATE).write_text(json.dumps({"step": step, "format": fmt, **meta}, indent=1))  # last
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last > 0:
            for old in list_checkpoints(run)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------------------


def _reader(ckpt: Path, fmt: str):
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    return HuggingFaceStorageReader(str(ckpt / SHARDED if fmt == SHARDED_FORMAT else ckpt))


def saved_names(ckpt: str | Path) -> set[str]:
    """Full names of every tensor in a checkpoint (either format), read from file headers only."""
    ckpt = Path(ckpt)
    fmt = checkpoint_format(ckpt)
    if fmt == SHARDED_FORMAT:
        return set(_reader(ckpt, fmt).read_metadata().state_dict_metadata)
    from safetensors import safe_open

    names: set[str] = set()
    for file, prefix in ((MODEL, VLM_PREFIX), (OBJECTIVES, OBJECTIVES_PREFIX), (OPTIMIZER_TENSORS, "")):
        if (ckpt / file).is_file():
            with safe_open(str(ckpt / file), framework="pt") as f:
                names |= {prefix + k for k in f.keys()}
    return names


def load_into(ckpt: str | Path, templates: dict[str, torch.Tensor], collective: bool = True) -> None:
    """Fill ``templates`` (full names -> tensors of this process: whole, or DTensor shards) in place from a
    checkpoint of either format; DCP reads just the pieces each process needs. ``collective``: every rank
    calls it (a run); False: this process alone (no process group needed)."""
    import torch.distributed.checkpoint as dcp

    ckpt = Path(ckpt)
    fmt = checkpoint_format(ckpt)
    missing = sorted(set(templates) - saved_names(ckpt))
    if missing:
        raise CheckpointError(
            f"{ckpt} lacks {len(missing)} tensor(s) this model needs (e.g. {missing[:3]}): it was written by "
            "a run with other trainable parameters; resume with that run's settings"
        )
    keyed = {file_key(name, fmt): tensor for name, tensor in templates.items()}
    single = not collective or not torch.distributed.is_initialized()
    with warnings.catch_warnings():
        # one process reading alone is the intent here, not a missing process group
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(keyed, storage_reader=_reader(ckpt, fmt), no_dist=single)
    for name, tensor in templates.items():
        loaded = keyed[file_key(name, fmt)]
        if loaded is not tensor:  # DCP fills in place; a replaced entry is copied back
            tensor.copy_(loaded)


def read_tensors(ckpt: str | Path, prefixes: tuple[str, ...] = ("",)) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint whose full name starts with one of ``prefixes``, whole, in this process
    (no process group needed): ``vlm.*``, ``objectives.*``, ``state.<parameter>.<exp_avg|exp_avg_sq|step>``."""
    ckpt = Path(ckpt)
    fmt = checkpoint_format(ckpt)
    if fmt == GATHERED:
        found: dict[str, torch.Tensor] = {}
        for file, prefix in ((MODEL, VLM_PREFIX), (OBJECTIVES, OBJECTIVES_PREFIX), (OPTIMIZER_TENSORS, "")):
            if (ckpt / file).is_file():
                found.update({prefix + k: v for k, v in load_file(ckpt / file).items()})
        return {k: v for k, v in found.items() if k.startswith(prefixes)}
    metadata = _reader(ckpt, fmt).read_metadata().state_dict_metadata
    templates = {
        name: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in metadata.items()
        if name.startswith(prefixes)
    }
    load_into(ckpt, templates, collective=False)
    return templates


def read_weights(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(VisualLM tensors, objective tensors)`` of a checkpoint, whole, in this process (no process group
    needed): names as in ``VisualLM.state_dict()`` and ``TrainModule.objectives.state_dict()``."""
    ckpt = Path(ckpt)
    if checkpoint_format(ckpt) == GATHERED:
        model = load_tensors(ckpt, MODEL)
        objectives = load_file(ckpt / OBJECTIVES) if (ckpt / OBJECTIVES).is_file() else {}
        return model, objectives
    found = read_tensors(ckpt, (VLM_PREFIX, OBJECTIVES_PREFIX))
    model = {k[len(VLM_PREFIX) :]: v for k, v in found.items() if k.startswith(VLM_PREFIX)}
    objectives = {k[len(OBJECTIVES_PREFIX) :]: v for k, v in found.items() if k.startswith(OBJECTIVES_PREFIX)}
    return model, objectives


def read_optimizer_json(ckpt: str | Path) -> dict[str, Any] | None:
    path = Path(ckpt) / OPTIMIZER_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def load_tensors(ckpt: str | Path, name: str = MODEL) -> dict[str, torch.Tensor]:
    path = Path(ckpt) / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} lacks {name}")
    return load_file(path)


def load_torch(ckpt: str | Path, name: str) -> Any:
    path = Path(ckpt) / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} lacks {name}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_rank_state(ckpt: str | Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(rng state, data state) written by ``rank``; a run resumed with another process count is refused."""
    ckpt = Path(ckpt)
    rng_path, data_path = ckpt / f"rng-rank{rank}.pt", ckpt / f"data-rank{rank}.json"
    if not rng_path.is_file() or not data_path.is_file():
        raise CheckpointError(
            f"{ckpt} has no state for rank {rank}: it was written by fewer processes; resume with the same "
            "number of processes (an exact resume needs the same data split)"
        )
    return torch.load(rng_path, map_location="cpu", weights_only=True), json.loads(data_path.read_text())


def read_data_state(ckpt: str | Path, rank: int) -> dict[str, Any]:
    path = Path(ckpt) / f"data-rank{rank}.json"
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt} has no state for rank {rank}: it was written by fewer processes; resume with the same "
            "number of processes (an exact resume needs the same data split)"
        )
    return json.loads(path.read_text())
