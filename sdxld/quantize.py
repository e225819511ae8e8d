"""performance.quantize: the UNets' linear layers as quantized matmuls, through torchao.

fp8  float8 (e4m3) weights, and activations quantized per row as they come
     (torchao's Float8DynamicActivationFloat8WeightConfig): the fp8 tensor cores of Ada and
     Hopper GPUs run these at twice their bf16 rate.
int8 int8 weights and dynamically quantized int8 activations
     (Int8DynamicActivationInt8WeightConfig): int8 tensor cores from Ampere (A100, RTX 30xx)
     on; it also runs on the CPU, which is where the tests exercise it.

Only linear layers are quantized (attention projections, feed-forwards, the transformer blocks'
in/out projections: most of the UNet's matmul work); convolutions stay in the pipeline's dtype.

LoRAs: a quantized weight has lost precision, and merging a LoRA into it and out again would add
rounding at every swap. So the full-precision weight of every quantized layer of the base UNet is
kept, on the CPU, before quantizing; a merge computes original + LoRA there (lora_merge.py) and
`write` quantizes the result into the layer's existing tensors in place. The tensors keep their
addresses, so compiled code and recorded CUDA graphs read the new weights without a recompile or
a re-record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .host_copies import packed_cpu_copies

# fp8 matmuls (torch._scaled_mm) want both dimensions divisible by 16; SDXL's all are.
_ALIGNMENT = 16


class QuantizeUnavailable(RuntimeError):
    """torchao is missing or too old for performance.quantize."""


def fp8_unsupported(device: str) -> str | None:
    """Why fp8 matmuls cannot run on `device` (None when they can)."""
    import torch

    if not device.startswith("cuda"):
        return f"fp8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); this runs on {device}"
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(torch.device(device))
        return f"fp8 matmuls need compute capability 8.9 or newer (Ada, Hopper, Blackwell); {name} has {major}.{minor}"
    return None


def torchao_config(mode: str, set_inductor_config: bool = True):
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
        )
    except ImportError as err:
        raise QuantizeUnavailable(
            f"performance.quantize {mode} needs torchao ({err}); install it with pip install 'sdxld[quantize]' "
            "(torchao matching your torch), or set performance.quantize: none") from None
    if mode == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=set_inductor_config)
    if mode == "int8":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=set_inductor_config)
    raise ValueError(f"unknown quantize mode {mode!r}")


def is_quantized(tensor) -> bool:
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return False
    return isinstance(tensor, TorchAOBaseTensor)


def _quantizable(module, _name: str = "") -> bool:
    import torch

    return (isinstance(module, torch.nn.Linear) and module.in_features % _ALIGNMENT == 0
            and module.out_features % _ALIGNMENT == 0)


@dataclass
class Quantized:
    """One quantized UNet: its mode and, for the base UNet, the full-precision originals of its
    quantized layers, keyed like LoraMerger's ("unet", layer name)."""

    mode: str
    layers: int = 0
    originals: dict[tuple[str, str], object] = field(default_factory=dict)

    def holds(self, component: str, layer: str) -> bool:
        return (component, layer) in self.originals

    def original_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.originals.values())

    def write(self, module, weight) -> None:
        """Quantize `weight` (full precision, the layer's shape) into `module.weight` in place."""
        import torch
        from torchao.quantization import quantize_

        scratch = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        scratch.weight = torch.nn.Parameter(weight.to(module.weight.dtype), requires_grad=False)
        quantize_(scratch, torchao_config(self.mode, set_inductor_config=False))
        with torch.no_grad():
            module.weight.copy_(scratch.weight)


def quantize_unet(unet, mode: str, keep_originals: bool) -> Quantized:
    """Quantize `unet`'s linear layers where it is (best on the GPU: seconds for SDXL); with
    `keep_originals`, first copy each of those weights to the CPU for LoRA merges."""
    import torch

    config = torchao_config(mode)  # first: says what to install when torchao is missing
    from torchao.quantization import quantize_

    quantized = Quantized(mode)
    layers = [(name, module) for name, module in unet.named_modules() if _quantizable(module)]
    quantized.layers = len(layers)
    if keep_originals:
        copies = packed_cpu_copies([module.weight for _, module in layers], pin=next(unet.parameters()).is_cuda)
        quantized.originals = {("unet", name): copy for (name, _), copy in zip(layers, copies)}
    with torch.no_grad():
        quantize_(unet, config, filter_fn=_quantizable)
    return quantized


def relative_error(reference, output) -> float:
    """||output - reference|| / ||reference||, in fp32."""
    reference, output = reference.float(), output.float()
    return float((output - reference).norm() / reference.norm())


def fixed_unet_inputs(unet, batch: int, latent_hw: tuple[int, int], seed: int = 0) -> tuple:
    """(args, kwargs) for one CFG-shaped UNet call on inputs drawn from `seed`, on the UNet's
    device and dtype: what quantized and full-precision UNets are compared on."""
    import torch

    config = unet.config
    parameter = next(unet.parameters())
    generator = torch.Generator("cpu").manual_seed(seed)

    def noise(*shape):
        return torch.randn(*shape, generator=generator).to(parameter.device, parameter.dtype)

    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    height, width = latent_hw
    time_ids = torch.tensor([[height * 8, width * 8, 0, 0, height * 8, width * 8]] * batch)
    added = {"text_embeds": noise(batch, pooled), "time_ids": time_ids.to(parameter.device, parameter.dtype)}
    args = (noise(batch, config.in_channels, height, width), torch.tensor(500, device=parameter.device))
    return args, {"encoder_hidden_states": noise(batch, 77, config.cross_attention_dim), "added_cond_kwargs": added}
