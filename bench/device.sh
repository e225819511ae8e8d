#!/usr/bin/env bash
# The throughput figures (docs/performance.md) in one call on a GPU machine: batch sizes, the
# fast section (baselines, quantize, compile max, approved path), the host's share of an approved
# image (bench/host_costs.py), written to bench/results/ and,
# when the caller collects files from $OUT, there too. Extra arguments go to bench/gpu.py.
#   bash bench/fetch_wheels.sh    # here, once: .whl/ for what the GPU machine lacks
#   bash bench/device.sh          # there, with .whl carried along
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
"$PYTHON" -c 'import torch, diffusers, torchao; print("torch", torch.__version__, "diffusers", diffusers.__version__, "torchao", torchao.__version__)' \
  || echo "an import failed: the rows that need it will say FAILED"
# Straight into $OUT when the caller collects it: a call cut off by its time limit still returns
# every row written so far (the results file is rewritten after each row).
results=${RESULTS:-${OUT:-bench/results}}
"$PYTHON" bench/gpu.py --skip stages,pixel,esrgan,switches,compile,offload,sequential --budget-s "${BUDGET_S:-450}" \
  --out "$results" "$@"
status=$?
# The CPU's share of an approved image (PNG, pixel conversions) with the card doing its part.
device=$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
timeout 120 "$PYTHON" bench/host_costs.py --device "$device" | tee "$results/host-costs-$device.txt"
if [ -n "${OUT:-}" ] && [ "$results" != "$OUT" ]; then cp -r "$results"/. "$OUT"/; fi
exit $status
