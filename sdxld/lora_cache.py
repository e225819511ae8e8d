"""LoRA files kept ready to merge after they leave the model, within a memory budget.

The rotation draws a LoRA pair for every image (every batch), and with a learned rotation the
same few files come back again and again. Each time a file was read from disk, parsed against
the model and stacked for the batched merge (lora_stacks.py): 0.45 s of host work for a 456 MB
rank-32 file on two CPU cores, while the card waited. On the H100 a swap before one image under
CUDA graphs cost 0.99 s, as much as the image. A file kept here is merged straight from its
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
    """Path -> (file signature, LoraWeights), least recently merged first."""

    def __init__(self, budget_bytes: int):
        self._kept: OrderedDict[Path, tuple[tuple, LoraWeights]] = OrderedDict()
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
        """Keep (or refresh as most recent) the weights merged from `path`; the oldest leave
        while the total is over budget, this one too if it alone is."""
        self._kept[path] = (signature, weights)
        self._kept.move_to_end(path)
        self._shrink()

    def forget(self, path: Path) -> None:
        self._kept.pop(path, None)

    def held_bytes(self) -> int:
        return sum(weights.held_bytes() for _, weights in self._kept.values())

    def paths(self) -> list[Path]:
        """Least recently merged first."""
        return list(self._kept)

    def _shrink(self) -> None:
        sizes = {path: weights.held_bytes() for path, (_, weights) in self._kept.items()}
        total = sum(sizes.values())
        while self._kept and total > self._budget:
            path, _ = self._kept.popitem(last=False)
            total -= sizes[path]
