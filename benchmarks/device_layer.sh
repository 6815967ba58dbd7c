#!/usr/bin/env bash
# benchmarks/layer.py on a lent GPU machine: ours and llm-compressor on the same GPU (layer.py's --peer-device
# auto picks cuda there), with the image's own torch and jax. Prepare here with
# benchmarks/fetch_device_wheels.sh, then call the device tool's `run` with carry [".whl"] and the command
#   bash benchmarks/device_layer.sh
# (extra arguments go to layer.py). The JSON record and the log land in $OUT, which comes back.
set -euo pipefail
out=${OUT:-/tmp/gilora_device}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# JAX would otherwise take 75 % of the GPU up front; torch shares the card.
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"
python3 benchmarks/layer.py --out "$out/layer.jsonl" "$@" 2>&1 | tee "$out/log"
