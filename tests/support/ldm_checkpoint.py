"""Write a diffusers SDXL folder as an original-layout (SGM/LDM) single-file checkpoint.

This is how SDXL fine-tunes are shipped on model sites. The tests use it to prove that
`model.base: some.safetensors` really loads through diffusers' `from_single_file`, on the
tiny model, and gives the same pixels as the folder it came from.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_key(key: str, blocks_per_level: int, up_has_attention: list[bool]) -> str:
    fixed = {
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    }
    module, _, param = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{param}"
    step = blocks_per_level + 1  # resnets of a level plus its down/upsampler
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        side, level, kind, index, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if kind == "resnets":
            first, _, tail = rest.partition(".")
            rest = f"{RESNET.get(first, first)}.{tail}"
        if side == "down":
            return f"input_blocks.{step * level + index + 1}.{0 if kind == 'resnets' else 1}.{rest}"
        return f"output_blocks.{step * level + index}.{0 if kind == 'resnets' else 1}.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{step * (int(m[1]) + 1)}.0.op.{m[2]}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        level = int(m[1])
        return f"output_blocks.{step * level + blocks_per_level}.{2 if up_has_attention[level] else 1}.conv.{m[2]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(\w+)\.(.*)", key)
    if m:
        return f"middle_block.{2 * int(m[1])}.{RESNET.get(m[2], m[2])}.{m[3]}"
    if key.startswith("mid_block.attentions.0."):
        return "middle_block.1." + key[len("mid_block.attentions.0."):]
    raise KeyError(f"no original name for UNet key {key}")


def _vae_key(key: str, levels: int) -> tuple[str, bool]:
    """(original name, whether the weight is a linear that the original stores as a 1x1 conv)."""
    renames = [("conv_norm_out", "norm_out"), ("conv_shortcut", "nin_shortcut")]
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.*)", key)
    if m:
        inner = f"block.{m[3]}" if m[3] is not None else "downsample"
        key = f"encoder.down.{m[1]}.{inner}.{m[4]}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key)
    if m:
        inner = f"block.{m[3]}" if m[3] is not None else "upsample"
        key = f"decoder.up.{levels - 1 - int(m[1])}.{inner}.{m[4]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key)
    if m:
        key = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    linear = False
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+)(?:\.0)?\.(weight|bias)", key)
    if m:
        name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[m[2]]
        linear = name != "norm" and m[3] == "weight"
        key = f"{m[1]}.mid.attn_1.{name}.{m[3]}"
    for old, new in renames:
        key = key.replace(old, new)
    return key, linear


def _open_clip(state: dict) -> dict:
    out, qkv = {}, {}
    simple = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key == "text_model.embeddings.position_ids":
            continue
        else:
            m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", key)
            layer, module, param = m[1], m[2], m[3]
            proj = re.fullmatch(r"self_attn\.([qkv])_proj", module)
            if proj:
                qkv.setdefault((layer, param), {})[proj[1]] = value
                continue
            module = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                      "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[module]
            out[f"transformer.resblocks.{layer}.{module}.{param}"] = value
    for (layer, param), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _unet_checkpoint(folder: Path) -> dict:
    import json

    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    up_attention = ["CrossAttn" in t for t in unet_config["up_block_types"]]
    return {"model.diffusion_model." + _unet_key(key, unet_config["layers_per_block"], up_attention): value
            for key, value in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items()}


def _vae_checkpoint(folder: Path, prefix: str) -> dict:
    import json

    vae_levels = len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"])
    checkpoint = {}
    for key, value in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        name, linear = _vae_key(key, vae_levels)
        checkpoint[prefix + name] = value[..., None, None] if linear else value
    return checkpoint


def _save(checkpoint: dict, target: Path) -> Path:
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(target))
    return Path(target)


def write_single_file_vae(folder: Path, target: Path) -> Path:
    """The VAE alone, as standalone VAE files (e.g. sdxl_vae.safetensors) are shipped."""
    return _save(_vae_checkpoint(Path(folder), ""), target)


def write_single_file_refiner(folder: Path, target: Path) -> Path:
    """A refiner checkpoint: its UNet, the VAE and its one text encoder (OpenCLIP layout)."""
    folder = Path(folder)
    checkpoint = _unet_checkpoint(folder) | _vae_checkpoint(folder, "first_stage_model.")
    for key, value in _open_clip(load_file(folder / "text_encoder_2" / "model.safetensors")).items():
        checkpoint["conditioner.embedders.0.model." + key] = value
    return _save(checkpoint, target)


def write_single_file(folder: Path, target: Path) -> Path:
    folder = Path(folder)
    checkpoint = _unet_checkpoint(folder) | _vae_checkpoint(folder, "first_stage_model.")
    for key, value in load_file(folder / "text_encoder" / "model.safetensors").items():
        # transformers >= 5.6 saves CLIPTextModel without its text_model wrapper; checkpoints have it.
        key = key if key.startswith("text_model.") else "text_model." + key
        checkpoint["conditioner.embedders.0.transformer." + key] = value
    for key, value in _open_clip(load_file(folder / "text_encoder_2" / "model.safetensors")).items():
        checkpoint["conditioner.embedders.1.model." + key] = value
    return _save(checkpoint, target)
