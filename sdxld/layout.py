"""Every path sdxld touches, derived once from the root and the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Config

# What the piles hold: images another tool made may come as JPEG or WebP.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def state_folder(root: Path) -> Path:
    return Path(root) / ".sdxld"


def status_folder(root: Path) -> Path:
    """Where daemons write their status; a function of the root alone, so `sdxld status` finds it
    without reading (or even being able to parse) config.yaml."""
    return state_folder(root) / "status"


@dataclass(frozen=True)
class Layout:
    root: Path
    outputs: Path
    stage1: Path
    rejected: Path  # stage-1 images the user turned down (the review page's X); kept for learning
    metadata: Path
    final: Path
    intermediates: Path
    inbox: Path
    approved: Path
    processing: Path
    done: Path
    failed: Path
    state: Path  # sdxld's own files: status of each daemon, nothing the user edits
    status: Path
    manual_prompt: Path
    negative_prompt: Path
    prompt_options: Path
    wildcards: Path
    lora_dirs: dict
    upscaler_weights: Path

    @classmethod
    def from_config(cls, config: Config) -> "Layout":
        outputs = config.path(config.output.dir)
        inbox = config.root / "inbox"
        return cls(
            root=config.root,
            outputs=outputs,
            stage1=outputs / "stage1",
            rejected=outputs / "rejected",
            metadata=outputs / "metadata",
            final=outputs / "final",
            intermediates=outputs / "intermediates",
            inbox=inbox,
            approved=inbox / "approved",
            processing=inbox / "processing",
            done=inbox / "done",
            failed=inbox / "failed",
            state=state_folder(config.root),
            status=status_folder(config.root),
            manual_prompt=config.path(config.prompts.manual_prompt),
            negative_prompt=config.path(config.prompts.negative_prompt),
            prompt_options=config.path(config.prompts.options),
            wildcards=config.path(config.prompts.wildcards),
            lora_dirs={
                "character": config.path(config.lora.character_dir),
                "style": config.path(config.lora.style_dir),
                "extra": config.path(config.lora.extra_dir),
            },
            upscaler_weights=config.path(config.upscaler.weights),
        )

    def piles(self) -> dict[str, Path]:
        """The folders an image can be in, from made to finished: where it is says what the user
        thought of it (taste.py) and what the review page shows."""
        return {
            "stage1": self.stage1, "rejected": self.rejected, "approved": self.approved,
            "processing": self.processing, "done": self.done, "failed": self.failed, "final": self.final,
        }

    def intermediate(self, kind: str) -> Path:
        """One of generate.py's intermediate folders: stage2_up, stage2, stage3_up, tiles."""
        return self.intermediates / kind

    def ensure_output_dirs(self) -> None:
        for folder in (self.stage1, self.metadata, self.final):
            folder.mkdir(parents=True, exist_ok=True)
