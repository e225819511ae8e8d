"""A shared PNG leaks nothing private: embedded text names models, LoRAs and files by name and
hash, never by an absolute path (which would show the user's folders and user name)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from sdxld.tiny import ensure_tiny_model, write_tiny_lora


def text_chunks(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def test_no_text_chunk_of_a_stage1_image_or_final_holds_an_absolute_path(make_engine, root):
    write_tiny_lora(root / "loras" / "style" / "ink.safetensors", seed=5)
    engine = make_engine(generation__base_width=64, generation__base_height=64)
    made = engine.stage1_once(seed=3)
    final = engine.upscale(made.record, made.image)

    private = [str(root), str(Path.home()), str(ensure_tiny_model()[0].parent)]
    for path in (made.path, final.path):
        chunks = text_chunks(path)
        assert set(chunks) == {"parameters", "sdxld"}
        for name, text in chunks.items():
            for folder in private:
                assert folder not in text, f"{path.name}: chunk {name} holds {folder}"
            assert not re.search(r'"(/|~|[A-Za-z]:\\\\)', text), f"{path.name}: chunk {name} holds a path"
        embedded = json.loads(chunks["sdxld"])
        assert embedded["model"]["name"] == "sdxld-tiny-demo"
        assert [(u["name"], u["file"]) for u in embedded["loras"]] == [("ink", "ink.safetensors")]
    # The local record keeps where the model came from.
    local = json.loads((engine.layout.metadata / f"{made.record.tag}.json").read_text())
    assert local["model"]["base"] == str(ensure_tiny_model()[0])


@pytest.mark.parametrize("embed, chunks", [("parameters", {"parameters"}), ("none", set())])
def test_output_embed_strips_the_sdxld_record_or_all_text(make_engine, embed, chunks):
    engine = make_engine(generation__base_width=64, generation__base_height=64, output__embed=embed)
    made = engine.stage1_once(seed=3)
    engine.flush()
    assert set(text_chunks(made.path)) == chunks
