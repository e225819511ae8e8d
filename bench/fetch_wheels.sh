#!/usr/bin/env bash
# Before a throughput call on a GPU machine that cannot reach PyPI: the packages bench/gpu.py
# needs beyond what that machine's Python 3.12 has (torch, transformers, accelerate, numpy,
# safetensors, Pillow, PyYAML), as wheels into .whl/ (kept out of git). Run it here, where PyPI
# is reachable; the call carries .whl and bench/device.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
# The versions the suite runs with; torchao 0.18 loads its kernels on torch 2.11 and newer. pytest
# and its own dependencies: device.sh runs the tests that only a GPU can run.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 compel==2.5.1 dynamicprompts==0.31.0 lycoris-lora==4.1.3 spandrel==0.4.2 peft==0.21.2 \
  torchao==0.18.0 einops==0.8.2 toml==0.10.2 pyparsing==3.3.3 isal==1.9.1 \
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 pytest-timeout==2.4.0
du -sh .whl
