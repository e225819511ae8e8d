"""LoRA files kept ready to merge after they leave the model, within a memory budget.

The rotation draws a LoRA pair for every image (every batch), and with a learned rotation the
same few files come back again and again. Each time a file was read from disk, parsed against
the model and stacked for the batched merge (lora_stacks.py): 0.49 s of host work for a 456 MB
rank-32 file on two CPU cores, before the card gets any of the merge's work. On the H100 a swap
before one image under CUDA graphs cost 0.99 s, as much as the image. A file kept here is merged straight from its
stacks (pinned when the merge runs on a GPU).

The least recently merged files leave first when the budget (lora.keep_in_memory_mb) is
exceeded; a file that changed on disk or left its folder is dropped at once. Why not
functools.lru_cache or a library: the bound is bytes held, which only the weights know, and the
entries must be dropped by path when the folder changes.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from .lora_files import LoraWeights


class ReadyLoras:
    """Path -> (file signature, LoraWeights, bytes held), least recently merged first."""

    def __init__(self, budget_bytes: int):
        self._kept: OrderedDict[Path, tuple[tuple, LoraWeights, int]] = OrderedDict()
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

    def keep(self, path: Path, signature: tuple, weights: LoraWeights) -> None:
        """Keep (or refresh as most recent) the weights merged from `path` (merged: stacked,
        their size final); the oldest leave while the total is over budget, this one too if it
        alone is."""
        kept = self._kept.get(path)
        if kept is not None and kept[1] is weights:
            self._kept.move_to_end(path)
            return
        self._kept[path] = (signature, weights, weights.held_bytes())
        self._kept.move_to_end(path)
        self._shrink()

    def forget(self, path: Path) -> None:
        self._kept.pop(path, None)

    def held_bytes(self) -> int:
        return sum(size for _, _, size in self._kept.values())

    def paths(self) -> list[Path]:
        """Least recently merged first."""
        return list(self._kept)

    def _shrink(self) -> None:
        total = self.held_bytes()
        while self._kept and total > self._budget:
            _, (_, _, size) = self._kept.popitem(last=False)
            total -= size
