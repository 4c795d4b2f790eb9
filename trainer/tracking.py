"""Where a run's curves go besides ``log.jsonl``: experiment trackers through Accelerate, and ``env.json``.

``--logging.report-to tensorboard,wandb,mlflow`` names Accelerate trackers (any name Accelerate knows:
tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio; ``none`` = log.jsonl only).
Every tracker receives exactly the scalars of each ``log.jsonl`` record under the same names (sections such
as ``eval/hit@1/l0`` stay sections), at the record's ``step``. MLflow alone refuses some characters in metric
names (it allows letters, digits, ``_ - . / :`` and spaces); for it those are replaced by ``_`` and the
renaming is logged once.

Offline safety: nothing here needs the network.

* TensorBoard writes ``RUN/tensorboard/``.
* W&B writes ``RUN/wandb/``. Its mode is ``$WANDB_MODE`` when set, ``online`` when credentials exist
  (``$WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai), and otherwise ``offline``: the run is kept
  locally and can be uploaded later with ``wandb sync RUN/wandb/offline-run-*``.
* MLflow logs to ``$MLFLOW_TRACKING_URI`` when set, otherwise to a store inside the run: ``RUN/mlflow.db``
  (SQLite, with the full ``mlflow`` package) or ``RUN/mlruns`` (file store, with ``mlflow-skinny``); view it
  with ``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`` (or ``RUN/mlruns``).

The W&B run id and the MLflow run id are kept in ``RUN/trackers.json``, so ``--resume`` continues the same
tracker runs. ``write_env`` records the environment of every start in ``RUN/env.json``: command line,
package versions, the git revision of the code, hardware and the process layout.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import logging
import netrc
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from visalign.config import ConfigError, to_dict

log = logging.getLogger(__name__)

ENV_FILE = "env.json"
TRACKERS_FILE = "trackers.json"
# tracker name -> the module it needs (what `pip install` brings)
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}
# distributions whose versions env.json records (when installed)
PACKAGES = (
    "visalign", "torch", "transformers", "accelerate", "tokenizers", "huggingface_hub", "safetensors",
    "webdataset", "numpy", "pillow", "pyarrow", "tensorboard", "wandb", "mlflow", "mlflow-skinny",
    "deepspeed", "peft", "flash-attn",
)  # fmt: skip
# environment variables that describe the process layout or the device choice (never credentials)
ENV_VARS = (
    "CUDA_VISIBLE_DEVICES", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "NODE_RANK",
    "SLURM_JOB_ID", "SLURM_NODEID", "SLURM_NTASKS", "ACCELERATE_MIXED_PRECISION", "WANDB_MODE",
    "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "VISALIGN_CACHE",
)  # fmt: skip
_MLFLOW_BAD = re.compile(r"[^\w.\- :/]")


def tracker_names(logging_cfg: Any) -> list[str]:
    """The trackers ``--logging.report-to`` asks for, checked: known names, installed packages."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names: list[str] = []
    for raw in logging_cfg.report_to or ():
        for name in str(raw).split(","):
            name = name.strip().lower()
            if name and name != "none" and name not in names:
                names.append(name)
    legacy = getattr(logging_cfg, "tensorboard", None)
    if legacy is False and "tensorboard" in names:
        names.remove("tensorboard")  # the pre-report-to switch, still honoured in old configs
    elif legacy is True and "tensorboard" not in names:
        names.append("tensorboard")
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"--logging.report-to {name!r} is not a tracker Accelerate knows; choose from "
                f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))} (or none)"
            )
        module = TRACKER_PACKAGES.get(name, name)
        if importlib.util.find_spec(module) is None:
            package = "mlflow-skinny" if name == "mlflow" else module.replace("_", "-")
            raise ConfigError(
                f"--logging.report-to {name}: the {module!r} package is not installed; "
                f"pip install {package} (or drop {name} from --logging.report-to)"
            )
    return names


def wandb_mode() -> tuple[str, str]:
    """``(mode, why)`` for W&B: ``$WANDB_MODE``, else online with credentials, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    if os.environ.get("WANDB_API_KEY"):
        return "online", "WANDB_API_KEY"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online", "~/.netrc"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline", "no W&B credentials found"


def mlflow_names(values: dict[str, Any]) -> dict[str, Any]:
    """Metric names MLflow accepts: characters it refuses become ``_``."""
    return {_MLFLOW_BAD.sub("_", k): v for k, v in values.items()}


def make_trackers(cfg: Any, names: list[str]) -> list[Any]:
    """Accelerate tracker objects for ``names``, configured to write inside the run folder; started by
    ``Accelerator.init_trackers`` (``start_trackers``) on the main process only."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, TensorBoardTracker, WandBTracker

    run = Path(cfg.output).resolve()
    project = cfg.logging.project
    ids = read_tracker_ids(run) if cfg.resume else {}
    trackers: list[Any] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", str(run)))
        elif name == "wandb":
            mode, why = wandb_mode()
            kwargs: dict[str, Any] = {"dir": str(run), "name": run.name, "mode": mode}
            if ids.get("wandb"):
                kwargs.update(id=ids["wandb"], resume="allow")
            trackers.append(WandBTracker(project, **kwargs))
            log.info("W&B: %s mode (%s)%s", mode, why, _wandb_hint(mode, run))
        elif name == "mlflow":
            trackers.append(_mlflow_tracker(run, project, ids.get("mlflow")))
        else:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if cls.requires_logging_directory:
                trackers.append(cls(project, str(run)))
            else:
                trackers.append(cls(project))
    return trackers


def _wandb_hint(mode: str, run: Path) -> str:
    if mode == "offline":
        return f": written to {run}/wandb; upload later with `wandb sync {run}/wandb/offline-run-*`"
    return ""


def mlflow_local_uri(run: Path) -> str:
    """MLflow's store inside the run: SQLite (``RUN/mlflow.db``) when SQLAlchemy is installed (full
    ``mlflow``), else the file store ``RUN/mlruns`` (``mlflow-skinny``; MLflow 3 keeps it in maintenance
    mode and wants ``MLFLOW_ALLOW_FILE_STORE`` to use it)."""
    if importlib.util.find_spec("sqlalchemy") is not None and importlib.util.find_spec("alembic") is not None:
        return f"sqlite:///{run / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (run / "mlruns").as_uri()


def _mlflow_tracker(run: Path, project: str, run_id: str | None) -> Any:
    """Accelerate's MLflow tracker with a local file store by default and names MLflow accepts."""
    from accelerate.tracking import MLflowTracker

    class LocalMLflowTracker(MLflowTracker):
        def start(self):
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri(mlflow_local_uri(run))
            super().start()
            log.info("MLflow: run %s at %s", self.active_run.info.run_id, mlflow.get_tracking_uri())

        def log(self, values, step=None, **kwargs):
            renamed = mlflow_names(values)
            if set(renamed) != set(values) and not getattr(self, "_warned", False):
                changed = sorted(k for k in values if k not in renamed)
                log.warning("MLflow refuses some characters in metric names; renamed %s", changed[:5])
                self._warned = True
            super().log(renamed, step=step, **kwargs)

    return LocalMLflowTracker(experiment_name=project, run_id=run_id, run_name=run.name)


def read_tracker_ids(run: Path) -> dict[str, str]:
    path = Path(run) / TRACKERS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def start_trackers(accelerator: Any, cfg: Any) -> None:
    """Start the trackers (main process), log the resolved config, and keep their run ids for --resume."""
    if not accelerator.log_with:
        return
    accelerator.init_trackers(cfg.logging.project)
    if not accelerator.is_main_process:
        return
    config = flat_config(cfg)
    for tracker in accelerator.trackers:
        # TensorBoard's hparams would add two timestamped folders; RUN/config.yaml already holds the config
        if tracker.name != "tensorboard":
            tracker.store_init_configuration(config)
    ids = {}
    for tracker in accelerator.trackers:
        if tracker.name == "wandb" and getattr(tracker, "run", None) is not None:
            ids["wandb"] = tracker.run.id
        elif tracker.name == "mlflow" and getattr(tracker, "active_run", None) is not None:
            ids["mlflow"] = tracker.active_run.info.run_id
    if ids:
        (Path(cfg.output) / TRACKERS_FILE).write_text(json.dumps(ids, indent=1) + "\n")


def flat_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as ``{"optim.lr": 0.001, ...}`` with values every tracker accepts."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
            return
        key = prefix[:-1]
        out[key] = node if isinstance(node, (bool, int, float, str)) else json.dumps(node)

    walk("", to_dict(cfg))
    return out


# ---------------------------------------------------------------------------------------------------------
# env.json
# ---------------------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def git_revision(path: str | Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty", "root"}`` of the git work tree holding the code (None when it is not in one)."""
    where = Path(path or Path(__file__).resolve().parent)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        root = git("rev-parse", "--show-toplevel")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty, "root": root}


def hardware(accelerator: Any = None) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gib"] = None
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
    else:
        info["gpus"] = []
    if accelerator is not None:
        info["num_processes"] = accelerator.num_processes
        info["distributed_type"] = str(accelerator.distributed_type)
        info["mixed_precision"] = str(accelerator.mixed_precision)
        info["device"] = str(accelerator.device)
    return info


def environment(accelerator: Any = None, step: int = 0) -> dict[str, Any]:
    """One start's record: when, what command, which code and packages, on what hardware."""
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "step": int(step),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git_revision(),
        "hardware": hardware(accelerator),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def write_env(run: str | Path, accelerator: Any = None, step: int = 0) -> Path:
    """Write ``RUN/env.json`` for this start; the records of earlier starts (resumes) are kept in it."""
    path = Path(run) / ENV_FILE
    record = environment(accelerator, step)
    earlier: list[dict[str, Any]] = []
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
            earlier = previous.pop("earlier_starts", []) + [previous]
        except (json.JSONDecodeError, AttributeError):
            earlier = []
    record["earlier_starts"] = earlier
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path
