#!/usr/bin/env bash
# Downloads the wheels benchmarks/device_layer.sh installs on a lent GPU machine (its image runs Python 3.12
# and cannot reach a registry) into .whl/ at the repository root (git-ignored). Run it here, once:
#   bash benchmarks/fetch_device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl -r benchmarks/device_wheels.txt
ls .whl
