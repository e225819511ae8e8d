"""LoRA weights merged into the model: W = W0 + sum over the merged files of strength * their difference
(B @ A * alpha / rank for a plain LoRA; lora_formats.py for LyCORIS and DoRA).

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
from .host_copies import groups_within, packed_cpu_copies
from .lora_formats import LayerFormatError, LayerPatch, is_lycoris, patch_from_tensors, split_key, unsupported_kind
from .lora_stacks import LayerStack, StackedDifferences, stack_layers

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_ALPHA_SUFFIXES = (".lora_linear_layer.down.weight", ".lora.down.weight", ".down.weight")
# diffusers names the alphas of kohya text-encoder attention after its old attention processors.
_OLD_ATTENTION_NAMES = {".to_q_lora": ".q_proj", ".to_k_lora": ".k_proj", ".to_v_lora": ".v_proj", ".to_out_lora": ".out_proj"}


class LoraFileError(ValueError):
    """Why a file is not a usable LoRA, in words the user can act on."""


@dataclass
class LoraWeights:
    """A LoRA file ready to merge: per component, per layer, what it adds (a LayerPatch)."""

    layers: dict[str, dict[str, LayerPatch]] = field(default_factory=dict)
    # Built at the first merge (checking a file does not need them): (component, layer) ->
    # (its LayerStack, its index there), for the plain-LoRA layers.
    _stacked: dict | None = field(default=None, repr=False)

    def stacked(self) -> dict[tuple[str, str], tuple[LayerStack, int]]:
        if self._stacked is None:
            self._stacked = {key: (stack, index) for stack in stack_layers(self.layers)
                             for index, key in enumerate(stack.layers)}
        return self._stacked

    def layout(self) -> dict[str, dict[str, str]]:
        """Which layers it adapts, in which format (small: kept per file instead of the tensors)."""
        return {c: {m: patch.label for m, patch in layers.items()} for c, layers in self.layers.items()}

    def formats(self) -> str:
        """'LoHa', 'DoRA (LoRA)', 'LoCon + LoRA': what the file is, for logs and `sdxld check`."""
        counts = Counter(patch.label for layers in self.layers.values() for patch in layers.values())
        return " + ".join(label for label, _ in counts.most_common())


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
    """Parse a LoRA file's bytes (plain LoRA or any LyCORIS format; kohya/A1111 or diffusers
    naming) against this pipeline's layers.

    Bytes, never a path: safetensors would mmap a path, and a mapped file that someone truncates
    or copies over in place kills the process with SIGBUS at the next access (found by
    bench/soak.py); the weights of a merged LoRA are used again when the other kind changes.
    diffusers does the name conversion (lora_state_dict maps kohya and SGM block names); this
    checks every layer exists with the widths the file's weights give, so a LoRA for another
    architecture is refused here with the layer that does not fit instead of failing
    mid-generation.
    """
    from safetensors.torch import load

    tensors = load(data)
    unsupported = unsupported_kind(tensors)
    if unsupported:
        raise LoraFileError(f"{unsupported}; sdxld merges LoRA, LoCon, LoHa, LoKr, DoRA and full diffs")
    adapter_metadata = _adapter_metadata(data)
    try:
        if is_lycoris(tensors):
            patches = _lycoris_patches(pipe, tensors, adapter_metadata)
        else:
            patches = {c: {m: patch_from_tensors({"lora_down.weight": down, "lora_up.weight": up}, alpha)
                           for m, (down, up, alpha) in layers.items()}
                       for c, layers in _diffusers_named(pipe, tensors, adapter_metadata).items()}
    except LayerFormatError as err:
        raise LoraFileError(f"{err}; the file is damaged or of an unknown kind") from None

    weights = LoraWeights()
    misfits: list[str] = []
    for component, layers in patches.items():
        modules = dict(getattr(pipe, component).named_modules())
        for name, patch in layers.items():
            problem = _misfit(modules.get(name), patch)
            if problem:
                misfits.append(f"{component}.{name}: {problem}")
            else:
                weights.layers.setdefault(component, {})[name] = patch
    if misfits:
        raise LoraFileError(
            f"its layer shapes do not fit this model (a LoRA for another architecture, e.g. SD1.5?): "
            f"size mismatch at {misfits[0]}" + (f" and {len(misfits) - 1} more layers" if len(misfits) > 1 else "")
        )
    if not weights.layers:
        raise LoraFileError("no layer of this model matched the LoRA's keys (a LoRA for another architecture?)")
    return weights


def _diffusers_named(pipe, tensors: dict, adapter_metadata: dict) -> dict[str, dict[str, tuple]]:
    """A plain LoRA's layers under this pipeline's module names: component -> layer -> (down,
    up, alpha or None), whatever naming the file uses (kohya, SGM blocks, diffusers, peft)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state_dict, alphas = pipe.lora_state_dict(dict(tensors), unet_config=pipe.unet.config)
    alphas = alphas or {}
    named: dict[str, dict[str, tuple]] = {}
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
            # diffusers recognises its old text-encoder naming only by a to_out_lora key; a LoRA
            # that adapts q/k/v alone would be "of unknown type".
            old_naming = any(f".{name}_lora." in k for k in part for name in ("to_q", "to_k", "to_v", "to_out"))
            part = convert_state_dict_to_peft(
                convert_state_dict_to_diffusers(part, original_type=StateDictType.DIFFUSERS_OLD if old_naming else None))
        part = {_strip_text_model(model, k): v for k, v in part.items()}
        component_alphas = {_alpha_module(model, k.removeprefix(prefix)): float(v) for k, v in alphas.items() if k.startswith(prefix)}
        # A layer whose alpha cannot be matched gets the file's usual alpha, as diffusers does.
        usual_alpha = Counter(component_alphas.values()).most_common(1)[0][0] if component_alphas else None
        config = {k.removeprefix(prefix): v for k, v in adapter_metadata.items() if k.startswith(prefix)}
        layer_names = {k.removesuffix(".lora_A.weight") for k in part if k.endswith(".lora_A.weight")}
        component_alphas, usual_alpha = _peft_alphas(config, layer_names, component_alphas, usual_alpha)
        layers = {}
        for name in layer_names:
            up = part.get(f"{name}.lora_B.weight")
            if up is None:
                raise LoraFileError(f"layer {component}.{name} has a down but no up matrix; the file is damaged")
            layers[name] = (part[f"{name}.lora_A.weight"], up, component_alphas.get(name, usual_alpha))
        if layers:
            named[component] = layers
    return named


def _peft_alphas(config: dict, layer_names, alphas: dict, usual_alpha):
    """peft-trained files saved by diffusers carry their LoraConfig (lora_alpha, alpha_pattern)."""
    if usual_alpha is None and config.get("lora_alpha") is not None:
        usual_alpha = float(config["lora_alpha"])
    alphas = dict(alphas)
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        for name in layer_names:
            if name == pattern or name.endswith("." + pattern):
                alphas.setdefault(name, float(alpha))
    return alphas, usual_alpha


_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def _lycoris_patches(pipe, tensors: dict, adapter_metadata: dict) -> dict[str, dict[str, LayerPatch]]:
    """A LyCORIS (or DoRA) file's layers, component -> layer -> LayerPatch.

    Layer names: kohya's (lora_unet_..., SGM blocks included), the LyCORIS wrapper's own
    (lycoris_..., a diffusers UNet's module path) or diffusers' dotted ones (unet.down_blocks...).
    For kohya names diffusers' converter is asked, with a stand-in plain LoRA, which module each
    name is; that keeps one name mapping for plain and LyCORIS files."""
    grouped: dict[str, dict[str, object]] = {}
    for key, tensor in tensors.items():
        parts = split_key(key)
        if parts is None:
            raise LoraFileError(f"a key of no known LoRA or LyCORIS format: {key}")
        prefix, suffix = parts
        if prefix.startswith("lycoris_"):
            prefix = "lora_unet_" + prefix.removeprefix("lycoris_")
        grouped.setdefault(prefix, {})[suffix] = tensor

    modules: dict[str, tuple[str, str]] = {}
    kohya = [p for p in grouped if p.startswith(_KOHYA_PREFIXES)]
    if kohya:
        import torch

        stand_in = {}
        for index, prefix in enumerate(kohya):
            marker = torch.full((1, 1), float(index))
            stand_in[f"{prefix}.lora_down.weight"] = marker
            stand_in[f"{prefix}.lora_up.weight"] = marker
        for component, layers in _diffusers_named(pipe, stand_in, {}).items():
            for name, (marker, _, _) in layers.items():
                modules[kohya[int(marker.item())]] = (component, name)
    for prefix in grouped:
        component, _, name = prefix.partition(".")
        if prefix not in modules and component in COMPONENTS:
            modules[prefix] = (component, _strip_text_model(getattr(pipe, component), name))

    unnamed = [p for p in grouped if p not in modules]
    if unnamed:
        raise LoraFileError(f"a layer name this model does not have: {unnamed[0]}"
                            + (f" and {len(unnamed) - 1} more" if len(unnamed) > 1 else ""))
    patches: dict[str, dict[str, LayerPatch]] = {}
    for prefix, layer_tensors in grouped.items():
        component, name = modules[prefix]
        alpha = layer_tensors.pop("alpha", None)
        if alpha is None:
            config = {k.removeprefix(component + "."): v for k, v in adapter_metadata.items() if k.startswith(component + ".")}
            alphas, usual_alpha = _peft_alphas(config, [name], {}, None)
            alpha = alphas.get(name, usual_alpha)
        else:
            alpha = float(alpha)
        try:
            patches.setdefault(component, {})[name] = patch_from_tensors(layer_tensors, alpha)
        except LayerFormatError as err:
            raise LayerFormatError(f"layer {prefix}: {err}") from None
    return patches


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


def _misfit(module, patch: LayerPatch) -> str:
    import torch

    if module is None:
        return "the model has no such layer"
    base = getattr(module, "base_layer", module)
    if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
        return f"a {type(base).__name__}, which sdxld does not merge LoRAs into"
    return patch.misfit(base.weight.shape)


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


# What one part of a rewrite holds on the device besides the weights: the float32 sums of the
# LoRAs for its layers. As large as a stack (lora_stacks.STACK_BYTES), so a part spans at most two
# stacks of each LoRA and the device holds ~5 such blocks at the peak (~320 MB; one layer at a
# time, the largest SDXL layer took ~200 MB).
PART_BYTES = 64 << 20


class LoraMergeError(RuntimeError):
    """Merging failed part-way; every rewritten layer is back to what it was before the merge.

    `slots` are the slots whose incoming LoRA touched the layer that failed."""

    def __init__(self, message: str, slots: list[str]):
        super().__init__(message)
        self.slots = slots


class Merged(NamedTuple):
    key: tuple  # (path, file signature, strength): what identifies this content
    weights: LoraWeights
    strength: float


class LoraMerger:
    """Keeps LoRAs merged into the pipeline's weights, one per slot ("character", "style", and
    one for each `<lora:>` tag of the current image)."""

    def __init__(self, pipe, quantized=None):
        self.pipe = pipe
        self._merged: dict[str, Merged] = {}
        # (component, layer) -> its original weight, on the CPU: taken the first time a LoRA
        # touches the layer, the base every later merge starts from.
        self._originals: dict[tuple[str, str], object] = {}
        # performance.quantize (quantize.Quantized): its layers' originals were kept before
        # quantizing (a quantized weight is no original), and merged weights are quantized again.
        self._quantized = quantized

    def holds(self, slot: str, key: tuple) -> bool:
        merged = self._merged.get(slot)
        return merged is not None and merged.key == key

    def current(self, slot: str) -> Merged | None:
        return self._merged.get(slot)

    def saved_layers(self) -> int:
        return len(self._originals)

    def saved_originals(self) -> list:
        return list(self._originals.values())

    def apply(self, wanted: dict[str, Merged | None]) -> None:
        """Make the weights hold exactly `wanted` (slot -> LoRA; a slot left out or None holds
        nothing); only the layers the outgoing or incoming LoRAs touch are rewritten."""
        new_state = {slot: merged for slot, merged in wanted.items() if merged is not None}
        changed = sorted(slot for slot in set(new_state) | set(self._merged)
                         if _key(new_state.get(slot)) != _key(self._merged.get(slot)))
        if not changed:
            return
        touched: set[tuple[str, str]] = set()
        for slot in changed:
            for merged in (self._merged.get(slot), new_state.get(slot)):
                if merged is not None:
                    touched.update((c, layer) for c, layers in merged.weights.layers.items() for layer in layers)
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
            culprits = [slot for slot in changed
                        if new_state.get(slot) is not None and name in new_state[slot].weights.layers.get(component, {})]
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
        # Inference mode: group offload may have turned the weights into inference tensors.
        with torch.inference_mode():
            self._keep_originals(touched)
            differences = StackedDifferences(device)
            for part in self._parts(touched):
                if done is not None:
                    done.extend(part)
                self._rewrite_part(part, state, device, differences)

    def _module(self, key: tuple[str, str]):
        component, layer = key
        return getattr(self.pipe, component).get_submodule(layer)

    def _quantized_layer(self, key: tuple[str, str]) -> bool:
        return self._quantized is not None and self._quantized.holds(*key)

    def _original(self, key: tuple[str, str]):
        return self._quantized.originals[key] if self._quantized_layer(key) else self._originals[key]

    def _keep_originals(self, touched: list[tuple[str, str]]) -> None:
        """Save the original weight of each layer touched for the first time, all in one pass."""
        new = [key for key in touched if key not in self._originals and not self._quantized_layer(key)]
        if new:
            copies = packed_cpu_copies([self._module(key).weight for key in new])
            self._originals.update(zip(new, copies))

    def _parts(self, touched: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
        """The layers in parts of at most PART_BYTES of float32 weights (what one part's sums
        hold on the device), same-shape layers together in name order, as stacks are made."""
        def order(key):
            return tuple(self._original(key).shape), key

        ordered = sorted(touched, key=order)
        parts = groups_within([self._original(key).numel() * 4 for key in ordered], PART_BYTES)
        return [[ordered[i] for i in part] for part in parts]

    def _rewrite_part(self, part: list[tuple[str, str]], state: dict[str, Merged | None], device,
                      differences: StackedDifferences) -> None:
        import torch

        totals = self._lora_sums(part, state, device, differences)
        in_place, one_by_one = [], []
        for key in part:
            weight = self._module(key).weight
            if self._quantized_layer(key) or not _same_device(weight.device, torch.device(device)):
                one_by_one.append(key)
            else:
                in_place.append((key, weight))
        if in_place:
            # Back to the original, then plus the LoRAs' sum: the add is computed in float32 and
            # rounded once, exactly as (original.float() + sum).to(dtype). In place either way:
            # the parameter keeps its storage, which compiled code and CUDA graphs read from.
            torch._foreach_copy_([w for _, w in in_place], [self._original(k) for k, _ in in_place], non_blocking=True)
            summed = [(w, totals[k]) for k, w in in_place if k in totals]
            if summed:
                torch._foreach_add_([w for w, _ in summed], [t for _, t in summed])
        for key in one_by_one:
            module = self._module(key)
            original = self._original(key)
            if key in totals:
                merged = (original.to(device, non_blocking=True).float() + totals[key]).to(module.weight.dtype)
            else:
                merged = original
            if self._quantized_layer(key):
                self._quantized.write(module, merged.to(module.weight.device, non_blocking=True))
            else:
                module.weight.copy_(merged)

    def _lora_sums(self, part: list[tuple[str, str]], state: dict[str, Merged | None], device,
                   differences: StackedDifferences) -> dict:
        """(component, layer) -> the sum of what the LoRAs in `state` add to it, float32 on the
        device; layers no LoRA adapts are left out.

        Slots in a fixed order: float addition is not associative, and a re-merge must be
        bit-identical whatever order the slots were filled in. Each LoRA's part is measured from
        the original weight (DoRA's magnitude too), so no LoRA's part depends on which others
        are merged."""
        import torch

        totals: dict = {}
        for slot in sorted(state):
            merged = state[slot]
            if merged is None:
                continue
            stacked = merged.weights.stacked()
            parts = []
            for key in part:
                patch = merged.weights.layers.get(key[0], {}).get(key[1])
                if patch is None:
                    continue
                shape = self._original(key).shape
                if key in stacked:
                    stack, index = stacked[key]
                    difference = differences.of(stack, merged.strength)[index]
                    parts.append((key, difference if difference.shape == shape else difference.view(shape)))
                else:
                    base = self._original(key).to(device, non_blocking=True).float()
                    parts.append((key, patch.contribution(base, device) * merged.strength))
            adding = [(totals[key], value) for key, value in parts if key in totals]
            if adding:
                summed = torch._foreach_add([t for t, _ in adding], [v for _, v in adding])
                totals.update(zip((key for key, _ in parts if key in totals), summed))
            totals.update((key, value) for key, value in parts if key not in totals)
        return totals


def _same_device(a, b) -> bool:
    # torch.device("cuda") and torch.device("cuda:0") are the same card but compare unequal.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _key(merged: Merged | None):
    return merged.key if merged is not None else None
