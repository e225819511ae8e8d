"""Every LyCORIS format merges like a plain LoRA: the merged weight of each layer is the original
plus the difference lycoris-lora's own functions compute for the file's tensors, in kohya,
LyCORIS and diffusers naming, text encoders and convolutions included; DoRA's magnitude is
applied after the merge; unsupported kinds are refused with what they are."""

from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors.torch import save_file
from support.lycoris_files import FORMATS, write_lycoris, write_peft_dora

from sdxld.loras import LoraLibrary

STRENGTH = 0.7


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionXLPipeline

    from sdxld.tiny import ensure_tiny_model

    return StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model()[0])


def all_weights(pipe) -> dict:
    return {(c, name.removesuffix(".weight")): p.detach().clone()
            for c in ("unet", "text_encoder", "text_encoder_2")
            for name, p in getattr(pipe, c).named_parameters() if name.endswith(".weight")}


@contextlib.contextmanager
def merged(pipe, path, strength=STRENGTH):
    """The file merged at `strength` through the LoRA library; the model is restored after."""
    library = LoraLibrary(pipe, {"style": path.parent}, {"style": strength})
    library.sync()
    entry = library.entries()[0]
    assert entry.status == "loaded", entry.reason
    try:
        library.activate([entry])
        yield library, entry
    finally:
        library.activate([])


def reference_difference(layer, original):
    """lycoris-lora's weight difference for one layer (its functional API, torch backend), with
    alpha / rank applied once as A1111 and ComfyUI apply it, DoRA's magnitude after the merge."""
    from lycoris.functional import locon, loha, lokr, weight_decompose

    t = layer.tensors
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        difference = loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"],
                                      t.get("hada_t1"), t.get("hada_t2"), gamma=alpha / rank, backend="torch")
    elif any(k.startswith("lokr") for k in t):
        # lokr.diff_weight takes alpha and divides by the rank itself (full halves: unscaled).
        difference = lokr.diff_weight(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
                                      t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"), gamma=alpha, backend="torch")
    elif "diff" in t:
        difference = t["diff"]
    else:
        down, up = t.get("lora_down.weight", t.get("lora_A.weight")), t.get("lora_up.weight", t.get("lora_B.weight"))
        rank = down.shape[0]
        difference = locon.diff_weight(down, up, t.get("lora_mid.weight"), gamma=alpha / rank, backend="torch")
    difference = difference.reshape(original.shape)
    magnitude = t.get("dora_scale")
    if magnitude is not None:
        on_out = magnitude.shape[0] == original.shape[0]
        difference = weight_decompose(original + difference, magnitude, 1, on_out, backend="torch") - original
    return difference


def assert_merged_as_reference(pipe, path, layers, strength=STRENGTH):
    before = all_weights(pipe)
    with merged(pipe, path, strength):
        after = all_weights(pipe)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {(layer.component, layer.module) for layer in layers}
    for layer in layers:
        key = (layer.component, layer.module)
        expected = before[key] + strength * reference_difference(layer, before[key])
        assert torch.allclose(after[key], expected, rtol=1e-5, atol=1e-6), (layer.module, (after[key] - expected).abs().max())
    assert all(torch.equal(before[k], v) for k, v in all_weights(pipe).items()), "unmerging restores every layer exactly"


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_in_kohya_naming_merges_as_lycoris_computes_it(pipe, tmp_path, fmt):
    layers = write_lycoris(tmp_path / "loras" / f"{fmt}.safetensors", pipe, fmt, seed=len(fmt))
    assert_merged_as_reference(pipe, tmp_path / "loras" / f"{fmt}.safetensors", layers)


@pytest.mark.parametrize("naming", ["lycoris", "diffusers"])
@pytest.mark.parametrize("fmt", ["loha", "lokr_w2_decomposed"])
def test_lycoris_and_diffusers_layer_names_map_to_the_same_layers(pipe, tmp_path, fmt, naming):
    path = tmp_path / "loras" / "named.safetensors"
    layers = write_lycoris(path, pipe, fmt, naming=naming, seed=3)
    assert_merged_as_reference(pipe, path, layers)


@pytest.mark.parametrize("fmt, axis", [("lora", "out"), ("loha", "out"), ("lokr_w2_decomposed", "out"), ("lora", "in")])
def test_dora_applies_the_files_magnitude_after_the_merge(pipe, tmp_path, fmt, axis):
    path = tmp_path / "loras" / "dora.safetensors"
    layers = write_lycoris(path, pipe, fmt, seed=5, dora=axis)
    assert_merged_as_reference(pipe, path, layers)
    with merged(pipe, path) as (_, entry):
        assert entry.format.startswith({"lora": "DoRA (LoRA)", "loha": "DoRA (LoHa)", "lokr_w2_decomposed": "DoRA (LoKr)"}[fmt])


def test_the_scales_are_those_a1111_and_comfyui_apply(pipe, tmp_path):
    """By hand, without lycoris-lora: LoHa = (w1a w1b) * (w2a w2b) * alpha/rank, LoKr =
    kron(w1, w2a w2b) * alpha/rank, full-matrix LoKr unscaled, Tucker = mid x up x down *
    alpha/rank, DoRA at strength s = the original + s * (m * W/|W| - the original)."""
    def merged_difference(fmt, alpha, dora=None, strength=1.0):
        path = tmp_path / fmt / "f.safetensors"
        layers = write_lycoris(path, pipe, fmt, seed=9, alpha=alpha, dora=dora)
        before = all_weights(pipe)
        with merged(pipe, path, strength):
            after = all_weights(pipe)
        layer = next(layer for layer in layers if layer.shape[2:] == (3, 3)) if fmt.endswith("tucker") else layers[0]
        key = (layer.component, layer.module)
        return layer.tensors, after[key] - before[key], before[key]

    t, got, _ = merged_difference("loha", alpha=8.0)
    assert torch.allclose(got, (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 8.0 / 4, atol=1e-5)
    t, got, _ = merged_difference("lokr_w2_decomposed", alpha=8.0)
    assert torch.allclose(got, torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * 8.0 / 4, atol=1e-5)
    t, got, _ = merged_difference("lokr_full", alpha=8.0)
    assert torch.allclose(got, torch.kron(t["lokr_w1"], t["lokr_w2"]), atol=1e-5)
    t, got, _ = merged_difference("locon_tucker", alpha=2.0)
    by_hand = torch.einsum("m n k l, i m, n j -> i j k l", t["lora_mid.weight"], t["lora_up.weight"].flatten(1),
                           t["lora_down.weight"].flatten(1)) * 2.0 / 4
    assert torch.allclose(got, by_hand, atol=1e-5)

    t, half, original = merged_difference("lora", alpha=4.0, dora="out", strength=0.5)
    trained = original + t["lora_up.weight"] @ t["lora_down.weight"]
    trained = t["dora_scale"] * trained / trained.norm(dim=1, keepdim=True)
    assert torch.allclose(half, 0.5 * (trained - original), atol=1e-5)


def test_a_peft_dora_saved_by_diffusers_merges_as_diffusers_fuses_it(pipe, tmp_path):
    """lora_A/B + lora_magnitude_vector, alpha from the LoraConfig in the header: the same weights
    as diffusers' load_lora_weights + fuse_lora (peft's own DoRA) give."""
    from diffusers import StableDiffusionXLPipeline

    from sdxld.tiny import ensure_tiny_model

    path = tmp_path / "loras" / "peft_dora.safetensors"
    path.parent.mkdir(parents=True)
    layers = write_peft_dora(path, pipe, seed=11)
    with merged(pipe, path, strength=1.0) as (_, entry):
        ours = all_weights(pipe)
        assert entry.format == "DoRA (LoRA)"
    reference = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model()[0])
    reference.load_lora_weights(str(path), adapter_name="dora")
    reference.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=1.0)
    for layer in layers:
        module = getattr(reference, layer.component).get_submodule(layer.module)
        theirs = getattr(module, "base_layer", module).weight
        assert torch.allclose(ours[(layer.component, layer.module)], theirs, atol=1e-5), layer.module


def test_switching_formats_and_back_is_bit_identical(pipe, tmp_path):
    write_lycoris(tmp_path / "a" / "loha.safetensors", pipe, "loha", seed=1)
    write_lycoris(tmp_path / "a" / "lokr.safetensors", pipe, "lokr_tucker", seed=2)
    library = LoraLibrary(pipe, {"style": tmp_path / "a"}, {"style": 0.9})
    library.sync()
    first, second = library.find("style", "loha"), library.find("style", "lokr")
    assert (first.format, second.format) == ("LoHa", "LoKr")
    pristine = all_weights(pipe)
    try:
        library.activate([first])
        once = all_weights(pipe)
        library.activate([second])
        library.activate([first])
        assert all(torch.equal(once[k], v) for k, v in all_weights(pipe).items())
    finally:
        library.activate([])
    assert all(torch.equal(pristine[k], v) for k, v in all_weights(pipe).items())


def _rejected(pipe, path):
    library = LoraLibrary(pipe, {"style": path.parent}, {"style": 1.0})
    library.sync()
    entry = library.entries()[0]
    assert entry.status == "rejected"
    return entry.reason


def test_kinds_that_are_not_a_weight_difference_are_refused_with_what_they_are(pipe, tmp_path):
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.oft_blocks": torch.zeros(4, 8, 8), f"{name}.alpha": torch.tensor(1.0)}, str(tmp_path / "oft.safetensors"))
    assert "OFT" in _rejected(pipe, tmp_path / "oft.safetensors")
    (tmp_path / "oft.safetensors").unlink()
    save_file({f"{name}.hada_w1_a": torch.zeros(64, 4), f"{name}.hada_w1_b": torch.zeros(4, 64),
               f"{name}.hada_w2_a": torch.zeros(64, 4), f"{name}.hada_w2_b": torch.zeros(4, 64),
               "lora_unet_middle_block_1_norm.w_norm": torch.zeros(64)}, str(tmp_path / "norms.safetensors"))
    assert "normalization layers" in _rejected(pipe, tmp_path / "norms.safetensors")


def test_a_damaged_or_misfitting_lycoris_file_is_refused_with_the_layer(pipe, tmp_path):
    from safetensors.torch import load_file

    write_lycoris(tmp_path / "damaged.safetensors", pipe, "loha", seed=4)
    tensors = load_file(str(tmp_path / "damaged.safetensors"))
    broken = next(k for k in tensors if k.endswith(".hada_w2_b"))
    del tensors[broken]
    save_file(tensors, str(tmp_path / "damaged.safetensors"))
    reason = _rejected(pipe, tmp_path / "damaged.safetensors")
    assert broken.removesuffix(".hada_w2_b") in reason and "hada_w2_a/b" in reason

    (tmp_path / "damaged.safetensors").unlink()
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # 64 wide in the tiny model
    save_file({f"{name}.lokr_w1": torch.zeros(4, 4), f"{name}.lokr_w2": torch.zeros(80, 80)}, str(tmp_path / "sd15.safetensors"))
    reason = _rejected(pipe, tmp_path / "sd15.safetensors")
    assert "another architecture" in reason and "LoKr gives 320x320, layer is 64x64" in reason
