"""The oldest transformers visalign claims (pyproject.toml's floor), installed beside the project's, never in it.

    python devtools/transformers_floor.py install        # once: pip install --no-deps --target CACHE ...
    python devtools/transformers_floor.py path           # prints the folder (for PYTHONPATH)
    python devtools/transformers_floor.py python ARGS... # this interpreter with the floor first on sys.path
    e.g. python devtools/transformers_floor.py python -m trainer.cli run ...

The floor's transformers needs its own tokenizers and huggingface_hub (it pins tokenizers < 0.23.1 and
huggingface_hub < 1.0); everything else (torch, accelerate, safetensors, numpy, ...) comes from the
environment, whose versions pass its import-time checks. The folder is ``$VISALIGN_FLOOR_SITE`` or
``~/.cache/visalign-devtools/transformers-<version>``; it is written under a temporary name and renamed when
the install completes, so a failed install never looks usable. ``tests/test_compat.py`` uses it to load
exports and run the trainer under the floor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# the versions the compatibility tests run; pyproject.toml's transformers floor must equal the first
FLOOR = {"transformers": "4.57.6", "tokenizers": "0.22.2", "huggingface_hub": "0.36.2"}
MARKER = ".visalign-floor-complete"
REPO = Path(__file__).resolve().parents[1]


def site() -> Path:
    """Where the floor is (or would be) installed."""
    env = os.environ.get("VISALIGN_FLOOR_SITE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/visalign-devtools").expanduser() / f"transformers-{FLOOR['transformers']}"


def installed(folder: Path | None = None) -> bool:
    folder = folder or site()
    return (folder / MARKER).is_file()


def install(folder: Path | None = None, quiet: bool = True) -> Path:
    """Install the floor into ``folder`` unless it is there; returns the folder. Raises ``RuntimeError``
    with pip's last lines when the registry cannot be reached."""
    folder = folder or site()
    if installed(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    specs = [f"{name}=={version}" for name, version in FLOOR.items()]
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(tmp), *specs]
    if quiet:
        cmd.insert(4, "-q")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
            raise RuntimeError(f"pip could not install {' '.join(specs)}:\n{tail}")
        (tmp / MARKER).write_text(" ".join(specs) + "\n")
        if folder.exists():  # another process finished first
            return folder
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def env(folder: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose Python imports the floor first, then this repository, then the usual paths."""
    out = dict(os.environ if base is None else base)
    parts = [str(folder or site()), str(REPO)]
    if out.get("PYTHONPATH"):
        parts.append(out["PYTHONPATH"])
    out["PYTHONPATH"] = os.pathsep.join(parts)
    return out


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("install", "path", "python"):
        print(__doc__)
        return 2
    if argv[0] == "install":
        print(install(quiet=False))
        return 0
    if argv[0] == "path":
        print(site())
        return 0 if installed() else 1
    if not installed():
        print(f"the floor is not installed in {site()}: run `python {sys.argv[0]} install`", file=sys.stderr)
        return 1
    return subprocess.call([sys.executable, *argv[1:]], env=env())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
