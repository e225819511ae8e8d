"""Reading a LoRA file against the model: which of the model's layers it adapts and by what, in
any naming (kohya/A1111, SGM blocks, LyCORIS, diffusers, peft) and format (plain LoRA, the
LyCORIS formats, DoRA: lora_formats.py), checked layer by layer against the model's shapes so a
LoRA for another architecture is refused with the layer that does not fit; the file's header
and its A1111 hash; the words a refusal is explained in.

What a check decides depends on this module and lora_formats.py alone, not on how LoRAs are
merged (lora_merge.py) or rotated (loras.py): the checks' remembered verdicts (lora_memory.py) are
fingerprinted with these two, so changing the others does not make every LoRA be checked again.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .host_copies import storage_bytes
from .lora_formats import LayerFormatError, LayerPatch, is_lycoris, patch_from_tensors, split_key, unsupported_kind
from .lora_stacks import LayerStack, stack_layers

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_ALPHA_SUFFIXES = (".lora_linear_layer.down.weight", ".lora.down.weight", ".down.weight")
# diffusers names the alphas of kohya text-encoder attention after its old attention processors.
_OLD_ATTENTION_NAMES = {".to_q_lora": ".q_proj", ".to_k_lora": ".k_proj", ".to_v_lora": ".v_proj", ".to_out_lora": ".out_proj"}
# A safetensors header above this is not a LoRA's (and reading it would be a memory hazard).
MAX_HEADER_BYTES = 64 * 1024 * 1024


class LoraFileError(ValueError):
    """Why a file is not a usable LoRA, in words the user can act on."""


@dataclass
class LoraWeights:
    """A LoRA file ready to merge: per component, per layer, what it adds (a LayerPatch)."""

    layers: dict[str, dict[str, LayerPatch]] = field(default_factory=dict)
    # Built at the first merge (checking a file does not need them): (component, layer) ->
    # (its LayerStack, its index there), for the plain-LoRA layers.
    _stacked: dict | None = field(default=None, repr=False)

    def stacked(self, pin: bool = False) -> dict[tuple[str, str], tuple[LayerStack, int]]:
        """`pin`: the stacks in pinned memory (merging on a GPU), decided at the first call."""
        if self._stacked is None:
            self._stacked = {key: (stack, index) for stack in stack_layers(self.layers, pin)
                             for index, key in enumerate(stack.layers)}
        return self._stacked

    def held_bytes(self) -> int:
        """Host memory its tensors hold (its stacks once stacked: the layers' factors are views)."""
        tensors = [t for layers in self.layers.values() for patch in layers.values()
                   for t in (*patch.factors, patch.dora_scale) if t is not None]
        tensors += [stack.gammas for stack, _ in (self._stacked or {}).values()]
        return storage_bytes(tensors)

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


def check_lora_file(pipe, path: Path) -> tuple[str, str]:
    """Check a LoRA file against the model: (its A1111 hash, its formats), or an exception that
    explain() words. Reads the file whole: one read serves the hash and the weights, so both
    describe the same bytes."""
    check_lora_header(read_safetensors_header(path))
    data = path.read_bytes()
    return addnet_hash(data), read_lora_weights(pipe, data).formats()


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, with errors that say what is wrong with the file."""
    size = path.stat().st_size
    if size == 0:
        raise LoraFileError("the file is empty (0 bytes); is it still being copied?")
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise LoraFileError(f"the file is {size} bytes, too short to be safetensors")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise LoraFileError(
                "not a safetensors file (its first 8 bytes do not give a valid header length); "
                "re-download it or convert it to .safetensors"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraFileError("not a safetensors file (the header is not JSON); re-download it") from None
    if not isinstance(header, dict):
        raise LoraFileError("not a safetensors file (the header is not a JSON object)")
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if ends and 8 + length + max(ends) > size:
        raise LoraFileError(
            f"truncated: the header promises {8 + length + max(ends)} bytes but the file has {size}; "
            "the copy or download did not finish"
        )
    return header


def check_lora_header(header: dict) -> None:
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        raise LoraFileError("the safetensors file holds no tensors")
    unsupported = unsupported_kind(keys)
    if unsupported:
        raise LoraFileError(f"{unsupported}; sdxld merges LoRA, LoCon, LoHa, LoKr, DoRA and full diffs")
    if not any(split_key(k) for k in keys):
        sample = ", ".join(keys[:3])
        raise LoraFileError(
            f"a safetensors file but not a LoRA: none of its {len(keys)} tensors is a LoRA weight "
            f"(e.g. {sample}); is it a checkpoint, VAE or embedding? Move it out of the LoRA folder"
        )


def addnet_hash(data: bytes) -> str:
    """A1111's LoRA hash: sha256 of the file after the safetensors header, first 12 hex digits."""
    (length,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(memoryview(data)[8 + length:]).hexdigest()[:12]


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


def explain(err: Exception) -> str:
    """Why a file could not be used, in words the user can act on (a check's or a merge-time read's)."""
    if isinstance(err, LoraFileError):
        return str(err)
    if isinstance(err, ImportError):
        return (f"reading it needs the Python module {err.name or str(err)!r}, which this installation lacks: "
                f"reinstall sdxld with pip so its dependencies come along; the file is checked again at the next start")
    text = str(err).strip().splitlines()
    detail = next((line.strip() for line in text if "size mismatch" in line), text[0] if text else "")
    if "size mismatch" in detail:
        return f"its layer shapes do not fit this model (a LoRA for another architecture, e.g. SD1.5?): {detail}"
    return f"diffusers could not load it ({type(err).__name__}: {detail[:300]})"
