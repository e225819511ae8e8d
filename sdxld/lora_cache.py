"""LoRA files kept ready to merge after they leave the model, within a memory budget.

The rotation draws a LoRA pair for every image (every batch), and with a learned rotation the
same few files come back again and again. Each time a file was read from disk, parsed against
the model and stacked for the batched merge (lora_stacks.py): 0.49 s of host work for a 456 MB
rank-32 file on two CPU cores, before the card gets any of the merge's work. On the H100 a swap
before one image under CUDA graphs cost 0.99 s, as much as the image. A file kept here is merged
straight from its stacks (pinned when the merge runs on a GPU).

The files merged now are held by the merge anyway; of the others, the least recently merged
leave first when they hold more than the budget (lora.keep_in_memory_mb); a file that changed on
disk or left its folder is dropped at once. The files the next batch will draw are read into it
while the card runs the batch before (Engine._ready_next_loras). Why not functools.lru_cache or a
library: the bound is bytes held, which only the weights know, and the entries must be dropped by
path when the folder changes.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from .lora_files import LoraWeights


class ReadyLoras:
    """Path -> (file signature, LoraWeights, bytes held), least recently merged first. The files
    merged now are held by the merge anyway: the budget is for the others."""

    def __init__(self, budget_bytes: int):
        self._kept: OrderedDict[Path, tuple[tuple, LoraWeights, int]] = OrderedDict()
        self._in_use: set[Path] = set()
        self._budget = budget_bytes

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        self._budget = value
        self._shrink()

    def get(self, path: Path, signature: tuple) -> LoraWeights | None:
        """The weights read from this very file (same signature), or None."""
        kept = self._kept.get(path)
        if kept is None or kept[0] != signature:
            return None
        return kept[1]

    def merged_now(self, files: dict[Path, tuple[tuple, LoraWeights]]) -> None:
        """The files merged into the model now (path -> signature, weights; merged: stacked,
        their size final): kept as the most recent; of the others the oldest leave while they
        hold more than the budget."""
        for path, (signature, weights) in files.items():
            self._newest(path, signature, weights)
        self._in_use = set(files)
        self._shrink()

    def keep(self, path: Path, signature: tuple, weights: LoraWeights) -> None:
        """A file read ahead of its merge (stacked: its size final), kept as the most recent."""
        self._newest(path, signature, weights)
        self._shrink()

    def _newest(self, path: Path, signature: tuple, weights: LoraWeights) -> None:
        kept = self._kept.get(path)
        if kept is None or kept[1] is not weights:
            self._kept[path] = (signature, weights, weights.held_bytes())
        self._kept.move_to_end(path)

    def forget(self, path: Path) -> None:
        self._kept.pop(path, None)
        self._in_use.discard(path)

    def held_bytes(self) -> int:
        """What the files kept but not merged now hold (the budget's measure)."""
        return sum(size for path, (_, _, size) in self._kept.items() if path not in self._in_use)

    def paths(self) -> list[Path]:
        """Every file kept, merged now or not, least recently merged first."""
        return list(self._kept)

    def _shrink(self) -> None:
        total = self.held_bytes()
        for path in [path for path in self._kept if path not in self._in_use]:
            if total <= self._budget:
                break
            total -= self._kept.pop(path)[2]
