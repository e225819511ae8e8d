"""Run as a separate process by test_loras: merge a LoRA, truncate its file in place (what `cp`
over an existing file does), then make sdxld recompute from it. A memory-mapped read would die
with SIGBUS; the test reads a crash as a failure instead of losing the test run.

    python -m support.overwrite_lora_in_use ROOT
"""

import sys
from pathlib import Path

from support.helpers import demo_config

from sdxld.engine import Engine
from sdxld.tiny import write_tiny_lora


def main(root: Path) -> None:
    character = write_tiny_lora(root / "loras/character/c.safetensors", seed=1, rank=8)
    write_tiny_lora(root / "loras/style/s1.safetensors", seed=2)
    write_tiny_lora(root / "loras/style/s2.safetensors", seed=3)
    engine = Engine.load(demo_config(root))
    engine.sync_loras()
    library = engine.loras
    c = library.available("character")[0]
    s1, s2 = library.available("style")
    library.activate([c, s1])
    with open(character, "r+b") as handle:
        handle.truncate(64)
    library.activate([c, s2])  # recomputes layers from the merged character's weights
    library.activate([])
    print("survived")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
