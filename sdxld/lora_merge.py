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
import logging
from typing import NamedTuple

from . import diffusers_private
from .host_copies import groups_within, packed_cpu_copies
from .lora_files import LoraWeights
from .lora_stacks import StackedDifferences

log = logging.getLogger(__name__)


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

    def __init__(self, pipe, quantized=None, originals_on_device: bool = False):
        """`originals_on_device` (memory.lora_originals: gpu): the originals are kept beside the
        weights, on the card, instead of in host memory: a swap copies them back within the card
        instead of over PCIe (5.4 GiB for two full SDXL LoRAs), for as much GPU memory."""
        self.pipe = pipe
        self._merged: dict[str, Merged] = {}
        # (component, layer) -> its original weight, in host memory (or beside the weight): taken
        # the first time a LoRA touches the layer, the base every later merge starts from.
        self._originals: dict[tuple[str, str], object] = {}
        self._originals_on_device = originals_on_device
        # performance.quantize (quantize.Quantized): its layers' originals were kept before
        # quantizing (a quantized weight is no original), and merged weights are quantized again.
        self._quantized = quantized
        # Counts the times apply() started rewriting weights: while it stays the same, every
        # weight is the tensor it was, to the bit (the same LoRAs merged again by another path of
        # swaps may round differently on a GPU).
        self.rewrites = 0

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
        self.rewrites += 1
        with context:
            self._unfuse_qkv(components)
            self._rewrite_or_roll_back(sorted(touched), new_state, changed)
        self._merged = new_state

    def _rewrite_or_roll_back(self, touched: list[tuple[str, str]], new_state: dict, changed: list[str]) -> None:
        """Rewrite the layers; if one fails (out of memory, a layer the check let through), put
        back every layer already rewritten so the model holds exactly the previous LoRAs."""
        done: list[list[tuple[str, str]]] = []
        try:
            self._rewrite(touched, new_state, done)
        except Exception as err:
            if not done:
                raise
            failed = done[-1]
            culprits = [slot for slot in changed if new_state.get(slot) is not None
                        and any(name in new_state[slot].weights.layers.get(component, {}) for component, name in failed)]
            self._rewrite([key for part in done for key in part], self._merged)
            component, name = failed[0]
            others = f" (or one of the {len(failed) - 1} layers rewritten with it)" if len(failed) > 1 else ""
            raise LoraMergeError(f"merging failed at layer {component}.{name}{others}: {type(err).__name__}: {err}",
                                 culprits or changed) from err

    def prepare(self, files: list) -> None:
        """What merging these LoraWeights needs from each file alone (its stacks), built ahead of
        the merge."""
        if not files:
            return
        pin = self._merge_device().type == "cuda"
        for weights in files:
            weights.stacked(pin=pin)

    def _merge_device(self):
        """Where merges compute: the pipeline's execution device (host copies are pinned only for
        a GPU: pinning starts CUDA)."""
        import torch

        return torch.device(diffusers_private.execution_device(self.pipe))

    def _unfuse_qkv(self, components: set[str]) -> None:
        if "unet" in components and getattr(self.pipe, "fusing_unet", False):
            # performance.fuse_qkv: fused attention reads to_qkv, a copy made before any LoRA.
            log.info("LoRAs in use: unfusing the UNet's q/k/v projections (performance.fuse_qkv)")
            self.pipe.unfuse_qkv_projections(unet=True, vae=False)

    def _rewrite(self, touched: list[tuple[str, str]], state: dict[str, Merged | None], done: list | None = None) -> None:
        """Rebuild each layer from its original plus the LoRAs in `state`; `done` collects the
        parts of layers as they are started (what a rollback must restore)."""
        import torch

        device = self._merge_device()
        pin = device.type == "cuda"
        # Inference mode: group offload may have turned the weights into inference tensors.
        with torch.inference_mode():
            self._keep_originals(touched, pin)
            differences = StackedDifferences(device)
            for part in self._parts(touched):
                if done is not None:
                    done.append(part)
                self._rewrite_part(part, state, device, differences)

    def _module(self, key: tuple[str, str]):
        component, layer = key
        return getattr(self.pipe, component).get_submodule(layer)

    def _quantized_layer(self, key: tuple[str, str]) -> bool:
        return self._quantized is not None and self._quantized.holds(*key)

    def _original(self, key: tuple[str, str]):
        return self._quantized.originals[key] if self._quantized_layer(key) else self._originals[key]

    def _keep_originals(self, touched: list[tuple[str, str]], pin: bool) -> None:
        """Save the original weight of each layer touched for the first time, all in one pass."""
        new = [key for key in touched if key not in self._originals and not self._quantized_layer(key)]
        if not new:
            return
        weights = [self._module(key).weight for key in new]
        if self._originals_on_device:
            copies = [weight.detach().clone() for weight in weights]
        else:
            copies = packed_cpu_copies(weights, pin)
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
            module = self._module(key)
            if self._quantized_layer(key) or not _same_device(module.weight.device, device):
                one_by_one.append((key, module))
            else:
                in_place.append((key, module.weight))
        if in_place:
            # Back to the original, then plus the LoRAs' sum: the add is computed in float32 and
            # rounded once, exactly as (original.float() + sum).to(dtype). In place either way:
            # the parameter keeps its storage, which compiled code and CUDA graphs read from.
            torch._foreach_copy_([w for _, w in in_place], [self._original(k) for k, _ in in_place], non_blocking=True)
            summed = [(w, totals[k]) for k, w in in_place if k in totals]
            if summed:
                torch._foreach_add_([w for w, _ in summed], [t for _, t in summed])
        for key, module in one_by_one:
            original = self._original(key)
            if key in totals:
                # A copy on the device plus the sum, rounded once as above.
                merged = original.to(device, non_blocking=True, copy=True).add_(totals[key])
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
            stacked = merged.weights.stacked(pin=device.type == "cuda")
            contributions = []
            for key in part:
                patch = merged.weights.layers.get(key[0], {}).get(key[1])
                if patch is None:
                    continue
                shape = self._original(key).shape
                if key in stacked:
                    stack, index = stacked[key]
                    difference = differences.of(stack, merged.strength)[index]
                    contributions.append((key, difference if difference.shape == shape else difference.view(shape)))
                else:
                    base = self._original(key).to(device, non_blocking=True).float()
                    contributions.append((key, patch.contribution(base, device) * merged.strength))
            adding = [(totals[key], value) for key, value in contributions if key in totals]
            if adding:
                summed = torch._foreach_add([t for t, _ in adding], [v for _, v in adding])
                totals.update(zip((key for key, _ in contributions if key in totals), summed))
            totals.update((key, value) for key, value in contributions if key not in totals)
        return totals


def _same_device(a, b) -> bool:
    # torch.device("cuda") and torch.device("cuda:0") are the same card but compare unequal.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _key(merged: Merged | None):
    return merged.key if merged is not None else None
