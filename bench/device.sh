#!/usr/bin/env bash
# The throughput figures (docs/performance.md) in one call on a GPU machine: the compiled rows
# (graphs section; SECTIONS=fast: batch sizes, quantize, compile max, approved path), the host's
# share of an approved image (bench/host_costs.py, with fast), then the GPU-only tests, written to bench/results/ and,
# when the caller collects files from $OUT, there too. Extra arguments go to bench/gpu.py.
# CALL_S: the seconds the caller allows the whole call (the tests get what is left of it).
#   bash bench/fetch_wheels.sh    # here, once: .whl/ for what the GPU machine lacks
#   bash bench/device.sh          # there, with .whl (and .compile-cache, once a call made it) carried along
# The compiled code's parts it hands back (compile-cache.tgz.*) go into .compile-cache/ here, for
# the next call to carry (bench/compile_carry.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# What earlier calls compiled, carried as .compile-cache/ (bench/compile_carry.sh): inductor looks
# in this folder for every build, so the builds they made load in seconds instead of minutes.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/sdxld-compile-cache}
bash bench/compile_carry.sh unpack "$TORCHINDUCTOR_CACHE_DIR" .compile-cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
"$PYTHON" -c 'import torch, diffusers, torchao; print("torch", torch.__version__, "diffusers", diffusers.__version__, "torchao", torchao.__version__)' \
  || echo "an import failed: the rows that need it will say FAILED"
# Straight into $OUT when the caller collects it: a call cut off by its time limit still returns
# every row written so far (the results file is rewritten after each row).
results=${RESULTS:-${OUT:-bench/results}}
mkdir -p "$results"
# The H100 calls of 2026-11-27 measured batches, fp8 uncompiled and the approved path
# (bench/results/NVIDIA-H100-80GB-HBM3.md), then the graphs section's bf16 CUDA graphs, the
# cudagraphs backend, the batches and the host waits (NVIDIA-H100-80GB-HBM3-graphs.md); fp8 under
# CUDA graphs ran out of time in its build. This call times what is left, the goal furthest away
# first: the approved image under CUDA graphs (performance.compile_approved: two builds of about
# two minutes each), then stage 1 with the refiner (the default; its hand-off no longer waits
# for the base's steps) and where the host waits in it, then the LoRA rows (a file kept in memory
# against one read from disk, and a batch of 8 reading the next file ahead against one after a
# swap from disk), fp8 under CUDA graphs, regional, max, as --budget-s allows.
# GRAPHS_PARTS=all runs every part of the graphs section; SECTIONS=fast the first call's sections.
sections=${SECTIONS:-graphs}
parts=${GRAPHS_PARTS:-approved,refiner,loras,quantized,regional,max}
[ "$parts" = all ] && parts=approved,vae,refiner,batches,waits,loras,bf16,cudagraphs,quantized,regional,max
case "$sections" in
  graphs) skip=stages,pixel,esrgan,throughput,loras,switches,compile,fast,offload,sequential ;;
  fast) skip=stages,pixel,esrgan,switches,compile,graphs,offload,sequential ;;
  *) echo "SECTIONS is graphs or fast, not $sections" >&2; exit 2 ;;
esac
on_card=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')
# The short benches' outputs share one file: a call hands back at most 8 files, and the compiled
# code's parts take up to three of them.
small="$results/small-benches.txt"
: > "$small"
small_bench() { echo "## bench/$*" | tee -a "$small"; timeout "$limit" "$PYTHON" "bench/$@" | tee -a "$small"; }
# First, being short (about 30 s on a card, a minute on a CPU rehearsal): a stage-1 batch's
# prompts through the text encoders, compel text by text against sdxld's one forward per encoder
# (bench/text_encoders.py), which the graphs section's budget would otherwise leave no time for.
if [ "$on_card" = 1 ]; then te_args="--device cuda --dtype bf16 --repeats 5"; else te_args="--batches 1 --repeats 1"; fi
limit=90 small_bench text_encoders.py $te_args
# SDXL's attention calls (recorded from its UNets and VAE at each stage's shape) under each SDPA
# backend, flash, memory-efficient and cuDNN, against torch's default (bench/attention.py; about
# 30 s on a card, 11 s on a CPU rehearsal at a quarter of the sizes): whether a backend switch pays.
if [ "$on_card" = 1 ]; then attention_args="--device cuda --dtype bf16"; else attention_args=""; fi
limit=90 small_bench attention.py $attention_args
"$PYTHON" bench/gpu.py --skip "$skip" --graphs-parts "$parts" --budget-s "${BUDGET_S:-420}" --out "$results" "$@"
status=$?
# What this call and the ones before it compiled, for the next call: into $OUT when the caller
# collects it (then moved into .compile-cache/ to be carried), else straight into .compile-cache/.
bash bench/compile_carry.sh pack "$TORCHINDUCTOR_CACHE_DIR" "${OUT:-.compile-cache}"
# The CPU's share of an approved image (PNG, pixel conversions) with the card doing its part
# (measured in the H100 call: bench/results/NVIDIA-H100-80GB-HBM3-host-costs.txt).
if [ "$sections" = fast ]; then
  device=cpu; [ "$on_card" = 1 ] && device=cuda
  limit=120 small_bench host_costs.py --device "$device"
fi
# The VAE compiled, and eager in the channels-last layout, against eager (performance.compile_vae,
# performance.channels_last) on one VAE tile (1024 px: every tile of stage 2's and stage 3's
# decodes and encodes is at most that, and stage 1's two), if the call has the time beside the
# tests: one decode and one encode each, medians of 5 (a small size on a CPU rehearsal).
if [ $(( ${CALL_S:-575} - SECONDS )) -gt 200 ]; then
  if [ "$on_card" = 1 ]; then
    vae_args="--device cuda --size 1024x1024 --dtype bf16 --repeats 5"
  else
    vae_args="--size 64x64 --repeats 1"
  fi
  limit=120 small_bench vae_compile.py $vae_args
fi
# The suite's tests that only a GPU runs (they skip elsewhere, saying why): no sampler step
# synchronizes, nor a batch's prompt encoding, a LoRA swap neither (and gives the CPU's weights), fp8 with LoRAs merged in
# place, an approved image replayed as CUDA graphs makes the eager final, CUDA graphs replay
# merged LoRA weights (its compile max build last). In the time the call has left, less PACK_S
# for packing the compiled code again after them; a cut-off run still leaves its log.
PACK_S=${PACK_S:-25}
left=$(( ${CALL_S:-575} - SECONDS - PACK_S ))
if [ "$left" -gt 30 ]; then
  # In one process (no test workers: one card, and pytest-xdist is not among the wheels).
  # Each test at most 150 s (pytest-timeout): one that hangs or builds too long fails with its
  # stack in the log, and the tests after it still run.
  timeout "$left" "$PYTHON" -m pytest -o addopts= -q -p no:cacheprovider -rs --timeout 150 --durations=0 -k "cuda or fp8" \
    tests/test_samplers.py tests/test_conditioning.py tests/test_lora_stacks.py tests/test_lora_cache.py tests/test_quantize.py \
    tests/test_compile.py 2>&1 | tee "$results/gpu-tests.txt"
  tests=${PIPESTATUS[0]}
  [ "$status" = 0 ] && status=$tests
else
  echo "no time left for the GPU tests ($left s)" | tee "$results/gpu-tests.txt"
fi
# The tests' builds too (the CUDA graphs test's compile max build did not finish within a call):
# the next call's tests find them. The pack after bench/gpu.py stays if this one cannot finish.
bash bench/compile_carry.sh pack "$TORCHINDUCTOR_CACHE_DIR" "${OUT:-.compile-cache}"
if [ -n "${OUT:-}" ] && [ "$results" != "$OUT" ]; then cp -r "$results"/. "$OUT"/; fi
exit $status
