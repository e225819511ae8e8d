"""Approved-image jobs: one image -> its final, and what became of it.

The job runner shared by the daemon, `sdxld upscale` and the full `generate` pipeline, so every
path treats a file the same way: check the image, find its record, run stages 2-3 (Engine.upscale),
and say what happened as a JobOutcome. The inbox only moves the file afterwards.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from . import foreign, store
from .inbox import Claim, Inbox, InboxError
from .records import RecordLookupError, find_record
from .stages import Hooks, Interrupted, NaNImageError

log = logging.getLogger(__name__)

# Larger than any SDXL stage-1 image by far; refusing before decoding keeps a PNG bomb harmless.
MAX_INPUT_PIXELS = 64_000_000


class JobStatus(enum.StrEnum):
    FINAL = "final"
    SKIPPED = "skipped"  # a final already existed
    FAILED = "failed"  # the image is in failed/ (or, in place, left alone) with the reason
    INTERRUPTED = "interrupted"  # stopped: back in approved/
    DEFERRED = "deferred"  # could not save (disk full, read-only): back in approved/ for a later try
    INCOMPLETE = "incomplete"  # looks half-copied and is young: back in approved/


@dataclass
class JobOutcome:
    name: str
    status: JobStatus
    final: Path | None = None
    detail: str = ""


def open_image(path: Path):
    """A fully decoded RGB image, or an InboxError naming what is wrong with the file."""
    from PIL import Image, UnidentifiedImageError

    if path.is_symlink():
        raise InboxError("is a symbolic link; sdxld does not follow links out of the inbox", "move the image itself, not a link")
    if path.is_dir():
        raise InboxError("is a folder, not an image", "move the images inside it into inbox/approved/ one by one")
    size = path.stat().st_size
    if size == 0:
        raise InboxError("is empty (0 bytes)", "the copy may have failed; approve the original image again", incomplete=True)
    declared = _png_size(path)
    try:
        if declared is not None:
            _check_pixels(*declared)
        with Image.open(path) as image:
            _check_pixels(*image.size)
            image.load()
            return image.convert("RGB")
    except InboxError:
        raise
    except Image.DecompressionBombError as err:
        raise InboxError(f"is refused before decoding: {err}", "approve stage-1 images from outputs/stage1/") from None
    except UnidentifiedImageError:
        raise InboxError("is not an image (Pillow cannot identify its format)", "approve PNG images from outputs/stage1/") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InboxError(f"is a truncated or corrupt image ({err})", "approve the original from outputs/stage1/ again",
                         incomplete=True) from None


def _png_size(path: Path) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR, read without decoding anything."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) == 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return None


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_INPUT_PIXELS:
        raise InboxError(
            f"declares {width}x{height} pixels, over the {MAX_INPUT_PIXELS:,} limit (refused before decoding)",
            "approve stage-1 images from outputs/stage1/",
        )


def _load(path: Path, engine, sidecar=None, name=None):
    image = open_image(path)
    record = _record_for(path, image.size, engine, sidecar, name)
    if image.size != (record.width, record.height):
        raise InboxError(
            f"is {image.size[0]}x{image.size[1]} but its record {record.tag} says {record.width}x{record.height}",
            "approve the stage-1 image itself, not a resized copy",
        )
    return image, record


def _record_for(path: Path, size, engine, sidecar, name):
    """The image's own record; for an image another tool made, one from what it brings."""
    try:
        return find_record(path, engine.layout, sidecar=sidecar, name=name, image_size=size)
    except RecordLookupError as err:
        if not err.found_nothing:
            raise InboxError(err.problem, err.advice) from None
        lookup = err
    seed = random.SystemRandom().randrange(2**32)
    prompts = engine.prompts.manual_only(seed)
    gen = engine.config.generation
    defaults = foreign.Defaults(prompts.prompt, prompts.negative, gen.sampler, gen.t2i.steps, gen.t2i.cfg,
                                engine.models.describe(), seed, engine.config.prompts.syntax)
    engine.follow_lora_folders()
    record = foreign.record_for(path, size, sidecar, defaults, engine.loras, engine.config.upscale.unknown_images)
    if record is None:
        raise InboxError(f"{lookup.problem}, A1111 parameters in the image, a caption {Path(name or path.name).stem}.txt",
                         "set upscale.unknown_images: manual_prompt to upscale such images with the manual prompt")
    return record


def run_claimed(engine, inbox: Inbox, claim: Claim, hooks: Hooks | None = None, young_s: float = 0.0,
                while_card_works=None) -> JobOutcome:
    """Process one claimed approved image; it always ends in done/, failed/ or (stopped) back in approved/.

    A file that looks half-copied (empty, truncated) and changed less than `young_s` ago goes back
    to approved/ (incomplete) for a later try: the daemon waits for copies, a one-shot run does not.
    `while_card_works`: host work for while the card runs its stage 3 (the next job's LoRAs);
    by default the next waiting image's LoRAs are got ready (ready_next_approved)."""
    try:
        image, record = _load(claim.path, engine, sidecar=claim.sidecar, name=claim.name)
        existing = engine.final_exists(record.tag)
        if existing is not None:
            inbox.done(claim)
            return JobOutcome(claim.name, JobStatus.SKIPPED, existing, "a final already exists")
        result = engine.upscale(record, image, hooks, while_card_works or (lambda: ready_next_approved(engine, inbox)))
    except Interrupted:
        inbox.release(claim)
        return JobOutcome(claim.name, JobStatus.INTERRUPTED)
    except InboxError as err:
        if err.incomplete and _young(claim.path, young_s):
            inbox.release(claim)
            return JobOutcome(claim.name, JobStatus.INCOMPLETE, detail=err.problem)
        inbox.fail(claim, err)
        return JobOutcome(claim.name, JobStatus.FAILED, detail=err.problem)
    except OSError as err:
        # The image is fine, the machine is not (disk full, outputs read-only ...): nothing
        # half-written is visible, and the image waits in approved/ for the next try.
        inbox.release(claim)
        log.error("could not save the final of %s (%s); it stays in approved/ and will be retried", claim.name, err)
        return JobOutcome(claim.name, JobStatus.DEFERRED, detail=f"saving failed: {err}")
    except Exception as err:  # noqa: BLE001 - any other failure: the image goes aside with the reason
        log.exception("upscaling %s failed", claim.name)
        problem = f"upscaling failed: {type(err).__name__}: {err}"
        inbox.fail(claim, InboxError(problem, "see the daemon's log for details; move the file back into approved/ to retry"))
        return JobOutcome(claim.name, JobStatus.FAILED, detail=problem)
    inbox.done(claim)
    return JobOutcome(claim.name, JobStatus.FINAL, result.path)


def ready_next_approved(engine, inbox: Inbox) -> bool:
    """Get the LoRAs of the oldest image waiting in approved/ (the next one claimed, unless another
    process takes it first) ready for its upscale (Engine.prepare_recorded_loras: merged where the
    weights stay on the device, else their files read); whether an image waits (or may: after a
    failure the next job is left alone). Only an image with an sdxld record is looked at (its
    JSON, or its PNG's chunk once the copy is complete); anything that goes wrong leaves that to
    its own upscale."""
    try:
        waiting = inbox.pending()
        if waiting:
            engine.prepare_recorded_loras(find_record(waiting[0], engine.layout))
        return bool(waiting)
    except RecordLookupError:
        return True  # another tool's image, or a copy still on its way: its upscale finds out
    except Exception as err:  # noqa: BLE001 - getting ahead must never cost this image its final
        log.warning("getting the next approved image's LoRAs ready ahead failed (%s: %s); its upscale does it",
                    type(err).__name__, err)
        return True


def _young(path: Path, seconds: float) -> bool:
    """Changed less than `seconds` ago: a copy may still be on its way."""
    try:
        return time.time() - path.lstat().st_mtime < seconds
    except OSError:
        return False


def run_in_place(engine, path: Path, hooks: Hooks | None = None) -> JobOutcome:
    """Upscale a file without moving it (generate.py's `--upscale` over outputs/stage1/)."""
    try:
        image, record = _load(path, engine)
        existing = engine.final_exists(record.tag)
        if existing is not None:
            return JobOutcome(path.name, JobStatus.SKIPPED, existing, "a final already exists")
        result = engine.upscale(record, image, hooks)
    except Interrupted:
        return JobOutcome(path.name, JobStatus.INTERRUPTED)
    except (InboxError, NaNImageError) as err:
        problem = getattr(err, "problem", str(err))
        log.warning("%s: %s", path, problem)
        return JobOutcome(path.name, JobStatus.FAILED, detail=problem)
    return JobOutcome(path.name, JobStatus.FINAL, result.path)


def stage1_backlog(engine) -> list[Path]:
    """Stage-1 images that still exist, have their metadata, and have no final yet."""
    layout = engine.layout
    found = []
    for path in store.images_of_kind(layout.stage1, "stage1"):
        tag = store.tag_of(path.name)
        if tag and (layout.metadata / f"{tag}.json").is_file() and engine.final_exists(tag) is None:
            found.append(path)
    return found
