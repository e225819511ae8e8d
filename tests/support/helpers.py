"""Helpers shared by the tests: a demo config for a root, `sdxld` run as a process, the LoRA files
an engine reads to check them, the GPU bench run with the tiny model, whether inductor can build
kernels here and what its cache gives a new process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def demo_config(root: Path, **changes):
    """The root's config with --demo applied, then `section__key=value` changes."""
    from sdxld.config import load
    from sdxld.tiny import apply_demo

    config = apply_demo(load(root / "config.yaml"))
    for dotted, value in changes.items():
        target = config
        *parents, leaf = dotted.split("__")
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return config


def run_sdxld(*args, cwd: Path, timeout: float = 120, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "sdxld.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def checks_read(engine, label=lambda entry: entry.path.name) -> list[str]:
    """The LoRA files the engine's library reads to check them, from now on, in order."""
    library, read = engine.loras, []
    real_load = library._load
    library._load = lambda entry: read.append(label(entry)) or real_load(entry)
    return read


def cpp_compiler_missing() -> str | None:
    """Why inductor cannot build kernels on this machine's CPU, or None."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return "inductor builds C++ kernels for the CPU and this machine has no C++ compiler: install g++"
    return None


def inductor_cache_use(env: dict, before: str = "") -> tuple[int, int]:
    """(hits, misses) of inductor's graph cache when a new process with `env` compiles one small
    function, after running `before`."""
    script = before + """
import torch
double_then_add = torch.compile(lambda x: x * 2 + 1, backend="inductor")
assert torch.equal(double_then_add(torch.arange(4.0)), torch.tensor([1.0, 3.0, 5.0, 7.0]))
counters = torch._dynamo.utils.counters["inductor"]
print(counters["fxgraph_cache_hit"], counters["fxgraph_cache_miss"])
"""
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    hits, misses = done.stdout.split()[-2:]
    return int(hits), int(misses)


REPO_ROOT = Path(__file__).resolve().parents[2]


def tiny_gpu_bench(out: Path, *args: str) -> str:
    """bench/gpu.py on the CPU with the tiny model; its report. Compile there traces with the
    eager backend (inductor's builds are slow on a CPU, and its behaviour is tests/test_compile.py's)."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu.py"), "--tiny", "--out", str(out), *args],
                            capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "tiny-cpu.md").read_text()
    assert "FAILED" not in report
    return report
