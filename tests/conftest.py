"""Fixtures: the tiny model (built once per session, offline), a fresh sdxld root per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_WORKERS = 4  # past this the longest test file (test_daemon.py, about 90 s) bounds the run


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config):
    return min(_usable_cores(), MAX_WORKERS)


# The files that take longest, longest first (test-seconds of a run on two cores, 2026-11-28: 226,
# 145, 102, 86, 64, 63, 51, 48). Each file is one unit of work on one worker; xdist's default
# order (files with most tests first) left the single long bench tests for the end, and one worker
# ran them while the other had finished: 46 s of a 611 s run. The rest follow in their usual order.
LONGEST_FILES_FIRST = ("test_compile.py", "test_bench.py", "test_daemon.py", "test_upscale.py", "test_bench_approved.py",
                       "test_stages.py", "test_cli.py", "test_disk_faults.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)

    items.sort(key=rank)  # stable: tests keep their order within a file


# Each worker (and every sdxld process it starts, through the environment) gets its share of the
# cores for torch's threads: with two workers each using both cores of a two-core machine, OpenMP's
# spinning threads made the suite four times slower than running it in one process.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    threads = str(max(1, _usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", threads)


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """A private cache for the tiny model, shared by this session and the sdxld processes it starts."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    from sdxld.tiny import ensure_tiny_model

    ensure_tiny_model()
    return cache


@pytest.fixture
def root(tmp_path) -> Path:
    """A fresh root as `sdxld init` makes it: config.yaml, prompts, empty LoRA folders, inbox, outputs."""
    from sdxld.init import init_root

    init_root(tmp_path)
    return tmp_path


POOL_SIZE = 24


@pytest.fixture(scope="session")
def stage1_pool(tmp_path_factory, tiny_cache) -> Path:
    """Stage-1 images with their records, made once per session by `sdxld generate` in a root of
    their own: starting the generator costs seconds, and most daemon tests only need something to
    approve."""
    from support.helpers import run_sdxld

    from sdxld.init import init_root

    pool = init_root(tmp_path_factory.mktemp("pool")).root
    result = run_sdxld("generate", "--demo", "--stage1", "--count", str(POOL_SIZE), "--seed", "40", cwd=pool)
    assert result.returncode == 0, result.stderr
    return pool


@pytest.fixture
def make_stage1(root, stage1_pool):
    """Put `count` stage-1 images into this test's root as generate left them (records in
    outputs/metadata); `into` puts the images elsewhere, e.g. a folder to approve them from."""
    import shutil

    def make(count: int = 1, into: Path | None = None) -> list[Path]:
        assert count <= POOL_SIZE, f"the pool holds {POOL_SIZE} images"
        folder = into or root / "outputs" / "stage1"
        for path in (folder, root / "outputs" / "metadata"):
            path.mkdir(parents=True, exist_ok=True)
        made = []
        for image in sorted((stage1_pool / "outputs" / "stage1").glob("*.png"))[:count]:
            made.append(Path(shutil.copy2(image, folder / image.name)))
            record = image.name.split("_stage1_")[0] + ".json"
            shutil.copy2(stage1_pool / "outputs" / "metadata" / record, root / "outputs" / "metadata" / record)
        return made

    return make


@pytest.fixture
def make_engine(root):
    from support.helpers import demo_config

    from sdxld.engine import Engine

    def make(**changes):
        return Engine.load(demo_config(root, **changes))

    return make
