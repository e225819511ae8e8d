"""The daemon loop: the only thread that touches torch.

Forever, until asked to stop: apply what changed (config, LoRAs; prompt files are re-read per
image anyway), then do one unit of work — an approved image if one is waiting and settled (the
user is waiting for it), else one new stage-1 image, unless stage 1 is paused (too many uncurated
images, or low disk). Status goes to a file (`sdxld status`) and to systemd.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

from . import store
from .arrivals import Arrivals
from .changes import ChangeRouter, ConfigEdit, reread_config
from .config import Config
from .engine import Engine
from .inbox import Claim, Inbox
from .jobs import JobStatus, ready_next_approved, run_claimed
from .layout import Layout
from .pacing import Hold, Stage1Pacing, pending_images
from .stages import Hooks, Interrupted, NaNImageError
from .status import StatusBoard
from .taste import TasteReader
from .watch import Watcher, filesystem_type, is_shared_filesystem

log = logging.getLogger(__name__)

# performance.compile graphs and max build the UNet for a new shape inside its first denoising
# step, and no step ends to ping the watchdog meanwhile: minutes for SDXL (the unit's WatchdogSec
# is 300).
BUILD_WATCHDOG_S = 3600
# Checking a new LoRA reads the whole file (~1 s for a full-size one; verdicts are remembered for
# the next start). A first start with hundreds would keep the first image waiting for minutes:
# the daemon checks for at most this long before it starts, then this long between images.
LORA_CHECKS_AT_START_S = 10.0
LORA_CHECKS_BETWEEN_IMAGES_S = 1.0


def watched_folders(layout: Layout, shared: bool) -> dict[str, Path]:
    """The folders whose changes the daemon acts on, by what they are.

    On a shared root they are polled: every poll_s each file in them is stat'ed over the network.
    The piles (stage1, done, final... thousands of files after a few nights) only tell the taste
    ledger where images went, which its relist every rescan_s also does; polling them would cost
    most of an idle daemon's traffic (bench/shared_idle.py), so there they are left to the relist."""
    folders = {"approved": layout.approved}
    for path in {layout.manual_prompt.parent, layout.negative_prompt.parent, layout.prompt_options.parent}:
        folders[f"prompts:{path}"] = path
    for kind, folder in layout.lora_dirs.items():
        folders[f"loras:{kind}"] = folder
    if not shared:
        for pile, folder in layout.piles().items():
            if pile != "approved":
                folders[f"piles:{pile}"] = folder
    return folders


class Daemon:
    def __init__(self, config_path: Path, config: Config, *, demo: bool, stop, notifier):
        self.config_path = Path(config_path)
        self.config = config
        self.demo = demo
        self.stop = stop
        self.notifier = notifier
        self.status = StatusBoard(config.root, notifier, config.daemon.heartbeat_s)
        self.engine: Engine | None = None
        self.inbox: Inbox | None = None
        self.watcher: Watcher | None = None
        self.recovered: deque[Claim] = deque()
        self.arrivals = Arrivals(config.daemon.settle_s, config.daemon.copy_wait_s)
        self.changes = ChangeRouter()
        self.stage1_pacing = Stage1Pacing(wait=stop.event.wait)
        self.approved_hold = Hold()  # set while a final cannot be saved
        self._taste_shown = (-1, 0.0)
        self._unchecked_loras = 0  # new LoRA files left for later by a sync's time budget

    # --- life cycle -------------------------------------------------------------------------

    def run(self) -> int:
        self.status.update(force=True, state="loading models")
        # Loading SDXL from disk (or the Hub) can take minutes: tell systemd we are alive.
        self.notifier.extend_timeout(900)
        # Reading what the user approved (every record, cold: seconds for 100,000) needs no torch:
        # it runs beside the model load instead of after it.
        taste = TasteReader(Layout.from_config(self.config), self.config.taste.since_time())
        # The loop syncs the LoRA folders itself (_apply_changes): on the watcher's reports, every
        # rescan_s, and with a bounded time for checking new files.
        self.engine = Engine.load(self.config, lora_settle_s=self.config.daemon.settle_s, background_writes=True,
                                  lora_folders_followed=True)
        if self.config.performance.builds_for_minutes and self.notifier.allow_silence(BUILD_WATCHDOG_S):
            log.info("performance.compile %s, compile_vae %s: the watchdog now waits up to %d s between pings "
                     "(a build of a new shape pings nothing)", self.config.performance.compile,
                     self.config.performance.compile_vae, BUILD_WATCHDOG_S)
        self.engine.use_ledger(taste.ledger())
        self.engine.remove_leftovers()
        self.inbox = Inbox(self.engine.layout, self.config.daemon.max_attempts, self.config.daemon.lease_s)
        self.inbox.ensure_dirs()
        self.engine.layout.ensure_output_dirs()
        self._start_watcher()
        self.recovered.extend(self.inbox.recover())
        self._sync_loras(LORA_CHECKS_AT_START_S, show=True)
        self._show_taste(force=True)
        self.notifier.ready()
        self.status.update(force=True, state="running")
        log.info("sdxld running on %s: watching %s", self.engine.models.device, self.engine.layout.approved)
        try:
            while not self.stop():
                self.notifier.watchdog()
                self._apply_changes()
                if self._upscale_next():
                    continue
                writer = self.engine.writer
                reason = self.stage1_pacing.pause_reason(self.config.daemon, self.engine.layout, writer.in_flight if writer else 0)
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
        if self.watcher is not None:
            self.watcher.stop()
        shared = self._shared_root()
        folders = watched_folders(self.engine.layout, shared=bool(shared))
        self.watcher = Watcher(folders, self.config_path, poll_s=self.config.daemon.poll_s if shared else None)
        mode = self.watcher.start()
        self.arrivals.events_show_opens = mode == "inotify"
        self.status.update(watch=f"{mode} (shared root: {shared})" if shared else mode)

    def _watching(self) -> tuple:
        """What the watcher was started from: a config edit that changes it restarts the watcher."""
        layout, daemon = self.engine.layout, self.config.daemon
        return layout.piles(), layout.lora_dirs, layout.prompt_options, daemon.shared, daemon.poll_s

    def _shared_root(self) -> str:
        """Why the root counts as shared by several hosts ('' when it does not)."""
        setting = self.config.daemon.shared
        if setting is True:
            return "daemon.shared"
        kind = filesystem_type(self.config.root)
        if setting == "auto" and is_shared_filesystem(kind):
            return kind
        return ""

    # --- changes ----------------------------------------------------------------------------

    def _apply_changes(self) -> None:
        due = self.changes.route(self.watcher.drain(), self.arrivals, self.config.daemon.rescan_s)
        if due.config:
            self._apply_config(reread_config(self.config_path, self.config, demo=self.demo))
        ledger = self.engine.ledger
        for path in due.pile_files:
            ledger.observe(path)
        if due.rescan:
            ledger.relist()
            # Claims left by processes that died since the start, here or on another host.
            self.recovered.extend(self.inbox.recover())
        self._show_taste(force=due.rescan)
        if due.loras:
            self.arrivals.prune()
            self._sync_loras(LORA_CHECKS_BETWEEN_IMAGES_S)

    def _sync_loras(self, budget_s: float, show: bool = False) -> None:
        """The LoRA folders as they are now; files still pending (being copied, or left for later by
        the budget) are looked at again at the next pass."""
        report = self.engine.sync_loras(budget_s=budget_s)
        if show or report.changed or self._unchecked_loras != report.unchecked:
            self._refresh_loras(report)
        if any(e.status == "pending" for e in self.engine.loras.entries()):
            self.changes.look_at_loras_again_soon()

    def _refresh_loras(self, report) -> None:
        entries = self.engine.loras.entries()
        rejected = [{"file": str(e.path), "reason": e.reason} for e in entries if e.status == "rejected"]
        if report.unchecked and not self._unchecked_loras:
            log.info("LoRAs: %d more to check, a few between images (each check reads the whole file once; the "
                     "verdicts are remembered for the next start)", report.unchecked)
        elif self._unchecked_loras and not report.unchecked:
            log.info("LoRAs: every file checked")
        self._unchecked_loras = report.unchecked
        self.status.update(force=True, loras={"loaded": sum(e.status == "loaded" for e in entries), "rejected": rejected,
                                              "unchecked": report.unchecked})

    def _show_taste(self, force: bool = False) -> None:
        """The last 24 hours' approval rate in the status, when the counts changed (recounting the
        recent images is a pass over every entry: at most every few seconds)."""
        ledger = self.engine.ledger
        if not force and (ledger.version == self._taste_shown[0] or time.monotonic() - self._taste_shown[1] < 5):
            return
        self._taste_shown = (ledger.version, time.monotonic())
        self.status.update(force=True, taste={"learning": self.engine.rotation.describe(), **ledger.recent_rate(24)})

    def _apply_config(self, edit: ConfigEdit) -> None:
        if edit.config is None:
            log.error("config change not applied, keeping the last good config: %s", edit.error)
            self.status.update(force=True, config_error=edit.error)
            return
        if edit.restart_needed:
            log.warning("config: %s changed; restart sdxld to apply (the models stay as they are)", ", ".join(edit.restart_needed))
        new = edit.config
        watched_before = self._watching()
        self.config = new
        self.engine.reconfigure(new)
        self.arrivals.settle_s, self.arrivals.copy_wait_s = new.daemon.settle_s, new.daemon.copy_wait_s
        self.inbox = Inbox(self.engine.layout, new.daemon.max_attempts, new.daemon.lease_s)
        self.status.heartbeat_s = new.daemon.heartbeat_s
        if self._watching() != watched_before:
            self._start_watcher()
        self.status.update(force=True, restart_needed=edit.restart_needed, config_error=None)
        log.info("config reloaded from %s", self.config_path)

    # --- work -------------------------------------------------------------------------------

    def _upscale_next(self) -> bool:
        """Run the next approved job, if one is ready; False when there is none."""
        if self.approved_hold.active():
            return False
        if self.recovered:
            self._upscale(self.recovered.popleft(), young_s=0.0)
            return True
        pending = self.inbox.pending()
        self.status.update(approved_queued=len(pending))
        claim = self.inbox.claim_next(self.arrivals.settled, candidates=pending)
        if claim is None:
            return False
        # A file that may still be growing (no close or move seen: polling, lost events) and
        # decodes as truncated goes back to approved/ while it is young; one seen complete fails.
        path = self.engine.layout.approved / claim.name
        young_s = 0.0 if self.arrivals.arrived_complete(path) else self.config.daemon.copy_wait_s
        self.arrivals.forget(path)
        self._upscale(claim, young_s)
        return True

    def _upscale(self, claim: Claim, young_s: float) -> None:
        started = time.monotonic()
        self.status.update(force=True, state="upscaling", current={"job": "upscale", "file": claim.name})
        outcome = run_claimed(self.engine, self.inbox, claim, self._hooks(claim.name), young_s=young_s,
                              while_card_works=self._ready_next_job)
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
            self.approved_hold.hold_for(retry, outcome.detail)
            self.status.update(force=True, last_error=f"{claim.name}: {outcome.detail}; retrying in {retry:g} s")
        self.status.update(force=True, state="running", current=None)

    def _ready_next_job(self) -> None:
        """While the card runs an approved image's stage 3 (its steps queued, the image's own LoRAs
        read for the last time): the next job's LoRAs. Another approved image waiting: its LoRAs
        (jobs.ready_next_approved). Otherwise, unless stage 1 is paused, the next stage-1 batch's LoRAs
        merged and its prompts encoded, as each batch does for the one after it, so that stage 1
        starts again with nothing to swap (an approval arriving meanwhile swaps as it would have)."""
        if self.recovered:
            return  # claims a restart found: their upscale reads what it needs
        if ready_next_approved(self.engine, self.inbox):
            return
        try:
            writer = self.engine.writer
            if self.stage1_pacing.pause_reason(self.config.daemon, self.engine.layout, writer.in_flight if writer else 0):
                return
            self.engine.get_next_batch_ready(self._batch_size())
        except OSError as err:  # a folder gone or unreadable: the next job finds out, not this final
            log.warning("getting the next job's LoRAs ready failed (%s); it reads them when it starts", err)

    def _batch_size(self) -> int:
        """The engine's batch size now, less where the batch would take stage1/ past daemon.max_pending."""
        wanted, limit = self.engine.stage1_batch_size(), self.config.daemon.max_pending
        if wanted == 1 or not limit:
            return wanted
        writer = self.engine.writer
        return max(1, min(wanted, limit - pending_images(self.engine.layout, writer.in_flight if writer else 0)))

    def _stage1(self) -> None:
        started = time.monotonic()
        self.status.update(state="generating", current={"job": "stage1"})
        try:
            made = self.engine.stage1_batch(self._batch_size(), hooks=self._hooks("stage1"), another_follows=True)
        except Interrupted:
            return
        except NaNImageError as err:
            log.error("%s", err)
            self.status.update(force=True, last_error=str(err))
            return
        except OSError as err:
            # A save failed (on the writer thread, reported here): nothing half-written is visible.
            retry = self.config.daemon.save_retry_s
            self.stage1_pacing.save_failed(err, retry)
            log.error("saving a stage-1 image failed: %s; stage 1 retries in %g s", err, retry)
            self.status.update(force=True, last_error=f"save failed: {err}; retrying in {retry:g} s")
            return
        except Exception as err:  # noqa: BLE001 - one bad image must not end a week-long run
            log.exception("stage 1 failed")
            self.status.update(force=True, last_error=f"stage 1 failed: {type(err).__name__}: {err}")
            self.stage1_pacing.image_failed()
            return
        self.stage1_pacing.image_made()
        per_image = (time.monotonic() - started) / len(made)
        for _ in made:
            self.status.image_done(per_image, "stage1")
        self.status.update(force=True, state="running", current=None)

    def _hooks(self, job: str) -> Hooks:
        return Hooks(should_stop=self.stop, on_step=self.status.step_reporter(job))
