"""The watcher: a watchdog observer thread that only reports. It never touches a model.

Handlers put small Change records on a queue; the daemon loop decides what they mean. Events are
hints (a copy from another machine may produce none, inotify can overflow): the daemon also
rescans on a timer, so a lost event only delays work, never loses it.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEventHandler

from .inbox import is_ignored

log = logging.getLogger(__name__)


@dataclass
class Change:
    area: str  # "approved" | "prompts" | "loras" | "config"
    path: Path
    kind: str  # watchdog event type: created, modified, opened, closed, closed_no_write, moved, deleted
    at: float = field(default_factory=time.monotonic)
    src: Path | None = None  # a move's source


class _Handler(FileSystemEventHandler):
    def __init__(self, area: str, events: queue.Queue, only: Path | None = None):
        self.area, self.events, self.only = area, events, only

    def on_any_event(self, event):
        if event.is_directory and event.event_type != "moved":
            return
        if event.event_type in ("opened", "closed_no_write") and self.area != "approved":
            return  # reading is not changing; in approved/ opens and closes tell a copy's progress
        path = Path(getattr(event, "dest_path", "") or event.src_path)
        if self.only is not None and path.name != self.only.name and Path(event.src_path).name != self.only.name:
            return
        if self.only is None and is_ignored(path.name) and self.area != "loras":
            return
        src = Path(event.src_path) if event.event_type == "moved" else None
        self.events.put(Change(self.area, path, event.event_type, src=src))


# File systems whose changes made on other machines inotify never reports.
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs", "lustre", "gpfs",
                       "beegfs", "ocfs2", "gfs2", "virtiofs", "davfs"}


def filesystem_type(path: Path, mountinfo: str | None = None) -> str:
    """The type of the file system `path` is on (nfs4, fuse.sshfs, ext4 ...), from the mount table;
    '' when it cannot be read (not Linux)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return ""
    target, best, kind = str(Path(path).resolve()), "", ""
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not tail:
            continue
        point = parts[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, tail.split()[0]
    return kind


def is_shared_filesystem(kind: str) -> bool:
    return kind in NETWORK_FILESYSTEMS or kind.startswith("fuse")


class Watcher:
    """One observer over the folders the daemon cares about; falls back to polling if inotify can't.
    `poll_s` set: polling from the start (a root shared by several hosts: their changes reach no
    inotify watch here)."""

    def __init__(self, folders: dict[str, Path], config_file: Path | None, poll_s: float | None = None):
        self.events: queue.Queue[Change] = queue.Queue()
        self.folders = folders
        self.config_file = config_file
        self.poll_s = poll_s
        self.observer = None
        self.mode = "off"

    def _schedule(self, observer) -> None:
        watched = set()
        for area, folder in self.folders.items():
            folder.mkdir(parents=True, exist_ok=True)
            observer.schedule(_Handler(area, self.events), str(folder), recursive=False)
            watched.add(folder.resolve())
        if self.config_file is not None:
            observer.schedule(_Handler("config", self.events, only=self.config_file), str(self.config_file.parent), recursive=False)

    def start(self) -> str:
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        if self.poll_s is not None:
            observer = PollingObserver(timeout=self.poll_s)
            self._schedule(observer)
            observer.start()
            self.mode = "polling"
            self.observer = observer
            return self.mode
        try:
            observer = Observer()
            self._schedule(observer)
            observer.start()
            self.mode = "inotify"
        except OSError as err:
            log.warning("file events unavailable (%s: often the inotify watch limit); polling the folders instead", err)
            observer = PollingObserver(timeout=1.0)
            self._schedule(observer)
            observer.start()
            self.mode = "polling"
        self.observer = observer
        return self.mode

    def drain(self, timeout: float = 0.0) -> list[Change]:
        """Everything queued so far; waits up to `timeout` for the first one."""
        changes = []
        try:
            changes.append(self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait())
            while True:
                changes.append(self.events.get_nowait())
        except queue.Empty:
            pass
        return changes

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
