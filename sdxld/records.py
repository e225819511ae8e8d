"""Record: everything needed to reproduce an image, as JSON and as PNG text chunks.

Stages 2 and 3 read the prompt, seed and LoRAs back from the Record, never from the current
prompt files, so an image is upscaled with what made it. The same Record is embedded in the PNG
(`sdxld` chunk) so a renamed or moved image still carries it, next to an A1111-style
`parameters` chunk that Civitai and most image viewers understand.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .prompt_syntax import LORA_TAG, lora_tag
from .prompt_syntax import SYNTAXES as PROMPT_SYNTAXES
from .store import tag_of

PARAMETERS_CHUNK = "parameters"
RECORD_CHUNK = "sdxld"
RECORD_FORMAT = 1


class RecordError(ValueError):
    """A record that cannot be trusted: names the field and what is wrong with it."""


@dataclass
class LoraUse:
    kind: str  # the folder it is in: "character", "style" or "extra"
    name: str  # file stem, the name users see
    file: str  # file name inside its kind's folder
    strength: float
    hash: str  # A1111 "addnet" hash: sha256 of the tensors after the header, 12 hex
    triggers: str = ""
    # "rotation": the image's random character or style LoRA; "tag": a `<lora:name:weight>` tag
    # in the prompt asked for it (the tag stays in the prompt text).
    via: str = "rotation"


LORA_FOLDERS = ("character", "style", "extra")
ROTATED_KINDS = ("character", "style")


@dataclass
class Stage2Report:
    """How stage 2 ran for a final (written into its record as `stages.stage2`)."""

    enabled: bool
    size: list[int]
    steps: int
    cfg: float
    strength: float
    refiner_split: float | None
    seed: int
    upscale: str = "lanczos"


@dataclass
class Stage3Report:
    enabled: bool
    size: list[int]
    mode: str
    steps: int
    cfg: float
    strength: float
    refiner_split: float | None
    tile_size: int
    tile_overlap: int
    blend_mode: str
    tile_batch: int | str
    tiles: int
    seed: int
    upscaler: str
    tile_fit: str = "grow_overlap"  # records from before the choice existed grew their overlaps


@dataclass
class FinalReport:
    """What A1111's hires-fix fields of the final's `parameters` text say."""

    scale: float
    upscaler: str
    strength: float


@dataclass
class StageReports:
    stage2: Stage2Report
    stage3: Stage3Report
    final: FinalReport
    notes: list[str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Record:
    tag: str
    prompt: str
    negative: str
    seed: int
    width: int
    height: int
    sampler: str
    steps: int
    cfg: float
    model: dict = field(default_factory=dict)  # base, hash, refiner (None when not used)
    refiner_split: float | None = None
    # How the prompt text is read: "a1111" (weights, BREAK) or "plain". Records written before
    # prompt syntax existed are plain.
    prompt_syntax: str = "plain"
    # For an image another tool made: where each field came from (its A1111 parameters, a caption,
    # sdxld's config). Empty for sdxld's own images.
    origin: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)  # triggers, manual, extras
    loras: list[LoraUse] = field(default_factory=list)
    files: dict = field(default_factory=dict)  # stage1, final, ... -> file names
    stages: dict = field(default_factory=dict)  # StageReports.to_dict() once stages 2-3 ran
    # Learned rotation's draws (rotation.Arms.to_record) per group drawn that way: the counts and
    # odds behind this image's LoRAs and options. Empty for uniform rotation.
    rotation: dict = field(default_factory=dict)
    # Made in a stage-1 batch: {size, index, lora_seed}. The batch shared the LoRAs drawn from
    # lora_seed (its first image's seed); empty for an image made alone.
    batch: dict = field(default_factory=dict)
    created: str = ""
    demo: bool = False
    version: str = __version__
    format: int = RECORD_FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return _compact_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> "Record":
        if not isinstance(data, dict):
            raise RecordError(f"a record must be a JSON object, not {type(data).__name__}")
        hints = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(hints)
        if unknown:
            raise RecordError(f"unknown field(s) {sorted(unknown)}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise RecordError(f"missing field(s) {missing}")
        values = dict(data)
        _expect(values, "tag", str)
        _expect(values, "prompt", str)
        _expect(values, "negative", str)
        _expect(values, "sampler", str)
        if "prompt_syntax" in values:
            _expect(values, "prompt_syntax", str)
        for key in ("seed", "width", "height", "steps"):
            _expect(values, key, int)
        _expect(values, "cfg", (int, float))
        for key in ("model", "parts", "files", "stages", "origin", "rotation", "batch"):
            if key in values:
                _expect(values, key, dict)
        loras = values.get("loras", [])
        if not isinstance(loras, list):
            raise RecordError("field 'loras' must be a list")
        try:
            values["loras"] = [item if isinstance(item, LoraUse) else LoraUse(**item) for item in loras]
        except TypeError as err:
            raise RecordError(f"field 'loras' has a malformed entry: {err}") from None
        record = cls(**values)
        record.check_values()
        return record

    def check_values(self) -> None:
        """Values an untrusted record (a PNG chunk, a JSON someone dropped) must not get past:
        the tag becomes file names, so it must be a tag and nothing else."""
        from .store import TAG_PATTERN

        if not re.fullmatch(TAG_PATTERN, self.tag):
            raise RecordError(f"field 'tag' {self.tag[:80]!r} is not an sdxld tag (YYYYmmdd_HHMMSS...)")
        for key, low, high in (("width", 64, 8192), ("height", 64, 8192), ("steps", 1, 1000)):
            value = getattr(self, key)
            if not low <= value <= high:
                raise RecordError(f"field '{key}' {value} is outside {low}..{high}")
        if self.prompt_syntax not in PROMPT_SYNTAXES:
            raise RecordError(f"field 'prompt_syntax' {self.prompt_syntax[:40]!r} is not one of {', '.join(PROMPT_SYNTAXES)}")
        # Stage 1 makes multiples of 8; an image from another tool may have any size (stage 2 rounds).
        if (self.width % 8 or self.height % 8) and not self.origin:
            raise RecordError(f"size {self.width}x{self.height} is not a multiple of 8")
        if not 0 <= self.seed < 2**64:
            raise RecordError(f"field 'seed' {self.seed} is outside 0..2^64-1")
        if not 0 <= self.cfg <= 100:
            raise RecordError(f"field 'cfg' {self.cfg} is outside 0..100")
        rotated = [use.kind for use in self.loras if use.via == "rotation"]
        if len(rotated) != len(set(rotated)):
            raise RecordError(f"more than one rotated LoRA of a kind ({', '.join(rotated)})")
        for use in self.loras:
            if use.via not in ("rotation", "tag"):
                raise RecordError(f"a LoRA came {use.via!r}, not by rotation or tag")
            if use.kind not in (ROTATED_KINDS if use.via == "rotation" else LORA_FOLDERS):
                raise RecordError(f"a LoRA has kind {use.kind!r}, not {' or '.join(ROTATED_KINDS if use.via == 'rotation' else LORA_FOLDERS)}")
            if not isinstance(use.name, str) or not re.fullmatch(r"[^/\\\x00]+", use.name) or use.name in (".", ".."):
                raise RecordError(f"a LoRA name {str(use.name)[:80]!r} is not a plain file name")
            # lora.*_strength allows [-4, 4]; beyond it a LoRA only destroys the image.
            if not isinstance(use.strength, (int, float)) or not -4 <= use.strength <= 4:
                raise RecordError(f"LoRA {use.name} has strength {use.strength!r}, outside -4..4")

    @classmethod
    def from_json(cls, text: str) -> "Record":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordError(f"invalid JSON: {err}") from None
        return cls.from_dict(data)

    # --- A1111 "parameters" ------------------------------------------------------------------

    def a1111_parameters(self) -> str:
        items: list[tuple[str, Any]] = [
            ("Steps", self.steps),
            ("Sampler", self.sampler),
            ("CFG scale", _number(self.cfg)),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
            ("Model", self.model.get("name") or self.model.get("base", "")),
        ]
        if self.model.get("hash"):
            items.append(("Model hash", self.model["hash"]))
        if self.model.get("refiner") and self.refiner_split is not None:
            items.append(("Refiner", self.model["refiner"].rstrip("/").split("/")[-1]))
            items.append(("Refiner switch at", _number(self.refiner_split)))
        final = self.stages.get("final")
        if final:
            # A1111's hires-fix vocabulary, so viewers show how the final was made.
            items.append(("Hires upscale", _number(final["scale"])))
            items.append(("Hires upscaler", final["upscaler"]))
            items.append(("Denoising strength", _number(final["strength"])))
        if self.loras:
            hashes = {lora.name: lora.hash for lora in self.loras}
            items.append(("Lora hashes", ", ".join(f"{name}: {value}" for name, value in hashes.items())))
        items.append(("Version", f"sdxld {self.version}"))
        lines = [_one_line(self.prompt)]
        rotated = self.rotated_lora_tags()
        if rotated:
            # A1111 and Civitai read <lora:> tags from the prompt; the rotated pair was never in
            # the text, so it gets a line of its own (sdxld's reader knows it by being the last).
            lines.append(rotated)
        if self.negative:
            lines.append(f"Negative prompt: {_one_line(self.negative)}")
        lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in items))
        return "\n".join(lines)

    def rotated_lora_tags(self) -> str:
        """'<lora:alice:1> <lora:ink:0.85>' for the LoRAs rotation chose ('' when none)."""
        return " ".join(lora_tag(use.name, use.strength) for use in self.loras if use.via == "rotation")

    def shareable_dict(self) -> dict:
        """The record as it may leave this machine inside a PNG: models by their configured hub id
        or their file/folder name (with the hash), files by name. An absolute path would tell
        everyone who opens a posted image the user's folders and user name. The local JSON in
        outputs/metadata/ keeps the full record."""
        data = self.to_dict()
        user_text = {key: data.pop(key) for key in ("prompt", "negative", "parts")}
        data = _without_paths(data)
        data.update(user_text)
        return data

    def png_chunks(self, embed: str = "full") -> dict[str, str]:
        """The PNG text chunks for output.embed: full (A1111 parameters + the path-free sdxld
        record), parameters (A1111 text only), none."""
        if embed == "none":
            return {}
        chunks = {PARAMETERS_CHUNK: self.a1111_parameters()}
        if embed == "full":
            chunks[RECORD_CHUNK] = _compact_json(self.shareable_dict())
        return chunks


def _compact_json(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


_PATH = re.compile(r"^(?:/|~|\\\\|[A-Za-z]:[\\/]|\.{1,2}[\\/])")


def public_name(value: str) -> str:
    """A model setting as it may be shown to others: a hub id (owner/name) as it is, a local
    path by its last component."""
    if _PATH.match(value) or value.count("/") > 1 or "\\" in value:
        return re.split(r"[\\/]", value.rstrip("/\\"))[-1]
    return value


def _without_paths(value):
    if isinstance(value, dict):
        return {key: _without_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_paths(item) for item in value]
    if isinstance(value, str) and _PATH.match(value):
        return public_name(value)
    return value


def _expect(values: dict, key: str, types: type | tuple) -> None:
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, types):
        raise RecordError(f"field '{key}' has the wrong type ({type(value).__name__})")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _one_line(text: str) -> str:
    # A line break inside the prompt would be read as the start of the next section, and a
    # prompt that itself starts with "Negative prompt:" would be read as the negative prompt.
    line = " ".join(text.replace("\r", "\n").split("\n"))
    return " " + line if line.startswith("Negative prompt:") else line


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n\"") else text


def parse_a1111(text: str) -> dict:
    """Parse an A1111 `parameters` text: {'prompt', 'negative', and each key: value item}.

    In text sdxld wrote, a last prompt line of nothing but `<lora:>` tags is the rotated LoRAs
    (Record.a1111_parameters): it comes back under 'rotated loras', not in the prompt."""
    lines = text.strip("\n").split("\n")
    settings_line = lines[-1]
    head = lines[:-1]
    negative_at = next((i for i, line in enumerate(head) if line.startswith("Negative prompt: ")), None)
    if negative_at is None:
        prompt, negative = "\n".join(head), ""
    else:
        prompt = "\n".join(head[:negative_at])
        negative = "\n".join(head[negative_at:])[len("Negative prompt: "):]
    result: dict[str, Any] = {"prompt": prompt, "negative": negative}
    item = re.compile(r'\s*([\w \-/+]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
    for match in item.finditer(settings_line):
        key, value = match[1].strip(), match[2].strip()
        if value.startswith('"'):
            value = json.loads(value)
        result[key] = value
    prompt_lines = prompt.split("\n")
    if (len(prompt_lines) > 1 and str(result.get("Version", "")).startswith("sdxld")
            and LORA_TAG.sub("", prompt_lines[-1]).strip() == ""):
        result["prompt"], result["rotated loras"] = "\n".join(prompt_lines[:-1]), prompt_lines[-1]
    return result


def read_png_record(path) -> Record:
    """The Record embedded in an sdxld PNG's `sdxld` chunk."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get(RECORD_CHUNK) if hasattr(image, "text") else None
    if text is None:
        raise RecordError(f"{path}: no '{RECORD_CHUNK}' text chunk (not written by sdxld?)")
    return Record.from_json(text)


# --- where an image's record is -------------------------------------------------------------

SIDECAR_SUFFIX = ".json"
CAPTION_SUFFIX = ".txt"  # a caption beside an image from another tool: its prompt


class RecordLookupError(Exception):
    """No usable record for an image: what was looked for or what is wrong, and what to do."""

    def __init__(self, problem: str, advice: str, found_nothing: bool = False):
        super().__init__(problem)
        self.problem, self.advice = problem, advice
        self.found_nothing = found_nothing  # no record at all (not a broken one): another tool's image?


def is_sidecar(name: str) -> bool:
    return name.lower().endswith((SIDECAR_SUFFIX, CAPTION_SUFFIX))


def sidecar_candidates(folder: Path, name: str, prefix: str = "") -> list[Path]:
    """What may sit beside an image called `name`, best first: its record (<tag>.json or
    <stem>.json), else a caption (<stem>.txt)."""
    tag = tag_of(name)
    names = [f"{tag}{SIDECAR_SUFFIX}"] if tag else []
    names.append(Path(name).with_suffix(SIDECAR_SUFFIX).name)
    names.append(Path(name).with_suffix(CAPTION_SUFFIX).name)
    return [folder / f"{prefix}{n}" for n in dict.fromkeys(names) if n != name]


def _record_from_json(text: str, name: str, image_size: tuple[int, int] | None) -> Record:
    """An sdxld record, or the metadata generate.py wrote (mapped to a Record)."""
    from .seed_compat import is_seed_metadata, record_from_seed_metadata

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"invalid JSON: {err}") from None
    if is_seed_metadata(data):
        return record_from_seed_metadata(data, tag_of(name), image_size)
    return Record.from_dict(data)


def find_record(path: Path, layout, sidecar: Path | None = None, name: str | None = None,
                image_size: tuple[int, int] | None = None) -> Record:
    """The image's Record: a JSON beside it, else outputs/metadata/<tag>.json, else its PNG chunk.
    The JSON may be generate.py's metadata (its size defaults to `image_size`)."""
    name = name or path.name
    tag = tag_of(name)
    tried = []
    candidates = []
    if sidecar is not None:
        candidates.append(("the JSON beside it", sidecar))
    else:
        candidates.extend(("the JSON beside it", c) for c in sidecar_candidates(path.parent, name))
    if tag:
        candidates.append(("outputs/metadata", layout.metadata / f"{tag}{SIDECAR_SUFFIX}"))
    for label, candidate in candidates:
        if candidate.suffix != SIDECAR_SUFFIX:
            continue  # a caption: not a record
        if candidate.is_file():
            try:
                return _record_from_json(candidate.read_text(encoding="utf-8"), name, image_size)
            except (RecordError, UnicodeDecodeError) as err:
                raise RecordLookupError(f"its record {candidate.name} ({label}) is invalid: {err}", "restore the JSON or approve the PNG alone") from None
        tried.append(f"{label} ({candidate.name})")
    try:
        return read_png_record(path)
    except RecordError as err:
        if "no 'sdxld' text chunk" not in str(err):
            raise RecordLookupError(f"its embedded sdxld record is invalid: {err}", "approve the original PNG from outputs/stage1/") from None
    except OSError:
        pass
    tried.append("an sdxld chunk inside the PNG")
    raise RecordLookupError(
        "has no record: looked for " + ", ".join(tried),
        "approve images that sdxld made (outputs/stage1/), or put the image's <tag>.json beside it",
        found_nothing=True,
    )
