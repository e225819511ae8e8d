"""The approved-image inbox: approved/ -> claim (atomic rename) -> done/ | failed/.

The only mover of files under inbox/. A claim is a rename of approved/NAME into
processing/<owner>__NAME: rename is atomic within a filesystem, so of several processes racing
for one file exactly one wins (the others find the source gone), and the unique destination
means a claim never overwrites another. Nothing is ever deleted: every approved image ends in
done/ or in failed/ beside a NAME.error.txt that says what was wrong and what to do.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import owners, store
from .leases import KEEPER, expired, lease_path
from .records import CAPTION_SUFFIX, SIDECAR_SUFFIX, is_sidecar, sidecar_candidates

log = logging.getLogger(__name__)

ERROR_SUFFIX = ".error.txt"


class InboxError(Exception):
    """Why an approved file cannot be upscaled, and what the user can do about it."""

    def __init__(self, problem: str, advice: str = "", incomplete: bool = False):
        super().__init__(problem)
        # incomplete: what a file still being copied looks like (empty, truncated), so a young
        # one is put back and tried again instead of failing.
        self.problem, self.advice, self.incomplete = problem, advice, incomplete


@dataclass
class Claim:
    name: str  # the name the user gave the file
    path: Path  # where it is while being processed
    sidecar: Path | None = None  # a <stem>.json that came with it
    attempt: int = 1  # 2+ when a process died while working on it before


_claims = itertools.count(1)


def _owner(attempt: int = 1) -> str:
    # <owner token>.n.attempt: lets recovery tell a claim of a dead process from one still being
    # worked on (owners.py: host, boot, pid and start time, so a reused pid is not mistaken for
    # the claimant), and count how often processing an image was cut short.
    return f"{owners.current().token}.{next(_claims)}.{attempt}"


@dataclass(frozen=True)
class ClaimOwner:
    attempt: int
    pid: int
    owner: owners.Owner | None  # None: a claim named by host.pid.n.attempt (before owner tokens)
    host: str

    def alive(self, claimed_at: float) -> bool:
        if self.owner is not None:
            return self.owner.alive()
        if self.host != owners.host():
            return True
        return owners.pid_alive_since(self.pid, claimed_at)


def _parse_owner(owner: str) -> ClaimOwner | None:
    parts = owner.split(".")
    if len(parts) == 6 and parts[4].isdigit() and parts[5].isdigit():
        token = owners.parse(".".join(parts[:4]))
        if token is not None:
            return ClaimOwner(int(parts[5]), token.pid, token, token.host)
    if len(parts) == 4 and parts[1].isdigit() and parts[3].isdigit():
        return ClaimOwner(int(parts[3]), int(parts[1]), None, parts[0])
    return None


def unique_path(folder: Path, name: str) -> Path:
    """folder/name, or 'stem (2).ext' ... if that is taken: done/ and failed/ never overwrite."""
    candidate = folder / name
    stem, suffix = os.path.splitext(name)
    for n in itertools.count(2):
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
        candidate = folder / f"{stem} ({n}){suffix}"
    raise AssertionError("unreachable")


def is_ignored(name: str) -> bool:
    """Names that are never work: hidden and temporary files, partial downloads, editor files,
    record sidecars and our own error reports."""
    lowered = name.lower()
    return (
        name.startswith(".")
        or name.endswith("~")
        or lowered.endswith((".tmp", ".part", ".crdownload", ".swp", SIDECAR_SUFFIX, CAPTION_SUFFIX, ERROR_SUFFIX))
        or name == "4913"
    )


class Inbox:
    def __init__(self, layout, max_attempts: int = 3, lease_s: float = 600.0):
        self.layout = layout
        self.max_attempts = max_attempts
        self.lease_s = lease_s
        self.approved = layout.approved
        self.processing = layout.processing
        self.done_dir = layout.done
        self.failed_dir = layout.failed

    def ensure_dirs(self) -> None:
        for folder in (self.approved, self.processing, self.done_dir, self.failed_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def pending(self) -> list[Path]:
        """Entries waiting in approved/, oldest first."""
        if not self.approved.is_dir():
            return []
        entries = []
        for entry in self.approved.iterdir():
            if is_ignored(entry.name):
                continue
            try:
                mtime = entry.lstat().st_mtime
            except FileNotFoundError:
                continue
            entries.append((mtime, entry.name, entry))
        return [entry for _, _, entry in sorted(entries)]

    def claim_next(self, ready=lambda path: True, candidates: list[Path] | None = None) -> Claim | None:
        """Claim the oldest waiting file that `ready` accepts; None when there is none, or other
        processes took each first. The one place that decides which approved file is next."""
        for path in self.pending() if candidates is None else candidates:
            if ready(path) and (claim := self.claim(path)) is not None:
                return claim
        return None

    def claim(self, path: Path) -> Claim | None:
        """Take a file out of approved/ for processing; None if another process took it first."""
        self.ensure_dirs()
        target = self.processing / f"{_owner()}__{path.name}"
        if not self._take(path, target):
            return None
        moved_sidecar = None
        for sidecar in sidecar_candidates(path.parent, path.name):
            moved = target.with_name(f"{target.name.rsplit('__', 1)[0]}__{sidecar.name}")
            if store.move(sidecar, moved):
                moved_sidecar = moved
                break
        return Claim(path.name, target, moved_sidecar)

    def _take(self, source: Path, claim: Path) -> bool:
        """Rename `source` to this process's `claim` name; False if another process took it first.
        The lease comes first: a claim is never visible to other hosts without one."""
        KEEPER.hold(lease_path(claim), self.lease_s)
        if store.move(source, claim):
            return True
        KEEPER.drop(lease_path(claim))
        return False

    def _move(self, claim: Claim, folder: Path) -> Path:
        """Move a claimed file (and its record sidecar) to `folder` under the user's names."""
        self.ensure_dirs()
        destination = unique_path(folder, claim.name)
        moved = store.move(claim.path, destination)
        KEEPER.drop(lease_path(claim.path))
        if not moved:
            # Another host takes a live claim only when its lease went unrenewed for lease_s (this
            # host lost the share, or was suspended); that host finishes the image.
            log.warning("%s is no longer in processing/ under this process's claim: taken over by another "
                        "host after its lease expired, or moved away by hand; left where it is", claim.name)
            return None
        if claim.sidecar is not None and claim.sidecar.exists():
            store.move(claim.sidecar, unique_path(folder, claim.sidecar.name.rsplit("__", 1)[1]))
        return destination

    def done(self, claim: Claim) -> Path | None:
        return self._move(claim, self.done_dir)

    def fail(self, claim: Claim, error: InboxError) -> Path:
        """Move to failed/ with NAME.error.txt beside it (written first, so it is never missing)."""
        self.ensure_dirs()
        report = unique_path(self.failed_dir, claim.name)
        text = f"{claim.name}: {error.problem}\n"
        if error.advice:
            text += f"\nWhat to do: {error.advice}\n"
        text += "\nMove the file back into inbox/approved/ to try again.\n"
        store.atomic_write(report.with_name(report.name + ERROR_SUFFIX), text.encode("utf-8"))
        destination = self._move(claim, self.failed_dir)
        log.warning("approved %s failed: %s", claim.name, error.problem)
        return destination

    def release(self, claim: Claim) -> Path:
        """Give an unfinished claim back to approved/ (the run was stopped before it finished)."""
        return self._move(claim, self.approved)

    def recover(self) -> list[Claim]:
        """Re-claim work left in processing/ by processes of this host that no longer run (a
        reboot or a reused pid does not keep a dead claimant alive: owners.py).

        Each such image is claimed again for this process (an atomic rename, so two daemons
        recovering at once never both get it) with its attempt count raised; one that already
        had `max_attempts` goes to failed/ instead, since it may be what kills the process.
        """
        if not self.processing.is_dir():
            return []
        recovered = []
        entries = sorted(e for e in self.processing.iterdir() if not e.name.startswith("."))
        names = {e.name for e in entries}
        now = store.share_clock(self.processing)
        for entry in entries:
            owner, sep, name = entry.name.partition("__")
            parsed = _parse_owner(owner)
            if not sep or parsed is None:
                continue
            if parsed.host != owners.host():
                # Another host's claim: only an expired lease says it is gone. A claim without a
                # lease (an sdxld before leases) is left alone.
                overdue = expired(lease_path(entry), self.lease_s, now)
                if overdue is None:
                    continue
                reason = f"host {parsed.host} did not renew its lease for {self.lease_s + overdue:.0f} s"
            else:
                try:
                    claimed_at = entry.lstat().st_ctime  # the claim's rename set it
                except FileNotFoundError:
                    continue
                if parsed.alive(claimed_at):
                    continue
                reason = f"process {parsed.pid} no longer runs"
            if is_sidecar(name) and any(n.startswith(owner + "__") and not is_sidecar(n) for n in names):
                continue  # travels with its image below
            attempt = parsed.attempt + 1
            target = self.processing / f"{_owner(attempt)}__{name}"
            if not self._take(entry, target):
                continue  # another process recovered it first
            try:
                lease_path(entry).unlink()
            except FileNotFoundError:
                pass
            sidecar = None
            for candidate in sidecar_candidates(self.processing, name, prefix=f"{owner}__"):
                moved = target.with_name(f"{target.name.rsplit('__', 1)[0]}__{candidate.name.split('__', 1)[1]}")
                if store.move(candidate, moved):
                    sidecar = moved
                    break
            claim = Claim(name, target, sidecar, attempt)
            if attempt > self.max_attempts:
                self.fail(claim, InboxError(
                    f"processing was cut short {attempt - 1} times (the process died or was killed while working on it)",
                    "if sdxld crashes on this image, check the log for the cause; otherwise approve it again",
                ))
                continue
            log.info("recovered %s (attempt %d), left unfinished: %s", name, attempt, reason)
            recovered.append(claim)
        return recovered
