"""The benchmarks run (smoke tests; their numbers are never asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest
from support.helpers import cpp_compiler_missing, inductor_cache_use, tiny_gpu_bench

REPO = Path(__file__).resolve().parents[1]


# The sections the GPU calls run; the graphs section's approved image is tests/test_bench_approved.py's
# (another file: the suite's two workers take one file each).
def test_gpu_bench_runs_on_the_cpu_with_the_tiny_model(tmp_path):
    # fast and graphs (the fast section's approved path covers stages 2 and 3 and the ESRGAN upscale).
    report = tiny_gpu_bench(tmp_path, "--skip", "stages,pixel,esrgan,compile,switches",
                            "--graphs-parts", "refiner,batches,waits,loras,bf16,cudagraphs,quantized,regional,max")
    for row in ("stage 1 128x224", "stage 1 batch 4", "LoRA swap: a character read from disk",
                "LoRA swap: a character drawn before, kept in memory", "originals on the card",
                "fast: approved image, int8",
                "fast: LoRA swap, int8", "relative error", "fast: stage 1, one image, int8 + compile max",
                "fast: stage 1 profiled", "graphs: stage 1 + refiner (split 0.8), one image, eager", "fast: stage 1, UniPC: sdxld's (no host waits) / diffusers'",
                "graphs: stage 1, one image, static shapes (eager backend)", "graphs: stage 1 batch 4, int8 + static shapes",
                "graphs: stage 1 batch 4, regional compile", "graphs: stage 1, one image, int8 + regional compile",
                "fast: stage 1, one image, fp32 + compile max",
                "graphs: LoRA character swap (kept in memory) + one image, int8",
                "graphs: LoRA character swap (read from disk) + one image, int8",
                "graphs: one image merging the next character ahead (read from disk), int8",
                "graphs: a batch of 4 reading the next character ahead (from disk), then the swap",
                "graphs: a batch of 4 merging the next character ahead (read from disk)",
                "graphs: 2 images in a row, prompts encoded at each start, static shapes (eager backend)",
                "graphs: 2 images in a row, each next one's prompts encoded while the card runs the one before, "
                "static shapes (eager backend)",
                "graphs: 2 images in a row, each next one's prompts encoded while the card runs the one before, "
                "int8 + static shapes", "graphs: 2 images in a row, prompts encoded at each start, regional compile"):
        assert row in report


def test_taste_bench_runs():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "taste.py"), "--images", "150", "--runs", "1", "--records", "200"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "approval rate  uniform" in result.stdout and "Ledger.load() 200 records" in result.stdout


def test_host_costs_bench_runs():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "host_costs.py"), "--final", "256x448", "--repeat", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final 256x448 with grain" in result.stdout and "per approved image, the final" in result.stdout
    assert "upscaler output -> final (Lanczos)" in result.stdout and "same pixels" in result.stdout
    assert "VAE tile seams (decode + encode)" in result.stdout and "same values" in result.stdout


def test_unet_ops_bench_counts_the_full_size_unet_without_its_weights():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "unet_ops.py")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "aten.scaled_dot_product_attention" in result.stdout and "  all " in result.stdout


def test_attention_bench_records_sdxls_attention_calls_and_times_each_backend():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "attention.py"), "--scale", "8", "--repeats", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| base UNet, stage 3, a call of 2 tiles | 140 |" in result.stdout  # 70 blocks, self + cross each
    assert "| refiner UNet, stage 2 | 88 |" in result.stdout
    assert "| VAE decode, one 1024 px tile | 1 |" in result.stdout
    assert "| flash ms | efficient ms | cudnn ms | default ms |" in result.stdout


def test_a_gpu_call_finds_what_the_call_before_it_compiled(tmp_path):
    """bench/device.sh packs inductor's cache folder at the end of a call and unpacks it at the
    start of the next, on a fresh machine: the next call's builds of the same graphs are hits."""
    import os
    import shutil

    if why := cpp_compiler_missing():
        pytest.skip(why)
    cache, parts = tmp_path / "sdxld-compile-cache", tmp_path / "out"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}

    def carry(action: str, **extra: str) -> str:
        done = subprocess.run(["bash", str(REPO / "bench" / "compile_carry.sh"), action, str(cache), str(parts)],
                              env={**env, **extra}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "none (every build is cold)" in carry("unpack")  # the first call
    assert inductor_cache_use(env) == (0, 1)
    assert "not kept" in carry("pack", COMPILE_CACHE_MB="0") and not list(parts.iterdir())
    assert "compiled code kept for the next call" in carry("pack")
    assert [p.name for p in parts.iterdir()] == ["compile-cache.tgz.00"]
    kept = (parts / "compile-cache.tgz.00").read_bytes()
    assert "(the 1 part(s) already in" in carry("pack", COMPILE_CACHE_MB="0"), "a pack too large keeps the earlier one"
    assert [p.name for p in parts.iterdir()] == ["compile-cache.tgz.00"] and (parts / "compile-cache.tgz.00").read_bytes() == kept
    shutil.rmtree(cache)  # the next call starts on a bare machine
    assert "compiled code from an earlier call" in carry("unpack")
    assert inductor_cache_use(env) == (1, 0)
