"""What users of the original generate.py bring along: its config.yaml keys and its metadata JSON.

sdxld renamed a few settings when it grew stages and samplers (stage 1's steps now live under
generation.t2i, the ESRGAN settings under upscaler, compile_unet became compile with modes).
A config written for generate.py is read anyway: each old key is mapped to its new name, with one
warning that lists every mapping, and `sdxld config migrate` rewrites the file. Only keys that
neither program knows are errors.

Likewise an image approved with generate.py's metadata JSON beside it (or in outputs/metadata/)
is upscaled: the old fields are mapped to a Record.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .records import LoraUse, Record, RecordError


@dataclass(frozen=True)
class KeyMapping:
    old: str  # dotted key as generate.py's config.yaml has it
    new: str  # dotted key in sdxld's config.yaml
    convert: Callable[[Any], Any] | None = None

    def describe(self, value: Any) -> str:
        if self.convert is None:
            return f"{self.old} -> {self.new}"
        return f"{self.old}: {value!r} -> {self.new}: {self.convert(value)!r}"


def _compile_mode(value: Any) -> Any:
    return "full" if value is True else "off" if value is False else value


def _attention(value: Any) -> Any:
    return "xformers" if value is True else "sdpa" if value is False else value


_STAGE_ALIASES = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg",
    "cfg_scale": "cfg",
    "denoising_end": "denoise_split",
    "high_noise_frac": "denoise_split",
    "refiner_split": "denoise_split",
    "denoising_split": "denoise_split",
    "denoising_strength": "strength",
    "img2img_strength": "strength",
    "overlap": "tile_overlap",
    "blend": "blend_mode",
}


def _mappings() -> list[KeyMapping]:
    maps = [
        KeyMapping("performance.compile_unet", "performance.compile", _compile_mode),
        KeyMapping("performance.use_xformers", "performance.attention", _attention),
        KeyMapping("performance.enable_xformers", "performance.attention", _attention),
        KeyMapping("memory.enable_vae_slicing", "memory.vae_slicing"),
        KeyMapping("memory.enable_vae_tiling", "memory.vae_tiling"),
        KeyMapping("lora.character_folder", "lora.character_dir"),
        KeyMapping("lora.style_folder", "lora.style_dir"),
        KeyMapping("generation.steps", "generation.t2i.steps"),
        KeyMapping("generation.num_inference_steps", "generation.t2i.steps"),
        KeyMapping("generation.cfg", "generation.t2i.cfg"),
        KeyMapping("generation.guidance_scale", "generation.t2i.cfg"),
        KeyMapping("generation.cfg_scale", "generation.t2i.cfg"),
        KeyMapping("generation.denoise_split", "generation.t2i.denoise_split"),
        KeyMapping("generation.denoising_end", "generation.t2i.denoise_split"),
        KeyMapping("generation.high_noise_frac", "generation.t2i.denoise_split"),
        KeyMapping("generation.refiner_split", "generation.t2i.denoise_split"),
        KeyMapping("generation.scheduler", "generation.sampler", lambda v: "UniPC" if str(v).lower().startswith("unipc") else v),
        KeyMapping("output.output_dir", "output.dir"),
        KeyMapping("output.intermediates", "output.save_intermediates"),
    ]
    for key in ("steps", "cfg", "denoise_split"):
        maps.append(KeyMapping(f"generation.stage1.{key}", f"generation.t2i.{key}"))
    for old, new in _STAGE_ALIASES.items():
        maps.append(KeyMapping(f"generation.stage1.{old}", f"generation.t2i.{new}"))
        for stage in ("stage2", "stage3"):
            maps.append(KeyMapping(f"generation.{stage}.{old}", f"generation.{stage}.{new}"))
    for section in ("esrgan", "upscale"):
        maps += [
            KeyMapping(f"{section}.weights", "upscaler.weights"),
            KeyMapping(f"{section}.model_path", "upscaler.weights"),
            KeyMapping(f"{section}.weights_path", "upscaler.weights"),
            KeyMapping(f"{section}.tile", "upscaler.tile"),
            KeyMapping(f"{section}.tile_size", "upscaler.tile"),
            KeyMapping(f"{section}.pad", "upscaler.pad"),
            KeyMapping(f"{section}.tile_pad", "upscaler.pad"),
        ]
    maps += [KeyMapping("upscaler.tile_size", "upscaler.tile"), KeyMapping("upscaler.tile_pad", "upscaler.pad"),
             KeyMapping("upscaler.model_path", "upscaler.weights")]
    return maps


SEED_KEYS = {mapping.old: mapping for mapping in _mappings()}


def _pop(data: dict, dotted: str) -> tuple[bool, Any]:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False, None
    if leaf not in node:
        return False, None
    return True, node.pop(leaf)


def _has(data: dict, dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _put(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def _drop_empty_sections(data: dict) -> None:
    for key in [k for k, v in data.items() if isinstance(v, dict)]:
        _drop_empty_sections(data[key])
        if not data[key]:
            del data[key]


def migrate_config(data: Any) -> tuple[Any, list[str]]:
    """generate.py's keys renamed to sdxld's: (new data, one line per mapping applied).

    A new key that is also given wins over its old name (the line says the old one was ignored)."""
    if not isinstance(data, dict):
        return data, []
    data = copy.deepcopy(data)
    applied = []
    for old, mapping in SEED_KEYS.items():
        found, value = _pop(data, old)
        if not found:
            continue
        if _has(data, mapping.new):
            applied.append(f"{old} ignored: {mapping.new} is set too")
            continue
        _put(data, mapping.new, mapping.convert(value) if mapping.convert else value)
        applied.append(mapping.describe(value))
    _drop_empty_sections(data)
    return data, applied


# --- generate.py's metadata JSON ------------------------------------------------------------------


def is_seed_metadata(data: Any) -> bool:
    """sdxld records always carry 'format'; generate.py's metadata never did."""
    return isinstance(data, dict) and "format" not in data and "prompt" in data and "seed" in data


def _first(data: dict, *keys: str, default: Any = None) -> Any:
    for key in keys:
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return default


def _lora(data: dict, kind: str, default_strength: float) -> LoraUse | None:
    entry = _first(data, f"loras.{kind}", f"{kind}_lora", f"lora.{kind}", f"{kind}")
    strength = _first(data, f"{kind}_strength", f"{kind}_lora_strength", f"lora.{kind}_strength", default=default_strength)
    triggers = ""
    if isinstance(entry, dict):
        strength = entry.get("strength", entry.get("weight", strength))
        triggers = entry.get("triggers", entry.get("trigger_words", "")) or ""
        entry = entry.get("file") or entry.get("path") or entry.get("name")
    if not isinstance(entry, str) or not entry.strip():
        return None
    file = Path(entry.replace("\\", "/")).name
    name = file
    for suffix in (".safetensors", ".safetensor"):
        name = name.removesuffix(suffix)
    if isinstance(triggers, list):
        triggers = ", ".join(str(t) for t in triggers)
    return LoraUse(kind, name, file, float(strength), "", str(triggers))


def record_from_seed_metadata(data: dict, tag: str | None, image_size: tuple[int, int] | None) -> Record:
    """A Record from generate.py's metadata: prompt, seed, size, stage-1 settings and the two LoRAs.

    The tag comes from the file name when the JSON has none; the size from the image when the
    JSON has none."""
    tag = _first(data, "tag", "timestamp", default=tag)
    if not isinstance(tag, str) or not tag:
        raise RecordError("generate.py metadata without a timestamp, and the file name holds none")
    size = _first(data, "size", "resolution")
    width = _first(data, "width", "base_width", "stage1.width", "generation.base_width")
    height = _first(data, "height", "base_height", "stage1.height", "generation.base_height")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        width, height = size
    elif isinstance(size, str) and "x" in size:
        width, height = (int(v) for v in size.lower().split("x", 1))
    if (width is None or height is None) and image_size:
        width, height = image_size
    use_refiner = _first(data, "use_refiner", "model.use_refiner", "stage1.use_refiner", default=False)
    split = _first(data, "denoise_split", "denoising_end", "high_noise_frac", "refiner_split", "stage1.denoise_split",
                   "stage1.denoising_end", default=0.8)
    loras = [use for use in (_lora(data, "character", 1.0), _lora(data, "style", 0.85)) if use is not None]
    model = _first(data, "model", "base_model", "model.base")
    values = {
        "tag": tag,
        "prompt": _first(data, "prompt", "positive_prompt", default=""),
        "negative": _first(data, "negative_prompt", "negative", default=""),
        "seed": _first(data, "seed"),
        "width": width,
        "height": height,
        "sampler": "UniPC",  # generate.py used UniPC for every stage
        "steps": _first(data, "steps", "num_inference_steps", "stage1.steps", "stage1.num_inference_steps", default=30),
        "cfg": _first(data, "cfg", "guidance_scale", "cfg_scale", "stage1.cfg", "stage1.guidance_scale", default=8.0),
        "model": {"base": model if isinstance(model, str) else "", "from": "generate.py"},
        "refiner_split": float(split) if use_refiner else None,
        "loras": loras,
        "created": str(_first(data, "created", "datetime", default="")),
    }
    for key in ("seed", "width", "height", "steps"):
        if not isinstance(values[key], int) or isinstance(values[key], bool):
            raise RecordError(f"generate.py metadata: field {key!r} is {values[key]!r}, not a whole number")
    return Record.from_dict(values)


def migrate_file(path: Path) -> tuple[list[str], Path | None]:
    """Rewrite a config.yaml that uses generate.py's key names with sdxld's names.

    The original is kept beside it (config.yaml.generate-py), the new file is checked before it
    replaces the old one, and is written atomically. Returns the mappings and the backup's path
    (no backup and no write when nothing needed mapping)."""
    import yaml

    from . import store
    from .config import from_dict

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    data, mapped = migrate_config(yaml.safe_load(text))
    if not mapped:
        return [], None
    from_dict(data, path.parent, path)  # raises ConfigError: nothing is written
    backup = path.with_name(path.name + ".generate-py")
    store.atomic_write(backup, text.encode("utf-8"))
    header = "# Migrated from generate.py's key names by `sdxld config migrate`; the original is in " + backup.name + "\n"
    store.atomic_write(path, (header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)).encode("utf-8"))
    return mapped, backup
