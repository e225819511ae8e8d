"""`<lora:name:weight>` tags in sdxld's own prompt files: the named LoRA (from loras/character,
loras/style or loras/extra) is merged for that image at that weight, on top of the rotated pair;
the tag stays in the record and in A1111 `parameters`; a tag that cannot be used is a warning
and the image goes on."""

from __future__ import annotations

import logging

import torch
from PIL import Image

from sdxld.lora_files import read_lora_weights
from sdxld.records import parse_a1111
from sdxld.tiny import write_tiny_lora


def with_loras(root):
    write_tiny_lora(root / "loras/character/alice.safetensors", seed=1, scale=0.2)
    write_tiny_lora(root / "loras/style/ink.safetensors", seed=2, scale=0.2)
    write_tiny_lora(root / "loras/extra/glow.safetensors", seed=3, scale=0.2)


def small(make_engine):
    engine = make_engine(generation__base_width=64, generation__base_height=64, generation__stage3__tile_size=128,
                         generation__stage3__tile_overlap=32)
    engine.prompts.max_extras = 0
    engine.sync_loras()
    return engine


def unet_weight(engine, layer):
    return engine.models.base.unet.get_submodule(layer).weight.detach().clone()


def difference(engine, path, layer):
    """What a LoRA file adds to one UNet layer at strength 1."""
    patch = read_lora_weights(engine.models.base, path.read_bytes()).layers["unet"][layer]
    return patch.difference().reshape(unet_weight(engine, layer).shape)


def test_a_tag_merges_that_lora_for_that_image_on_top_of_the_rotated_pair(root, make_engine):
    with_loras(root)
    (root / "prompts/manual_prompt.txt").write_text("1girl, night sky, <lora:glow:0.6>\n")
    engine = small(make_engine)
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    pristine = unet_weight(engine, layer)

    record = engine.new_stage1_record(seed=1)

    uses = [(u.kind, u.name, u.strength, u.via) for u in record.loras]
    assert uses == [("character", "alice", 1.0, "rotation"), ("style", "ink", 0.85, "rotation"), ("extra", "glow", 0.6, "tag")]
    expected = (pristine + 1.0 * difference(engine, root / "loras/character/alice.safetensors", layer)
                + 0.85 * difference(engine, root / "loras/style/ink.safetensors", layer)
                + 0.6 * difference(engine, root / "loras/extra/glow.safetensors", layer))
    assert torch.allclose(unet_weight(engine, layer), expected, atol=1e-6)
    assert "<lora:glow:0.6>" in record.prompt  # the record keeps the prompt as written

    # The tag is for that image: without it, the next image has only the rotated pair.
    (root / "prompts/manual_prompt.txt").write_text("1girl, night sky\n")
    assert [u.name for u in engine.new_stage1_record(seed=1).loras] == ["alice", "ink"]
    glow_part = 0.6 * difference(engine, root / "loras/extra/glow.safetensors", layer)
    assert torch.allclose(unet_weight(engine, layer) + glow_part, expected, atol=1e-6)


def test_parameters_carry_the_rotated_pair_as_tags_and_every_lora_hash(root, make_engine):
    with_loras(root)
    (root / "prompts/manual_prompt.txt").write_text("1girl, <lora:glow:0.6>\n")
    record = small(make_engine).new_stage1_record(seed=1)
    text = record.a1111_parameters()

    # What A1111/Forge's "send to txt2img" and Civitai read: every prompt line, tags included.
    prompt_as_a1111_reads_it = text.split("\nNegative prompt:")[0]
    assert prompt_as_a1111_reads_it.endswith("<lora:glow:0.6>\n<lora:alice:1> <lora:ink:0.85>")
    parsed = parse_a1111(text)
    hashes = {u.name: u.hash for u in record.loras}
    assert parsed["Lora hashes"] == ", ".join(f"{name}: {value}" for name, value in hashes.items())
    assert set(hashes) == {"alice", "ink", "glow"}
    # sdxld's own reader gives the prompt back as the record has it.
    assert parsed["prompt"] == record.prompt and parsed["rotated loras"] == "<lora:alice:1> <lora:ink:0.85>"


def test_a_tag_that_cannot_be_used_is_one_warning_and_the_image_goes_on(root, make_engine, caplog):
    with_loras(root)
    (root / "loras/extra/broken.safetensors").write_bytes(b"not a LoRA")
    (root / "prompts/manual_prompt.txt").write_text(
        "1girl, <lora:nobody:1>, <lora:glow:9>, <lora:broken:0.5>, <lora:GLOW:0.4>, <lora:glow:0.3>\n")
    (root / "prompts/manual_negative_prompt.txt").write_text("lowres, <lora:ink:1>\n")
    engine = small(make_engine)
    with caplog.at_level(logging.WARNING, logger="sdxld.loras"):
        first = engine.new_stage1_record(seed=1)
        second = engine.new_stage1_record(seed=2)
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA tag")]
    assert len(warnings) == 5, warnings  # once each, not once per image
    assert any("no LoRA named nobody in loras/character, loras/style, loras/extra" in w for w in warnings)
    assert any("weight 9 is outside -4..4" in w for w in warnings)
    assert any("extra/broken.safetensors is rejected" in w for w in warnings)
    assert any("glow is already tagged" in w for w in warnings)
    assert any("negative prompt" in w for w in warnings)
    for record in (first, second):  # the name is matched ignoring case when no file has it exactly
        assert [(u.name, u.strength, u.via) for u in record.loras if u.via == "tag"] == [("glow", 0.4, "tag")]


def test_a_tag_drawn_from_a_wildcard_counts(root, make_engine):
    with_loras(root)
    (root / "prompts/wildcards/effect.txt").write_text("<lora:glow:0.5>\n")
    (root / "prompts/manual_prompt.txt").write_text("1girl, __effect__\n")
    record = small(make_engine).new_stage1_record(seed=3)
    assert [(u.name, u.strength) for u in record.loras if u.via == "tag"] == [("glow", 0.5)]


def test_an_approved_image_is_upscaled_with_its_tagged_lora(root, make_engine):
    with_loras(root)
    (root / "prompts/manual_prompt.txt").write_text("1girl, <lora:glow:0.6>\n")
    engine = small(make_engine)
    result = engine.stage1_once(seed=4)
    (root / "prompts/manual_prompt.txt").write_text("1girl\n")
    engine.new_stage1_record(seed=5)  # another image without the tag in between
    assert engine.loras.merger.current("tag extra/glow") is None

    final = engine.upscale(result.record, Image.open(result.path))

    assert engine.loras.merger.current("tag extra/glow").strength == 0.6
    assert [(u.name, u.via) for u in final.record.loras] == [("alice", "rotation"), ("ink", "rotation"), ("glow", "tag")]
