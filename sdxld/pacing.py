"""When the daemon's work may run: stage 1's pause reasons, save-failure holds, the failure streak.

Stage 1 is the work nobody waits for, so it yields: to too many uncurated images (the user is
behind, more would only bury the good ones), to a nearly full disk, and for a while after a save
failed (a full or read-only disk is not fixed by trying again at once). An approved image that
cannot be saved holds the approved queue the same way. Failures of the process itself (a wedged
GPU fails every image) are counted in a row, backed off, and end the process so that the service
manager restarts it.
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Callable

from . import store
from .config import DaemonConfig
from .layout import Layout

log = logging.getLogger(__name__)

# This many failed images in a row means something is broken beyond one image (a wedged GPU):
# the daemon exits for a restart, `generate` stops.
MAX_FAILURES_IN_A_ROW = 5
FAILURE_BACKOFF_S = 2.0  # after n failures in a row, wait FAILURE_BACKOFF_S ** n (at most 30 s)


class Hold:
    """'Not before this time', with the reason to show while it lasts."""

    def __init__(self) -> None:
        self._until = 0.0
        self.reason = ""

    def hold_for(self, seconds: float, reason: str) -> None:
        self._until = time.monotonic() + seconds
        self.reason = reason

    def active(self) -> bool:
        return time.monotonic() < self._until


def pending_images(layout: Layout, images_in_flight: int) -> int:
    """Stage-1 images waiting to be curated: in outputs/stage1/, or made and still being saved."""
    return len(store.images_of_kind(layout.stage1, "stage1")) + images_in_flight


class Stage1Pacing:
    def __init__(self, wait: Callable[[float], object]):
        self._wait = wait  # sleeps, but wakes at once when the daemon is asked to stop
        self.after_save_failure = Hold()
        self.failures_in_a_row = 0

    def pause_reason(self, daemon: DaemonConfig, layout: Layout, images_in_flight: int) -> str | None:
        """Why stage 1 waits now, or None. `images_in_flight`: made, handed to the writer, not yet on disk."""
        if self.after_save_failure.active():
            return f"saving failed ({self.after_save_failure.reason}); retrying every {daemon.save_retry_s:g} s"
        if daemon.max_pending:
            pending = pending_images(layout, images_in_flight)
            if pending >= daemon.max_pending:
                return f"{pending} stage-1 images waiting to be curated (daemon.max_pending {daemon.max_pending})"
        if not layout.outputs.is_dir():
            log.warning("%s disappeared while running; recreating it", layout.outputs)
            layout.ensure_output_dirs()
        if daemon.min_free_gb:
            try:
                free = shutil.disk_usage(layout.outputs).free / 1e9
            except OSError as err:  # deleted again, or unmounted: the next save will say more
                log.warning("cannot measure the free space of %s: %s", layout.outputs, err)
                free = daemon.min_free_gb
            if free < daemon.min_free_gb:
                return f"{free:.1f} GB free on the outputs disk (daemon.min_free_gb {daemon.min_free_gb})"
        return None

    def save_failed(self, err: OSError, retry_s: float) -> None:
        # Not a failure of the process: restarting does not free a disk. Stage 1 waits instead.
        self.after_save_failure.hold_for(retry_s, str(err))

    def image_made(self) -> None:
        self.failures_in_a_row = 0

    def image_failed(self) -> None:
        """Back off; after MAX_FAILURES_IN_A_ROW the process itself is broken (e.g. a wedged GPU):
        raise, so that sdxld exits non-zero and the service manager restarts it instead of spinning."""
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            raise RuntimeError(f"{self.failures_in_a_row} stage-1 images failed in a row; exiting so that sdxld is restarted")
        self._wait(min(30.0, FAILURE_BACKOFF_S ** self.failures_in_a_row))
