"""LoRA rotation on the real (tiny) pipeline: discovery, both file formats, rejection, live sync."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sdxld.tiny import write_sd15_shaped_lora, write_tiny_lora


def render(engine, seed=7):
    """One stage-1 image through the full engine path, as an array."""
    result = engine.stage1_once(seed=seed)
    from PIL import Image

    return np.asarray(Image.open(result.path).convert("RGB"), dtype=np.int16), result.record


def no_extras(engine):
    engine.prompts.max_extras = 0


def test_both_extensions_are_discovered_with_trigger_words(root, make_engine):
    write_tiny_lora(root / "loras/character/alice.safetensors", "kohya", seed=1)
    (root / "loras/character/alice.txt").write_text("alice_(tiny), red hair\n")
    write_tiny_lora(root / "loras/style/ink.safetensor", "kohya", seed=2)
    (root / "loras/style/notes.md").write_text("not a LoRA")
    engine = make_engine()
    report = engine.sync_loras()
    assert sorted(report.added) == ["character/alice", "style/ink"]
    entries = {e.name: e for e in engine.loras.entries()}
    assert set(entries) == {"alice", "ink"}
    assert entries["alice"].triggers == "alice_(tiny), red hair"
    assert entries["ink"].triggers == ""
    assert all(e.status == "loaded" and len(e.hash) == 12 for e in entries.values())


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_each_format_loads_and_changes_the_image(fmt, root, make_engine):
    engine = make_engine()
    no_extras(engine)
    plain, plain_record = render(engine)
    assert plain_record.loras == []
    write_tiny_lora(root / "loras/style/look.safetensors", fmt, seed=3)
    with_lora, record = render(engine)
    assert [(u.kind, u.name, u.strength) for u in record.loras] == [("style", "look", 0.85)]
    assert np.abs(with_lora - plain).mean() > 1.0, "the LoRA should visibly change the image"


def adapted_layers(engine, entry) -> dict:
    """component -> layer -> rank: what the entry's file adapts in the engine's model."""
    from sdxld.lora_files import read_lora_weights

    return read_lora_weights(engine.models.base, entry.path.read_bytes()).layout()


def test_kohya_lora_adapts_unet_and_both_text_encoders(root, make_engine):
    write_tiny_lora(root / "loras/character/c.safetensors", "kohya", seed=4)
    engine = make_engine()
    engine.sync_loras()
    layout = adapted_layers(engine, engine.loras.entries()[0])
    assert set(layout) == {"unet", "text_encoder", "text_encoder_2"}
    render(engine)
    assert engine.loras.merger.saved_layers() == sum(len(layers) for layers in layout.values())


def test_trigger_words_lead_the_prompt(root, make_engine):
    write_tiny_lora(root / "loras/character/alice.safetensors", seed=1)
    (root / "loras/character/alice.txt").write_text("alice_(tiny)")
    write_tiny_lora(root / "loras/style/ink.safetensors", seed=2)
    (root / "loras/style/ink.txt").write_text("ink style")
    engine = make_engine()
    _, record = render(engine)
    assert record.prompt.startswith(r"alice_\(tiny\), ink style, masterpiece")  # a name, not emphasis
    assert [u.kind for u in record.loras] == ["character", "style"]
    assert [u.strength for u in record.loras] == [1.0, 0.85]


def test_bad_files_are_rejected_with_a_reason_and_generation_goes_on(root, make_engine):
    (root / "loras/style/random.safetensors").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "loras/style/empty.safetensors").write_bytes(b"")
    write_sd15_shaped_lora(root / "loras/style/sd15.safetensors")
    from safetensors.torch import save_file
    import torch

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(root / "loras/character/checkpoint.safetensors"))
    good = write_tiny_lora(root / "loras/character/good.safetensors", seed=5)
    good_full = good.read_bytes()
    (root / "loras/character/half.safetensors").write_bytes(good_full[: len(good_full) // 2])

    engine = make_engine()
    report = engine.sync_loras()
    reasons = {e.name: e.reason for e in engine.loras.entries() if e.status == "rejected"}
    assert set(report.rejected) == {"style/random", "style/empty", "style/sd15", "character/checkpoint", "character/half"}
    assert "not a safetensors file" in reasons["random"]
    assert "empty" in reasons["empty"]
    assert "another architecture" in reasons["sd15"] and "size mismatch" in reasons["sd15"]
    assert "not a LoRA" in reasons["checkpoint"]
    assert "truncated" in reasons["half"]
    _, record = render(engine)
    assert [u.name for u in record.loras] == ["good"]


def test_a_rejected_lora_leaves_no_residue_in_the_pipeline(root, make_engine):
    engine = make_engine()
    no_extras(engine)
    before, _ = render(engine)
    write_sd15_shaped_lora(root / "loras/style/sd15.safetensors")
    after, record = render(engine)
    assert record.loras == []
    assert np.array_equal(before, after)


def test_a_rejected_file_returns_when_fixed(root, make_engine):
    path = root / "loras/style/later.safetensors"
    path.write_bytes(b"garbage that is not safetensors")
    engine = make_engine()
    engine.sync_loras()
    assert engine.loras.entries()[0].status == "rejected"
    # Not retried while unchanged (no log spam, no repeated work).
    assert not engine.sync_loras().changed
    write_tiny_lora(path, seed=6)
    report = engine.sync_loras()
    assert report.added == ["style/later"]
    assert engine.loras.entries()[0].status == "loaded"


def test_sync_follows_files_added_changed_and_removed_between_images(root, make_engine):
    engine = make_engine()
    first_image, first = render(engine)
    assert first.loras == []

    added = write_tiny_lora(root / "loras/style/new.safetensors", seed=7)
    _, second = render(engine)
    assert [u.name for u in second.loras] == ["new"]
    old_hash = second.loras[0].hash

    write_tiny_lora(added, seed=8)  # replaced in place with different weights
    assert engine.sync_loras().reloaded == ["style/new"]
    _, third = render(engine)
    assert third.loras[0].hash != old_hash

    added.unlink()
    assert engine.sync_loras().removed == ["style/new"]
    fourth_image, fourth = render(engine)
    assert fourth.loras == []
    assert np.array_equal(fourth_image, first_image), "an unmerged LoRA must leave no trace"


def test_an_empty_or_missing_folder_means_no_lora_of_that_kind(root, make_engine):
    (root / "loras/style").rmdir()
    write_tiny_lora(root / "loras/character/c.safetensors", seed=9)
    engine = make_engine()
    _, record = render(engine)
    assert [u.kind for u in record.loras] == ["character"]


def test_pick_covers_every_loaded_lora(root, make_engine):
    for i in range(3):
        write_tiny_lora(root / f"loras/style/s{i}.safetensors", seed=10 + i, rank=2)
    engine = make_engine()
    engine.sync_loras()
    rng = random.Random(0)
    seen = {engine.rotation.pick_loras(rng, engine.loras, {})[0].name for _ in range(60)}
    assert seen == {"s0", "s1", "s2"}


def test_files_still_being_written_wait_for_the_settle_time(root):
    from support.helpers import demo_config

    from sdxld.engine import Engine

    write_tiny_lora(root / "loras/style/fresh.safetensors", seed=11)
    engine = Engine.load(demo_config(root), lora_settle_s=3600)
    engine.sync_loras()
    entry = engine.loras.entries()[0]
    assert entry.status == "pending" and entry.reason == "still being written"
    assert engine.loras.available("style") == []


def test_unusable_trigger_files_are_ignored_and_the_lora_still_rotates(root, make_engine):
    write_tiny_lora(root / "loras/style/a.safetensors", seed=1)
    (root / "loras/style/a.txt").write_bytes(b"\x00\x01binary\xff")
    write_tiny_lora(root / "loras/style/b.safetensors", seed=2)
    (root / "loras/style/b.txt").write_text("word, " * 20_000)
    engine = make_engine()
    engine.sync_loras()
    entries = {e.name: e for e in engine.loras.entries()}
    assert entries["a"].status == entries["b"].status == "loaded"
    assert entries["a"].triggers == "" and entries["b"].triggers == ""


def _outputs(pipe):
    """Text-encoder embeddings and one UNet prediction for fixed inputs: what a LoRA changes."""
    import torch

    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("a lighthouse at dusk", do_classifier_free_guidance=False)
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, 16, 16, generator=generator)
        time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])
        noise = pipe.unet(latents, 500, encoder_hidden_states=embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return embeds, pooled, noise


def test_merged_loras_compute_what_diffusers_own_lora_loading_computes(root, make_engine):
    """Two LoRAs of different ranks, formats and alphas at once, strengths as configured: the
    merged weights compute what diffusers' load_lora_weights + set_adapters compute.
    (Small LoRA weights: with large random ones the tiny UNet is chaotic and float rounding
    order alone changes its output.)"""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from sdxld.tiny import ensure_tiny_model

    character = write_tiny_lora(root / "loras/character/c.safetensors", "kohya", seed=21, rank=4, alpha=1.5, scale=0.15)
    style = write_tiny_lora(root / "loras/style/s.safetensors", "diffusers", seed=22, rank=8, scale=0.15)
    engine = make_engine(lora__character_strength=0.7, lora__style_strength=-0.4)
    engine.sync_loras()
    engine.loras.activate(engine.rotation.pick_loras(random.Random(0), engine.loras, {}))
    ours = _outputs(engine.models.base)

    reference = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model()[0])
    reference.load_lora_weights(str(character), adapter_name="c")
    reference.load_lora_weights(str(style), adapter_name="s")
    reference.set_adapters(["c", "s"], adapter_weights=[0.7, -0.4])
    theirs = _outputs(reference)
    plain = _outputs(StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model()[0]))

    for a, b, p in zip(ours, theirs, plain):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (a - b).abs().max()
        assert (a - p).abs().max() > 1e-2, "the LoRAs must change this output"


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("keep_in_memory_mb", [0, 1024], ids=["read-each-time", "kept-in-memory"])
def test_many_loras_rotate_without_adding_a_parameter_or_drifting(root, make_engine, keep_in_memory_mb):
    """Fifty LoRAs in the folders: rotating them adds nothing to the model, and a LoRA chosen
    again (or none) gives bit-identical weights, however many merges happened in between, whether
    it is read from disk again or merged from memory."""
    for i in range(25):
        write_tiny_lora(root / f"loras/character/c{i}.safetensors", seed=100 + i, rank=2 + i % 3)
        write_tiny_lora(root / f"loras/style/s{i}.safetensors", "diffusers", seed=200 + i, rank=2 + i % 4)
    engine = make_engine(lora__keep_in_memory_mb=keep_in_memory_mb)
    engine.sync_loras()
    library, unet = engine.loras, engine.models.base.unet
    assert len(library.available("character")) == len(library.available("style")) == 25
    pristine = weights(unet)
    first = [library.available("character")[0], library.available("style")[0]]
    library.activate(first)
    with_first = weights(unet)
    rng = random.Random(1)
    for _ in range(12):
        library.activate(engine.rotation.pick_loras(rng, library, {}))
    assert set(weights(unet)) == set(pristine), "no parameter added or removed"
    layers = {(c, layer) for e in library.entries() for c, ls in adapted_layers(engine, e).items() for layer in ls}
    assert library.merger.saved_layers() <= len(layers)
    library.activate(first)
    assert all(torch.equal(with_first[n], p) for n, p in weights(unet).items())
    library.activate([])
    assert all(torch.equal(pristine[n], p) for n, p in weights(unet).items())


def test_a_merged_lora_file_overwritten_in_place_cannot_crash_the_process(root, tmp_path):
    """Copying over a LoRA in place truncates the very file sdxld read it from; a memory-mapped
    read would die with SIGBUS later. A separate process, so a crash is a failure, not the end."""
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, "-m", "support.overwrite_lora_in_use", str(root)], cwd=tests,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "survived" in result.stdout


def test_a_peft_lora_with_its_config_in_the_header_uses_that_alpha(root, make_engine):
    """diffusers' save_lora_weights stores lora_alpha in the safetensors header; an alpha other
    than the rank scales the LoRA, as diffusers itself applies it."""
    import json as json_module

    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    from sdxld.tiny import ensure_tiny_model

    path = write_tiny_lora(root / "loras/style/peft.safetensors", "diffusers", seed=31, rank=8, scale=0.15)
    tensors = load_file(str(path))
    config = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        targets = sorted({k[len(component) + 1:].removesuffix(".lora_A.weight") for k in tensors
                          if k.startswith(component + ".") and k.endswith(".lora_A.weight")})
        config.update({f"{component}.r": 8, f"{component}.lora_alpha": 2, f"{component}.target_modules": targets})
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json_module.dumps(config), "format": "pt"})
    engine = make_engine(lora__style_strength=1.0)
    engine.sync_loras()
    engine.loras.activate(engine.loras.available("style"))
    ours = _outputs(engine.models.base)
    reference = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model()[0])
    reference.load_lora_weights(str(path), adapter_name="p")
    theirs = _outputs(reference)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (a - b).abs().max()


def test_fused_qkv_is_undone_when_a_lora_is_merged_so_the_lora_applies(root, make_engine):
    """performance.fuse_qkv: fused attention would read a q/k/v copy made before the LoRA."""
    write_tiny_lora(root / "loras/style/s.safetensors", seed=41, scale=0.15)
    outputs = {}
    for fused in (False, True):
        engine = make_engine(performance__fuse_qkv=fused)
        assert getattr(engine.models.base, "fusing_unet", False) == fused
        engine.sync_loras()
        engine.loras.activate(engine.loras.available("style"))
        assert not getattr(engine.models.base, "fusing_unet", False)
        outputs[fused] = _outputs(engine.models.base)
    for a, b in zip(outputs[False], outputs[True]):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (a - b).abs().max()
