"""Learned vs uniform rotation against a simulated curator, and the ledger's load time.

    python bench/taste.py [--images 2000] [--runs 5] [--lag 20] [--records 100000] [--cold]

1. A curator with hidden preferences judges every image: one character + style pair is approved
   60 % of the time, every other pair 10 %; some prompt options raise or lower that. The rotation
   code sdxld runs (sdxld.rotation.Rotation) draws 4 character LoRAs, 4 style LoRAs and 0-3 of 8
   options per image from the image's seed, learning from the verdicts given so far (the curator
   judges each image `--lag` images after it was made, as a person curating in batches does).
   No diffusion: only the draws. Prints the approval rate of learned vs uniform rotation and the
   share of the least-drawn arm of each kind.
2. `--records N` writes N records into a temporary outputs/metadata and times Ledger.load()
   with the page cache warm; `--cold` also times it after dropping the page cache (root only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdxld.config import Config  # noqa: E402
from sdxld.rotation import Rotation  # noqa: E402

CHARACTERS = [f"character{i}" for i in range(4)]
STYLES = [f"style{i}" for i in range(4)]
OPTIONS = [f"option{i}" for i in range(8)]
LIKED_PAIR = ("character2", "style1")
OPTION_EFFECT = {"option0": 1.5, "option1": 1.3, "option6": 0.6, "option7": 0.5}
MAX_EXTRAS = 3


def approval_chance(character: str, style: str, options: list[str]) -> float:
    chance = 0.6 if (character, style) == LIKED_PAIR else 0.1
    for option in options:
        chance *= OPTION_EFFECT.get(option, 1.0)
    return min(chance, 0.95)


@dataclass
class Lora:
    name: str


class Library:
    """What Rotation needs of a LoraLibrary: the loaded LoRAs of a kind."""

    pools = {"character": [Lora(n) for n in CHARACTERS], "style": [Lora(n) for n in STYLES]}

    def available(self, kind: str):
        return self.pools[kind]


class Verdicts:
    """What Rotation needs of a Ledger: approved/rejected per arm."""

    def __init__(self):
        self.table = defaultdict(lambda: [0, 0])

    def counts(self, group: str):
        return {arm: tuple(tally) for (g, arm), tally in self.table.items() if g == group}

    def judge(self, arms: dict, approved: bool) -> None:
        for group, names in arms.items():
            for name in names:
                self.table[group, name][0 if approved else 1] += 1


def simulate(mode: str, images: int, lag: int, run: int) -> tuple[float, Counter]:
    config = Config()
    config.lora.rotation = config.prompts.rotation = mode
    verdicts = Verdicts()
    rotation = Rotation(config, verdicts)
    library, curator = Library(), random.Random(10_000 + run)
    waiting: deque = deque()
    approved, drawn = 0, Counter()
    for n in range(images):
        rng = random.Random(run * 1_000_003 + n)  # the image's seed
        character, style = (entry.name for entry in rotation.pick_loras(rng, library, {}))
        count = rng.randint(0, MAX_EXTRAS)
        options = rotation.option_chooser({})(rng, OPTIONS, count)
        drawn.update([("character", character), ("style", style)] + [("option", o) for o in options])
        verdict = curator.random() < approval_chance(character, style, options)
        approved += verdict
        waiting.append(({"character": [character], "style": [style], "option": options}, verdict))
        if len(waiting) > lag:
            verdicts.judge(*waiting.popleft())
    return approved / images, drawn


def least_share(drawn: Counter, kind: str, names: list[str]) -> tuple[str, float]:
    total = sum(drawn[kind, name] for name in names)
    name = min(names, key=lambda n: drawn[kind, n])
    return name, drawn[kind, name] / total


def bench_rotation(images: int, runs: int, lag: int) -> None:
    rates = {"uniform": [], "learned": []}
    started = time.perf_counter()
    pooled, per_run = Counter(), {"character": [], "style": [], "option": []}
    kinds = (("character", CHARACTERS), ("style", STYLES), ("option", OPTIONS))
    for run in range(runs):
        for mode in rates:
            rate, drawn = simulate(mode, images, lag, run)
            rates[mode].append(rate)
            if mode == "learned":
                pooled.update(drawn)
                for kind, names in kinds:
                    per_run[kind].append(least_share(drawn, kind, names)[1])
    seconds = time.perf_counter() - started
    uniform, learned = (sum(rates[m]) / runs for m in ("uniform", "learned"))
    print(f"rotation: {runs} runs x {images} images, 4 character + 4 style LoRAs, 0-{MAX_EXTRAS} of {len(OPTIONS)} options,"
          f" verdicts {lag} images late ({seconds:.1f} s, {1e3 * seconds / (2 * runs * images):.2f} ms per image)")
    print(f"  approval rate  uniform {uniform:.1%}  learned {learned:.1%}  ratio {learned / uniform:.2f}x"
          f"  (per run: {', '.join(f'{l / u:.2f}' for u, l in zip(rates['uniform'], rates['learned']))})")
    for kind, names in kinds:
        name, share = least_share(pooled, kind, names)
        print(f"  least-drawn {kind:<9} {name} {share:.1%} of its kind's draws over all runs "
              f"(single runs {min(per_run[kind]):.1%}..{max(per_run[kind]):.1%}; uniform: {1 / len(names):.1%}, "
              f"explore floor: {0.2 / len(names):.1%})")


def bench_load(count: int, cold_too: bool) -> None:
    from sdxld.layout import Layout
    from sdxld.taste import Ledger

    with tempfile.TemporaryDirectory() as folder:
        config = Config(root=Path(folder))
        layout = Layout.from_config(config)
        layout.metadata.mkdir(parents=True)
        layout.stage1.mkdir(parents=True)
        started = time.perf_counter()
        for n in range(count):
            tag = f"20261127_{n // 60 % 24:02d}{n % 60:02d}00_{n:06d}_1a2b"
            record = {"tag": tag, "prompt": "masterpiece, 1girl, " * 6, "negative": "lowres, bad hands " * 4, "seed": n,
                      "width": 768, "height": 1344, "sampler": "UniPC", "steps": 30, "cfg": 8.0, "model": {"base": "x"},
                      "parts": {"triggers": ["t"], "manual": "m", "extras": random.sample(OPTIONS, 3)},
                      "loras": [{"kind": "character", "name": random.choice(CHARACTERS), "file": "c.safetensors",
                                 "strength": 1.0, "hash": "0" * 12, "triggers": "t", "via": "rotation"},
                                {"kind": "style", "name": random.choice(STYLES), "file": "s.safetensors",
                                 "strength": 0.85, "hash": "0" * 12, "triggers": "t", "via": "rotation"}],
                      "files": {"stage1": f"{tag}_stage1_768x1344.png"}, "stages": {},
                      "created": "2026-11-27T10:00:00+00:00", "rotation": {}}
            (layout.metadata / f"{tag}.json").write_text(json.dumps(record, indent=2))
            if n % 10 == 0:  # a tenth still waiting in stage1/
                (layout.stage1 / record["files"]["stage1"]).write_bytes(b"")
        print(f"ledger: wrote {count:,} records in {time.perf_counter() - started:.1f} s")
        for label, cold in (("warm", False), ("cold", True))[: 2 if cold_too else 1]:
            if cold:
                try:
                    os.sync()
                    Path("/proc/sys/vm/drop_caches").write_text("3\n")
                except OSError:
                    print("  cold: not measured (dropping the page cache needs root)")
                    continue
            ledger = Ledger(layout)
            report = ledger.load()
            totals = ledger.totals()
            print(f"  {label}: Ledger.load() {report.records:,} records in {report.seconds:.2f} s "
                  f"({totals['approved']} approved, {totals['rejected']:,} rejected, {totals['waiting']:,} waiting)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lag", type=int, default=20, help="images made before one is judged")
    parser.add_argument("--records", type=int, default=100_000, help="records for the load timing (0: skip)")
    parser.add_argument("--cold", action="store_true", help="also time the load with the page cache dropped (root)")
    args = parser.parse_args()
    bench_rotation(args.images, args.runs, args.lag)
    if args.records:
        bench_load(args.records, args.cold)


if __name__ == "__main__":
    main()
