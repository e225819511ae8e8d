"""The built-in tiny SDXL: SDXL's topology, reproducible, loaded like any diffusers folder."""

import hashlib
import json

from sdxld.tiny import build_tokenizer, ensure_tiny_model


def folder_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_two_builds_are_bit_identical(tmp_path):
    first = ensure_tiny_model(tmp_path / "a")
    second = ensure_tiny_model(tmp_path / "b")
    assert folder_digest(first[0]) == folder_digest(second[0])
    assert folder_digest(first[1]) == folder_digest(second[1])
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".tiny-build-")]


def test_it_has_sdxls_topology():
    base, refiner = ensure_tiny_model()
    unet = json.loads((base / "unet" / "config.json").read_text())
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert unet["transformer_layers_per_block"] == [1, 1, 2]
    assert unet["addition_embed_type"] == "text_time"
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"} <= set(index)
    vae = json.loads((base / "vae" / "config.json").read_text())
    assert len(vae["block_out_channels"]) == 4  # latent is 1/8 of the image, as in SDXL
    refiner_unet = json.loads((refiner / "unet" / "config.json").read_text())
    assert refiner_unet["projection_class_embeddings_input_dim"] == 32 + 5 * 8  # aesthetic-score time ids


def test_tokenizer_keeps_a_typical_prompt_short():
    tokenizer = build_tokenizer()
    ids = tokenizer("masterpiece, best quality, 1girl, solo, looking at viewer, cherry blossoms").input_ids
    assert len(ids) < 30
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "masterpiece,bestquality,1girl,solo,lookingatviewer,cherryblossoms"
    # Any text tokenizes: every byte is in the alphabet.
    assert len(tokenizer("日本語 ✨").input_ids) > 2
