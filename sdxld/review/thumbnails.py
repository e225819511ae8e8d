"""The review page's thumbnails: small WebPs under .sdxld/thumbnails, made on first view.

Keyed by the image's file name, size and modification time, not its folder: approving or
rejecting an image renames it (same name, size and time), so it keeps its thumbnail instead of
leaving one behind in every pile it passed through. The folder is kept under a size cap, the
oldest thumbnails deleted first (one is made again from its image when next viewed), checked when
the page starts and after every PRUNE_EVERY new thumbnails: a factory that runs for months must
not fill the disk with pictures of images long since deleted.
"""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path

from .piles import ReviewError

THUMBNAIL_SIZE = 320
CACHE_BYTES = 512 * 2**20
PRUNE_EVERY = 500


class Thumbnails:
    def __init__(self, folder: Path, max_bytes: int = CACHE_BYTES):
        self.folder = folder
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._made_since_prune = 0
        self.prune()

    def get(self, path: Path) -> Path:
        """The thumbnail of the image at `path`, made now if it has none."""
        stat = path.stat()
        key = hashlib.sha256(f"{path.name}\0{stat.st_mtime_ns}\0{stat.st_size}".encode()).hexdigest()[:32]
        target = self.folder / f"{key}.webp"
        if target.is_file():
            return target
        made = _webp(path)
        from ..store import atomic_write

        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(target, made)
        with self._lock:
            self._made_since_prune += 1
            due = self._made_since_prune >= PRUNE_EVERY
        if due:
            self.prune()
        return target

    def prune(self) -> int:
        """Delete the oldest thumbnails until the folder is under max_bytes; returns how many."""
        with self._lock:
            self._made_since_prune = 0
            entries = []
            try:
                for item in self.folder.iterdir():
                    try:
                        stat = item.stat()
                    except FileNotFoundError:
                        continue  # deleted by another review process meanwhile
                    entries.append((stat.st_mtime_ns, stat.st_size, item))
            except FileNotFoundError:
                return 0
            total = sum(size for _, size, _ in entries)
            removed = 0
            for _, size, item in sorted(entries, key=lambda entry: entry[0]):
                if total <= self.max_bytes:
                    break
                item.unlink(missing_ok=True)
                total -= size
                removed += 1
            return removed


def _webp(path: Path) -> bytes:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "WEBP", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ReviewError(f"{path.name} cannot be shown: {err}", 415) from None
    return buffer.getvalue()
