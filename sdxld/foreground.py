"""The one-shot commands run in a terminal: progress bars, Ctrl-C/SIGTERM, the generate loop."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from .pacing import MAX_FAILURES_IN_A_ROW
from .stages import Hooks, Interrupted

log = logging.getLogger(__name__)


class StopFlag:
    """Set by the first SIGINT/SIGTERM: finish nothing new, stop at the next denoising step.
    A second signal stops at once (atomic writes still leave no partial file)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self) -> bool:
        return self.event.is_set()

    @contextmanager
    def installed(self):
        previous = {}

        def handler(signum, frame):
            if self.event.is_set():
                raise KeyboardInterrupt
            log.info("%s received: stopping after the current denoising step", signal.Signals(signum).name)
            self.event.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


class StepProgress:
    """A tqdm bar per phase when attached to a terminal; silent otherwise (logs say enough)."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._phase = None

    def on_step(self, phase: str, step: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if phase != self._phase or self._bar is None:
            self.close()
            self._bar = tqdm(total=total, desc=phase, leave=False, unit="step")
            self._phase = phase
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._phase = None, None


def generate(engine, *, stage1_only: bool, once: bool, count: int | None, seed: int | None, stop: StopFlag) -> int:
    """generate.py's modes 1 (stage 1 -> 2 -> 3) and 2 (`--stage1`): one image, `count`, or until stopped."""
    progress = StepProgress()
    hooks = Hooks(should_stop=stop, on_step=progress.on_step)
    made = 0
    failures_in_a_row = 0
    last_save_failed = False
    writes_seen = 0
    limit = 1 if once else count
    if seed is not None:
        engine.seeds = type(engine.seeds)(seed)
    try:
        while not stop() and (limit is None or made < limit):
            # Batches are for stage-1 images made in a row; each final's stages 2-3 dwarf stage 1.
            batch = engine.stage1_batch_size() if stage1_only else 1
            if limit is not None:
                batch = min(batch, limit - made)
            try:
                # Stage-1 only: the next batch's LoRAs are got ready during this one, unless this
                # is the last; with upscaling, these images' own LoRAs must stay merged.
                another = stage1_only and (limit is None or made + batch < limit)
                results = engine.stage1_batch(batch, hooks=hooks, another_follows=another)
                for result in results:
                    print(result.path, flush=True)
                if not stage1_only:
                    for result in results:
                        final = engine.upscale(result.record, result.image, hooks)
                        print(final.path, flush=True)
            except Interrupted:
                break
            except Exception as err:  # noqa: BLE001 - as the seed script: one bad image does not end the run
                failures_in_a_row += 1
                log.error("image failed (%d in a row): %s: %s", failures_in_a_row, type(err).__name__, err,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                if once or failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    log.error("stopping: %d image(s) failed in a row", failures_in_a_row)
                    return 1
                continue
            finally:
                progress.close()
            # With background writes an image counts as made once a write has succeeded since.
            writer = engine.writer
            if writer is None or writer.written > writes_seen:
                failures_in_a_row = 0
                writes_seen = writer.written if writer is not None else 0
            made += len(results)
    except KeyboardInterrupt:
        log.info("stopped at once on the second signal")
    finally:
        try:
            engine.flush()  # images handed to the writer thread reach the disk before we exit
        except OSError as err:
            log.error("the last stage-1 image could not be saved: %s", err)
            made -= 1
            last_save_failed = True
    log.info("made %d %s", made, "stage-1 image(s)" if stage1_only else "final image(s)")
    return 1 if last_save_failed else 0


def upscale(engine, *, files: list[Path], backlog: bool, stop: StopFlag) -> int:
    """generate.py's mode 3: approved images (claimed and moved), given files, or the stage-1 backlog."""
    from .inbox import Inbox
    from .jobs import JobStatus, run_claimed, run_in_place, stage1_backlog

    progress = StepProgress()
    hooks = Hooks(should_stop=stop, on_step=progress.on_step)
    inbox = Inbox(engine.layout, engine.config.daemon.max_attempts, engine.config.daemon.lease_s)
    approved = engine.layout.approved.resolve()

    counts: dict[str, int] = {}

    def jobs():
        """(claim, None) for an inbox job, (None, path) for a file upscaled in place; claims are
        taken one at a time, only once the previous job is done and no stop was asked for."""
        if backlog:
            yield from ((None, path) for path in stage1_backlog(engine))
        elif files:
            for path in map(Path, files):
                if path.resolve().parent != approved:
                    yield None, path
                elif (claim := inbox.claim(path)) is not None:
                    yield claim, None
                else:
                    counts["taken"] = counts.get("taken", 0) + 1  # another process claimed it first
        else:
            yield from ((claim, None) for claim in inbox.recover())
            seen: set[str] = set()  # one try per image: a deferred one back in approved/ waits for the next run
            while not stop() and (claim := inbox.claim_next(lambda path: path.name not in seen)) is not None:
                seen.add(claim.name)
                yield claim, None

    try:
        for claim, path in jobs():
            if stop():
                break
            if claim is None and not path.exists():
                log.error("%s: file not found", path)
                counts[JobStatus.FAILED] = counts.get(JobStatus.FAILED, 0) + 1
                continue
            try:
                outcome = run_claimed(engine, inbox, claim, hooks) if claim is not None else run_in_place(engine, path, hooks)
            finally:
                progress.close()
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
            if outcome.status is JobStatus.FINAL:
                print(outcome.final, flush=True)
            elif outcome.status is JobStatus.SKIPPED:
                log.info("%s: skipped, %s (%s)", outcome.name, outcome.detail, outcome.final.name)
            elif outcome.status is JobStatus.INTERRUPTED:
                break
    except KeyboardInterrupt:
        log.info("stopped at once on the second signal")
    if not counts:
        log.info("nothing to upscale")
        return 0
    log.info("upscale: %s", ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return 1 if counts.get(JobStatus.FAILED) or counts.get(JobStatus.DEFERRED) else 0
