"""Prompt files -> prompt parts; compose(rng, triggers) -> the prompt for one image.

Files are re-read whenever their mtime or size changes, so an edit applies to the next image
without a restart. A missing or empty file falls back to generate.py's text with one warning per
state of the file (not one per image).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from .wildcards import Wildcards, has_template

log = logging.getLogger(__name__)

FALLBACK_PROMPT = "masterpiece, best quality, highly detailed"
FALLBACK_NEGATIVE = "lowres, bad anatomy, bad hands, text, error, worst quality, low quality, blurry"
# Prompt files are text a person edits; anything larger is a mistake (or not a prompt file).
MAX_PROMPT_FILE_BYTES = 1_000_000


@dataclass
class Composed:
    prompt: str
    negative: str
    parts: dict = field(default_factory=dict)


def split_phrases(text: str) -> list[str]:
    """Comma-separated phrases, stripped; a comma inside a {variant|list} does not split."""
    phrases, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            phrases.append(text[start:i])
            start = i + 1
    phrases.append(text[start:])
    return [p.strip() for p in phrases if p.strip()]


def parse_options(text: str) -> list[str]:
    """One or more comma-separated phrases per line, '#' lines are comments; each phrase is one option."""
    options: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        options.extend(split_phrases(line))
    # Repeats would make a phrase more likely and could be sampled twice into one prompt.
    return list(dict.fromkeys(options))


def normalize_phrases(text: str) -> str:
    """A prompt file's text as one line of ', '-joined phrases (newlines act as commas)."""
    lines = [line for line in text.splitlines() if not line.strip().startswith("#")]
    return ", ".join(split_phrases(",".join(lines)))


class _WatchedText:
    """A text file re-read when its (mtime, size) changes."""

    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label
        self._signature: tuple | None = None
        self._text = ""
        self._warned_for: tuple | None = None

    def read(self) -> str:
        try:
            stat = self.path.stat()
            signature = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            signature = ("missing",)
        if signature != self._signature:
            self._text = self._load(signature)
            self._signature = signature
        return self._text

    def _load(self, signature: tuple) -> str:
        if signature == ("missing",):
            return self._warn(signature, "not found")
        if signature[1] > MAX_PROMPT_FILE_BYTES:
            return self._warn(signature, f"is {signature[1]} bytes, over the {MAX_PROMPT_FILE_BYTES} limit")
        try:
            raw = self.path.read_bytes()
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._warn(signature, "is not UTF-8 text")
        except OSError as err:
            return self._warn(signature, f"cannot be read ({err.strerror})")
        if "\x00" in text:
            return self._warn(signature, "contains NUL bytes (binary, not text)")
        if not text.strip():
            return self._warn(signature, "is empty")
        return text

    def _warn(self, signature: tuple, problem: str) -> str:
        if self._warned_for != signature:
            log.warning("%s %s %s; using the built-in default until it is fixed", self.label, self.path, problem)
            self._warned_for = signature
        return ""


class PromptSource:
    def __init__(self, manual: Path, negative: Path, options: Path, max_extras: int, wildcards: Path | None = None):
        self._manual = _WatchedText(manual, "manual prompt")
        self._negative = _WatchedText(negative, "negative prompt")
        self._options = _WatchedText(options, "prompt options")
        self.max_extras = max_extras
        self._wildcards = Wildcards(wildcards if wildcards is not None else manual.parent / "wildcards")

    @classmethod
    def from_layout(cls, layout, max_extras: int) -> "PromptSource":
        return cls(layout.manual_prompt, layout.negative_prompt, layout.prompt_options, max_extras, layout.wildcards)

    def options(self) -> list[str]:
        return parse_options(self._options.read())

    def _manual_and_negative(self) -> tuple[str, str]:
        return (normalize_phrases(self._manual.read()) or FALLBACK_PROMPT,
                normalize_phrases(self._negative.read()) or FALLBACK_NEGATIVE)

    def manual_only(self, seed: int) -> Composed:
        """The manual and negative prompt alone (for an image that brings no prompt of its own)."""
        rng = random.Random(seed)
        manual, negative = self._manual_and_negative()
        return Composed(self._wildcards.resolve(manual, rng.getrandbits(32), "manual prompt"),
                        self._wildcards.resolve(negative, rng.getrandbits(32), "negative prompt"), {"manual": manual})

    def compose(self, rng: random.Random, triggers: list[str], choose=None) -> Composed:
        """Trigger words, then the manual prompt, then 0..max_extras sampled options (generate.py's order);
        then its {variants} and __wildcards__ drawn, by numbers drawn last from `rng` (the image's seed).
        `choose(rng, pool, count)` picks the options (default: uniformly, as generate.py did)."""
        manual, negative = self._manual_and_negative()
        pool = self.options()
        count = rng.randint(0, min(self.max_extras, len(pool)))
        extras = (choose or _uniform_options)(rng, pool, count)
        triggers = [t for t in triggers if t]
        parts = {"triggers": triggers, "manual": manual, "extras": extras}
        # Each part on its own: in template text `#` starts a comment, which must not eat the next part.
        resolved_manual = self._wildcards.resolve(manual, rng.getrandbits(32), "manual prompt")
        resolved_extras = [self._wildcards.resolve(extra, rng.getrandbits(32), "prompt option") for extra in extras]
        resolved_negative = self._wildcards.resolve(negative, rng.getrandbits(32), "negative prompt")
        template = ", ".join([*triggers, manual, *extras])
        prompt = ", ".join(p for p in [*triggers, resolved_manual, *resolved_extras] if p)
        if prompt != template:
            parts["template"] = template
            choices = _choices([manual, *extras], [resolved_manual, *resolved_extras])
            if choices:
                parts["choices"] = choices
        if resolved_negative != negative:
            parts["negative_template"] = negative
        return Composed(prompt, resolved_negative, parts)


def _uniform_options(rng: random.Random, pool: list[str], count: int) -> list[str]:
    return rng.sample(pool, count)


def _choices(templates: list[str], resolved: list[str]) -> list[list[str]]:
    """[phrase with {variants} or __wildcards__, what it became] for each such phrase: what the
    taste statistics count a wildcard's choices by. A phrase whose drawn text has a different
    number of commas cannot be paired up and is left out."""
    pairs = []
    for template, text in zip(templates, resolved):
        phrases, drawn = split_phrases(template), split_phrases(text)
        if len(phrases) == len(drawn):
            pairs += [[t, d] for t, d in zip(phrases, drawn) if has_template(t)]
    return pairs
