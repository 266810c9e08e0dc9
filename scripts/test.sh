#!/usr/bin/env bash
# Installs the project (scripts/install.sh) and runs the whole test suite on all cores.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
exec .venv/bin/python -m pytest -n "${SJEA_TEST_WORKERS:-2}" -q "$@"
