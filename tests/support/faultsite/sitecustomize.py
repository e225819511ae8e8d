"""Fault injection for daemon tests, loaded by Python at start-up when this folder is on PYTHONPATH.

While the file named by $SDXLD_FAULT_FILE exists, writes under the folder named by
$SDXLD_FAULT_UNDER fail the way a real disk fails:
- ENOSPC: the temporary file is created and written, then flushing it fails (disk full);
- EROFS:  nothing can be created there at all (outputs remounted read-only).
Everything else behaves normally, so the daemon under test is the real one.
"""

import errno
import os

_FLAG = os.environ.get("SDXLD_FAULT_FILE")
_UNDER = os.environ.get("SDXLD_FAULT_UNDER")


def _fault():
    try:
        with open(_FLAG) as handle:
            return handle.read().strip()
    except OSError:
        return ""


if _FLAG and _UNDER:
    _open, _fsync, _mkdir = os.open, os.fsync, os.mkdir
    _fd_paths = {}

    def _inside(path):
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(_UNDER)
        except (TypeError, ValueError):
            return False

    def open_(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT and _inside(path) and _fault() == "EROFS":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        fd = _open(path, flags, mode, *args, **kwargs)
        if _inside(path):
            _fd_paths[fd] = os.fsdecode(path)
        return fd

    def fsync(fd):
        path = _fd_paths.get(fd)
        if path and _fault() == "ENOSPC" and os.path.isfile(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return _fsync(fd)

    def mkdir(path, mode=0o777, *args, **kwargs):
        if _inside(path) and _fault() == "EROFS":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return _mkdir(path, mode, *args, **kwargs)

    os.open, os.fsync, os.mkdir = open_, fsync, mkdir
