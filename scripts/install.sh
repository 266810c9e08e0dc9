#!/usr/bin/env bash
# Installs sjea-tools into ./.venv with everything it needs, plus the Fashion-MNIST files used by
# the default preset, the demo and the tests. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
  else
    echo "note: no apt-get; sjea will download Fashion-MNIST with torchvision or use --data-dir" >&2
  fi
fi

# A real browser for the page test of `sjea serve` (tests skip it, saying why, where none installs).
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "note: chromium/chromium-driver could not be installed; the browser test will be skipped" >&2
fi

# h5dump, for the test that reads a store of segments with plain HDF5 tools (skipped, saying why, without it).
if ! command -v h5dump >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq hdf5-tools) >/dev/null 2>&1 \
    || echo "note: hdf5-tools could not be installed; the h5dump test will be skipped" >&2
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: the version this project is tested with (CUDA build on Linux x86-64).
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# setuptools' "Editable installation" notice (a wall of asterisks on every editable install of a
# flat layout) says nothing actionable here; only that one message is silenced.
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q -e ".[dev]"
echo "installed: $(.venv/bin/sjea --version) in $(pwd)/.venv"
