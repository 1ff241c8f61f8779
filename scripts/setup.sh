#!/usr/bin/env bash
# Creates .venv with cmr_ood and its dependencies. constraints.txt pins the CPU build of torch; on a
# machine with a GPU, install with `pip install -e .` into an environment that already has CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
