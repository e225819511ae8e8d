"""Prompt text as A1111/Forge (and ComfyUI) users write it -> weighted fragments, split at BREAK.

    (word)          weight x 1.1          [word]     weight / 1.1
    (word:1.3)      weight x 1.3          nesting multiplies: ((word)) = 1.21
    \\( \\) \\[ \\]     literal brackets      BREAK      the next text starts a new 75-token chunk

An unclosed bracket weights everything after it (as A1111 does); a stray closing bracket is kept
as text. No library parses this syntax (compel's own differs: `(word)1.3`, `word++`), so this
small parser is written here; tokenizing, chunking and weighting the embeddings is compel's job
(sdxld/conditioning.py). `plain` syntax reads the text as it is: no weights, no BREAK.

No torch here: the review page and `sdxld status` may import it.
"""

from __future__ import annotations

import re
from typing import Literal

Syntax = Literal["a1111", "plain"]
SYNTAXES: tuple[str, ...] = ("a1111", "plain")
Fragment = tuple[str, float]  # text and its weight

EMPHASIS = 1.1
_TOKEN = re.compile(
    r"""\\[()\[\]\\]            # an escaped bracket or backslash
      | \( | \[                  # openers
      | :\s*([+-]?[\d.]+)\s*\)   # ':1.3)' closes a weighted group
      | \) | \]                  # closers
      | [^\\()\[\]:]+            # plain text
      | [\\:]                    # a lone backslash or colon is text
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_UNESCAPED_BRACKET = re.compile(r"(?<!\\)([()\[\]])")
# `<lora:name:weight>` (A1111, Forge; `lyco:` in older A1111 extensions): names a LoRA to apply,
# never text for the encoder.
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", re.IGNORECASE)


def parse(text: str, syntax: Syntax = "a1111") -> list[list[Fragment]]:
    """The chunks of a prompt (one per BREAK-separated part), each a list of (text, weight)
    with neighbours of equal weight merged; `<lora:...>` tags left out."""
    text = without_lora_tags(text)
    if syntax == "plain":
        return [[(text, 1.0)]]
    chunks: list[list[Fragment]] = [[]]
    weights: list[float] = []  # one entry per fragment, in order across all chunks
    fragments: list[tuple[int, str]] = []  # (chunk index, text)
    open_round: list[int] = []  # index into `fragments` where each open group starts
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for i in range(start, len(weights)):
            weights[i] *= factor

    def add_text(part: str) -> None:
        pieces = _BREAK.split(part)
        for n, piece in enumerate(pieces):
            if n:
                chunks.append([])
            if piece:
                fragments.append((len(chunks) - 1, piece))
                weights.append(1.0)

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            fragments.append((len(chunks) - 1, token[1]))
            weights.append(1.0)
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round and _is_number(weight):
            scale(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            scale(open_round.pop(), EMPHASIS)
        elif token == "]" and open_square:
            scale(open_square.pop(), 1 / EMPHASIS)
        else:
            add_text(token)
    for start in open_round:
        scale(start, EMPHASIS)
    for start in open_square:
        scale(start, 1 / EMPHASIS)

    for (chunk, piece), weight in zip(fragments, weights):
        merged = chunks[chunk]
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return [chunk or [("", 1.0)] for chunk in chunks]


def lora_tags(text: str) -> list[tuple[str, float]]:
    """The `<lora:name:weight>` tags of a prompt as (name, weight); weight 1 when left out."""
    tags = []
    for match in LORA_TAG.finditer(text):
        weight = float(match[2]) if match[2] and _is_number(match[2]) else 1.0
        tags.append((match[1].strip(), weight))
    return tags


def lora_tag(name: str, weight: float) -> str:
    """`<lora:name:weight>` as A1111 writes it (a whole weight without its .0)."""
    return f"<lora:{name}:{int(weight) if float(weight).is_integer() else weight}>"


def without_lora_tags(text: str) -> str:
    if not LORA_TAG.search(text):
        return text
    return tidy_commas(LORA_TAG.sub("", text))


def tidy_commas(text: str) -> str:
    """Phrases re-joined by ', ' after something was cut out of them, without empty ones."""
    return ", ".join(p.strip() for p in text.split(",") if p.strip())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def escape(text: str) -> str:
    """Text with its brackets made literal (`name_(cosplay)` -> `name_\\(cosplay\\)`); brackets
    already escaped stay as they are, so a trigger file written for A1111 reads the same."""
    return _UNESCAPED_BRACKET.sub(r"\\\1", text)


def plain_text(chunk: list[Fragment]) -> str:
    return "".join(piece for piece, _ in chunk)
