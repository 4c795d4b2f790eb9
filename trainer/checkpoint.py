"""Checkpoints of a run: write (tmp dir + rename), find the latest complete one, load (resume, init, export).

Layout of ``RUN/checkpoints/step-NNNNNN/`` (a directory without ``trainer_state.json`` is never used):

    model.safetensors       trainable VisualLM parameters (projector; + LLM in finetune), names as in VisualLM
    objectives.safetensors  the objective modules' full state (SEA temperature, reverse projectors, buffers)
    optimizer.pt            AdamW state (tensors + plain values; loaded with weights_only=True)
    scheduler.pt            LR scheduler state
    rng-rank{r}.pt          python / numpy / torch (+ CUDA) RNG states of rank r
    data-rank{r}.json       loader position of rank r (batches consumed + the stream layout it assumes)
    trainer_state.json      step, stage, LLM, projector, feature width, the shards' manifest (export reads it)

Multi-node runs need RUN on a filesystem all nodes share (every rank writes its own rng/data file).
Never unpickles: weights are safetensors, the rest is JSON or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
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
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
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
# save / load
# ---------------------------------------------------------------------------------------------------------


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(
    accelerator: Any,
    run: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    objectives_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    data_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Collective: every rank calls it. Rank files go into ``step-N.tmp``; the main process renames it."""
    final = step_dir(run, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a crash mid-save leaves a stale tmp dir
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(capture_rng(), tmp / f"rng-rank{rank}.pt")
    (tmp / f"data-rank{rank}.json").write_text(json.dumps(data_state, indent=1))
    if accelerator.is_main_process:
        save_file(_cpu(model_state), tmp / MODEL)
        save_file(_cpu(objectives_state), tmp / OBJECTIVES)
        torch.save(optimizer_state, tmp / OPTIMIZER)
        torch.save(scheduler_state, tmp / SCHEDULER)
        (tmp / STATE).write_text(json.dumps({"step": step, **meta}, indent=1))  # last: marks completeness
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
