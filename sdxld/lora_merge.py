"""LoRA weights merged into the model: W = W0 + sum over kinds of strength * B @ A * alpha / rank.

Why not peft adapters (diffusers' load_lora_weights + set_adapters)? Measured on an H200 with
full-size SDXL (bench/gpu.py, bench/results/): two rank-32 LoRAs left as adapter layers beside 722
UNet layers made a 30-step stage-1 image take 5.3 s instead of 2.0 s: every adapted layer launches
its own small kernels, at every step, and regional compile only got that to 4.3 s. Merged weights
cost nothing per step. Also:
- memory: adapters stay resident, one set per file; fifty SDXL LoRAs are ~10 GB. Here a file's
  weights are read when it is chosen and dropped when it is replaced;
- compile: switching adapters changes what torch.compile guards on; diffusers' hotswap covers the
  UNet only. Merging only writes into existing weight tensors, so nothing is ever recompiled;
- drift: merging and unmerging in fp16/bf16 (diffusers' fuse_lora/unfuse_lora) accumulates
  rounding. Here every layer a LoRA touched keeps its original weights (W0, on the CPU) and is
  always rebuilt from them, so a LoRA gives bit-identical weights whenever it is chosen again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from . import diffusers_private

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_ALPHA_SUFFIXES = (".lora_linear_layer.down.weight", ".lora.down.weight", ".down.weight")
# diffusers names the alphas of kohya text-encoder attention after its old attention processors.
_OLD_ATTENTION_NAMES = {".to_q_lora": ".q_proj", ".to_k_lora": ".k_proj", ".to_v_lora": ".v_proj", ".to_out_lora": ".out_proj"}


class LoraFileError(ValueError):
    """Why a file is not a usable LoRA, in words the user can act on."""


@dataclass
class LoraWeights:
    """A LoRA file ready to merge: per component, per layer, (A, B * alpha / rank)."""

    layers: dict[str, dict[str, tuple]] = field(default_factory=dict)

    def layout(self) -> dict[str, dict[str, int]]:
        """Which layers it adapts, at which rank (small: kept per file instead of the tensors)."""
        return {c: {m: a.shape[0] for m, (a, _) in layers.items()} for c, layers in self.layers.items()}


def _strip_text_model(model, name: str) -> str:
    # transformers 5 flattened CLIPTextModel; older LoRAs still name its 'text_model.' level.
    if not hasattr(model, "text_model"):
        return name.removeprefix("text_model.")
    return name


def _alpha_module(model, key: str) -> str:
    key = key.removesuffix(".alpha")
    for suffix in _ALPHA_SUFFIXES:
        key = key.removesuffix(suffix)
    for old, new in _OLD_ATTENTION_NAMES.items():
        if key.endswith(old):
            key = key.removesuffix(old) + new
    return _strip_text_model(model, key)


def read_lora_weights(pipe, data: bytes) -> LoraWeights:
    """Parse a LoRA file's bytes (kohya/A1111 or diffusers naming) against this pipeline's layers.

    Bytes, never a path: safetensors would mmap a path, and a mapped file that someone truncates
    or copies over in place kills the process with SIGBUS at the next access (found by
    bench/soak.py); the weights of a merged LoRA are used again when the other kind changes.
    diffusers does the name conversion (lora_state_dict maps kohya and SGM block names); this
    checks every layer exists with the LoRA's widths, so a LoRA for another architecture is
    refused here with the layer that does not fit instead of failing mid-generation.
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    from safetensors.torch import load

    tensors = load(data)
    adapter_metadata = _adapter_metadata(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state_dict, alphas = pipe.lora_state_dict(tensors, unet_config=pipe.unet.config)
    alphas = alphas or {}

    weights = LoraWeights()
    misfits: list[str] = []
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        prefix = component + "."
        part = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        if model is None or not part:
            continue
        if component == "unet":
            if not any("lora_A" in k for k in part):
                part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        part = {_strip_text_model(model, k): v for k, v in part.items()}
        component_alphas = {_alpha_module(model, k.removeprefix(prefix)): float(v) for k, v in alphas.items() if k.startswith(prefix)}
        # A layer whose alpha cannot be matched gets the file's usual alpha, as diffusers does.
        usual_alpha = Counter(component_alphas.values()).most_common(1)[0][0] if component_alphas else None
        # peft-trained files saved by diffusers carry their LoraConfig (lora_alpha, alpha_pattern).
        config = {k.removeprefix(prefix): v for k, v in adapter_metadata.items() if k.startswith(prefix)}
        if usual_alpha is None and config.get("lora_alpha") is not None:
            usual_alpha = float(config["lora_alpha"])
        layer_names = {k.removesuffix(".lora_A.weight") for k in part if k.endswith(".lora_A.weight")}
        for pattern, alpha in (config.get("alpha_pattern") or {}).items():
            for name in layer_names:
                if name == pattern or name.endswith("." + pattern):
                    component_alphas.setdefault(name, float(alpha))
        modules = dict(model.named_modules())
        layers = {}
        for key, down in part.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key.removesuffix(".lora_A.weight")
            up = part.get(f"{name}.lora_B.weight")
            if up is None:
                raise LoraFileError(f"layer {component}.{name} has a down but no up matrix; the file is damaged")
            problem = _misfit(modules.get(name), down, up)
            if problem:
                misfits.append(f"{component}.{name}: {problem}")
                continue
            rank = down.shape[0]
            alpha = component_alphas.get(name, usual_alpha)
            scale = 1.0 if alpha is None else alpha / rank
            layers[name] = (down.detach(), (up.detach().float() * scale).to(up.dtype))
        if layers:
            weights.layers[component] = layers
    if misfits:
        raise LoraFileError(
            f"its layer shapes do not fit this model (a LoRA for another architecture, e.g. SD1.5?): "
            f"size mismatch at {misfits[0]}" + (f" and {len(misfits) - 1} more layers" if len(misfits) > 1 else "")
        )
    if not weights.layers:
        raise LoraFileError("no layer of this model matched the LoRA's keys (a LoRA for another architecture?)")
    return weights


def _adapter_metadata(data: bytes) -> dict:
    """The LoraConfig diffusers' save_lora_weights stores in the header ({} when absent)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    raw = (header.get("__metadata__") or {}).get("lora_adapter_metadata")
    try:
        parsed = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _misfit(module, down, up) -> str:
    import torch

    if module is None:
        return "the model has no such layer"
    base = getattr(module, "base_layer", module)
    if isinstance(base, torch.nn.Linear):
        n_in, n_out, kernel = base.in_features, base.out_features, (1, 1)
    elif isinstance(base, torch.nn.Conv2d):
        n_in, n_out, kernel = base.in_channels, base.out_channels, tuple(base.kernel_size)
    else:
        return f"a {type(base).__name__}, which sdxld does not merge LoRAs into"
    if down.shape[1] != n_in or up.shape[0] != n_out or up.shape[1] != down.shape[0]:
        return f"LoRA {down.shape[1]}->{up.shape[0]} (rank {down.shape[0]}), layer {n_in}->{n_out}"
    # A conv LoRA (LoCon) carries the layer's kernel in its down matrix and 1x1 in its up matrix;
    # a plain matrix fits a linear layer or a 1x1 conv.
    down_kernel = tuple(down.shape[2:]) or (1, 1)
    up_kernel = tuple(up.shape[2:]) or (1, 1)
    if down_kernel != kernel or up_kernel != (1, 1):
        return (f"LoRA kernel {'x'.join(map(str, down_kernel))} (up {'x'.join(map(str, up_kernel))}), "
                f"layer kernel {'x'.join(map(str, kernel))}")
    return ""


@contextlib.contextmanager
def offload_paused(pipe):
    """Take accelerate/group offload hooks off while weights are rewritten, and put them back.

    The dance diffusers does inside load_lora_weights: sequential offload keeps the weights on the
    meta device between calls, with the real ones inside its hooks."""
    import torch

    model_offload, sequential, group = diffusers_private.disable_offloading(pipe)
    try:
        yield
    finally:
        if model_offload:
            pipe.enable_model_cpu_offload(device=diffusers_private.offload_device(pipe))
        elif sequential:
            pipe.enable_sequential_cpu_offload(device=diffusers_private.offload_device(pipe))
        elif group:
            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module):
                    diffusers_private.reapply_group_offloading(component)


def _weights_on_meta(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


class LoraMergeError(RuntimeError):
    """Merging failed part-way; every rewritten layer is back to what it was before the merge.

    `kinds` are the kinds whose incoming LoRA touched the layer that failed."""

    def __init__(self, message: str, kinds: list[str]):
        super().__init__(message)
        self.kinds = kinds


class Merged(NamedTuple):
    key: tuple  # (path, file signature, strength): what identifies this content
    weights: LoraWeights
    strength: float


class LoraMerger:
    """Keeps, per kind, one LoRA merged into the pipeline's weights."""

    def __init__(self, pipe, kinds: tuple[str, ...]):
        self.pipe = pipe
        self.kinds = kinds
        self._merged: dict[str, Merged | None] = {kind: None for kind in kinds}
        # (component, layer) -> its original weight, on the CPU: taken the first time a LoRA
        # touches the layer, the base every later merge starts from.
        self._originals: dict[tuple[str, str], object] = {}

    def holds(self, kind: str, key: tuple) -> bool:
        merged = self._merged[kind]
        return merged is not None and merged.key == key

    def current(self, kind: str) -> Merged | None:
        return self._merged[kind]

    def saved_layers(self) -> int:
        return len(self._originals)

    def apply(self, wanted: dict[str, Merged | None]) -> None:
        """Make the weights hold exactly `wanted` (kind -> LoRA or None); only the layers the
        outgoing or incoming LoRAs touch are rewritten."""
        changed = [kind for kind in self.kinds if _key(wanted.get(kind)) != _key(self._merged[kind])]
        if not changed:
            return
        touched: set[tuple[str, str]] = set()
        for kind in changed:
            for merged in (self._merged[kind], wanted.get(kind)):
                if merged is not None:
                    touched.update((c, layer) for c, layers in merged.weights.layers.items() for layer in layers)
        new_state = {kind: wanted.get(kind) for kind in self.kinds}
        components = {c for c, _ in touched}
        if any(_weights_on_meta(getattr(self.pipe, c)) for c in components):
            context = offload_paused(self.pipe)
        else:
            context = contextlib.nullcontext()
        with context:
            self._unfuse_qkv(components)
            self._rewrite_or_roll_back(sorted(touched), new_state, changed)
        self._merged = new_state

    def _rewrite_or_roll_back(self, touched: list[tuple[str, str]], new_state: dict, changed: list[str]) -> None:
        """Rewrite the layers; if one fails (out of memory, a layer the check let through), put
        back every layer already rewritten so the model holds exactly the previous LoRAs."""
        done: list[tuple[str, str]] = []
        try:
            self._rewrite(touched, new_state, done)
        except Exception as err:
            if not done:
                raise
            component, name = done[-1]
            culprits = [kind for kind in changed
                        if new_state.get(kind) is not None and name in new_state[kind].weights.layers.get(component, {})]
            self._rewrite(done, self._merged)
            raise LoraMergeError(f"merging failed at layer {component}.{name}: {type(err).__name__}: {err}",
                                 culprits or changed) from err

    def _unfuse_qkv(self, components: set[str]) -> None:
        if "unet" in components and getattr(self.pipe, "fusing_unet", False):
            # performance.fuse_qkv: fused attention reads to_qkv, a copy made before any LoRA.
            log.info("LoRAs in use: unfusing the UNet's q/k/v projections (performance.fuse_qkv)")
            self.pipe.unfuse_qkv_projections(unet=True, vae=False)

    def _rewrite(self, touched: list[tuple[str, str]], state: dict[str, Merged | None], done: list | None = None) -> None:
        """Rebuild each layer from its original plus the LoRAs in `state`; `done` collects the
        layers as they are started (what a rollback must restore)."""
        import torch

        device = diffusers_private.execution_device(self.pipe)
        pin = torch.cuda.is_available()
        # Inference mode: group offload may have turned the weights into inference tensors.
        with torch.inference_mode():
            for component, layer in touched:
                if done is not None:
                    done.append((component, layer))
                self._rewrite_layer(component, layer, state, device, pin)

    def _rewrite_layer(self, component: str, layer: str, state: dict[str, Merged | None], device, pin: bool) -> None:
        module = getattr(self.pipe, component).get_submodule(layer)
        weight = module.weight
        original = self._originals.get((component, layer))
        if original is None:
            original = weight.detach().to("cpu", copy=True)
            self._originals[(component, layer)] = original.pin_memory() if pin else original
        total = None
        for merged in state.values():
            if merged is None or layer not in merged.weights.layers.get(component, {}):
                continue
            down, up = merged.weights.layers[component][layer]
            # Copy at the file's precision, widen on the device: .to(device, float32)
            # would widen on the CPU first.
            down, up = down.to(device).float().flatten(1), up.to(device).float().flatten(1)
            delta = (up @ down) * merged.strength
            total = delta if total is None else total + delta
        if total is None:
            weight.copy_(original)
        else:
            merged_weight = original.to(device, non_blocking=True).float() + total.reshape(original.shape)
            weight.copy_(merged_weight.to(weight.dtype))


def _key(merged: Merged | None):
    return merged.key if merged is not None else None
