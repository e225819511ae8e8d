"""Upscale jobs: an approved image (claimed from the inbox) or a file in place -> its final.

Shared by `sdxld upscale`, the full `generate` pipeline and the daemon, so every path treats a
file the same way: validate it, find its record, run stages 2-3, and account for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .inbox import Claim, Inbox, InboxError, find_record, open_image
from .stages import Hooks, Interrupted, NaNImageError

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    name: str
    # "final", "skipped" (a final already existed), "failed", "interrupted", "deferred" (could not
    # save: back in approved/ for a later try), "incomplete" (looks half-copied and is young: back
    # in approved/), "taken"
    status: str
    final: Path | None = None
    detail: str = ""


def _load(path: Path, layout, sidecar=None, name=None):
    image = open_image(path)
    record = find_record(path, layout, sidecar=sidecar, name=name, image_size=image.size)
    if image.size != (record.width, record.height):
        raise InboxError(
            f"is {image.size[0]}x{image.size[1]} but its record {record.tag} says {record.width}x{record.height}",
            "approve the stage-1 image itself, not a resized copy",
        )
    return image, record


def upscale_claimed(engine, inbox: Inbox, claim: Claim, hooks: Hooks | None = None, young_s: float = 0.0) -> Outcome:
    """Process one claimed approved image; it always ends in done/, failed/ or (stopped) back in approved/.

    A file that looks half-copied (empty, truncated) and changed less than `young_s` ago goes back
    to approved/ ("incomplete") for a later try: the daemon waits for copies, a one-shot run does not."""
    try:
        image, record = _load(claim.path, engine.layout, sidecar=claim.sidecar, name=claim.name)
        existing = engine.final_exists(record.tag)
        if existing is not None:
            inbox.done(claim)
            return Outcome(claim.name, "skipped", existing, "a final already exists")
        result = engine.upscale(record, image, hooks)
    except Interrupted:
        inbox.release(claim)
        return Outcome(claim.name, "interrupted")
    except InboxError as err:
        if err.incomplete and _young(claim.path, young_s):
            inbox.release(claim)
            return Outcome(claim.name, "incomplete", detail=err.problem)
        inbox.fail(claim, err)
        return Outcome(claim.name, "failed", detail=err.problem)
    except OSError as err:
        # The image is fine, the machine is not (disk full, outputs read-only ...): nothing
        # half-written is visible, and the image waits in approved/ for the next try.
        inbox.release(claim)
        log.error("could not save the final of %s (%s); it stays in approved/ and will be retried", claim.name, err)
        return Outcome(claim.name, "deferred", detail=f"saving failed: {err}")
    except Exception as err:  # noqa: BLE001 - any other failure: the image goes aside with the reason
        log.exception("upscaling %s failed", claim.name)
        problem = f"upscaling failed: {type(err).__name__}: {err}"
        inbox.fail(claim, InboxError(problem, "see the daemon's log for details; move the file back into approved/ to retry"))
        return Outcome(claim.name, "failed", detail=problem)
    inbox.done(claim)
    return Outcome(claim.name, "final", result.path)


def _young(path: Path, seconds: float) -> bool:
    """Changed less than `seconds` ago: a copy may still be on its way."""
    import time

    try:
        return time.time() - path.lstat().st_mtime < seconds
    except OSError:
        return False


def upscale_in_place(engine, path: Path, hooks: Hooks | None = None) -> Outcome:
    """Upscale a file without moving it (generate.py's `--upscale` over outputs/stage1/)."""
    try:
        image, record = _load(path, engine.layout)
        existing = engine.final_exists(record.tag)
        if existing is not None:
            return Outcome(path.name, "skipped", existing, "a final already exists")
        result = engine.upscale(record, image, hooks)
    except Interrupted:
        return Outcome(path.name, "interrupted")
    except (InboxError, NaNImageError) as err:
        problem = getattr(err, "problem", str(err))
        log.warning("%s: %s", path, problem)
        return Outcome(path.name, "failed", detail=problem)
    return Outcome(path.name, "final", result.path)


def stage1_backlog(engine) -> list[Path]:
    """Stage-1 images that still exist, have their metadata, and have no final yet."""
    from . import store

    layout = engine.layout
    found = []
    for path in store.images_of_kind(layout.stage1, "stage1"):
        tag = store.tag_of(path.name)
        if tag and (layout.metadata / f"{tag}.json").is_file() and engine.final_exists(tag) is None:
            found.append(path)
    return found
