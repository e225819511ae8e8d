"""Engine: the assembled factory (config, paths, models, LoRAs, prompts) and its unit of work.

Both the one-shot commands and the daemon drive an Engine; it owns the pipelines, so whoever
holds it is the one thread that touches torch.
"""

from __future__ import annotations

import logging
import random
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import store
from .config import Config
from .layout import Layout
from .loras import LoraLibrary
from .prompts import PromptSource
from .records import Record
from .stages import Hooks, stage1

log = logging.getLogger(__name__)


class SeedSequence:
    """generation.seed -1: a fresh random seed per image; N: N, N+1, N+2, ... (like A1111 batches)."""

    def __init__(self, configured: int):
        self.configured = configured
        self._next = configured

    def next(self) -> int:
        if self.configured < 0:
            return secrets.randbelow(2**32)
        seed, self._next = self._next, self._next + 1
        return seed


@dataclass
class Stage1Result:
    record: Record
    path: Path


class Engine:
    def __init__(self, config: Config, models, lora_settle_s: float = 0.0):
        self.config = config
        self.layout = Layout.from_config(config)
        self.models = models
        self.prompts = PromptSource.from_layout(self.layout, config.prompts.max_extras)
        self.loras = LoraLibrary(
            models.base,
            self.layout.lora_dirs,
            {"character": config.lora.character_strength, "style": config.lora.style_strength},
            settle_s=lora_settle_s,
        )
        self.seeds = SeedSequence(config.generation.seed)
        self._warned_dirs = False

    @classmethod
    def load(cls, config: Config, **kwargs) -> "Engine":
        from .models import load_models

        return cls(config, load_models(config), **kwargs)

    def sync_loras(self):
        missing = [str(d) for d in self.layout.lora_dirs.values() if not d.is_dir()]
        if missing and not self._warned_dirs:
            log.warning("LoRA folder(s) %s do not exist: no LoRA of that kind until they do", ", ".join(missing))
            self._warned_dirs = True
        return self.loras.sync()

    def new_stage1_record(self, seed: int | None = None) -> Record:
        """Choose LoRAs and prompt for one image. The choice is a function of the seed alone
        (given the same files), so a recorded seed re-makes the same image."""
        seed = self.seeds.next() if seed is None else seed
        rng = random.Random(seed)
        uses = self.loras.activate(self.loras.pick(rng))
        composed = self.prompts.compose(rng, [u.triggers for u in uses])
        gen = self.config.generation
        use_refiner = self.models.refiner is not None
        return Record(
            tag=store.new_tag(),
            prompt=composed.prompt,
            negative=composed.negative,
            seed=seed,
            width=gen.base_width,
            height=gen.base_height,
            sampler=gen.sampler,
            steps=gen.t2i.steps,
            cfg=gen.t2i.cfg,
            model=self.models.describe(),
            refiner_split=gen.t2i.denoise_split if use_refiner else None,
            parts=composed.parts,
            loras=uses,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            demo=self.config.demo,
        )

    def run_stage1(self, record: Record, hooks: Hooks | None = None) -> Stage1Result:
        self.layout.ensure_output_dirs()
        image = stage1(self.models, record, hooks)
        path = store.save_image(self.layout, record, image, "stage1")
        log.info("stage1 %s seed %d -> %s", record.tag, record.seed, path.name)
        return Stage1Result(record, path)

    def stage1_once(self, seed: int | None = None, hooks: Hooks | None = None) -> Stage1Result:
        self.sync_loras()
        return self.run_stage1(self.new_stage1_record(seed), hooks)
