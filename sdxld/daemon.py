"""The daemon loop: the only thread that touches torch.

Forever, until asked to stop: apply what changed (config, LoRAs; prompt files are re-read per
image anyway), then do one unit of work — an approved image if one is waiting and settled (the
user is waiting for it), else one new stage-1 image, unless stage 1 is paused (too many uncurated
images, or low disk). Status goes to a file (`sdxld status`) and to systemd.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from pathlib import Path

from .config import Config, ConfigError, keep_loaded_settings, load
from . import store
from .arrivals import Arrivals
from .engine import MAX_FAILURES_IN_A_ROW, Engine
from .inbox import Claim, Inbox
from .jobs import JobStatus, run_claimed
from .stages import Hooks, Interrupted, NaNImageError
from .status import StatusBoard
from .watch import Watcher

log = logging.getLogger(__name__)

FAILURE_BACKOFF_S = 2.0  # after n failures in a row, wait FAILURE_BACKOFF_S ** n (at most 30 s)

class Daemon:
    def __init__(self, config_path: Path, config: Config, *, demo: bool, stop, notifier):
        self.config_path = Path(config_path)
        self.config = config
        self.demo = demo
        self.stop = stop
        self.notifier = notifier
        self.status = StatusBoard(config.root, notifier)
        self.engine: Engine | None = None
        self.inbox: Inbox | None = None
        self.watcher: Watcher | None = None
        self.recovered: deque[Claim] = deque()
        self.arrivals = Arrivals(config.daemon.settle_s, config.daemon.copy_wait_s)
        self._config_dirty = False
        self._loras_dirty = False
        self._last_rescan = 0.0
        self._progress_at = 0.0
        self._approved_paused_until = 0.0
        self._stage1_paused_until = 0.0
        self._save_error = ""
        self._failures_in_a_row = 0

    # --- life cycle -------------------------------------------------------------------------

    def run(self) -> int:
        self.status.update(force=True, state="loading models")
        # Loading SDXL from disk (or the Hub) can take minutes: tell systemd we are alive.
        self.notifier.extend_timeout(900)
        self.engine = Engine.load(self.config, lora_settle_s=self.config.daemon.settle_s, background_writes=True)
        self.engine.remove_leftovers()
        self.inbox = Inbox(self.engine.layout, self.config.daemon.max_attempts)
        self.inbox.ensure_dirs()
        self.engine.layout.ensure_output_dirs()
        self._start_watcher()
        self.recovered.extend(self.inbox.recover())
        self._refresh_loras(self.engine.sync_loras())
        self.notifier.ready()
        self.status.update(force=True, state="running")
        log.info("sdxld running on %s: watching %s", self.engine.models.device, self.engine.layout.approved)
        try:
            while not self.stop():
                self.notifier.watchdog()
                self._apply_changes()
                if self._upscale_next():
                    continue
                reason = self._pause_reason()
                if reason:
                    self.status.update(state="running", paused=reason, current=None)
                    self.stop.event.wait(0.5)
                    continue
                self.status.update(paused=None)
                self._stage1()
        finally:
            self.notifier.stopping()
            self.status.update(force=True, state="stopping", current=None)
            try:
                self.engine.flush()
            except OSError as err:
                log.error("the last stage-1 image could not be saved: %s", err)
            if self.watcher is not None:
                self.watcher.stop()
            self.status.finish()
            log.info("sdxld stopped")
        return 0

    def _start_watcher(self) -> None:
        layout = self.engine.layout
        folders = {"approved": layout.approved}
        for path in {layout.manual_prompt.parent, layout.negative_prompt.parent, layout.prompt_options.parent}:
            folders[f"prompts:{path}"] = path
        for kind, folder in layout.lora_dirs.items():
            folders[f"loras:{kind}"] = folder
        if self.watcher is not None:
            self.watcher.stop()
        self.watcher = Watcher(folders, self.config_path)
        mode = self.watcher.start()
        self.arrivals.events_show_opens = mode == "inotify"
        self.status.update(watch=mode)

    # --- changes ----------------------------------------------------------------------------

    def _apply_changes(self) -> None:
        for change in self.watcher.drain():
            area = change.area.split(":")[0]
            if area == "config":
                self._config_dirty = True
            elif area == "loras":
                self._loras_dirty = True
            elif area == "approved":
                self.arrivals.observe(change.kind, change.path, change.src)
            elif area == "prompts":
                log.debug("prompt file changed: %s (read again for the next image)", change.path.name)
        if self._config_dirty:
            self._config_dirty = False
            self._reload_config()
        now = time.monotonic()
        if self._loras_dirty or now - self._last_rescan >= self.config.daemon.rescan_s:
            self._loras_dirty = False
            self._last_rescan = now
            self.arrivals.prune()
            report = self.engine.sync_loras()
            if report.changed:
                self._refresh_loras(report)
            if any(e.status == "pending" for e in self.engine.loras.entries()):
                self._loras_dirty = True  # a LoRA still being copied: look again soon

    def _refresh_loras(self, report) -> None:
        entries = self.engine.loras.entries()
        rejected = [{"file": str(e.path), "reason": e.reason} for e in entries if e.status == "rejected"]
        self.status.update(force=True, loras={"loaded": sum(e.status == "loaded" for e in entries), "rejected": rejected})

    def _reload_config(self) -> None:
        try:
            new = load(self.config_path)
        except ConfigError as err:
            log.error("config change not applied, keeping the last good config: %s", err)
            self.status.update(force=True, config_error=str(err))
            return
        if self.demo:
            from .tiny import apply_demo

            apply_demo(new)
        restart = keep_loaded_settings(new, self.config)
        if restart:
            log.warning("config: %s changed; restart sdxld to apply (the models stay as they are)", ", ".join(restart))
        watched_before = (self.engine.layout.approved, self.engine.layout.lora_dirs, self.engine.layout.prompt_options)
        self.config = new
        self.engine.reconfigure(new)
        self.arrivals.settle_s, self.arrivals.copy_wait_s = new.daemon.settle_s, new.daemon.copy_wait_s
        self.inbox = Inbox(self.engine.layout, new.daemon.max_attempts)
        if (self.engine.layout.approved, self.engine.layout.lora_dirs, self.engine.layout.prompt_options) != watched_before:
            self._start_watcher()
        self._loras_dirty = True
        self.status.update(force=True, restart_needed=restart, config_error=None)
        log.info("config reloaded from %s", self.config_path)

    # --- work -------------------------------------------------------------------------------

    def _upscale_next(self) -> bool:
        if time.monotonic() < self._approved_paused_until:
            return False
        claim = self.recovered.popleft() if self.recovered else None
        # A file that may still be growing (no close or move seen: polling, lost events) and
        # decodes as truncated goes back to approved/ while it is young; one seen complete fails.
        young_s = 0.0
        if claim is None:
            pending = self.inbox.pending()
            self.status.update(approved_queued=len(pending))
            claim = self.inbox.claim_next(self.arrivals.settled, candidates=pending)
            if claim is not None:
                path = self.engine.layout.approved / claim.name
                young_s = 0.0 if self.arrivals.arrived_complete(path) else self.config.daemon.copy_wait_s
                self.arrivals.forget(path)
        if claim is None:
            return False
        started = time.monotonic()
        self.status.update(force=True, state="upscaling", current={"job": "upscale", "file": claim.name})
        outcome = run_claimed(self.engine, self.inbox, claim, self._hooks(claim.name), young_s=young_s)
        if outcome.status is JobStatus.FINAL:
            self.status.image_done(time.monotonic() - started, "final")
            log.info("approved %s -> %s", claim.name, outcome.final.name, extra={"sdxld_tag": store.tag_of(outcome.final.name), "sdxld_stage": "final"})
        elif outcome.status is JobStatus.SKIPPED:
            log.info("approved %s: %s (%s); moved to done/", claim.name, outcome.detail, outcome.final.name)
        elif outcome.status is JobStatus.FAILED:
            self.status.data["failed"] += 1
            self.status.update(force=True, last_error=f"{claim.name}: {outcome.detail}")
        elif outcome.status is JobStatus.INCOMPLETE:
            # Put back half-copied: look again once the copy has had time to go on.
            self.arrivals.defer(self.engine.layout.approved / claim.name, max(2.0, 2 * self.config.daemon.settle_s))
            log.info("approved %s looks half-copied (%s); trying again shortly", claim.name, outcome.detail)
        elif outcome.status is JobStatus.DEFERRED:
            retry = self.config.daemon.save_retry_s
            self._approved_paused_until = time.monotonic() + retry
            self.status.update(force=True, last_error=f"{claim.name}: {outcome.detail}; retrying in {retry:g} s")
        self.status.update(force=True, state="running", current=None)
        return True

    def _pause_reason(self) -> str | None:
        daemon = self.config.daemon
        stage1 = self.engine.layout.stage1
        if time.monotonic() < self._stage1_paused_until:
            return f"saving failed ({self._save_error}); retrying every {daemon.save_retry_s:g} s"
        if daemon.max_pending:
            pending = len(store.images_of_kind(stage1, "stage1"))
            writer = self.engine.writer
            pending += writer.in_flight if writer is not None else 0  # saved soon, already made
            if pending >= daemon.max_pending:
                return f"{pending} stage-1 images waiting to be curated (daemon.max_pending {daemon.max_pending})"
        outputs = self.engine.layout.outputs
        if not outputs.is_dir():
            log.warning("%s disappeared while running; recreating it", outputs)
            self.engine.layout.ensure_output_dirs()
        if daemon.min_free_gb:
            try:
                free = shutil.disk_usage(outputs).free / 1e9
            except OSError as err:  # deleted again, or unmounted: the next save will say more
                log.warning("cannot measure the free space of %s: %s", outputs, err)
                free = daemon.min_free_gb
            if free < daemon.min_free_gb:
                return f"{free:.1f} GB free on the outputs disk (daemon.min_free_gb {daemon.min_free_gb})"
        return None

    def _stage1(self) -> None:
        started = time.monotonic()
        self.status.update(state="generating", current={"job": "stage1"})
        try:
            result = self.engine.stage1_once(hooks=self._hooks("stage1"))
        except Interrupted:
            return
        except NaNImageError as err:
            log.error("%s", err)
            self.status.update(force=True, last_error=str(err))
            return
        except OSError as err:
            # A save failed (on the writer thread, reported here): nothing half-written is
            # visible. A full or read-only disk is not fixed by restarting the process, so this
            # does not count towards the restart: stage 1 waits and tries again.
            retry = self.config.daemon.save_retry_s
            self._save_error = str(err)
            self._stage1_paused_until = time.monotonic() + retry
            log.error("saving a stage-1 image failed: %s; stage 1 retries in %g s", err, retry)
            self.status.update(force=True, last_error=f"save failed: {err}; retrying in {retry:g} s")
            return
        except Exception as err:  # noqa: BLE001 - one bad image must not end a week-long run
            log.exception("stage 1 failed")
            self.status.update(force=True, last_error=f"stage 1 failed: {type(err).__name__}: {err}")
            self._count_failure()
            return
        self._failures_in_a_row = 0
        self.status.image_done(time.monotonic() - started, "stage1")
        self.status.update(force=True, state="running", current=None)

    def _count_failure(self) -> None:
        """Many failures in a row mean the process itself is broken (e.g. a wedged GPU): exit
        non-zero so the service manager restarts it, instead of spinning."""
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            raise RuntimeError(f"{self._failures_in_a_row} stage-1 images failed in a row; exiting so that sdxld is restarted")
        self.stop.event.wait(min(30.0, FAILURE_BACKOFF_S ** self._failures_in_a_row))

    def _hooks(self, job: str) -> Hooks:
        def on_step(phase: str, step: int, total: int) -> None:
            self.notifier.watchdog()
            now = time.monotonic()
            if now - self._progress_at >= 1.0:
                self._progress_at = now
                self.status.update(current={"job": job, "phase": phase, "step": step, "total": total})

        return Hooks(should_stop=self.stop, on_step=on_step)
