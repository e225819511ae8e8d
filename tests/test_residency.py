"""Memory strategies keep their promise with the refiner: at most one large model (the base UNet
or the refiner UNet) on the execution device at a time, in every stage, around LoRA swaps.

The offload hooks are accelerate's, running with device="cpu": which modules they hold resident
is followed by watching the hooks themselves (a module becomes resident when its hook moves it to
the execution device before a forward, and stops being resident when its hook offloads it).
"""

from __future__ import annotations

import random

import pytest
from accelerate.hooks import CpuOffload

from sdxld import offload
from sdxld.tiny import write_tiny_lora


class ResidencyLog:
    def __init__(self, large: dict):
        self.large = large  # name -> module
        self.resident: set[int] = set()
        self.phase = ""
        self.seen: list[tuple[str, str, list[str]]] = []  # (phase, module that runs, large modules resident)

    def name(self, module) -> str | None:
        return next((n for n, m in self.large.items() if m is module), None)

    def onload(self, module) -> None:
        self.resident.add(id(module))
        running = self.name(module)
        if running:
            held = sorted(n for n, m in self.large.items() if id(m) in self.resident)
            self.seen.append((self.phase, running, held))

    def offload(self, module) -> None:
        self.resident.discard(id(module))

    def violations(self):
        return [entry for entry in self.seen if len(entry[2]) > 1]


@pytest.fixture
def residency(monkeypatch):
    logs = []
    original_pre, original_init = CpuOffload.pre_forward, CpuOffload.init_hook

    def pre_forward(self, module, *args, **kwargs):
        result = original_pre(self, module, *args, **kwargs)
        for log in logs:
            log.onload(module)
        return result

    def init_hook(self, module):
        for log in logs:
            log.offload(module)
        return original_init(self, module)

    monkeypatch.setattr(CpuOffload, "pre_forward", pre_forward)
    monkeypatch.setattr(CpuOffload, "init_hook", init_hook)

    def start(models):
        log = ResidencyLog({"unet": models.base.unet, "refiner unet": models.refiner.unet})
        logs.append(log)
        return log

    return start


def test_model_offload_keeps_one_unet_on_the_device_in_every_stage_and_around_lora_swaps(make_engine, root, residency, tmp_path):
    for kind, seed in (("character", 1), ("style", 2), ("style", 3)):
        write_tiny_lora(root / "loras" / kind / f"{kind}{seed}.safetensors", seed=seed)
    # Enough steps and strength that both UNets really run in stages 2 and 3.
    engine = make_engine(generation__stage2__strength=0.5, generation__stage2__steps=8,
                         generation__stage3__strength=0.6, generation__stage3__steps=8,
                         generation__base_width=64, generation__base_height=64,
                         generation__stage3__tile_size=128, generation__stage3__tile_overlap=32)
    models = engine.models
    models.residency = offload.place("model_offload", "cpu", models.base, models.refiner)
    log = residency(models)

    log.phase = "stage 1"
    first = engine.stage1_once(seed=10)
    log.phase = "stage 1 after a LoRA swap"
    other = next(seed for seed in range(11, 100)
                 if [e.name for e in engine.rotation.pick_loras(random.Random(seed), engine.loras, {})] != [u.name for u in first.record.loras])
    second = engine.stage1_once(seed=other)
    assert [u.name for u in first.record.loras] != [u.name for u in second.record.loras]
    for mode in ("latent", "pixel"):
        engine.config.generation.stage3.mode = mode
        log.phase = f"stages 2 and 3 ({mode})"
        engine.upscale(first.record, first.image).path.unlink()  # a final is never replaced: make room
    log.phase = "stage 1 after an upscale"
    engine.stage1_once(seed=12)

    assert log.violations() == []
    ran = {(phase, module) for phase, module, _ in log.seen}
    for phase in ("stage 1", "stages 2 and 3 (latent)", "stages 2 and 3 (pixel)", "stage 1 after an upscale"):
        assert (phase, "unet") in ran and (phase, "refiner unet") in ran, f"both UNets must run in {phase}"


def test_every_shared_module_is_hooked_once_and_pipelines_find_the_execution_device(make_engine):
    engine = make_engine()
    models = engine.models
    group = offload.place("model_offload", "cpu", models.base, models.refiner)
    hooked = group.modules()
    assert len(hooked) == len({id(m) for m in hooked}) == 5  # 2 text encoders, 2 UNets, 1 VAE
    for pipe in (models.base, models.img2img, models.refiner):
        assert str(pipe._execution_device) == "cpu"
