"""LoraLibrary: the LoRA folders on disk <-> the LoRAs merged into the pipeline's weights.

`sync()` makes the set of usable files follow the folders: new files are checked (header, layer
names and widths against this model) and join the rotation, changed files are checked again,
files that left drop out; the verdicts outlive the process (lora_memory.py), so a restart reads
only what changed. Only the verdict is kept per file; the weights are read when a file is chosen
and merged into the model (lora_merge.py), so rotating them never changes the model's structure;
the files merged last stay ready in memory up to a budget (lora_cache.py), so memory does not
grow with the number of LoRAs.
A file that cannot be used is kept out of rotation with its reason until it changes on disk;
it never stops the run.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .lora_memory import LoraMemory, fingerprint
from .lora_cache import ReadyLoras
from .lora_files import LoraFileError, LoraWeights, check_lora_file, explain, read_lora_weights
from .lora_merge import LoraMergeError, LoraMerger, Merged
from .prompt_syntax import lora_tag, lora_tags
from .records import LORA_FOLDERS, LoraUse

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".safetensor")
MAX_TRIGGER_BYTES = 64_000


@dataclass
class LoraEntry:
    kind: str
    path: Path
    signature: tuple
    status: str = "pending"  # loaded | rejected | pending
    reason: str = ""
    hash: str = ""
    format: str = ""  # "LoRA", "LoHa", "DoRA (LoKr)"...
    triggers: str = ""
    trigger_signature: tuple | None = field(default=None, repr=False)

    @functools.cached_property
    def name(self) -> str:
        # Asked for every entry each time the entries are sorted (every draw): Path.stem was two
        # thirds of a draw's time with 1,250 LoRAs.
        return self.path.stem


@dataclass
class SyncReport:
    added: list[str] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    unchecked: int = 0  # new files a sync's time budget left for a later sync

    @property
    def changed(self) -> bool:
        return bool(self.added or self.reloaded or self.removed or self.rejected)


# The reason a pending LoRA gives while a sync's time budget has left it for later.
NOT_CHECKED_YET = "not checked yet"


def _kinds_in_turn(found: dict[Path, tuple[str, tuple]]):
    """The found files with their kinds taking turns (character, style, character, ...)."""
    by_kind: dict[str, list] = {}
    for path, (kind, signature) in found.items():
        by_kind.setdefault(kind, []).append((path, (kind, signature)))
    for turn in itertools.zip_longest(*by_kind.values()):
        yield from (item for item in turn if item is not None)


def _signature(path: Path) -> tuple:
    stat = path.stat()
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def read_triggers(txt: Path) -> str:
    """Comma-separated trigger words from the .txt beside a LoRA ('' when absent or unusable)."""
    try:
        size = txt.stat().st_size
    except OSError:
        return ""
    if size > MAX_TRIGGER_BYTES:
        log.warning("trigger file %s is %d bytes (limit %d); ignoring it", txt, size, MAX_TRIGGER_BYTES)
        return ""
    try:
        text = txt.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        log.warning("trigger file %s is not UTF-8 text; ignoring it", txt)
        return ""
    if "\x00" in text:
        log.warning("trigger file %s is binary; ignoring it", txt)
        return ""
    words = [w.strip() for w in re.split(r"[,\n]", text) if w.strip() and not w.strip().startswith("#")]
    return ", ".join(words)


class LoraLibrary:
    def __init__(self, pipe, dirs: dict[str, Path], strengths: dict[str, float], settle_s: float = 0.0, quantized=None,
                 remember_in: Path | None = None, keep_in_memory_bytes: int = 0, originals_on_device: bool = False):
        """`remember_in`: the folder where verdicts are kept across runs (None: checked anew each
        run); `keep_in_memory_bytes`: the budget for files kept ready after they leave the model;
        `originals_on_device`: LoraMerger's."""
        self.pipe = pipe
        self.dirs = {kind: Path(d) for kind, d in dirs.items()}
        self.strengths = dict(strengths)
        # Files modified less than this long ago may still be copying: wait before loading them.
        self.settle_s = settle_s
        self._entries: dict[Path, LoraEntry] = {}
        self.merger = LoraMerger(pipe, quantized, originals_on_device)
        self.ready = ReadyLoras(keep_in_memory_bytes)
        self._tag_warnings: set[str] = set()
        self._remember_in = Path(remember_in) if remember_in else None
        self._memory: LoraMemory | None = None  # read at the first sync: the fingerprint needs the model

    # --- folder state -----------------------------------------------------------------------

    def _scan(self) -> dict[Path, tuple[str, tuple]]:
        found = {}
        for kind, folder in self.dirs.items():
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or path.suffix.lower() not in LORA_SUFFIXES:
                    continue
                try:
                    if path.is_symlink() and not path.resolve().is_file():
                        continue
                    if path.is_file():
                        found[path] = (kind, _signature(path))
                except OSError:
                    continue
        return found

    def sync(self, budget_s: float | None = None) -> SyncReport:
        """Bring the entries in line with the folders. Checking a new file reads it whole (~1 s for a
        full-size SDXL LoRA, more from a slow disk): with `budget_s`, new files past that many
        seconds of checking (at least one is checked per call) stay pending as NOT_CHECKED_YET for
        a later call, the kinds taking turns so that each gets some LoRAs early. Remembered
        verdicts cost nothing and are always taken."""
        report = self._sync(budget_s)
        if report.changed:
            self._tag_warnings.clear()  # a tag may name a file that just arrived, or left
        return report

    def _sync(self, budget_s: float | None) -> SyncReport:
        report = SyncReport()
        found = self._scan()
        for path in list(self._entries):
            if path not in found:
                entry = self._entries.pop(path)
                self._unload(entry)
                report.removed.append(f"{entry.kind}/{entry.name}")
                log.info("LoRA %s/%s left the folder; removed from rotation", entry.kind, entry.name)
        now = time.time()
        deadline = None if budget_s is None else time.monotonic() + budget_s
        checked = 0
        for path, (kind, signature) in _kinds_in_turn(found):
            entry = self._entries.get(path)
            if entry and entry.signature == signature and entry.status != "pending":
                self._refresh_triggers(entry)
                continue
            if self.settle_s and now - signature[0] / 1e9 < self.settle_s:
                if entry is None:
                    self._entries[path] = LoraEntry(kind, path, signature, reason="still being written")
                continue
            reloading = entry is not None and entry.status == "loaded"
            if entry is not None:
                self._unload(entry)
            entry = LoraEntry(kind, path, signature)
            self._entries[path] = entry
            if not self._recall(entry):
                if checked and deadline is not None and time.monotonic() > deadline:
                    entry.reason = NOT_CHECKED_YET
                    report.unchecked += 1
                    continue
                checked += 1
                self._check(entry)
            self._refresh_triggers(entry)
            label = f"{kind}/{entry.name}"
            if entry.status == "rejected":
                report.rejected.append(label)
            else:
                (report.reloaded if reloading else report.added).append(label)
        self.memory.keep_only({self._key(entry) for entry in self._entries.values()})
        self.memory.save()
        return report

    def _check(self, entry: LoraEntry) -> None:
        """Check the file now, and remember the verdict when it is the file's own."""
        if self._load(entry):
            self.memory.learn(self._key(entry), entry.signature, status=entry.status, reason=entry.reason,
                              hash=entry.hash, format=entry.format)

    @property
    def memory(self) -> LoraMemory:
        if self._memory is None:
            path = None
            if self._remember_in:
                try:
                    path = self._remember_in / f"{fingerprint(self.pipe)}.json"
                except (OSError, AttributeError) as err:  # e.g. sdxld's own source not on disk
                    log.warning("LoRA checks are not remembered across runs: no fingerprint of the model (%s)", err)
            self._memory = LoraMemory(path)
        return self._memory

    @staticmethod
    def _key(entry: LoraEntry) -> str:
        return f"{entry.kind}/{entry.path.name}"

    def _recall(self, entry: LoraEntry) -> bool:
        """Take an earlier run's verdict on this very file (same signature), logged as a check's."""
        verdict = self.memory.recall(self._key(entry), entry.signature)
        if verdict is None:
            return False
        entry.status, entry.reason, entry.hash, entry.format = (verdict[f] for f in ("status", "reason", "hash", "format"))
        if entry.status == "loaded":
            log.info("LoRA %s/%s loaded (%s, hash %s; checked in an earlier run)", entry.kind, entry.name, entry.format, entry.hash)
        else:
            log.warning("LoRA %s rejected: %s (checked in an earlier run)", entry.path, entry.reason)
        return True

    def _refresh_triggers(self, entry: LoraEntry) -> None:
        txt = entry.path.with_suffix(".txt")
        try:
            stat = txt.stat()
            signature = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            signature = None
        if signature != entry.trigger_signature:
            entry.triggers = read_triggers(txt) if signature else ""
            entry.trigger_signature = signature

    def _load(self, entry: LoraEntry) -> bool:
        """Check the file; True when the verdict is the file's own (not a read that failed and may
        succeed later), so that it can be remembered."""
        try:
            entry.hash, entry.format = check_lora_file(self.pipe, entry.path)
        except Exception as err:  # noqa: BLE001 - any failure of a user file keeps it out of rotation
            entry.status = "rejected"
            entry.reason = explain(err)
            log.warning("LoRA %s rejected: %s", entry.path, entry.reason)
            # A read that failed, or a module missing from this installation, is not the file's
            # fault: the next start checks it again instead of taking the verdict.
            return not isinstance(err, (OSError, ImportError))
        entry.status, entry.reason = "loaded", ""
        log.info("LoRA %s/%s loaded (%s, hash %s)", entry.kind, entry.name, entry.format, entry.hash)
        return True

    def _unload(self, entry: LoraEntry) -> None:
        entry.status = "pending"
        self.ready.forget(entry.path)

    # --- queries ----------------------------------------------------------------------------

    def entries(self) -> list[LoraEntry]:
        return sorted(self._entries.values(), key=lambda e: (e.kind, e.name))

    def available(self, kind: str) -> list[LoraEntry]:
        return [e for e in self.entries() if e.kind == kind and e.status == "loaded"]

    def find(self, kind: str, name: str) -> LoraEntry | None:
        """The usable LoRA of that kind and name (a record names it), checked now if a sync's
        budget left it for later."""
        candidates = [e for e in self.entries() if e.kind == kind and e.name == name]
        self._check_waiting(candidates)
        return next((e for e in candidates if e.status == "loaded"), None)

    def _check_waiting(self, candidates: list[LoraEntry]) -> None:
        """Check the files among `candidates` that a sync's budget left for later: one a tag or a
        record names is worth its check now rather than an image made without it."""
        unchecked = [e for e in candidates if e.reason == NOT_CHECKED_YET]
        for entry in unchecked:
            self._check(entry)
            self._refresh_triggers(entry)
        if unchecked:
            self.memory.save()

    def tagged_in(self, prompt: str, negative: str = "") -> list[tuple[LoraEntry, float]]:
        """The LoRAs the prompt's `<lora:name:weight>` tags ask for. A tag that cannot be used is
        a warning (once per tag and reason while it stays so) and the image goes on without it;
        so is a tag in the negative prompt, where A1111 does not read them either."""
        found, problems = self.for_tags(lora_tags(prompt))
        if lora_tags(negative):
            problems.append("<lora:> tags in the negative prompt are left out; put them in the prompt")
        for problem in problems:
            if problem not in self._tag_warnings:
                self._tag_warnings.add(problem)
                log.warning("LoRA tag %s", problem)
        return found

    def for_tags(self, tags: list[tuple[str, float]]) -> tuple[list[tuple[LoraEntry, float]], list[str]]:
        """The LoRAs that `<lora:name:weight>` tags name (searched in loras/character, loras/style
        and loras/extra, by file name, then ignoring case), and why any tag cannot be used."""
        found: list[tuple[LoraEntry, float]] = []
        problems: list[str] = []
        for name, weight in tags:
            tag = lora_tag(name, weight)
            candidates = [e for e in self.entries() if e.name == name] or [
                e for e in self.entries() if e.name.casefold() == name.casefold()]
            self._check_waiting(candidates)
            usable = [e for e in candidates if e.status == "loaded"]
            if not -4 <= weight <= 4:
                problems.append(f"{tag}: weight {weight:g} is outside -4..4")
            elif not usable:
                where = ", ".join(f"loras/{kind}" for kind in LORA_FOLDERS)
                problems.append(f"{tag}: no LoRA named {name} in {where}" if not candidates else
                                f"{tag}: {candidates[0].kind}/{candidates[0].path.name} is {candidates[0].status}: {candidates[0].reason}")
            elif any(entry is usable[0] for entry, _ in found):
                problems.append(f"{tag}: {name} is already tagged in this prompt; the first tag counts")
            else:
                found.append((usable[0], weight))
        return found, problems

    def activate(self, chosen: list[LoraEntry], strengths: list[float] | None = None,
                 tagged: list[tuple[LoraEntry, float]] = ()) -> list[LoraUse]:
        """Merge exactly these LoRAs into the model: the rotated ones (at the kind's configured
        strength unless `strengths` are given) and the tagged ones at their tags' weights;
        returns what goes into the Record.

        A newly chosen file is read from disk now, unless it is still kept ready from an earlier
        merge. If it became unreadable since it was checked it leaves the rotation and the image
        goes on without it (the record says what was used)."""
        wanted: dict[str, Merged] = {}
        entries: dict[str, LoraEntry] = {}
        uses: list[tuple[str, LoraUse]] = []
        for slot, entry, use in self._requests(chosen, strengths, tagged):
            key = (entry.path, entry.signature, use.strength)
            if self.merger.holds(slot, key):
                wanted[slot] = self.merger.current(slot)
            else:
                weights = self._read(entry)
                if weights is None:
                    continue
                wanted[slot] = Merged(key, weights, use.strength)
            entries[slot] = entry
            uses.append((slot, use))
        try:
            self.merger.apply(wanted)
        except LoraMergeError as err:
            # The merger restored the previous weights; the file that failed leaves the rotation
            # (until it changes on disk) and this image goes on without it.
            for slot in err.slots:
                entry = entries[slot]
                entry.status, entry.reason = "rejected", str(err)
                self.ready.forget(entry.path)
                log.warning("LoRA %s rejected: %s", entry.path, err)
                del wanted[slot]
            uses = [(slot, use) for slot, use in uses if slot not in err.slots]
            self.merger.apply(wanted)
        self.ready.merged_now({entries[slot].path: (entries[slot].signature, merged.weights)
                               for slot, merged in wanted.items()})
        return [use for _, use in uses]

    def prepare(self, chosen: list[LoraEntry]) -> None:
        """Read and stack the files of `chosen` that are neither merged now nor kept ready, and
        keep them ready for a merge soon (lora.keep_in_memory_mb bounds what stays). A file larger
        than the whole budget is left for its merge: it would not stay."""
        wanted = [entry for entry in chosen
                  if self.ready.get(entry.path, entry.signature) is None and entry.signature[1] <= self.ready.budget_bytes]
        read = [(entry, weights) for entry in wanted if (weights := self._read(entry)) is not None]
        self.merger.prepare([weights for _, weights in read])
        for entry, weights in read:
            self.ready.keep(entry.path, entry.signature, weights)

    def wanted_uses(self, chosen: list[LoraEntry], strengths: list[float] | None = None,
                    tagged: list[tuple[LoraEntry, float]] = ()) -> list[LoraUse]:
        """What `activate` would merge, without touching the model: lets a batch group its images
        by the weights they need and merge once per group (a file that fails then still drops out
        of the records, which take `activate`'s answer)."""
        return [use for _, _, use in self._requests(chosen, strengths, tagged)]

    def _requests(self, chosen, strengths, tagged) -> list[tuple[str, LoraEntry, LoraUse]]:
        if strengths is None:
            strengths = [self.strengths[e.kind] for e in chosen]
        requests = [(entry.kind, entry, float(strength), "rotation") for entry, strength in zip(chosen, strengths)]
        requests += [(f"tag {entry.kind}/{entry.name}", entry, float(weight), "tag") for entry, weight in tagged]
        return [(slot, entry, LoraUse(entry.kind, entry.name, entry.path.name, strength, entry.hash, entry.triggers, via))
                for slot, entry, strength, via in requests]

    def _read(self, entry: LoraEntry) -> LoraWeights | None:
        try:
            if _signature(entry.path) != entry.signature:
                raise LoraFileError("the file changed on disk since it was checked; it is checked again at the next sync")
            kept = self.ready.get(entry.path, entry.signature)
            return kept if kept is not None else read_lora_weights(self.pipe, entry.path.read_bytes())
        except Exception as err:  # noqa: BLE001 - a user file may change or vanish at any moment
            entry.status, entry.reason = "pending", explain(err)
            log.warning("LoRA %s skipped for this image: %s", entry.path, entry.reason)
            return None
