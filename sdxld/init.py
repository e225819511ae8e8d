"""`sdxld init DIR [--demo]`: a root of the user's own, outside sdxld's source checkout.

A root holds everything that is the user's: config.yaml, prompts, LoRAs, upscaler weights, the
inbox and the outputs. Keeping it out of the checkout means edits never show up in `git status`
and `git pull` never collides with them. Existing files are never overwritten, so running init
again on a root only fills in what is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

SKELETON = Path(__file__).resolve().parent / "skeleton"
FOLDERS = ("prompts", "prompts/wildcards", "loras/character", "loras/style", "loras/extra", "weights", "inbox/approved", "outputs")

# (kind, name, trigger words, seed). Random deltas on a random model: they change the noise, not
# draw a character, but they rotate, merge, carry triggers into prompts and records like real ones.
DEMO_LORAS = (
    ("character", "alice", "alice_(demo), blonde hair, blue eyes", 101),
    ("character", "kuro", "kuro_(demo), black hair, red eyes", 102),
    ("style", "ink", "ink style, lineart, sketch", 201),
    ("style", "watercolor", "watercolor, soft lighting", 202),
)
EXTRAS = "demo-extras"
EXTRAS_README = """Two more LoRAs, to try what happens when you drop a file into a running sdxld:

  cp demo-extras/oil_painting.safetensors demo-extras/oil_painting.txt loras/style/
      joins the rotation from the next image (its trigger words lead the prompt)

  cp demo-extras/sd15_style.safetensors loras/style/
      a LoRA made for another model (SD1.5 shapes): rejected with the reason, generation goes on;
      see it in `sdxld status` and `sdxld check --demo`
"""


class InitError(Exception):
    """The root cannot be made here; the message says why and what to do instead."""


@dataclass
class InitReport:
    root: Path
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def source_checkout() -> Path | None:
    """sdxld's own source folder when it runs from a checkout (an editable install), else None."""
    folder = Path(__file__).resolve().parent.parent
    if (folder / "pyproject.toml").is_file() and ((folder / ".git").exists() or (folder / "sdxld" / "skeleton").is_dir()):
        return folder
    return None


def check_outside_checkout(folder: Path) -> None:
    checkout = source_checkout()
    if checkout is not None and folder.resolve().is_relative_to(checkout):
        raise InitError(
            f"{folder} is inside sdxld's source folder ({checkout}): your config, prompts and images would "
            f"show up in `git status` and collide with `git pull`. Choose a folder outside it, e.g. "
            f"`sdxld init ~/sdxld`"
        )


def init_root(folder: Path, demo: bool = False) -> InitReport:
    folder = Path(folder).expanduser().absolute()
    check_outside_checkout(folder)
    if folder.exists() and not folder.is_dir():
        raise InitError(f"{folder} exists and is not a folder; choose another path")
    report = InitReport(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in FOLDERS:
            (folder / name).mkdir(parents=True, exist_ok=True)
        for template in sorted(SKELETON.rglob("*")):
            if template.is_file():
                _copy_new(template, folder / template.relative_to(SKELETON), report)
        if demo:
            _write_demo_loras(folder, report)
    except PermissionError as err:
        raise InitError(f"cannot write in {folder} ({err.strerror}); choose a folder you own, e.g. ~/sdxld") from None
    return report


def _copy_new(source: Path, target: Path, report: InitReport) -> None:
    relative = str(target.relative_to(report.root))
    if target.exists():
        report.kept.append(relative)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_new(target, source.read_bytes())
    report.created.append(relative)


def _write_new(target: Path, data: bytes) -> None:
    """Write a file that does not exist yet, never visible half-written (a daemon may be watching)."""
    from .store import atomic_write

    atomic_write(target, data)


def _write_demo_loras(folder: Path, report: InitReport) -> None:
    from .tiny import write_sd15_shaped_lora, write_tiny_lora

    pipe = None
    wanted = [(folder / "loras" / kind, name, triggers, seed) for kind, name, triggers, seed in DEMO_LORAS]
    wanted.append((folder / EXTRAS, "oil_painting", "oil painting, dramatic lighting", 203))
    for where, name, triggers, seed in wanted:
        lora = where / f"{name}.safetensors"
        if lora.exists():
            report.kept.append(str(lora.relative_to(folder)))
        else:
            pipe = pipe or _tiny_pipeline()
            _write_lora(lora, lambda path, seed=seed: write_tiny_lora(path, seed=seed, pipe=pipe))
            report.created.append(str(lora.relative_to(folder)))
        if not (where / f"{name}.txt").exists():
            _write_new(where / f"{name}.txt", f"{triggers}\n".encode())
    other = folder / EXTRAS / "sd15_style.safetensors"
    if other.exists():
        report.kept.append(str(other.relative_to(folder)))
    else:
        _write_lora(other, write_sd15_shaped_lora)
        report.created.append(str(other.relative_to(folder)))
    if not (folder / EXTRAS / "README.txt").exists():
        _write_new(folder / EXTRAS / "README.txt", EXTRAS_README.encode())


def _tiny_pipeline():
    """The tiny model, for the layer names and widths its LoRAs must have (built once, cached)."""
    from .models import quiet_libraries
    from .tiny import ensure_tiny_model

    quiet_libraries()  # before the pipeline's import: it imports torchao, whose notes are not for users
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model()[0])


def _write_lora(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.init.tmp")
    write(temporary)
    os.replace(temporary, target)


def describe(report: InitReport, demo: bool) -> str:
    """What init made, and the command to run next."""
    root = report.root
    home = Path.home()
    shown = f"~/{root.relative_to(home)}" if root.is_relative_to(home) else str(root)
    lines = [f"sdxld root ready: {shown}"]
    if report.created:
        lines.append(f"  created: {', '.join(report.created)}")
    if report.kept:
        lines.append(f"  kept as they were: {', '.join(report.kept)}")
    if demo:
        lines += [
            "  demo LoRAs: loras/character/{alice,kuro}, loras/style/{ink,watercolor} (trigger words in the .txt files);",
            f"  two more to drop in while it runs: {EXTRAS}/README.txt",
            "",
            f"next:  sdxld run --demo --root {shown}",
        ]
    else:
        lines += [
            "",
            f"next:  set model.base in {shown}/config.yaml (a hub id, a .safetensors checkpoint or a diffusers folder),",
            "       put LoRAs in loras/character and loras/style, the upscaler weights in weights/, then",
            f"       sdxld check --root {shown}   and   sdxld run --root {shown}",
        ]
    return "\n".join(lines)
