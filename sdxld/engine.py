"""Engine: the assembled factory (config, paths, models, LoRAs, prompts) and its unit of work.

Both the one-shot commands and the daemon drive an Engine; it owns the pipelines, so whoever
holds it is the one thread that touches torch.
"""

from __future__ import annotations

import functools
import logging
import random
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import stages, store
from .config import Config
from .layout import Layout
from .loras import LoraLibrary
from .prompt_syntax import escape, lora_tag
from .prompts import PromptSource
from .records import FinalReport, Record, Stage2Report, Stage3Report, StageReports
from .rotation import Rotation
from .stages import (
    STAGE2_SEED_OFFSET,
    STAGE3_SEED_OFFSET,
    Hooks,
    auto_stage1_batch,
    out_of_memory_error,
    stage1,
    stage1_batch,
    stage2,
    stage3,
    upscale_for_stage3,
)
from .taste import TasteReader

log = logging.getLogger(__name__)

class SeedSequence:
    """generation.seed -1: a fresh random seed per image; N: N, N+1, N+2, ... (like A1111 batches)."""

    def __init__(self, configured: int):
        self.configured = configured
        self._coming: list[int] = []  # seeds looked at ahead, in the order next() gives them
        self._after = configured  # fixed seeds: the first one not in _coming yet

    def next(self) -> int:
        self.upcoming(1)
        return self._coming.pop(0)

    def peek(self) -> int:
        """The seed next() gives next (a random one is drawn now and kept for it)."""
        return self.upcoming(1)[0]

    def upcoming(self, count: int) -> list[int]:
        """The seeds the next `count` calls of next() give, in order (random ones drawn now and kept)."""
        while len(self._coming) < count:
            if self.configured >= 0:
                self._coming.append(self._after)
                self._after += 1
            else:
                self._coming.append(secrets.randbelow(2**32))
        return self._coming[:count]


@dataclass
class Stage1Result:
    record: Record
    path: Path
    image: object = None


@dataclass
class Draw:
    """One image's choices and what merging its LoRAs again needs."""

    record: Record
    rotated: list  # the rotated LoRA entries
    tagged: list  # (entry, weight) of the prompt's <lora:> tags
    lora_draws: dict  # learned rotation's LoRA draws, for the record


@dataclass
class PromptsEncodedAhead:
    """A batch's prompt embeddings, encoded while the card still ran the batch before it."""

    prompts: list[tuple[str, str, str]]  # (prompt, negative, syntax) of each image, in order
    rewrites: int  # LoraMerger.rewrites then: the text encoders' weights they were made with
    embeddings: list

    def fit(self, records: list[Record], rewrites: int) -> list | None:
        """The embeddings, if `records` have exactly these prompts and no weight was rewritten since."""
        if rewrites != self.rewrites or _prompts_of(records) != self.prompts:
            return None
        return self.embeddings


def _prompts_of(records: list[Record]) -> list[tuple[str, str, str]]:
    return [(record.prompt, record.negative, record.prompt_syntax) for record in records]


@dataclass
class FinalResult:
    record: Record
    path: Path
    notes: list


class Engine:
    def __init__(self, config: Config, models, lora_settle_s: float = 0.0, background_writes: bool = False,
                 lora_folders_followed: bool = False):
        """`lora_folders_followed`: the caller keeps the LoRA library in step with its folders
        (the daemon: when the watcher reports a change and every daemon.rescan_s, checking new
        files for a bounded time), so a batch or an upscale does not look at the folders again."""
        self.config = config
        self.layout = Layout.from_config(config)
        self.models = models
        self.prompts = PromptSource.from_layout(self.layout, config.prompts.max_extras)
        self.loras = LoraLibrary(
            models.base,
            self.layout.lora_dirs,
            {"character": config.lora.character_strength, "style": config.lora.style_strength},
            settle_s=lora_settle_s,
            quantized=models.quantized,
            remember_in=self.layout.state / "lora-checks",
            keep_in_memory_bytes=config.lora.keep_in_memory_mb << 20,
            originals_on_device=config.memory.lora_originals == "gpu",
        )
        self.seeds = SeedSequence(config.generation.seed)
        # For batch_size auto: the largest peak VRAM per stage-1 image seen, and the batch size
        # below one that ran out of memory.
        self._stage1_image_bytes: float | None = None
        self._stage1_batch_ceiling: int | None = None
        self._ledger = None
        self.rotation = Rotation(config)
        self._warned_dirs = False
        self._upscaler = None
        # Whether stage1_batch(another_follows=True) gets the next batch's LoRAs ready and encodes
        # its prompts while the card runs this one; off only to measure against.
        self.prefetch_loras = True
        self.encode_ahead = True
        self._prompts_ahead: PromptsEncodedAhead | None = None
        # Long runs save stage-1 images on a writer thread; one-shot callers get the file at once.
        self.writer = store.BackgroundWriter() if background_writes else None
        self.lora_folders_followed = lora_folders_followed

    @property
    def embed(self) -> str:
        return self.config.output.embed

    def flush(self) -> None:
        """Make sure every stage-1 image handed to the writer is on disk (raises a failed write)."""
        if self.writer is not None:
            self.writer.flush()

    def remove_leftovers(self) -> None:
        """Temporary files that killed writers left in the folders sdxld writes to."""
        folders = [self.layout.outputs, self.layout.failed, self.layout.state]
        removed = store.remove_stale_temporaries(folders)
        if removed:
            log.info("removed %d temporary file(s) left by sdxld processes that no longer run: %s",
                     len(removed), ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))

    def reconfigure(self, config: Config) -> None:
        """Apply a new config that keeps the same models (the daemon checked that)."""
        old, old_layout = self.config, self.layout
        self.config = config
        self.layout = Layout.from_config(config)
        if (self.layout.metadata, self.layout.piles()) != (old_layout.metadata, old_layout.piles()):
            self.use_ledger(None)  # other folders: read again at the next draw
        self.prompts = PromptSource.from_layout(self.layout, config.prompts.max_extras)
        self.loras.dirs = dict(self.layout.lora_dirs)
        self.loras.strengths = {"character": config.lora.character_strength, "style": config.lora.style_strength}
        self.loras.settle_s = config.daemon.settle_s
        self.loras.ready.budget_bytes = config.lora.keep_in_memory_mb << 20
        if config.generation.seed != old.generation.seed:
            self.seeds = SeedSequence(config.generation.seed)
        if config.upscaler != old.upscaler:
            self._upscaler = None
        self.rotation.configure(config)
        if self._ledger is not None:
            self._ledger.set_since(config.taste.since_time())

    @classmethod
    def load(cls, config: Config, **kwargs) -> "Engine":
        from .models import load_models

        return cls(config, load_models(config), **kwargs)

    def sync_loras(self, budget_s: float | None = None):
        """The LoRA folders as they are now (LoraLibrary.sync; `budget_s` bounds the checking)."""
        missing = [str(d) for d in self.layout.lora_dirs.values() if not d.is_dir()]
        if missing and not self._warned_dirs:
            log.warning("LoRA folder(s) %s do not exist: no LoRA of that kind until they do", ", ".join(missing))
            self._warned_dirs = True
        return self.loras.sync(budget_s)

    def follow_lora_folders(self) -> None:
        """The LoRA folders as they are now, before work that draws or merges LoRAs, unless the
        caller follows them. Why the daemon does: a sync stats every file (27-29 ms at 1,250 files,
        card time lost between batches), and it has no budget, so in a daemon it would check at
        once every new file the daemon's bounded checks left for later (each reads the whole file)."""
        if not self.lora_folders_followed:
            self.sync_loras()

    @property
    def ledger(self):
        """What the user approved so far (taste.py): read from the folders on first use."""
        if self._ledger is None:
            self.use_ledger(TasteReader(self.layout, self.config.taste.since_time()).ledger())
        return self._ledger

    def use_ledger(self, ledger) -> None:
        self._ledger = ledger
        self.rotation.ledger = ledger

    def new_stage1_record(self, seed: int | None = None, replay: dict | None = None) -> Record:
        """Choose LoRAs and prompt for one image. The choice is a function of the seed (given the
        same files and, for learned rotation, the same approval counts), so a recorded seed
        re-makes the same image; `replay` = a record's `rotation` draws with the counts it kept."""
        return self._draw(self.seeds.next() if seed is None else seed, replay).record

    def _draw(self, seed: int, replay: dict | None = None, lead: Draw | None = None, merge: bool = True) -> Draw:
        """One image's draw; with `lead`, it takes the lead image's rotated LoRAs instead of its own
        (a batch shares one set of merged weights). Its own LoRA draw still runs first, so the rest
        of its prompt is what its seed gives alone; only the trigger words are the lead's.
        merge=False leaves the model's weights alone: the record names the LoRAs it wants, and the
        caller merges them (a batch, once per group of images that want the same)."""
        rng = random.Random(seed)
        rotation = Rotation(self.config, replay=replay) if replay is not None else self.rotation
        drawn: dict = {}
        rotated = self._pick_loras(rng, rotation, drawn)
        if lead is not None:
            rotated, drawn = lead.rotated, dict(lead.lora_draws)
        lora_draws = dict(drawn)
        syntax = self.config.prompts.syntax
        # Trigger words are names (danbooru's `miku_(cosplay)`), never emphasis.
        triggers = [escape(e.triggers) if syntax == "a1111" else e.triggers for e in rotated]
        composed = self.prompts.compose(rng, triggers, rotation.option_chooser(drawn))
        tagged = self.loras.tagged_in(composed.prompt, composed.negative)
        uses = self.loras.activate(rotated, tagged=tagged) if merge else self.loras.wanted_uses(rotated, tagged=tagged)
        gen = self.config.generation
        # model.use_refiner decides for stage 1; stages 2 and 3 have their own switches.
        use_refiner = self.models.refiner is not None and self.config.model.use_refiner
        record = Record(
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
            prompt_syntax=syntax,
            parts=composed.parts,
            loras=uses,
            rotation=drawn,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            demo=self.config.demo,
        )
        return Draw(record, rotated, tagged, lora_draws)

    def _draw_batch(self, seeds: list[int]) -> list[Draw]:
        """The draws of a stage-1 batch: the first image's LoRAs for all (_draw's `lead`)."""
        draws: list[Draw] = []
        for seed in seeds:
            draws.append(self._draw(seed, lead=draws[0] if draws else None, merge=False))
        return draws

    def _pick_loras(self, rng: random.Random, rotation: Rotation, drawn: dict) -> list:
        """The rotated LoRAs: the first thing an image's seeded RNG draws."""
        if rotation is self.rotation and rotation.any_learned:
            rotation.ledger = self.ledger  # the first learned draw reads the folders
        return rotation.pick_loras(rng, self.loras, drawn)

    def _ready_next_loras(self) -> None:
        """Get the LoRAs the next batch will draw ready while the card runs this batch (its lead's
        seed is known, and the LoRA pick is the first thing that seed draws). On a GPU the host is
        idle then; on the H100 a swap read from disk before one image cost 0.99 s, as much as the
        image.

        With the weights staying on the device (memory.strategy gpu, or no GPU), the pair is merged
        now: the swap's writes queue on the card behind this batch's work, which still reads the
        weights it was queued with, and the next batch starts with nothing to swap. Under offload
        strategies the weights move between calls and a merge may pause the offload hooks, so
        the files are only read and stacked into the kept memory (lora.keep_in_memory_mb) for the
        next batch's swap. If the pick changes before then (an approval teaching the rotation, a
        folder edit, an approved image's own LoRAs), the next batch swaps as it would have; files
        read stay kept like any other. <lora:> tags in prompts are not looked ahead: they come
        after the prompt is composed."""
        if not self.prefetch_loras:
            return
        try:
            picked = self._pick_loras(random.Random(self.seeds.peek()), self.rotation, {})
            if self._merges_ahead():
                self.loras.activate(picked)
            elif self.loras.ready.budget_bytes:
                self.loras.prepare(picked)
        except Exception as err:  # noqa: BLE001 - getting ahead must never cost this batch its images
            log.warning("getting the next batch's LoRAs ready failed (%s: %s); they are swapped in when it starts",
                        type(err).__name__, err)

    def get_next_batch_ready(self, count: int) -> None:
        """The next stage-1 batch's LoRAs, then its prompts (of `count` images): what a batch runs
        once its own work is queued, for the batch after it (of its own size: the daemon's batches
        stay one size while it keeps up), and what a caller may run while the card is busy with
        other work that will not read the LoRAs again (an approved image's stage 3, queued)."""
        self._ready_next_loras()
        self._encode_next_prompts(count)

    def _encode_next_prompts(self, count: int) -> None:
        """Encode the prompts the next batch will draw while the card runs this one, after its
        LoRAs were merged ahead. A batch's prompts through both text encoders are 1,835-2,115
        operations (bench/text_encoders.py, SDXL's encoders) that the host dispatches one by one:
        at the start of the batch the card waits for every one of them, here they queue behind
        this batch's work. The next batch takes them only if it draws exactly these prompts, in
        this order, and no weight was rewritten since (an approved image's LoRAs, a tag, a file
        changed); otherwise it encodes its own, as before, so its images are the same to the bit
        either way. Only where the weights stay on the device: under the offload strategies a
        call of the text encoders moves models."""
        if not (self.encode_ahead and self._merges_ahead()):
            return
        try:
            draws = self._draw_batch(self.seeds.upcoming(count))
            if any(draw.tagged for draw in draws):
                return  # its tags' LoRAs are merged at its start: these would be encoded without them
            records = [draw.record for draw in draws]
            self._prompts_ahead = PromptsEncodedAhead(_prompts_of(records), self.loras.merger.rewrites,
                                                      stages.batch_prompt_embeddings(self.models.base, records))
        except Exception as err:  # noqa: BLE001 - getting ahead must never cost this batch its images
            log.warning("encoding the next batch's prompts ahead failed (%s: %s); they are encoded when it starts",
                        type(err).__name__, err)

    def _merges_ahead(self) -> bool:
        """Whether the next batch's LoRAs are merged while the card runs this one: only where the
        weights stay on the device (memory.strategy gpu, or no GPU to offload to)."""
        return self.config.memory.strategy == "gpu" or not self.models.device.startswith("cuda")

    def run_stage1(self, record: Record, hooks: Hooks | None = None) -> Stage1Result:
        self.layout.ensure_output_dirs()
        return self._publish_stage1(record, stage1(self.models, record, hooks))

    def stage1_once(self, seed: int | None = None, hooks: Hooks | None = None) -> Stage1Result:
        self.follow_lora_folders()
        return self.run_stage1(self.new_stage1_record(seed), hooks)

    def stage1_batch(self, count: int, hooks: Hooks | None = None, another_follows: bool = False) -> list[Stage1Result]:
        """`count` stage-1 images in one UNet call per step. They share the first image's LoRA
        draw (the model holds one set of merged weights); each has its own seed, prompt and
        record, whose `batch` says so. Images whose <lora:> tags ask for other weights run in a
        call of their own, one per set of weights: each set is merged once per batch, however the
        images that want it are interleaved. Returns the results in the order the seeds came.

        `another_follows`: the caller makes another stage-1 batch next (the daemon's loop), so
        that batch's LoRAs and prompts are got ready while the card runs this one
        (get_next_batch_ready). Not for a caller that upscales these images next: they need this
        batch's LoRAs."""
        self.follow_lora_folders()
        self.layout.ensure_output_dirs()
        ahead, self._prompts_ahead = self._prompts_ahead, None
        draws = self._draw_batch([self.seeds.next() for _ in range(count)])
        if count > 1:
            for index, draw in enumerate(draws):
                draw.record.batch = {"size": count, "index": index, "lora_seed": draws[0].record.seed}
        groups: dict[tuple, list[Draw]] = {}
        for draw in draws:
            key = tuple((use.kind, use.name, use.strength, use.via) for use in draw.record.loras)
            groups.setdefault(key, []).append(draw)
        results: dict[int, Stage1Result] = {}
        for number, group in enumerate(groups.values(), 1):
            uses = self.loras.activate(group[0].rotated, tagged=group[0].tagged)
            for draw in group:
                draw.record.loras = list(uses)
            # The next batch is got ready during the last group only: earlier, this batch's next
            # group would swap its LoRAs out again (or push their files out of the budget).
            last = number == len(groups)
            records = [draw.record for draw in group]
            next_batch = functools.partial(self.get_next_batch_ready, count) if last and another_follows else None
            encoded = ahead.fit(records, self.loras.merger.rewrites) if ahead is not None else None
            images = self._stage1_measured(records, hooks, next_batch, encoded)
            for draw, image in zip(group, images):
                results[id(draw)] = self._publish_stage1(draw.record, image)
        return [results[id(draw)] for draw in draws]

    def stage1_batch_size(self) -> int:
        """generation.batch_size now: 'auto' resolved from the free VRAM and the measured peak of
        an image (1 on the CPU), and never above a size that ran out of memory."""
        configured = self.config.generation.batch_size
        if configured == "auto":
            free = None
            if self.models.device.startswith("cuda"):
                import torch

                free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
            configured = auto_stage1_batch(free, self._stage1_image_bytes)
        return min(configured, self._stage1_batch_ceiling or configured)

    def _stage1_measured(self, records: list[Record], hooks: Hooks | None, while_card_works=None,
                         embeddings: list | None = None) -> list:
        """stage1_batch, measuring the peak VRAM per image on a GPU (for 'auto'); a batch that runs
        out of memory is run again in halves, and later batches stay at most that size.
        `embeddings`: the records' prompts, encoded ahead."""
        cuda = self.models.device.startswith("cuda")
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        try:
            images = stage1_batch(self.models, records, hooks, while_card_works, embeddings)
        except out_of_memory_error():
            if len(records) == 1:
                raise
            half = len(records) // 2
            self._stage1_batch_ceiling = half
            log.warning("a stage-1 batch of %d ran out of GPU memory; batches of at most %d from now on", len(records), half)
            if cuda:
                torch.cuda.empty_cache()
            return (self._stage1_measured(records[:half], hooks)
                    + self._stage1_measured(records[half:], hooks, while_card_works))
        if cuda:
            per_image = (torch.cuda.max_memory_allocated() - before) / len(records)
            self._stage1_image_bytes = max(self._stage1_image_bytes or 0, per_image)
        return images

    def _publish_stage1(self, record: Record, image) -> Stage1Result:
        name = store.image_name(record.tag, "stage1", image.width, image.height)
        path = self.layout.stage1 / name
        if self.writer is not None:
            record.files["stage1"] = name
            self.writer.submit(store.save_image, self.layout, record, image, "stage1", name, self.embed)
        else:
            store.save_image(self.layout, record, image, "stage1", name, self.embed)
        if self._ledger is not None:
            self._ledger.add(record)
        loras = " + ".join(f"{use.kind} {use.name}" if use.via == "rotation" else lora_tag(use.name, use.strength)
                           for use in record.loras) or "no LoRA"
        log.info("stage1 %s seed %d, %s -> %s", record.tag, record.seed, loras, path.name,
                 extra={"sdxld_tag": record.tag, "sdxld_stage": "stage1"})
        return Stage1Result(record, path, image)

    # --- stages 2 and 3 -----------------------------------------------------------------------

    @property
    def upscaler(self):
        """The ESRGAN-family upscaler (or Lanczos), loaded on first use and kept."""
        if self._upscaler is None:
            from esrgan import Upscaler

            self._upscaler = Upscaler.load_or_fallback(
                self.layout.upscaler_weights,
                device=self.models.device,
                dtype=self.models.dtype_name,
                tile_size=self.config.upscaler.tile,
                tile_pad=self.config.upscaler.pad,
            )
        return self._upscaler

    def activate_recorded_loras(self, record: Record) -> list[str]:
        """Switch on the LoRAs that made the image, at their recorded strengths.

        A LoRA that left its folder cannot be used: the upscale goes on without it and the note
        says so (it is written into the final's record)."""
        self.follow_lora_folders()
        rotated, strengths, tagged, notes = self._recorded_loras(record)
        self.loras.activate(rotated, strengths, tagged)
        for note in notes:
            log.warning("%s: %s", record.tag, note)
        return notes

    def prepare_recorded_loras(self, record: Record) -> None:
        """Get the LoRAs a record names ready for its upscale while the card runs other work that
        will not read the weights again (this approved image's stage 3, queued): merged now where
        the weights stay on the device (the writes queue behind that work, as the next stage-1
        batch's do), else their files read into the kept memory (lora.keep_in_memory_mb). On the
        H100 a swap that read its file took 1.35 s (bench/results), and an approved image made
        hours ago has let its files leave the memory long since. Its own upscale then finds them
        merged (or merges from memory) and says what it could not use."""
        rotated, strengths, tagged, _ = self._recorded_loras(record)
        if self._merges_ahead():
            self.loras.activate(rotated, strengths, tagged)
        else:
            self.loras.prepare(rotated + [entry for entry, _ in tagged])

    def _recorded_loras(self, record: Record) -> tuple[list, list, list, list[str]]:
        """A record's LoRAs as the library has them now: (rotated, their strengths, (tagged,
        weight)), and a note for each that left its folder or changed since."""
        rotated, strengths, tagged, notes = [], [], [], []
        for use in record.loras:
            entry = self.loras.find(use.kind, use.name)
            if entry is None:
                notes.append(f"LoRA {use.kind}/{use.name} is no longer available; upscaled without it")
                continue
            if use.hash and entry.hash != use.hash:
                notes.append(f"LoRA {use.kind}/{use.name} changed since the image was made (hash {use.hash} -> {entry.hash})")
            if use.via == "tag":
                tagged.append((entry, use.strength))
            else:
                rotated.append(entry)
                strengths.append(use.strength)
        return rotated, strengths, tagged, notes

    def final_exists(self, tag: str) -> Path | None:
        return store.find_final(self.layout, tag)

    def upscale(self, record: Record, stage1_image, hooks: Hooks | None = None, while_card_works=None) -> FinalResult:
        """Stage 2 then stage 3 for one image, with the prompt, seed and LoRAs of its record;
        the stage-2/3 settings come from the current config. `while_card_works`: host work for
        while the card runs stage 3 (the next job's LoRAs: its caller's)."""
        hooks = hooks or Hooks()
        gen = self.config.generation
        self.flush()  # the record may still be on its way to disk as a stage-1 image
        self.layout.ensure_output_dirs()
        mid_size = scaled(record.width, record.height, gen.mid_scale)
        final_size = scaled(record.width, record.height, gen.final_scale)
        keep = self._intermediate_saver(record)

        # 1. The LoRAs that made the image, at their recorded strengths.
        notes = self.activate_recorded_loras(record)

        with self.models.approved_path(may_build=self._repeats_stage1_shapes(record)):
            # 2. Stage 2: Lanczos to the mid size, img2img.
            stage2_up, stage2_image = stage2(self.models, record, stage1_image, gen.stage2, mid_size, hooks)
            keep(stage2_up, "stage2_up")
            keep(stage2_image, "stage2")

            # 3. Stage 3: the upscaler to the final size, then tiled img2img (retried smaller when out of memory).
            stage3_up = upscale_for_stage3(self.models, self.upscaler, stage2_image, final_size)
            keep(stage3_up, "stage3_up")
            def keep_tile(index, tile_image):
                keep(tile_image, "tiles", f"{record.tag}_tile_{index:03d}.png")

            final_image, tiles, settings3, retries = stage3(self.models, record, stage3_up, gen.stage3, hooks, on_tile=keep_tile,
                                                            while_card_works=while_card_works)
        for note in retries:
            log.warning("%s: %s", record.tag, note)

        # 4. The record says how the final was made; the final is saved with it.
        record.stages = self._stage_reports(record, mid_size, final_size, settings3, tiles, notes + retries).to_dict()
        path = store.save_image(self.layout, record, final_image, "final", embed=self.embed)
        log.info("final %s -> %s", record.tag, path.name, extra={"sdxld_tag": record.tag, "sdxld_stage": "final"})
        return FinalResult(record, path, notes + retries)

    def _repeats_stage1_shapes(self, record: Record) -> bool:
        """Whether stages 2 and 3 of this image have the shapes of every approval of this run: made
        at stage 1's size with its sampler (the timesteps' dtype is part of a compiled shape). Only
        such images may start compile builds (performance.compile_approved)."""
        gen = self.config.generation
        repeats = (record.width, record.height) == (gen.base_width, gen.base_height) and record.sampler == gen.sampler
        if self.models.compile_approved and not repeats:
            log.info("%s: %dx%d with %s is not stage 1's %dx%d with %s: stages 2 and 3 run the shapes already "
                     "compiled and the rest uncompiled", record.tag, record.width, record.height, record.sampler,
                     gen.base_width, gen.base_height, gen.sampler)
        return repeats

    def _intermediate_saver(self, record: Record):
        """keep(image, kind[, name]): saves an intermediate when output.save_intermediates is on."""
        def keep(image, kind: str, name: str | None = None) -> None:
            if self.config.output.save_intermediates:
                store.save_image(self.layout, record, image, kind, name=name, embed=self.embed)

        return keep

    def _stage_reports(self, record: Record, mid_size, final_size, settings3, tiles: int, notes: list[str]) -> StageReports:
        gen = self.config.generation
        use_refiner = self.models.refiner is not None
        method = self.upscaler.method
        return StageReports(
            stage2=Stage2Report(
                enabled=gen.stage2.enabled, size=list(mid_size), steps=gen.stage2.steps, cfg=gen.stage2.cfg,
                strength=gen.stage2.strength,
                refiner_split=gen.stage2.denoise_split if use_refiner and gen.stage2.use_refiner else None,
                seed=record.seed + STAGE2_SEED_OFFSET,
            ),
            stage3=Stage3Report(
                enabled=settings3.enabled, size=list(final_size), mode=settings3.mode, steps=settings3.steps,
                cfg=settings3.cfg, strength=settings3.strength,
                refiner_split=settings3.denoise_split if use_refiner and settings3.use_refiner else None,
                tile_size=settings3.tile_size, tile_overlap=settings3.tile_overlap, blend_mode=settings3.blend_mode,
                tile_batch=settings3.tile_batch, tiles=tiles, seed=record.seed + STAGE3_SEED_OFFSET, upscaler=method,
                tile_fit=settings3.tile_fit,
            ),
            final=FinalReport(
                scale=gen.final_scale, upscaler=method,
                strength=settings3.strength if settings3.enabled else (gen.stage2.strength if gen.stage2.enabled else 0),
            ),
            notes=notes,
        )


def scaled(width: int, height: int, scale: float) -> tuple[int, int]:
    """A size `scale` times larger, rounded down to multiples of 8 (generate.py's rule)."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8
