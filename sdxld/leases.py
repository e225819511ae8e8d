"""Leases on claims: how a host that died while holding an approved image gives it up.

A process that dies on this host is found out at once (owners.py: its pid is gone). A process on
another host sharing the root cannot be asked, so each claim has a lease: a hidden file beside it
(`inbox/.leases/<claim>.lease`) whose mtime the claimant's LeaseKeeper renews every lease_s / 3
by writing to it.
A lease not renewed for lease_s, judged by the share's clock (the mtime a file just touched on
the share gets), belongs to a claimant that is gone, and any host may take the claim over with
one atomic rename (inbox.recover). The keeper's thread writes lease files and nothing else.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from . import owners


def lease_path(claim: Path) -> Path:
    """inbox/.leases/<claim name>.lease: beside processing/, out of the way of whoever lists it."""
    return claim.parent.parent / LEASES / f"{claim.name}.lease"


LEASES = ".leases"


class LeaseKeeper:
    """The leases this process holds, renewed on one thread while they are held."""

    def __init__(self) -> None:
        self._held: dict[Path, float] = {}  # lease -> its lease_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, lease: Path, lease_s: float) -> None:
        """Write (or take over) a lease and keep renewing it until `drop`."""
        lease.parent.mkdir(exist_ok=True)
        lease.write_text(f"{owners.current().token}\n")
        with self._lock:
            self._held[lease] = lease_s
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sdxld-leases", daemon=True)
                self._thread.start()
        self._wake.set()

    def drop(self, lease: Path) -> None:
        with self._lock:
            self._held.pop(lease, None)
        try:
            lease.unlink()
        except FileNotFoundError:
            pass

    def held(self) -> list[Path]:
        with self._lock:
            return list(self._held)

    def _run(self) -> None:
        while True:
            with self._lock:
                held = dict(self._held)
            for lease in held:
                try:
                    renew(lease)
                except FileNotFoundError:
                    pass  # dropped since the copy above: not brought back
                except OSError:
                    pass  # the share is away for a moment: the next round tries again
            interval = min(held.values(), default=60.0) / 3
            self._wake.wait(interval)
            self._wake.clear()


KEEPER = LeaseKeeper()


def renew(lease: Path) -> None:
    """Stamp the lease with the share's time now. A write, not a touch: the server stamps a write
    by its own clock on every network file system, while a touch can carry this host's clock
    (sshfs sends the client's time). Never creates the file, so a lease dropped meanwhile stays
    dropped."""
    fd = os.open(lease, os.O_WRONLY)
    try:
        os.write(fd, f"{owners.current().token}\n".encode())
    finally:
        os.close(fd)


def expired(lease: Path, lease_s: float, now: float) -> float | None:
    """Seconds since the lease should have been renewed, if it expired; None while it holds (or
    when there is no lease file to judge by)."""
    try:
        age = now - lease.stat().st_mtime
    except FileNotFoundError:
        return None
    return age - lease_s if age > lease_s else None

