"""Fixtures: the tiny model (built once per session, offline), a fresh sdxld root per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


@pytest.fixture
def make_engine(root):
    from support.helpers import demo_config

    from sdxld.engine import Engine

    def make(**changes):
        return Engine.load(demo_config(root, **changes))

    return make
