"""performance.quantize: the UNet's linear layers as int8 (or fp8) matmuls; LoRAs merge into the
full-precision originals kept beside them and are quantized again, in place."""

from __future__ import annotations

import pytest

from sdxld import quantize
from sdxld.models import ModelLoadError
from sdxld.tiny import write_tiny_lora


def unet_output(engine):
    import torch

    unet = engine.models.base.unet
    args, kwargs = quantize.fixed_unet_inputs(unet, batch=2, latent_hw=(16, 16))
    with torch.inference_mode():
        return unet(*args, **kwargs).sample


def quantized_layers(unet) -> dict:
    return {name: module for name, module in unet.named_modules() if quantize.is_quantized(getattr(module, "weight", None))}


def inner_tensors(weight) -> dict:
    return {name: getattr(weight, name) for name in type(weight).tensor_data_names}


def snapshot(unet) -> dict:
    return {(layer, part): tensor.clone() for layer, module in quantized_layers(unet).items()
            for part, tensor in inner_tensors(module.weight).items()}


def addresses(unet) -> dict:
    return {(layer, part): tensor.data_ptr() for layer, module in quantized_layers(unet).items()
            for part, tensor in inner_tensors(module.weight).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


@pytest.fixture
def two_loras(root):
    write_tiny_lora(root / "loras/character/alice.safetensors", seed=1, rank=4, scale=0.1)
    write_tiny_lora(root / "loras/character/kuro.safetensors", "diffusers", seed=2, rank=4, scale=0.1)


def test_int8_runs_every_linear_layer_of_the_unet_quantized_close_to_full_precision(make_engine):
    import torch

    plain, int8 = make_engine(), make_engine(performance__quantize="int8")
    linear = [name for name, m in plain.models.base.unet.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(quantized_layers(int8.models.base.unet)) == sorted(linear)
    assert not quantized_layers(plain.models.base.unet)
    assert quantized_layers(int8.models.refiner.unet), "the refiner's UNet is quantized too"
    assert any("int8 matmuls" in note for note in int8.models.notes)
    assert any("compile off is slower, not faster" in note for note in int8.models.notes), "measured: say so at start"

    error = quantize.relative_error(unet_output(plain), unet_output(int8))
    assert 0 < error < 0.05, f"relative error of the int8 UNet against fp32: {error:.4f}"
    assert int8.stage1_once(seed=3).image.size == (plain.config.generation.base_width, plain.config.generation.base_height)


def test_a_lora_merges_into_the_kept_originals_and_is_quantized_again_in_place(two_loras, make_engine):
    plain, int8 = make_engine(), make_engine(performance__quantize="int8")
    unet = int8.models.base.unet
    unmerged, where = snapshot(unet), addresses(unet)
    for engine in (plain, int8):
        engine.sync_loras()
        alice, kuro = engine.loras.available("character")
        engine.loras.activate([alice])

    assert addresses(unet) == where, "merging replaced a quantized tensor instead of writing into it"
    with_alice = snapshot(unet)
    assert not same(with_alice, unmerged)
    # Exactly what quantizing the full-precision merge gives: the LoRA met the original, not a
    # dequantized copy of it.
    for layer, module in quantized_layers(unet).items():
        expected = plain.models.base.unet.get_submodule(layer).weight.detach().clone()
        scratch = type(module)(module.in_features, module.out_features, bias=False)
        quantize.quantize_unet(scratch, "int8", keep_originals=False)
        int8.models.quantized.write(scratch, expected)
        for part, tensor in inner_tensors(module.weight).items():
            assert bool((getattr(scratch.weight, part) == tensor).all()), f"{layer}.{part}"
    error = quantize.relative_error(unet_output(plain), unet_output(int8))
    assert 0 < error < 0.05, f"relative error with the LoRA merged: {error:.4f}"

    # Swapping away and back, then unmerging: bit for bit where it was, never drifting.
    for engine in (plain, int8):
        alice, kuro = engine.loras.available("character")
        engine.loras.activate([kuro])
        engine.loras.activate([alice])
    assert same(snapshot(unet), with_alice)
    int8.loras.activate([])
    assert same(snapshot(unet), unmerged)
    assert addresses(unet) == where


def fp8_missing() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "fp8 needs an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper); this machine has no CUDA GPU"
    return quantize.fp8_unsupported("cuda")


def test_fp8_where_the_hardware_has_none_falls_back_to_int8_and_says_why(make_engine):
    if not fp8_missing():
        pytest.skip("this machine runs fp8: the fallback cannot happen here")
    engine = make_engine(performance__quantize="fp8")
    assert engine.models.quantized.mode == "int8"
    assert any("fp8" in note and "8.9" in note and "using int8" in note for note in engine.models.notes)


@pytest.mark.skipif(bool(fp8_missing()), reason=fp8_missing() or "")
def test_fp8_on_ada_or_hopper_quantizes_the_unet_and_merges_loras_in_place(two_loras, make_engine):
    plain = make_engine(performance__device="cuda", performance__dtype="bf16")
    fp8 = make_engine(performance__device="cuda", performance__dtype="bf16", performance__quantize="fp8",
                      memory__strategy="gpu")
    assert fp8.models.quantized.mode == "fp8"
    where = addresses(fp8.models.base.unet)
    fp8.sync_loras()
    fp8.loras.activate(fp8.loras.available("character")[:1])
    assert addresses(fp8.models.base.unet) == where
    fp8.loras.activate([])
    error = quantize.relative_error(unet_output(plain), unet_output(fp8))
    assert 0 < error < 0.1, f"relative error of the fp8 UNet against bf16: {error:.4f}"


def test_without_torchao_quantize_says_what_to_install(make_engine, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if absent
    with pytest.raises(ModelLoadError, match=r"needs torchao.*pip install 'sdxld\[quantize\]'.*performance.quantize: none"):
        make_engine(performance__quantize="int8")
