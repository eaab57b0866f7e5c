#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh machine: the Fashion-MNIST files (Debian package),
# a virtual environment in .venv with torch 2.14.1 / torchvision 0.29.1 (taken from this
# machine's disk by pip) and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }) >/dev/null
  else
    echo "setup.sh: Fashion-MNIST is missing; run 'sudo apt-get install dataset-fashion-mnist' or pass --data-root" >&2
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import duallora_kernels, torch, timm, pytest, mlxtend" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
fi
