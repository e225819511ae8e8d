"""Records for approved images that sdxld did not make: A1111/Forge images, captioned and bare ones.

A Record is what stages 2-3 need: prompt, negative, seed, sampler and LoRAs. An image from another
tool brings what it has, read in this order:

  1. A1111/Forge `parameters`: a PNG text chunk, or the EXIF UserComment of a JPEG/WebP
     (prompt, negative, seed, steps, sampler, CFG, `<lora:name:weight>` tags and Lora hashes
     matched against the LoRA folders);
  2. a caption `<stem>.txt` beside the image (the prompt only);
  3. nothing: `upscale.unknown_images: manual_prompt` upscales with the manual prompt (`fail`
     sends the image to failed/).

What the image lacks comes from the current config and prompt files, and a fresh seed is drawn
and recorded. The size is the image's own, whatever its `Size` says (A1111 writes the size
before its hires fix). `record.origin` says where each field came from, for the final's record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import store
from .prompt_syntax import lora_tags
from .records import CAPTION_SUFFIX, LORA_FOLDERS, ROTATED_KINDS, LoraUse, Record, parse_a1111

PARAMETERS_CHUNK = "parameters"
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
MAX_CAPTION_BYTES = 100_000


@dataclass
class Defaults:
    """What sdxld fills in where the image says nothing: the current settings and prompt files."""

    prompt: str
    negative: str
    sampler: str
    steps: int
    cfg: float
    model: dict
    seed: int  # drawn fresh for this image
    syntax: str  # prompts.syntax, for text that did not come from A1111


def record_for(path: Path, size: tuple[int, int], sidecar: Path | None, defaults: Defaults, loras,
               unknown_images: str) -> Record | None:
    """A record for another tool's image, from the best source it has; None when it has none and
    `unknown_images` is fail."""
    found = embedded_parameters(path)
    if found is not None:
        return record_from_parameters(*found, size, defaults, loras)
    caption = caption_beside(path, sidecar)
    if caption is not None:
        text = caption.read_bytes()[:MAX_CAPTION_BYTES].decode("utf-8", errors="replace")
        return record_from_caption(text, f"the caption {caption.name.rsplit('__', 1)[-1]}", size, defaults)
    if unknown_images == "manual_prompt":
        return record_from_nothing(size, defaults)
    return None


def embedded_parameters(path: Path) -> tuple[str, str] | None:
    """(A1111 parameters text, where it was found) from a PNG chunk or JPEG/WebP EXIF, or None."""
    from PIL import Image

    with Image.open(path) as image:
        text = getattr(image, "text", {}).get(PARAMETERS_CHUNK) if image.format == "PNG" else None
        if text:
            return text, "A1111 parameters (PNG text)"
        comment = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    text = decode_user_comment(comment) if comment else None
    return (text, f"A1111 parameters (EXIF UserComment of the {path.suffix.lstrip('.').upper()})") if text else None


def decode_user_comment(value: bytes | str) -> str | None:
    """EXIF UserComment: an 8-byte character-code prefix, then the text (A1111 writes UNICODE,
    big-endian UTF-16; some tools write little-endian)."""
    if isinstance(value, str):
        return value.strip("\x00").strip() or None
    prefix, body = value[:8], value[8:]
    if prefix == b"UNICODE\x00":
        # The text is mostly ASCII: a zero high byte first means big-endian.
        encoding = "utf-16-be" if body[:1] == b"\x00" else "utf-16-le"
        text = body.decode(encoding, errors="replace")
    elif prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        text = body.decode("utf-8", errors="replace")
    else:
        text = value.decode("utf-8", errors="replace")
    return text.strip("\x00").strip() or None


def caption_beside(path: Path, sidecar: Path | None = None) -> Path | None:
    candidate = sidecar if sidecar is not None and sidecar.suffix == CAPTION_SUFFIX else path.with_suffix(CAPTION_SUFFIX)
    return candidate if candidate.is_file() else None


def record_from_parameters(text: str, where: str, size: tuple[int, int], defaults: Defaults, loras) -> Record:
    values = parse_a1111(text)
    origin = {}
    record = _fresh_record(size, defaults, origin)
    # The prompt as written, tags included (encoding skips them; A1111 shows them).
    record.prompt, origin["prompt"] = values["prompt"], where
    tags = lora_tags(values["prompt"])
    if "negative" in values and values["negative"]:
        record.negative, origin["negative"] = values["negative"], where
    seed = _int(values.get("Seed"))
    if seed is not None and 0 <= seed < 2**64:
        record.seed, origin["seed"] = seed, where
    steps = _int(values.get("Steps"))
    if steps is not None and 1 <= steps <= 1000:
        record.steps, origin["steps"] = steps, where
    cfg = _float(values.get("CFG scale"))
    if cfg is not None and 0 <= cfg <= 100:
        record.cfg, origin["cfg"] = cfg, where
    sampler = _known_sampler(values.get("Sampler"), values.get("Schedule type"))
    if sampler:
        record.sampler, origin["sampler"] = sampler, where
    elif values.get("Sampler"):
        origin["sampler"] = f"config (the image's sampler {values['Sampler']!r} is not one sdxld has)"
    if values.get("Model"):
        record.model = {**record.model, "made_with": values["Model"]}
    rotated = lora_tags(values.get("rotated loras", ""))
    record.loras, origin["loras"] = _match_loras(rotated, tags, values.get("Lora hashes", ""), loras, where)
    if values.get("Size") and values["Size"] != f"{size[0]}x{size[1]}":
        origin["size"] = f"the image itself (its parameters say {values['Size']}: the size before a hires fix or a resize)"
    record.prompt_syntax = "a1111"  # the text came from A1111 or Forge: its weights mean what they meant there
    return record


def record_from_caption(caption: str, where: str, size: tuple[int, int], defaults: Defaults) -> Record:
    origin = {}
    record = _fresh_record(size, defaults, origin)
    record.prompt, origin["prompt"] = " ".join(caption.split()), where
    return record


def record_from_nothing(size: tuple[int, int], defaults: Defaults) -> Record:
    return _fresh_record(size, defaults, {})


def _fresh_record(size: tuple[int, int], defaults: Defaults, origin: dict) -> Record:
    origin.update({
        "prompt": "the manual prompt file", "negative": "the negative prompt file", "seed": "drawn fresh by sdxld",
        "steps": "config", "cfg": "config", "sampler": "config", "loras": "none", "size": "the image itself",
    })
    return Record(
        tag=store.new_tag(),
        prompt=defaults.prompt,
        negative=defaults.negative,
        seed=defaults.seed,
        width=size[0],
        height=size[1],
        sampler=defaults.sampler,
        steps=defaults.steps,
        cfg=defaults.cfg,
        model=dict(defaults.model),
        prompt_syntax=defaults.syntax,
        origin=origin,
    )


def _match_loras(rotated, tags, hashes_text: str, loras, where: str) -> tuple[list[LoraUse], str]:
    """The image's LoRAs found in our folders (by name, or by A1111's short hash): `rotated`, the
    tag line sdxld writes for its rotated pair, and the prompt's own `<lora:>` tags."""
    if not rotated and not tags:
        return [], "none"
    hashes = dict(item.split(":", 1) for item in hashes_text.split(",") if ":" in item)
    hashes = {name.strip(): value.strip() for name, value in hashes.items()}
    available = [entry for kind in LORA_FOLDERS for entry in loras.available(kind)]
    uses, missing, rotated_kinds = [], [], set()
    for came, tag_list in (("rotation", rotated), ("tag", tags)):
        for name, weight in tag_list:
            wanted_hash = hashes.get(name)
            entry = next((e for e in available if e.name == name), None) or next(
                (e for e in available if wanted_hash and e.hash == wanted_hash), None)
            if entry is None or not -4 <= weight <= 4:
                missing.append(name)
                continue
            # A rotated LoRA since moved to another folder still applies, as if tagged.
            via = "rotation" if came == "rotation" and entry.kind in set(ROTATED_KINDS) - rotated_kinds else "tag"
            if via == "rotation":
                rotated_kinds.add(entry.kind)
            uses.append(LoraUse(entry.kind, entry.name, entry.path.name, weight, entry.hash, entry.triggers, via))
    origin = where if uses else "none"
    if missing:
        origin += f"; not found in loras/: {', '.join(missing)}"
    return uses, origin


def _known_sampler(name: str | None, schedule: str | None) -> str | None:
    from .config import SAMPLERS

    if not name:
        return None
    for candidate in (f"{name} {schedule}" if schedule else None, name):
        if candidate in SAMPLERS:
            return candidate
    return None


def _int(value) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        return float(str(value).strip())
    except (TypeError, ValueError):
        return None
