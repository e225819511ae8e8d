"""Same seed, same pixels: every stage, with every sampler sdxld offers (ancestral ones too)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sdxld.config import SAMPLERS
from sdxld.stages import stage1, stage2, stage3_latent, stage3_pixel

SCHEDULERS = {
    "UniPC": "NoWaitUniPCScheduler",  # sdxld's (sdxld/samplers.py)
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "NoWaitEulerAncestralScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DPM++ 2M Karras": "DPMSolverMultistepScheduler",
}


@pytest.fixture(scope="module")
def engine(tiny_cache, tmp_path_factory):
    from support.helpers import demo_config

    from sdxld.engine import Engine
    from sdxld.init import init_root

    root = init_root(tmp_path_factory.mktemp("root")).root
    return Engine.load(demo_config(root, generation__base_width=64, generation__base_height=64,
                                   generation__stage2__strength=0.5, generation__stage3__strength=0.5,
                                   generation__stage3__tile_size=96, generation__stage3__tile_overlap=32))


def twice(make):
    """Run `make` twice from different global random states; both results as uint8 arrays."""
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        random.seed(global_seed)
        np.random.seed(global_seed)
        results.append(np.asarray(make()))
    return results


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_stage_gives_the_same_pixels_for_the_same_seed(engine, sampler):
    gen = engine.config.generation
    record = engine.new_stage1_record(seed=77)
    record.sampler = sampler

    first, again = twice(lambda: stage1(engine.models, record))
    assert type(engine.models.base.scheduler).__name__ == SCHEDULERS[sampler]
    assert first.std() > 0
    assert np.array_equal(first, again), "stage 1"

    from PIL import Image

    base = Image.fromarray(first)
    first, again = twice(lambda: stage2(engine.models, record, base, gen.stage2, (96, 96))[1])
    assert np.array_equal(first, again), "stage 2"

    mid = Image.fromarray(first).resize((160, 160))
    first, again = twice(lambda: stage3_latent(engine.models, record, mid, gen.stage3)[0])
    assert np.array_equal(first, again), "stage 3 (latent)"
    first, again = twice(lambda: stage3_pixel(engine.models, record, mid, gen.stage3)[0])
    assert np.array_equal(first, again), "stage 3 (pixel)"
