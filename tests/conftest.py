"""Fixtures: the tiny model (built once per session, offline), a fresh sdxld root per test."""

from __future__ import annotations

import os
import shutil
import sys
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
    """An sdxld root like a fresh checkout: the repo's config.yaml and prompts, empty LoRA folders."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    shutil.copytree(REPO / "prompts", tmp_path / "prompts")
    (tmp_path / "loras" / "character").mkdir(parents=True)
    (tmp_path / "loras" / "style").mkdir(parents=True)
    return tmp_path


@pytest.fixture
def make_engine(root):
    from helpers import demo_config

    from sdxld.engine import Engine

    def make(**changes):
        return Engine.load(demo_config(root, **changes))

    return make
