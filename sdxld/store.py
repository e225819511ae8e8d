"""The only writer of outputs: atomic writes, unique tags, generate.py's file names.

A reader (the user's file manager, another daemon, a crash-recovery pass) must never see a
half-written file, so everything is written to a hidden temporary name in the destination folder,
fsynced and renamed into place. Temporary names start with '.' and end with '.tmp' so the watcher
and the inbox ignore them.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

from . import owners, png

# 20260207_143022 is generate.py's tag; sdxld adds microseconds, the process id and 4 hex digits
# of the host name so that many images per second, from several processes on several hosts
# sharing one root, never share a tag, and tags still sort by time. (The host mark is fixed-width
# and last, so pid + mark never reads the same for two (pid, host) pairs; older tags end at the pid.)
TAG_PATTERN = r"\d{8}_\d{6}(?:_\d{6}_[0-9a-f]+)?"
_NAME = re.compile(rf"^(?P<tag>{TAG_PATTERN})_(?P<kind>stage1|stage2_up|stage2|stage3_up|final)_(?P<w>\d+)x(?P<h>\d+)\.png$")


class TagClock:
    """Issues strictly increasing microsecond timestamps in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next_tag(self) -> str:
        with self._lock:
            now = time.time_ns() // 1000
            self._last = now if now > self._last else self._last + 1
            micros = self._last
        stamp = datetime.fromtimestamp(micros // 1_000_000)
        return f"{stamp:%Y%m%d_%H%M%S}_{micros % 1_000_000:06d}_{os.getpid():x}{host_mark()}"


@functools.cache
def host_mark() -> str:
    """4 hex digits of this host's name: enough to keep hosts apart, without naming the host."""
    return hashlib.blake2s(owners.host().encode()).hexdigest()[:4]


_clock = TagClock()


def new_tag() -> str:
    return _clock.next_tag()


def image_name(tag: str, kind: str, width: int, height: int) -> str:
    """`<tag>_<kind>_<W>x<H>.png`, e.g. 20260207_143022_stage1_768x1344.png."""
    return f"{tag}_{kind}_{width}x{height}.png"


def parse_image_name(name: str) -> dict | None:
    """The tag, kind and size encoded in an sdxld file name, or None for any other name."""
    match = _NAME.match(name)
    if not match:
        return None
    return {"tag": match["tag"], "kind": match["kind"], "width": int(match["w"]), "height": int(match["h"])}


def tag_of(name: str) -> str | None:
    """The tag at the start of a file name (`<tag>_...` or `<tag>.json`), or None."""
    match = re.match(rf"^({TAG_PATTERN})(?:[_.]|$)", name)
    return match[1] if match else None


def images_of_kind(folder: Path, kind: str, tag: str = "*") -> list[Path]:
    """Images named `<tag>_<kind>_...png` in a folder (stage1 or final), sorted by name: by tag.
    A name the user edited around the kind still counts, as a stage-1 image waiting to be curated."""
    return sorted(folder.glob(f"{tag}_{kind}_*.png")) if folder.is_dir() else []


def find_final(layout, tag: str) -> Path | None:
    """The final made from the image tagged `tag`, if one exists."""
    return next(iter(images_of_kind(layout.final, "final", tag)), None)


def is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<token>[A-Za-z0-9-]{1,32}\.[0-9a-f]{8}\.\d+\.\d+)\.[0-9a-f]+\.tmp$")
_OLD_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")


def _writer_gone(path: Path) -> bool:
    match = _TEMPORARY.match(path.name)
    if match:
        owner = owners.parse(match["token"])
        return owner is not None and not owner.alive()
    match = _OLD_TEMPORARY.match(path.name)
    if match:  # written before owner tokens: a bare pid, judged with the file's age
        return not owners.pid_alive_since(int(match["pid"]), path.lstat().st_mtime)
    return False


def remove_stale_temporaries(folders: list[Path]) -> list[Path]:
    """Delete the temporary files (under these folders, recursively) whose writer no longer runs.

    A kill -9 or a power cut during a save leaves the hidden temporary file behind; night after
    night they would pile up. Files of live writers, and of writers on other hosts sharing the
    folder, are left alone."""
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.rglob(".*.tmp"):
            try:
                if path.is_file() and not path.is_symlink() and _writer_gone(path):
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                continue
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, overwrite: bool = True) -> Path:
    """Write bytes so that `path` either keeps its old content or has all of the new one.

    overwrite=False publishes only if `path` does not exist yet (FileExistsError otherwise): for
    images, which are named once and never replaced, whoever else shares the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's owner token in the name lets a later start remove what a killed writer left.
    tmp = path.parent / f".{path.name}.{owners.current().token}.{threading.get_ident():x}.tmp"
    try:
        # Honour the umask like any other file the user's tools create (no fixed 0600 of mkstemp).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            publish(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


# Where a file system has no hard links (some SMB and FUSE mounts), publishing falls back to a
# rename after an existence check: a window of a few microseconds instead of none.
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def publish(tmp: Path, path: Path) -> None:
    """Give the finished temporary file `tmp` the name `path`, never replacing a file there.

    link() fails with EEXIST when the name is taken, which rename() does not (it silently
    replaces). On NFS a link whose reply was lost is sent again and then reports EEXIST for our
    own link: the name then points at our file (same inode), which counts as done."""
    taken = FileExistsError(errno.EEXIST, f"{path.name} already exists; sdxld never replaces an image", str(path))
    try:
        os.link(tmp, path)
    except FileExistsError:
        if not _same_file(tmp, path):
            raise taken from None
    except OSError as err:
        if err.errno not in _NO_LINKS:
            raise
        if os.path.lexists(path):
            raise taken from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def move(source: Path, target: Path) -> bool:
    """rename(source, target); False if `source` was gone. On NFS a rename whose reply was lost is
    sent again and reports ENOENT although it happened: when `target` exists and `source` does
    not, the move is ours and counts as done (every caller's target is a name only it uses)."""
    try:
        os.rename(source, target)
    except FileNotFoundError:
        return os.path.lexists(target) and not os.path.lexists(source)
    return True


def share_clock(folder: Path) -> float:
    """Now, by the clock of the file system `folder` is on (a file just touched there: its mtime).
    Hosts sharing a root over the network need not agree on the time; the share's clock is the
    one every host's files are stamped with. The local clock when the folder is not writable."""
    probe = folder / f".clock.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        probe.touch()
        stamp = probe.stat().st_mtime
        probe.unlink()
        return stamp
    except OSError:
        return time.time()


def write_json(path: Path, data: dict) -> Path:
    return atomic_write(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def save_image(layout, record, image, kind: str, name: str | None = None, embed: str = "full") -> Path:
    """Write an image with the record's chunks; for stage1 and final also the metadata JSON.

    The JSON is written first: the PNG appearing is what users and the watcher react to, and a
    crash in between leaves only a record with no image, which nothing treats as work.
    """
    name = name or image_name(record.tag, kind, image.width, image.height)
    if kind in ("stage1", "final"):
        record.files[kind] = name
    png_bytes = png.encode(image, record.png_chunks(embed))
    if kind in ("stage1", "final"):
        write_json(layout.metadata / f"{record.tag}.json", record.to_dict())
    # Stage-1 images and finals are named once, by tag: never replaced, whoever shares the folder.
    # Intermediates of an upscale cut short are written again by its retry.
    return atomic_write(_folder_for(layout, kind) / name, png_bytes, overwrite=kind not in ("stage1", "final"))


def _folder_for(layout, kind: str) -> Path:
    if kind == "stage1":
        return layout.stage1
    if kind == "final":
        return layout.final
    return layout.intermediate(kind)


class BackgroundWriter:
    """Encodes and writes images on one thread, so the next image's denoising starts at once.

    Writes stay atomic (they go through save_image). The queue is short, so a slow disk slows
    generation down instead of piling images up in memory; a failed write is raised in the
    caller's thread on its next submit or flush. The thread never touches torch.
    """

    def __init__(self, max_pending: int = 2):
        import queue

        self._queue: "queue.Queue" = queue.Queue(max_pending)
        self._errors: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self.written = 0  # writes that succeeded

    def submit(self, fn, *args) -> None:
        """Queue a write, then raise an earlier write's failure if there was one (this write is
        queued either way: reporting an old failure must not lose a new image)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sdxld-writer", daemon=True)
            self._thread.start()
        self._queue.put((fn, args))
        self._raise_failed()

    @property
    def in_flight(self) -> int:
        """Writes submitted and not finished yet."""
        return self._queue.unfinished_tasks

    def flush(self) -> None:
        """Wait until everything submitted is on disk; raise the first failure, if any."""
        if self._thread is not None:
            self._queue.join()
        self._raise_failed()

    def _raise_failed(self) -> None:
        if self._errors:
            raise self._errors.pop(0)

    def _run(self) -> None:
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
                self.written += 1
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                self._errors.append(err)
            finally:
                self._queue.task_done()
