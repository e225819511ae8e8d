"""Soak: the daemon on the demo model for N images while another process churns its inputs.

Runs `sdxld run --demo` in a temporary root. Meanwhile this process adds, replaces and removes
LoRAs every few images, edits the prompt options, and drops stage-1 images into inbox/approved.
It samples the daemon's RSS at every new stage-1 image and prints the growth from image
`--warmup` to the end as a ratio, plus counts: images, finals, failures, approved images lost or
processed twice.

    python bench/soak.py [--images 300] [--warmup 50]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import psutil
    import yaml

    from sdxld.tiny import write_tiny_lora

    rng = random.Random(args.seed)
    from sdxld.init import init_root

    root = init_root(Path(tempfile.mkdtemp(prefix="sdxld-soak-"))).root
    config = yaml.safe_load((root / "config.yaml").read_text())
    config["daemon"].update({"max_pending": 0, "settle_s": 0.5, "rescan_s": 5})
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    loras = root / "loras"
    spare = root / "spare-loras"
    for i in range(6):
        write_tiny_lora(spare / f"lora{i}.safetensors", seed=i, rank=rng.choice([2, 4, 8]))
    approved = root / "inbox" / "approved"
    approved.mkdir(parents=True)

    log = open(root / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "sdxld.cli", "run", "--demo"], cwd=root, stdout=log, stderr=subprocess.STDOUT)
    process = psutil.Process(daemon.pid)
    stage1 = root / "outputs" / "stage1"
    samples: list[tuple[int, int]] = []
    dropped: list[str] = []
    seen = 0
    started = time.monotonic()
    try:
        while seen < args.images:
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited with {daemon.returncode}; see {root / 'daemon.log'}")
            images = sorted(stage1.glob("*.png")) if stage1.exists() else []
            made = len(images) + len(dropped)
            if made > seen:
                seen = made
                samples.append((seen, process.memory_info().rss))
                churn(rng, seen, loras, spare, root, images, approved, dropped)
            time.sleep(0.05)
        # Let the last approved images finish.
        deadline = time.monotonic() + 120
        while any(approved.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        log.close()

    elapsed = time.monotonic() - started
    base = next((rss for n, rss in samples if n >= args.warmup), samples[0][1])
    end = samples[-1][1]
    finals = sorted((root / "outputs" / "final").glob("*.png"))
    done = sorted((root / "inbox" / "done").iterdir()) if (root / "inbox" / "done").exists() else []
    failed = sorted(p for p in (root / "inbox" / "failed").glob("*") if not p.name.endswith(".error.txt")) if (root / "inbox" / "failed").exists() else []
    final_tags = [p.name.split("_final_")[0] for p in finals]
    dropped_tags = [name.split("_stage1_")[0] for name in dropped]
    lost = [t for t in dropped_tags if t not in final_tags and not any(p.name.startswith(t) for p in failed)]
    status = json.loads(next((root / ".sdxld" / "status").glob("*.json")).read_text())
    print(f"{seen} stage-1 images in {elapsed:.0f} s; {len(dropped)} approved, {len(finals)} finals, {len(done)} in done/, {len(failed)} failed")
    print(f"approved images lost: {len(lost)}, processed twice: {len(final_tags) - len(set(final_tags))}")
    print(f"RSS at image {args.warmup}: {base / 2**20:.0f} MiB, at image {seen}: {end / 2**20:.0f} MiB, growth {end / base:.3f}x")
    print(f"LoRAs at the end: {status['loras']['loaded']} loaded, {len(status['loras']['rejected'])} rejected")
    shutil.rmtree(root, ignore_errors=True)


def churn(rng, n, loras, spare, root, images, approved, dropped) -> None:
    """Every few images: a LoRA added, replaced or removed; a prompt edit; an approval."""
    if n % 3 == 0:
        kind = rng.choice(["character", "style"])
        present = sorted((loras / kind).glob("*.safetensors"))
        # Bounded: the LoRA count wanders between 0 and 6 per kind, so memory growth after
        # warm-up is growth per churn, not a growing library.
        if not present:
            action = "add"
        elif len(present) >= 6:
            action = rng.choice(["replace", "remove"])
        else:
            action = rng.choice(["add", "replace", "remove"])
        if action == "add" or not present:
            source = rng.choice(sorted(spare.glob("*.safetensors")))
            shutil.copy(source, loras / kind / f"{source.stem}_{n}.safetensors")
        elif action == "replace":
            shutil.copy(rng.choice(sorted(spare.glob("*.safetensors"))), present[0])
        else:
            rng.choice(present).unlink()
    if n % 7 == 0:
        options = root / "prompts" / "prompt_options.txt"
        options.write_text(options.read_text() + f"soak phrase {n}\n")
    if n % 10 == 0 and images:
        image = rng.choice(images)
        dropped.append(image.name)
        shutil.move(image, approved / image.name)


if __name__ == "__main__":
    main()
