"""The host's work between two stage-1 batches, when the card has nothing queued: the LoRA folders'
sync, the draws (learned rotation's odds), the LoRA swap, the prompts' encoding, the count of
images waiting; measured on the tiny model with a library of many LoRAs and a stage1/ folder of
waiting images.

    python bench/between_batches.py [--loras 200 --waiting 500 --batches 10]

On a GPU under CUDA graphs a batch-1 image takes about a second, so every 10 ms here is about 1%
of the images per hour. Work done while the card runs the batch (the next batch's LoRAs merged
and its prompts encoded ahead, as the daemon does with the weights on the device) is reported
apart: it costs no card time there. So are the operations the host dispatches between a batch's
start and its first UNet call (each a kernel launch on a GPU, where the card waits for them). The learned rotation's odds are timed for
the library's character pool, with no verdicts and with one per arm, computed anew and asked again
(they are cached until the counts change).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

STAGE1 = "stage 1 (card time; getting ahead included)"
ENCODED_AT_START = "prompts encoded at the batch's start"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loras", type=int, default=200, help="character LoRAs (a quarter as many styles)")
    parser.add_argument("--waiting", type=int, default=500, help="images waiting in outputs/stage1 (daemon.max_pending's default)")
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()

    import sdxld.engine as engine_module
    import sdxld.loras as loras_module
    import sdxld.stages as stages_module
    from sdxld.engine import Engine
    from sdxld.host_waits import CountOperations
    from sdxld.init import init_root
    from sdxld.models import quiet_libraries
    from sdxld.pacing import pending_images
    from sdxld.rotation import _best_arm_odds, mixed_odds
    from sdxld.tiny import write_tiny_lora
    from support.helpers import demo_config

    quiet_libraries()
    root = Path(tempfile.mkdtemp(prefix="sdxld-between-"))
    init_root(root)
    for index in range(args.loras):
        write_tiny_lora(root / f"loras/character/c{index}.safetensors", seed=index, rank=4)
        (root / f"loras/character/c{index}.txt").write_text(f"character{index}")
    for index in range(max(1, args.loras // 4)):
        write_tiny_lora(root / f"loras/style/s{index}.safetensors", seed=100_000 + index, rank=2)
    engine = Engine.load(demo_config(root, model__refiner=None), background_writes=True)
    started = time.perf_counter()
    engine.sync_loras()
    print(f"{args.loras} characters, {max(1, args.loras // 4)} styles: first check {time.perf_counter() - started:.1f} s")
    waiting = root / "outputs" / "stage1"
    waiting.mkdir(parents=True, exist_ok=True)
    for index in range(args.waiting):
        (waiting / f"w{index:05d}_stage1_512x896.png").write_bytes(b"\x89PNG")

    seconds: dict[str, list[float]] = defaultdict(list)

    getting_ahead = []  # non-empty while the next batch's LoRAs are got ready

    def timed(owner, name: str, label: str, ahead_label: str | None = None):
        real = getattr(owner, name)

        def wrapper(*a, **k):
            where = ahead_label if ahead_label and getting_ahead else label
            start = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                seconds[where].append(time.perf_counter() - start)

        setattr(owner, name, wrapper)

    timed(engine, "sync_loras", "LoRA folders synced")
    timed(engine, "_draw", "draws (prompt, learned odds)", "next batch's draws, for its prompts (card time)")
    timed(engine.loras, "activate", "LoRA swap at the batch's start", "LoRA swap merged ahead (card time)")
    timed(stages_module, "batch_prompt_embeddings", ENCODED_AT_START, "prompts encoded ahead (card time)")
    def ahead(name: str):
        real = getattr(engine, name)

        def getting_ready(*a, **k):
            getting_ahead.append(1)
            try:
                real(*a, **k)
            finally:
                getting_ahead.clear()

        setattr(engine, name, getting_ready)

    ahead("_ready_next_loras")
    ahead("_encode_next_prompts")
    timed(engine, "_ready_next_loras", "next batch's LoRAs got ready (card time)")
    timed(engine_module, "stage1_batch", STAGE1)
    timed(loras_module, "read_lora_weights", "LoRA files read (ahead or by a swap)")
    # The operations dispatched from a batch's start to its first UNet call.
    counting: list[CountOperations] = []
    before_unet: list[int] = []

    def first_unet_call(*_):
        if counting and len(before_unet) < len(counting):
            before_unet.append(counting[-1].total)

    engine.models.base.unet.register_forward_pre_hook(first_unet_call)
    engine.stage1_batch(1, another_follows=True)  # warm-up, as the daemon calls it
    # The daemon's engine leaves the LoRA folders to the daemon (synced when the watcher reports a
    # change, and every rescan_s); generate's engine syncs them before each batch. With the weights
    # on the device it encodes the next batch's prompts ahead. The ways in turn:
    ways = {"synced, encoded at the start": (False, False), "followed, encoded at the start": (True, False),
            "followed, encoded ahead": (True, True)}
    columns, operations = {}, {}
    for column, (followed, ahead) in ways.items():
        engine.lora_folders_followed, engine.encode_ahead = followed, ahead
        engine.stage1_batch(1, another_follows=True)  # the batch before gets this way's work ahead
        seconds.clear()
        counting.clear()
        before_unet.clear()
        totals = []
        for _ in range(args.batches):
            start = time.perf_counter()
            with CountOperations() as counter:
                counting.append(counter)
                engine.stage1_batch(1, another_follows=True)
            counted = time.perf_counter()
            pending_images(engine.layout, 0)
            seconds["images waiting counted"].append(time.perf_counter() - counted)
            totals.append(time.perf_counter() - start)
        per_batch = {label: sum(values) / args.batches for label, values in seconds.items()}
        # Encoding at the batch's start happens inside stage 1's call, before its first UNet call.
        per_batch[STAGE1] -= per_batch.get(ENCODED_AT_START, 0.0)
        per_batch["all between batches (all but stage 1)"] = statistics.mean(totals) - per_batch[STAGE1]
        columns[column] = per_batch
        operations[column] = statistics.mean(before_unet)
    engine.flush()
    labels = list(dict.fromkeys(label for per_batch in columns.values() for label in per_batch))
    print(f"\nper batch of 1, mean of {args.batches} (ms): " + " | ".join(columns))
    for label in labels:
        print(f"  {label:44} " + " ".join(f"{columns[c].get(label, 0.0) * 1000:10.1f}" for c in columns))
    print(f"  {'operations from its start to its first UNet call':44} "
          + " ".join(f"{operations[c]:10.0f}" for c in columns))
    synced, followed, ahead = (columns[c]["all between batches (all but stage 1)"] for c in columns)
    print(f"  all between batches: LoRA folders followed / synced {followed / synced:.2f}x, prompts encoded ahead / "
          f"at the start {ahead / followed:.2f}x, both / neither {ahead / synced:.2f}x")
    at_start, encoded_ahead = (operations[c] for c in list(columns)[1:])
    print(f"  operations before the first UNet call, prompts encoded ahead / at the start: {encoded_ahead / at_start:.2f}x")
    start = time.perf_counter()
    engine.sync_loras(budget_s=1.0)
    print(f"one sync, as the daemon runs it when the watcher reports a change: {(time.perf_counter() - start) * 1000:.1f} ms")

    names = [entry.name for entry in engine.loras.available("character")]
    rng = random.Random(0)
    for label, counts in (("no verdicts", [(0, 0)] * len(names)),
                          ("a verdict or more per arm", [(rng.randint(0, 5), rng.randint(1, 30)) for _ in names])):
        _best_arm_odds.cache_clear()
        start = time.perf_counter()
        mixed_odds(counts, 0.2)
        anew = time.perf_counter() - start
        start = time.perf_counter()
        mixed_odds(counts, 0.2)
        again = time.perf_counter() - start
        print(f"learned odds, {len(names)} characters, {label}: {anew * 1000:.2f} ms anew, {again * 1000:.3f} ms asked again")


if __name__ == "__main__":
    main()
