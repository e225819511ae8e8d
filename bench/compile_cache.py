"""What a start costs under performance.compile when the compiled code of an earlier start is kept.

Each start is a new process, as a restart under systemd is: it loads the models, then makes two
stage-1 images; the first builds the compiled UNet (or finds it in the cache), the second runs
it. The first start finds an empty cache folder, the later ones find what it left there (sdxld
keeps inductor's cache in its cache folder: models.lasting_compile_cache), and a last start gets
an empty folder again, so the cold figure is measured twice in the same run.

    python bench/compile_cache.py                 # compile graphs, tiny model, CPU (inductor's C++ kernels)
    python bench/compile_cache.py --starts 3 --mode max

On the CPU the tiny model stands in for SDXL: the seconds are not SDXL's on a GPU, the share a
warm cache saves of a start's build is what it says. Needs a C++ compiler (inductor's CPU kernels).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_start(mode: str) -> dict:
    """In the child process: load the tiny models under `mode`, make two images, say how long each took."""
    import torch

    from sdxld.config import from_dict
    from sdxld.engine import Engine
    from sdxld.init import init_root
    from sdxld.tiny import apply_demo

    root = init_root(Path(tempfile.mkdtemp(prefix="sdxld-compile-cache-"))).root
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    config = apply_demo(from_dict({}, root))
    config.performance.compile = mode
    config.generation.t2i.steps = 4
    config.model.use_refiner = False
    started = time.perf_counter()
    engine = Engine.load(config)
    loaded = time.perf_counter()
    engine.stage1_once(seed=1)
    first = time.perf_counter()
    engine.stage1_once(seed=2)
    second = time.perf_counter()
    counters = torch._dynamo.utils.counters
    return {
        "load_s": loaded - started, "first_image_s": first - loaded, "second_image_s": second - first,
        "graph_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "graph_cache_misses": counters["inductor"]["fxgraph_cache_miss"],
        "cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""),
    }


def start(mode: str, cache_home: Path) -> dict:
    """One start in a fresh process whose cache folder (XDG_CACHE_HOME) is `cache_home`."""
    env = {key: value for key, value in os.environ.items() if key != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(cache_home), PYTHONPATH=str(REPO))
    # The tiny model is built once into the user's own cache; each start links to it so that
    # building it is not part of a start.
    tiny = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdxld"
    (cache_home / "sdxld").mkdir(parents=True, exist_ok=True)
    for model in tiny.glob("tiny-sdxl-v*"):
        link = cache_home / "sdxld" / model.name
        if not link.exists():
            link.symlink_to(model)
    done = subprocess.run([sys.executable, __file__, "--child", "--mode", mode], env=env, capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"a start failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="graphs", choices=["full", "regional", "graphs", "max"])
    parser.add_argument("--starts", type=int, default=2, help="starts that find the first start's cache (2)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_start(args.mode)))
        return
    from sdxld.tiny import ensure_tiny_model

    ensure_tiny_model()
    print(f"performance.compile {args.mode}, tiny model, CPU; each start a new process", flush=True)
    print(f"{'start':28} {'load':>7} {'1st image':>10} {'2nd image':>10} {'cache hits/misses':>18}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdxld-cache-home-") as kept, \
            tempfile.TemporaryDirectory(prefix="sdxld-cache-home-cold-") as cold:
        plan = [("cold (empty cache)", Path(kept))] + [(f"warm {n}", Path(kept)) for n in range(1, args.starts + 1)]
        plan.append(("cold again (empty cache)", Path(cold)))
        for name, home in plan:
            row = start(args.mode, home)
            rows.append((name, row))
            print(f"{name:28} {row['load_s']:6.1f}s {row['first_image_s']:9.1f}s {row['second_image_s']:9.2f}s "
                  f"{row['graph_cache_hits']:>8}/{row['graph_cache_misses']}", flush=True)
        kept_mib = folder_mib(Path(kept) / "sdxld" / "torchinductor")
    colds = [row["first_image_s"] for name, row in rows if name.startswith("cold")]
    warms = [row["first_image_s"] for name, row in rows if name.startswith("warm")]
    # Every warm start against every cold one: the range holds whatever the machine's noise did.
    print(f"first image of a start, warm cache / cold cache: {min(warms) / max(colds):.2f}x to "
          f"{max(warms) / min(colds):.2f}x (cold {', '.join(f'{c:.1f}' for c in colds)} s; "
          f"warm {', '.join(f'{w:.1f}' for w in warms)} s); the cache folder holds {kept_mib:.0f} MiB")


if __name__ == "__main__":
    main()
