"""Which LoRAs and prompt options the next image gets: uniformly, or learned from approvals.

Learned rotation is Thompson sampling over each arm's Beta(1 + approved, 1 + rejected) posterior,
in its probability-matching form: an arm is drawn with the probability that it is the best arm,
P(best) = ∫ pdf_i(x) ∏_{j≠i} cdf_j(x) dx, computed on a grid instead of by sampling the
posteriors. The draw is the same (Thompson sampling picks each arm with exactly that probability),
but the odds are numbers the record can keep: an image can be explained ("kuro had 41%") and, from
the same counts, drawn again. Mixed in is a uniform floor `explore`, so every arm keeps being
tried however far behind it falls; an arm with no verdicts yet has the Beta(1, 1) prior, mean 1/2,
above the approval rate of almost any arm with data, so new LoRAs and options start optimistic.

The draws use the image's own random generator (from its seed), one `random()` per pick. While no
arm has data the odds are equal and the draw is the uniform one (`choice`/`sample`), so learning
that has nothing to learn from makes exactly the images uniform rotation makes.
"""

from __future__ import annotations

import collections
import functools
import random
from dataclasses import dataclass

import numpy as np

from .records import ROTATED_KINDS

GRID = 2048
_X = (np.arange(GRID) + 0.5) / GRID
_LOG_X, _LOG_1MX = np.log(_X), np.log1p(-_X)


def best_arm_odds(counts: list[tuple[int, int]]) -> list[float]:
    """P(arm i has the highest approval rate) under independent Beta(1 + a, 1 + r) posteriors."""
    return list(_best_arm_odds(tuple(counts)))


# The counts change when the user curates, not from one draw to the next: a batch's character,
# style and option draws, and the next batch's look-ahead, mostly ask for the same odds again.
@functools.lru_cache(maxsize=32)
def _best_arm_odds(counts: tuple[tuple[int, int], ...]) -> tuple[float, ...]:
    """Arms with the same counts have the same posterior, so the integral runs once per distinct
    (approved, rejected) pair, the m arms of a pair entering as the m-th power of its CDF: a
    library of 1,000 LoRAs without verdicts is one grid row instead of 1,000 (80 ms a draw before,
    with the card idle until the batch's LoRA swap)."""
    if len(counts) <= 1:
        return (1.0,) * len(counts)
    members_of = collections.Counter(counts)
    distinct = sorted(members_of)
    members = np.array([members_of[pair] for pair in distinct], dtype=np.float64)[:, None]
    approved = np.array([a for a, _ in distinct], dtype=np.float64)[:, None]
    rejected = np.array([r for _, r in distinct], dtype=np.float64)[:, None]
    log_pdf = approved * _LOG_X + rejected * _LOG_1MX
    mass = np.exp(log_pdf - log_pdf.max(axis=1, keepdims=True))
    mass /= mass.sum(axis=1, keepdims=True)
    # Below x, counting half of a tie in x's own cell: posteriors on the same cell share it.
    below = np.cumsum(mass, axis=1) - mass / 2
    # For an arm of pair g, the other arms: the rest of its own pair, and every other pair's arms,
    # ∏_{h≠g} below_h^m_h without dividing by below_g (which can be 0): prefix and suffix products.
    others = below ** members
    ones = np.ones((1, GRID))
    prefix = np.cumprod(np.vstack([ones, others[:-1]]), axis=0)
    suffix = np.cumprod(np.vstack([ones, others[:0:-1]]), axis=0)[::-1]
    best = (mass * below ** (members - 1) * prefix * suffix).sum(axis=1)
    per_pair = dict(zip(distinct, best / (best * members[:, 0]).sum()))
    return tuple(float(per_pair[pair]) for pair in counts)


def mixed_odds(counts: list[tuple[int, int]], explore: float) -> list[float]:
    """The odds an arm is drawn with: `explore` spread evenly, the rest by P(best)."""
    if not counts:
        return []
    floor = explore / len(counts)
    return [floor + (1 - explore) * p for p in best_arm_odds(counts)]


def draw(rng: random.Random, odds: list[float]) -> int:
    """An index drawn with these odds, from one number of `rng`."""
    u = rng.random() * sum(odds)
    for index, weight in enumerate(odds):
        u -= weight
        if u < 0:
            return index
    return len(odds) - 1


@dataclass
class Arms:
    """One draw's arms with the counts and odds it used: what the record keeps."""

    names: list[str]
    counts: list[tuple[int, int]]
    odds: list[float]
    explore: float

    @property
    def uniform(self) -> bool:
        return len(set(self.counts)) <= 1

    def pick(self, rng: random.Random) -> int:
        return rng.choice(range(len(self.names))) if self.uniform else draw(rng, self.odds)

    def sample(self, rng: random.Random, count: int) -> list[int]:
        """`count` different arms: each drawn with the odds of those not drawn yet."""
        if self.uniform:
            return rng.sample(range(len(self.names)), count)
        left = list(range(len(self.names)))
        chosen = []
        for _ in range(count):
            index = left.pop(draw(rng, [self.odds[i] for i in left]))
            chosen.append(index)
        return chosen

    def to_record(self) -> dict:
        """Arms with verdicts as [name, approved, rejected, odds]; arms without any share one
        odds value (with the same files, the counts are all a later draw needs)."""
        judged = [[n, a, r, round(p, 6)] for n, (a, r), p in zip(self.names, self.counts, self.odds) if a or r]
        untried = next((round(p, 6) for (a, r), p in zip(self.counts, self.odds) if not a and not r), None)
        return {"explore": self.explore, "arms": len(self.names), "judged": judged, "untried": untried}


def arms(names: list[str], counts: dict[str, tuple[int, int]], explore: float) -> Arms:
    listed = [counts.get(name, (0, 0)) for name in names]
    return Arms(list(names), listed, mixed_odds(listed, explore), explore)


def counts_from_record(section: dict) -> dict[str, tuple[int, int]]:
    """The counts a record's draw used (`Arms.to_record`), to draw its image again."""
    return {name: (int(a), int(r)) for name, a, r, _ in section.get("judged", [])}


class Rotation:
    """The draws of one root: `lora.rotation` / `prompts.rotation` say uniform or learned, the
    ledger (taste.py) supplies the counts. `replay` draws again with the counts a record kept."""

    def __init__(self, config, ledger=None, replay: dict | None = None):
        self.ledger = ledger
        self.replay = replay
        self.configure(config)

    def configure(self, config) -> None:
        self.learned = {"character": config.lora.rotation == "learned", "style": config.lora.rotation == "learned",
                        "option": config.prompts.rotation == "learned"}
        self.explore = {"character": config.lora.explore, "style": config.lora.explore, "option": config.prompts.explore}

    @property
    def any_learned(self) -> bool:
        return any(self.learned.values())

    def describe(self) -> str:
        """What learns: 'LoRAs and prompt options', 'LoRAs', 'prompt options' or 'off'."""
        learned = [what for what, on in (("LoRAs", self.learned["character"]), ("prompt options", self.learned["option"])) if on]
        return " and ".join(learned) or "off"

    def _arms(self, group: str, names: list[str]) -> Arms | None:
        if self.replay is not None:
            section = self.replay.get(group)
            return arms(names, counts_from_record(section), section["explore"]) if section else None
        if not self.learned[group] or self.ledger is None:
            return None
        return arms(names, self.ledger.counts(group), self.explore[group])

    def pick_loras(self, rng: random.Random, library, kept: dict) -> list:
        """One loaded LoRA of each rotated kind (a kind with none is absent); the learned draws'
        counts and odds go into `kept` (the record's `rotation`)."""
        chosen = []
        for kind in ROTATED_KINDS:
            pool = library.available(kind)
            if not pool:
                continue
            drawn = self._arms(kind, [entry.name for entry in pool])
            if drawn is None:
                chosen.append(rng.choice(pool))
                continue
            chosen.append(pool[drawn.pick(rng)])
            kept[kind] = drawn.to_record()
        return chosen

    def option_chooser(self, kept: dict):
        """`choose(rng, pool, count)` for PromptSource.compose: which prompt options an image gets."""
        def choose(rng: random.Random, pool: list[str], count: int) -> list[str]:
            drawn = self._arms("option", pool) if pool else None
            if drawn is None:
                return rng.sample(pool, count)
            kept["option"] = drawn.to_record()
            return [pool[i] for i in drawn.sample(rng, count)]

        return choose
