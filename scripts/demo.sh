#!/usr/bin/env bash
# The main job end to end on a fresh machine, on real Fashion-MNIST, CPU or GPU:
# install, train the `tiny` S-JEA stack, export every level to ONNX (verified), embed a folder of
# real images into HDF5 with FAISS indexes, and search it per level and hierarchically.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
set -x
sjea train --overwrite                                   # -> runs/tiny (minutes on 2 cores)
sjea export --level all --overwrite                      # -> runs/tiny/onnx/*.onnx, parity printed
sjea images fashion-mnist demo/images --split test --limit 3000
sjea embed demo/images demo/fmnist.h5 --overwrite        # -> demo/fmnist.h5 + demo/fmnist.h5.index/
sjea search demo/images/Sneaker/000009.png --store demo/fmnist.h5 --mode both --k 5 --grid demo/search.png --overwrite
set +x
echo "serve the demo store as a search page: .venv/bin/sjea serve demo/fmnist.h5   # then open http://127.0.0.1:8000/"
