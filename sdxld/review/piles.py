"""The folders the review page shows and the moves a keypress makes, without any web in it.

A move is what dragging the file in a file manager does: one rename on the same file system
(atomic), with the record or caption that sits beside the image. A name from the page is looked
up in the folder's real listing and never joined into a path, symlinks are never followed, and
nothing outside the root's folders is read or moved.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

from ..layout import IMAGE_SUFFIXES
from ..inbox import ERROR_SUFFIX, is_ignored, unique_path
from ..records import RecordLookupError, find_record, sidecar_candidates

MAX_ERROR_TEXT = 16_000
UNDO_DEPTH = 200
# Records cached by (path, mtime): 5,000 waiting images are ~10 MB of summaries at most.
RECORD_CACHE_SIZE = 20_000


class ReviewError(Exception):
    """A request that cannot be done, in words for the page (`status` is the HTTP status)."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Item:
    name: str
    mtime: float
    size: int


@dataclass
class Action:
    """One keypress: the renames it made (source, destination) and texts it removed."""

    verb: str
    moves: list[tuple[Path, Path]] = field(default_factory=list)
    removed: dict[Path, bytes] = field(default_factory=dict)  # error reports a retry cleared

    @property
    def names(self) -> list[str]:
        return [source.name for source, _ in self.moves if source.suffix.lower() in IMAGE_SUFFIXES]


class Piles:
    def __init__(self, layout):
        self.layout = layout
        self.folders = layout.piles()
        self._undo: deque[Action] = deque(maxlen=UNDO_DEPTH)
        self._records: OrderedDict[tuple[str, float], dict | None] = OrderedDict()
        # The server answers requests on several threads; a move and its undo entry go together,
        # and the record cache is one OrderedDict.
        self._lock = threading.Lock()
        self._records_lock = threading.Lock()

    # --- what is where ------------------------------------------------------------------------

    def folder(self, pile: str) -> Path:
        try:
            return self.folders[pile]
        except KeyError:
            raise ReviewError(f"no such pile {pile[:40]!r}", 404) from None

    def items(self, pile: str) -> list[Item]:
        """The images in a pile, newest first: regular files only, no symlinks, no temporaries."""
        folder = self.folder(pile)
        found = []
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        for entry in entries:
            if is_ignored(entry.name) or not entry.name.lower().endswith(IMAGE_SUFFIXES):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found.append(Item(entry.name, stat.st_mtime, stat.st_size))
        found.sort(key=lambda item: (item.mtime, item.name), reverse=True)
        return found

    def path(self, pile: str, name: str) -> Path:
        """The file a name from the page means: only an entry of the folder's listing."""
        folder = self.folder(pile)
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name == name and entry.is_file(follow_symlinks=False):
                        return Path(entry.path)
        except FileNotFoundError:
            pass
        raise ReviewError(f"{name[:200]} is not in {self._shown(folder)} (moved or deleted meanwhile?)", 404)

    def signature(self) -> str:
        """Changes whenever a pile gains or loses a file (folder mtimes): what the page polls."""
        parts = []
        for folder in self.folders.values():
            try:
                stat = folder.stat()
                parts.append(f"{stat.st_mtime_ns}.{stat.st_nlink}")
            except FileNotFoundError:
                parts.append("-")
        return "-".join(parts)

    def record(self, path: Path) -> dict | None:
        """The image's record as the page shows it (None when it has none)."""
        try:
            key = (str(path), path.stat().st_mtime)
        except FileNotFoundError:
            return None
        with self._records_lock:
            if key in self._records:
                self._records.move_to_end(key)
                return self._records[key]
        try:
            record = find_record(path, self.layout)
            summary = {
                "prompt": record.prompt, "negative": record.negative, "seed": record.seed,
                "sampler": record.sampler, "steps": record.steps, "cfg": record.cfg,
                "size": f"{record.width}x{record.height}", "files": record.files,
                "loras": [{"kind": u.kind, "name": u.name, "strength": u.strength, "via": u.via} for u in record.loras],
            }
        except (RecordLookupError, OSError, ValueError):
            summary = None
        with self._records_lock:
            self._records[key] = summary
            while len(self._records) > RECORD_CACHE_SIZE:
                self._records.popitem(last=False)
        return summary

    def error_text(self, name: str) -> str:
        """The NAME.error.txt inbox wrote beside a failed image ('' when there is none)."""
        try:
            report = self.path("failed", name + ERROR_SUFFIX)
        except ReviewError:
            return ""
        with open(report, "rb") as handle:
            return handle.read(MAX_ERROR_TEXT).decode("utf-8", "replace")

    # --- moves --------------------------------------------------------------------------------

    def approve(self, names: list[str]) -> Action:
        return self._move("approve", "stage1", "approved", names)

    def reject(self, names: list[str]) -> Action:
        return self._move("reject", "stage1", "rejected", names)

    def retry(self, names: list[str]) -> Action:
        """Failed images back to approved/; their error reports go (and come back on undo)."""
        return self._move("retry", "failed", "approved", names, clear_error_reports=True)

    def undo(self) -> Action:
        """Put back the files of the last action (a batch is one action)."""
        with self._lock:
            if not self._undo:
                raise ReviewError("nothing to undo")
            action = self._undo[-1]
            for source, destination in action.moves:
                if not destination.is_file() or destination.is_symlink():
                    raise ReviewError(
                        f"cannot undo: {destination.name} is no longer in {self._shown(destination.parent)} "
                        "(the daemon may have started upscaling it)")
                if source.exists() or source.is_symlink():
                    raise ReviewError(f"cannot undo: a file named {source.name} is back in {self._shown(source.parent)}")
            for source, destination in reversed(action.moves):
                os.rename(destination, source)
            for path, text in action.removed.items():
                if not path.exists():
                    path.write_bytes(text)
            self._undo.pop()
            return action

    def _move(self, verb: str, source_pile: str, target_pile: str, names: list[str], clear_error_reports: bool = False) -> Action:
        if not names:
            raise ReviewError("no image given", 400)
        target = self.folder(target_pile)
        with self._lock:
            sources = [self.path(source_pile, name) for name in dict.fromkeys(names)]
            target.mkdir(parents=True, exist_ok=True)
            action = Action(verb)
            try:
                for source in sources:
                    self._rename(source, target, action)
                    for companion in sidecar_candidates(source.parent, source.name):
                        if companion.is_file() and not companion.is_symlink() and not self._shared(companion):
                            self._rename(companion, target, action)
                    if clear_error_reports:
                        report = source.with_name(source.name + ERROR_SUFFIX)
                        if report.is_file() and not report.is_symlink():
                            action.removed[report] = report.read_bytes()
                            report.unlink()
            except FileNotFoundError:
                self._put_back(action)
                raise ReviewError(f"{source.name} vanished from {self._shown(source.parent)} while it was being moved; "
                                  "nothing was moved") from None
            self._undo.append(action)
            return action

    def _rename(self, source: Path, target: Path, action: Action) -> None:
        destination = unique_path(target, source.name)
        os.rename(source, destination)
        action.moves.append((source, destination))

    def _shared(self, companion: Path) -> bool:
        # outputs/metadata holds every image's record; only a file beside the image travels.
        return companion.parent == self.layout.metadata

    def _put_back(self, action: Action) -> None:
        for source, destination in reversed(action.moves):
            try:
                os.rename(destination, source)
            except FileNotFoundError:
                pass
        for path, text in action.removed.items():
            path.write_bytes(text)

    def _shown(self, folder: Path) -> str:
        try:
            return str(folder.relative_to(self.layout.root)) + "/"
        except ValueError:
            return str(folder)
