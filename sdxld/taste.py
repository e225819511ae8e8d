"""What the user approves, read from where their images are: signals and approval statistics.

Curating is moving files, so the folders are the verdicts. For each sdxld stage-1 image (its tag):

    approved   it is in inbox/approved, processing, done or failed, or a final of it exists
               (in outputs/final, or its record says one was made: the final may since be gone)
    rejected   it is in outputs/rejected (the review page's X), or it is nowhere any more:
               deleted from outputs/stage1 without being approved
    waiting    still in outputs/stage1: not judged yet, counts for nothing

Re-approving a rejected image is moving it on, so it simply counts as approved. The Ledger is built
once from the records in outputs/metadata and a listing of those folders, then kept current file
by file (`observe`, fed by the daemon's watcher) with a periodic `relist` of the folders for lost
events. Nothing here imports torch: `sdxld stats` and the review page use it as well.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import store
from .inbox import is_ignored
from .layout import IMAGE_SUFFIXES

APPROVED_PILES = frozenset({"approved", "processing", "done", "failed", "final"})
# Each kind of arm an image is counted under, in the order `sdxld stats` shows them.
GROUPS = ("character", "style", "pair", "option", "choice", "sampler")
BY = {"lora": ("character", "style"), "pair": ("pair",), "option": ("option", "choice"), "sampler": ("sampler",)}
Z95 = 1.959963984540054

log = logging.getLogger(__name__)


def wilson_interval(approved: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of an approval rate: honest for few images and for rates near
    0 or 1, where the textbook p ± z·se interval leaves [0, 1] or collapses to a point."""
    if total <= 0:
        return 0.0, 1.0
    p = approved / total
    z2 = z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Entry:
    """One stage-1 image: what made it (its arms) and which files of it exist where."""

    tag: str
    created: float
    arms: dict[str, tuple[str, ...]]  # group -> arm names (an image has several options)
    finished: bool = False  # its record says a final was made
    where: set[tuple[str, str]] = field(default_factory=set)  # (pile, file name)
    # Made by this process and maybe still on the writer's queue: not "deleted" before it is seen.
    being_written: bool = False

    def verdict(self) -> str:
        piles = {pile for pile, _ in self.where}
        if self.finished or piles & APPROVED_PILES:
            return "approved"
        if "rejected" in piles or "stage1" not in piles:
            return "rejected"
        return "waiting"


def arms_of(record: dict) -> dict[str, tuple[str, ...]] | None:
    """The arms an sdxld record's image is counted under; None for an image sdxld did not draw
    (another tool's image upscaled here has an `origin` and was never part of the rotation)."""
    if record.get("origin") or not isinstance(record.get("tag"), str):
        return None
    rotated = {use.get("kind"): use.get("name") for use in record.get("loras") or []
               if isinstance(use, dict) and use.get("via", "rotation") == "rotation"}
    parts = record.get("parts") or {}
    character, style = rotated.get("character"), rotated.get("style")
    arms = {
        "character": (character,) if character else (),
        "style": (style,) if style else (),
        "pair": (f"{character or '-'} + {style or '-'}",) if character or style else (),
        "option": tuple(str(o) for o in parts.get("extras") or []),
        "choice": tuple(f"{t} → {r}" for t, r in parts.get("choices") or []),
        "sampler": (str(record.get("sampler", "")),),
    }
    return arms


def _created(record: dict) -> float:
    try:
        stamp = datetime.fromisoformat(record["created"])
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()
    except (KeyError, TypeError, ValueError):  # older or hand-made records: the tag is the local time
        return datetime.strptime(record["tag"][:15], "%Y%m%d_%H%M%S").timestamp()


def parse_since(text: str) -> float:
    """'2026-11-27', '2026-11-27 18:00' or an ISO time (local unless it names a zone) -> epoch s."""
    try:
        stamp = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD) or time (YYYY-MM-DD HH:MM)") from None
    return stamp.timestamp()


def pile_file(pile: str, name: str) -> str | None:
    """The tag of an image file in a pile (a claim in processing/ carries its owner before `__`)."""
    if is_ignored(name) or not name.lower().endswith(IMAGE_SUFFIXES):
        return None
    if pile == "processing":
        name = name.partition("__")[2]
    return store.tag_of(name)


@dataclass
class ArmStats:
    group: str
    arm: str
    approved: int = 0
    rejected: int = 0
    waiting: int = 0

    @property
    def judged(self) -> int:
        return self.approved + self.rejected

    @property
    def rate(self) -> float | None:
        return self.approved / self.judged if self.judged else None

    def to_dict(self) -> dict:
        low, high = wilson_interval(self.approved, self.judged)
        return {"group": self.group, "arm": self.arm, "approved": self.approved, "rejected": self.rejected,
                "waiting": self.waiting, "rate": self.rate, "low": low, "high": high}


def rank(stats: list[ArmStats]) -> list[ArmStats]:
    """Best first: by the interval's lower bound (a 3-of-3 LoRA is not yet better than 60 of 100),
    then by rate, then by name; arms with nothing judged yet last."""
    def key(s: ArmStats):
        return (s.judged == 0, -wilson_interval(s.approved, s.judged)[0], -(s.rate or 0.0), s.arm)

    return sorted(stats, key=key)


@dataclass
class LoadReport:
    records: int
    skipped: int
    seconds: float


class Ledger:
    """Every sdxld stage-1 image of a root and its verdict, with running approved/rejected counts
    per arm (for images made at or after `since`)."""

    def __init__(self, layout, since: float | None = None):
        self.layout = layout
        self.piles = layout.piles()
        self.since = since
        self.entries: dict[str, Entry] = {}
        self._verdicts: dict[str, str] = {}
        self._counts: dict[str, dict[str, list[int]]] = {group: defaultdict(lambda: [0, 0]) for group in GROUPS}
        self.version = 0  # goes up whenever a count changes

    # --- building ---------------------------------------------------------------------------

    def load(self) -> LoadReport:
        """Read every record in outputs/metadata not read yet, then list the piles (at start-up,
        `sdxld stats`; the review page again when the folders changed)."""
        started = time.perf_counter()
        records = skipped = 0
        try:
            listing = list(os.scandir(self.layout.metadata))
        except FileNotFoundError:
            listing = []
        for item in listing:
            if not item.name.endswith(".json") or item.name.startswith(".") or item.name[:-5] in self.entries:
                continue
            if self._read_record(Path(item.path)) is None:
                skipped += 1
            else:
                records += 1
        self.relist()
        return LoadReport(records, skipped, time.perf_counter() - started)

    def _read_record(self, path: Path) -> Entry | None:
        try:
            record = json.loads(path.read_bytes())
            arms = arms_of(record)
            if arms is None:
                return None
            entry = Entry(record["tag"], _created(record), arms, finished=bool(record.get("stages")))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None  # unreadable or not a record: it says nothing about taste
        old = self.entries.get(entry.tag)
        if old is not None:
            entry.where = old.where
        self.entries[entry.tag] = entry
        return entry

    def add(self, record, pile: str = "stage1", name: str | None = None) -> None:
        """An image this process just made (its file may still be on the writer's queue)."""
        data = record.to_dict()
        arms = arms_of(data)
        if arms is None:
            return
        entry = Entry(record.tag, _created(data), arms, being_written=True)
        entry.where.add((pile, name or record.files.get("stage1", "")))
        self.entries[record.tag] = entry
        self._judge(entry)

    def relist(self) -> None:
        """Where every image is now, from one listing of each pile (no record is read again)."""
        found: dict[str, set] = defaultdict(set)
        for pile, folder in self.piles.items():
            try:
                names = os.listdir(folder)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                tag = pile_file(pile, name)
                if tag is not None:
                    found[tag].add((pile, name))
        for tag in found.keys() - self.entries.keys():
            self._read_record(self.layout.metadata / f"{tag}.json")
        for tag, entry in self.entries.items():
            if tag not in found and entry.being_written:
                continue
            entry.where, entry.being_written = found.get(tag, set()), False
            if "final" in {pile for pile, _ in entry.where}:
                entry.finished = True
            self._judge(entry)

    def observe(self, path: Path) -> None:
        """One file in a pile appeared, left or was renamed: look at it again (events arrive late
        and out of order, so what counts is whether the file is there now)."""
        pile = next((p for p, folder in self.piles.items() if path.parent == folder), None)
        tag = pile_file(pile, path.name) if pile else None
        if tag is None:
            return
        entry = self.entries.get(tag) or self._read_record(self.layout.metadata / f"{tag}.json")
        if entry is None:
            return
        if os.path.lexists(path):
            entry.where.add((pile, path.name))
            entry.being_written = False
            entry.finished |= pile == "final"
        else:
            entry.where.discard((pile, path.name))
        self._judge(entry)

    # --- counting ---------------------------------------------------------------------------

    def set_since(self, since: float | None) -> None:
        if since != self.since:
            self.since = since
            self._verdicts.clear()
            self._counts = {group: defaultdict(lambda: [0, 0]) for group in GROUPS}
            for entry in self.entries.values():
                self._judge(entry)
            self.version += 1

    def _judge(self, entry: Entry) -> None:
        counted = self.since is None or entry.created >= self.since
        verdict = entry.verdict() if counted else "waiting"
        before = self._verdicts.get(entry.tag, "waiting")
        if verdict == before:
            return
        self._verdicts[entry.tag] = verdict
        for group, arms in entry.arms.items():
            for arm in arms:
                tally = self._counts[group][arm]
                if before != "waiting":
                    tally[before == "rejected"] -= 1
                if verdict != "waiting":
                    tally[verdict == "rejected"] += 1
        self.version += 1

    def counts(self, group: str) -> dict[str, tuple[int, int]]:
        """arm -> (approved, rejected) for the images judged so far (the learned rotation's data)."""
        return {arm: (tally[0], tally[1]) for arm, tally in self._counts[group].items() if tally[0] or tally[1]}

    def stats(self, groups=GROUPS, since: float | None = None) -> dict[str, list[ArmStats]]:
        """Per group, every arm's approved / rejected / waiting counts, best first."""
        table: dict[str, dict[str, ArmStats]] = {group: {} for group in groups}
        for entry in self.entries.values():
            if since is not None and entry.created < since:
                continue
            verdict = entry.verdict()
            for group in groups:
                for arm in entry.arms.get(group, ()):
                    stats = table[group].setdefault(arm, ArmStats(group, arm))
                    setattr(stats, verdict, getattr(stats, verdict) + 1)
        return {group: rank(list(arms.values())) for group, arms in table.items()}

    def totals(self, since: float | None = None) -> dict[str, int]:
        totals = {"approved": 0, "rejected": 0, "waiting": 0}
        for entry in self.entries.values():
            if since is None or entry.created >= since:
                totals[entry.verdict()] += 1
        return totals

    def recent_rate(self, hours: float = 24.0, now: float | None = None) -> dict:
        """Approved out of judged, for the images made in the last `hours`."""
        totals = self.totals(since=(now or time.time()) - hours * 3600)
        judged = totals["approved"] + totals["rejected"]
        return {"hours": hours, "approved": totals["approved"], "judged": judged,
                "rate": totals["approved"] / judged if judged else None}


class TasteReader:
    """A Ledger loaded on its own thread (started at once); `ledger()` waits for it."""

    def __init__(self, layout, since: float | None = None):
        self._ledger = Ledger(layout, since)
        self.report: LoadReport | None = None
        self._thread = threading.Thread(target=self._load, name="sdxld-taste", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        self.report = self._ledger.load()

    def ledger(self) -> Ledger:
        self._thread.join()
        if self.report is not None:
            log.info("%d image records read in %.2f s (for learned rotation and statistics)", self.report.records, self.report.seconds)
        return self._ledger
