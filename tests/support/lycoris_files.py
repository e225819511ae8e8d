"""LyCORIS files for the tiny model, laid out the way LyCORIS and kohya's trainers save them.

Every file adapts attention and feed-forward layers of the UNet, 3x3 and 1x1 resnet convolutions
(the formats that have a conv form) and layers of both text encoders, so a name mapping or a
shape rule that is wrong for one kind of layer shows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdxld.tiny import _sgm_unet_name

UNET_LINEAR = ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
               "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
               "up_blocks.0.attentions.1.proj_out")
UNET_CONV = ("down_blocks.0.resnets.0.conv1", "mid_block.resnets.1.conv2", "up_blocks.1.resnets.0.conv_shortcut")
# Text encoder layers by their tail: transformers 5 dropped CLIPTextModel's text_model level,
# CLIPTextModelWithProjection keeps it.
TEXT_LINEAR = (("text_encoder", "encoder.layers.0.self_attn.q_proj"), ("text_encoder_2", "encoder.layers.1.mlp.fc2"))

# format -> (what it stores, whether it has a conv form)
FORMATS = {
    "lora": "lora_down/lora_up (LoCon on convolutions)",
    "locon_tucker": "lora_down/lora_mid/lora_up on 3x3 convolutions",
    "loha": "hada_w1_a/b, hada_w2_a/b",
    "loha_tucker": "hada_t1/t2 on 3x3 convolutions",
    "lokr_full": "lokr_w1, lokr_w2 (both full matrices)",
    "lokr_w2_decomposed": "lokr_w1, lokr_w2_a/b",
    "lokr_both_decomposed": "lokr_w1_a/b, lokr_w2_a/b",
    "lokr_tucker": "lokr_w1, lokr_w2_a/b, lokr_t2 on 3x3 convolutions",
    "full": "diff",
}


@dataclass
class Layer:
    component: str
    module: str  # diffusers module name inside the component
    shape: tuple
    tensors: dict  # suffix -> tensor, as stored


def targets(pipe, fmt: str) -> list[tuple[str, str, tuple]]:
    """(component, module, weight shape) of the layers a file of this format adapts."""
    layers = [("unet", name, tuple(pipe.unet.get_submodule(name).weight.shape)) for name in UNET_LINEAR]
    for component, tail in TEXT_LINEAR:
        name, module = next((n, m) for n, m in getattr(pipe, component).named_modules() if n.endswith(tail))
        layers.append((component, name, tuple(module.weight.shape)))
    convs = [("unet", name, tuple(pipe.unet.get_submodule(name).weight.shape)) for name in UNET_CONV]
    if fmt.endswith("tucker"):
        return [c for c in convs if c[2][2:] == (3, 3)]
    return layers + convs


def _divisor(n: int) -> int:
    return next((d for d in (4, 2) if n % d == 0), 1)


def layer_tensors(fmt: str, shape: tuple, rank: int, generator, dora: str | None = None, alpha: float | None = None) -> dict:
    out, n_in, *kernel = shape
    k = kernel or []
    flat_in = n_in * (k[0] * k[1] if k else 1)

    def rand(*dims):
        return torch.randn(*dims, generator=generator) * 0.3

    t: dict = {}
    if fmt == "lora":
        t["lora_down.weight"] = rand(rank, n_in, *k)
        t["lora_up.weight"] = rand(out, rank, *([1, 1] if k else []))
    elif fmt == "locon_tucker":
        t["lora_down.weight"] = rand(rank, n_in, 1, 1)
        t["lora_mid.weight"] = rand(rank, rank, *k)
        t["lora_up.weight"] = rand(out, rank, 1, 1)
    elif fmt == "loha":
        t.update(hada_w1_a=rand(out, rank), hada_w1_b=rand(rank, flat_in), hada_w2_a=rand(out, rank), hada_w2_b=rand(rank, flat_in))
    elif fmt == "loha_tucker":
        t.update(hada_w1_a=rand(rank, out), hada_w1_b=rand(rank, n_in), hada_t1=rand(rank, rank, *k),
                 hada_w2_a=rand(rank, out), hada_w2_b=rand(rank, n_in), hada_t2=rand(rank, rank, *k))
    elif fmt.startswith("lokr"):
        a, c = _divisor(out), _divisor(n_in)
        b, d = out // a, n_in // c
        if fmt == "lokr_both_decomposed":
            t.update(lokr_w1_a=rand(a, rank), lokr_w1_b=rand(rank, c))
        else:
            t["lokr_w1"] = rand(a, c)
        if fmt == "lokr_full":
            t["lokr_w2"] = rand(b, d, *k)
        elif fmt == "lokr_tucker":
            t.update(lokr_w2_a=rand(rank, b), lokr_w2_b=rand(rank, d), lokr_t2=rand(rank, rank, *k))
        else:
            t.update(lokr_w2_a=rand(b, rank), lokr_w2_b=rand(rank, d, *k))
    elif fmt == "full":
        t["diff"] = rand(*shape) * 0.1
    else:
        raise ValueError(fmt)
    if alpha is not None:
        t["alpha"] = torch.tensor(float(alpha))
    if dora == "out":
        t["dora_scale"] = torch.rand(out, 1, *([1, 1] if k else []), generator=generator) + 0.5
    elif dora == "in":
        t["dora_scale"] = torch.rand(1, n_in, *([1, 1] if k else []), generator=generator) + 0.5
    return t


def file_key(component: str, module: str, naming: str) -> str:
    if component != "unet":  # files name CLIP's layers as transformers 4 did, under text_model
        module = "text_model." + module.removeprefix("text_model.")
    if naming == "kohya":
        name = _sgm_unet_name(module) if component == "unet" else module
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
        return prefix + name.replace(".", "_")
    if naming == "lycoris":  # the LyCORIS wrapper on a diffusers UNet (SimpleTuner and others)
        return "lycoris_" + module.replace(".", "_")
    return f"{component}.{module}"


def write_lycoris(path: Path, pipe, fmt: str, naming: str = "kohya", seed: int = 0, rank: int = 4,
                  alpha: float | None = 2.0, dora: str | None = None) -> list[Layer]:
    """Write a file of this format and naming; returns what each layer holds."""
    generator = torch.Generator().manual_seed(seed)
    layers, tensors = [], {}
    for component, module, shape in targets(pipe, fmt):
        if naming == "lycoris" and component != "unet":
            continue
        stored = layer_tensors(fmt, shape, rank, generator, dora, alpha)
        layers.append(Layer(component, module, shape, stored))
        key = file_key(component, module, naming)
        tensors.update({f"{key}.{suffix}": value for suffix, value in stored.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return layers


def write_peft_dora(path: Path, pipe, seed: int = 0, rank: int = 4, lora_alpha: float = 8.0) -> list[Layer]:
    """A UNet DoRA trained with peft and saved by diffusers: lora_A/B + lora_magnitude_vector, its
    alpha only in the LoraConfig stored in the header. (UNet layers only: diffusers 0.42 cannot
    load a text-encoder DoRA in this naming, so it could not serve as the reference.)"""
    generator = torch.Generator().manual_seed(seed)
    layers, tensors = [], {}
    for component, module, shape in targets(pipe, "lora")[: len(UNET_LINEAR)]:
        out, n_in = shape[:2]
        stored = {"lora_A.weight": torch.randn(rank, n_in, generator=generator) * 0.3,
                  "lora_B.weight": torch.randn(out, rank, generator=generator) * 0.3,
                  "lora_magnitude_vector": torch.rand(out, generator=generator) + 0.5}
        layers.append(Layer(component, module, shape, stored))
        tensors.update({f"{component}.{module}.{suffix}": value for suffix, value in stored.items()})
    config = {}
    for component in {layer.component for layer in layers}:
        config.update({f"{component}.r": rank, f"{component}.lora_alpha": lora_alpha, f"{component}.use_dora": True,
                       f"{component}.target_modules": [lay.module for lay in layers if lay.component == component]})
    metadata = {"lora_adapter_metadata": json.dumps(config), "format": "pt"}
    save_file(tensors, str(path), metadata=metadata)
    return layers
