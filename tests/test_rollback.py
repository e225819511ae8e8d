"""A failed operation leaves nothing half-done: the shared VAE's precision, LoRA merges, and LoRA
files that only a merge would have found wrong."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdxld import lora_merge, stages
from sdxld.lora_merge import LoraMergeError, LoraMerger, Merged
from sdxld.tiny import write_tiny_lora


def small(make_engine, **changes):
    return make_engine(generation__base_width=64, generation__base_height=64, generation__stage3__tile_size=128,
                       generation__stage3__tile_overlap=32, **changes)


def test_an_out_of_memory_retry_in_stage3_leaves_the_shared_vae_in_fp16(make_engine, monkeypatch):
    engine = small(make_engine, generation__stage3__tile_batch=2)
    record = engine.new_stage1_record(seed=4)
    vae = engine.models.img2img.vae
    vae.to(torch.float16)  # force_upcast is set, as in SDXL's own VAE config
    real_decode, dtypes = vae.decode, []

    def decode(*args, **kwargs):
        dtypes.append(vae.dtype)
        if len(dtypes) == 1:
            raise stages.out_of_memory_error()("CUDA out of memory (injected)")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)
    image = Image.new("RGB", (192, 192), (120, 90, 60))
    final, _, settings, notes = stages.stage3(engine.models, record, image, engine.config.generation.stage3)

    assert dtypes == [torch.float32, torch.float32]  # decoded upcast both times
    assert vae.dtype == torch.float16
    assert notes and settings.tile_batch == 1 and final.size == (192, 192)


def _weights(pipe) -> dict:
    return {f"{c}.{n}": p.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            for n, p in getattr(pipe, c).named_parameters() if n.endswith("weight")}


def test_a_merge_that_fails_part_way_restores_every_layer_and_takes_the_file_out_of_rotation(make_engine, root, monkeypatch):
    write_tiny_lora(root / "loras" / "character" / "hero.safetensors", seed=1)
    write_tiny_lora(root / "loras" / "style" / "ink.safetensors", seed=2)
    write_tiny_lora(root / "loras" / "style" / "broken.safetensors", seed=3)
    engine = small(make_engine)
    engine.sync_loras()
    library = engine.loras
    hero, ink, broken = library.find("character", "hero"), library.find("style", "ink"), library.find("style", "broken")
    library.activate([hero])
    hero_only = _weights(engine.models.base)
    library.activate([hero, ink])
    before = _weights(engine.models.base)

    # The third part of the layers fails (as a GPU running out of memory would), after two parts
    # were rewritten with the incoming LoRA.
    monkeypatch.setattr(lora_merge, "PART_BYTES", 64 << 10)
    real_rewrite_part, parts = LoraMerger._rewrite_part, []

    def rewrite_part(self, part, state, device, differences):
        if state.get("style") is not None and state["style"].key[0] == broken.path:
            parts.append(part)
            if len(parts) == 3:
                raise stages.out_of_memory_error()("CUDA out of memory (injected)")
        return real_rewrite_part(self, part, state, device, differences)

    monkeypatch.setattr(LoraMerger, "_rewrite_part", rewrite_part)
    wanted = {"character": library.merger.current("character"),
              "style": Merged((broken.path, broken.signature, 0.85), library._read(broken), 0.85)}
    with pytest.raises(LoraMergeError, match="merging failed at layer") as failure:
        library.merger.apply(wanted)
    assert failure.value.slots == ["style"]
    assert _changed(before, _weights(engine.models.base)) == []  # hero + ink, exactly as before

    parts.clear()
    uses = library.activate([hero, broken])
    assert [u.name for u in uses] == ["hero"]  # the image goes on with what did merge
    assert _changed(hero_only, _weights(engine.models.base)) == []
    assert broken.status == "rejected" and "merging failed at layer" in broken.reason
    assert "broken" not in [e.name for e in library.available("style")]


def _changed(expected: dict, actual: dict) -> list[str]:
    return [name for name in expected if not torch.equal(expected[name], actual[name])]


def _locon(path, kernel: tuple[int, int]):
    """A LoRA whose one conv layer (the first UNet resnet's 3x3 conv1) has the given kernel."""
    tensors = {
        "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": torch.randn(4, 32, *kernel),
        "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": torch.randn(32, 4, 1, 1),
        "lora_unet_input_blocks_1_0_in_layers_2.alpha": torch.tensor(4.0),
    }
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("kernel, accepted", [((3, 3), True), ((1, 1), False)])
def test_a_conv_lora_is_checked_against_the_layers_kernel(make_engine, root, kernel, accepted):
    _locon(root / "loras" / "style" / "locon.safetensors", kernel)
    engine = small(make_engine)
    engine.sync_loras()
    entry = next(e for e in engine.loras.entries() if e.name == "locon")
    if accepted:
        assert entry.status == "loaded", entry.reason
        engine.loras.activate([entry])  # and it merges
    else:
        assert entry.status == "rejected"
        assert "LoRA gives 32x32x1x1, layer is 32x32x3x3" in entry.reason
