"""When a file that appeared in inbox/approved/ is complete enough to claim.

A move within one disk is instant and complete. A copy is not: a file manager, a network share,
a USB disk or a browser download writes for a while, and may stall for seconds with the file
still open. An unchanged mtime for settle_s alone would then claim half a file. inotify says more
than the mtime: every open has exactly one close, and writing shows as modifications. So a file
is taken when its writer closed it, or when it was moved in, or when nothing has it open and it
has not changed for settle_s; a file still open for writing is waited for, up to copy_wait_s
(events can be lost, and a writer can hang). Events are hints; the mtime rule alone still
covers a folder watched by polling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class _State:
    opens: int = 0  # opens not yet matched by a close
    ever_opened: bool = False
    created: bool = False  # appeared in place: a rename from outside the folder, or a new file
    closed_at: float = 0.0  # monotonic time of the last close-after-write (or move in)
    last_event: float = 0.0
    not_before: float = 0.0  # put back after a failed read: not before this time
    put_back: bool = False  # our own rename back into approved/ says nothing about the copy


class Arrivals:
    """Fed the watcher's changes for approved/ (on the daemon thread); answers `settled()`."""

    def __init__(self, settle_s: float, copy_wait_s: float, events_show_opens: bool = True):
        self.settle_s = settle_s
        self.copy_wait_s = copy_wait_s
        # inotify reports opens and closes; a polling observer (inotify limits, network
        # filesystems) only sees changes, and then the mtime rule is all there is.
        self.events_show_opens = events_show_opens
        self._files: dict[Path, _State] = {}

    def observe(self, kind: str, path: Path, src: Path | None = None) -> None:
        now = time.monotonic()
        if kind == "moved" and src is not None and src != path:
            self._files.pop(src, None)
        if kind == "deleted":
            self._files.pop(path, None)
            return
        state = self._files.setdefault(path, _State())
        state.last_event = now
        if kind == "opened":
            state.opens += 1
            state.ever_opened = True
        elif kind == "created":
            state.created = True
        elif kind in ("closed", "closed_no_write"):
            state.opens = max(0, state.opens - 1)
            if kind == "closed":
                state.closed_at = now
        elif kind == "moved":
            state.opens, state.closed_at = 0, now

    def defer(self, path: Path, seconds: float) -> None:
        """Do not offer `path` again for `seconds` (it was put back half-copied)."""
        state = self._files.setdefault(path, _State())
        state.not_before = time.monotonic() + seconds
        state.opens, state.closed_at, state.put_back = 0, 0.0, True

    def forget(self, path: Path) -> None:
        self._files.pop(path, None)

    def prune(self) -> None:
        """Forget files that left approved/ without being claimed."""
        self._files = {path: state for path, state in self._files.items() if path.exists()}

    def arrived_complete(self, path: Path) -> bool:
        """inotify saw its writer close it, or saw it appear whole (renamed in: created, never
        opened): if it is truncated now, it stays truncated."""
        state = self._files.get(path)
        if not self.events_show_opens or state is None or state.opens:
            return False
        return state.closed_at > 0 or (state.created and not state.ever_opened and not state.put_back)

    def still_open(self, path: Path) -> bool:
        state = self._files.get(path)
        return state is not None and state.opens > 0 and time.monotonic() - state.last_event < self.copy_wait_s

    def settled(self, path: Path) -> bool:
        try:
            stat = path.lstat()
        except FileNotFoundError:
            return False
        state = self._files.get(path)
        now = time.monotonic()
        if state is not None:
            if now < state.not_before:
                return False
            if self.still_open(path):
                return False
            if state.closed_at and now - state.closed_at < 60:
                return True
        return time.time() - stat.st_mtime >= self.settle_s
