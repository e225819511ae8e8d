"""A LoRA file's plain layers stacked by shape, so that merging them takes a few batched matmuls
instead of a dozen small operations per layer.

A typical SDXL LoRA adapts 986 layers in 14 shapes. Merged one layer at a time, a swap cost the
host 31 operations per layer (30,566 for a swap, counted by bench/lora_swap.py): the original and
each LoRA's two factors copied to the GPU (the factors from pageable memory, copies the host waits
for), scaled, multiplied, scaled by the strength, summed, added, cast and written. On the H100
machine a swap took 0.52 s. What no batching removes is copying the originals back (5.4 GiB
for such a LoRA pair, from pinned memory, queued); the operations around them it does.

Here the same-shape plain-LoRA layers of one file are stacked, at most STACK_BYTES of float32
differences at a time: per stack one copy of each factor stack to the device and one torch.bmm.
Only plain LoRA layers (the up @ down of a rank-r pair, Linear or 1x1 conv) are stacked; LyCORIS
formats and DoRA keep their per-layer path (lora_formats.py), which sees the original weight.

Why by hand: diffusers' fuse_lora and peft's merge_and_unload merge layer by layer (and round in
the model's dtype on every merge and unmerge); lycoris-lora's functional diff_weight takes one
layer. Nothing batches a file's layers.

Stacks are built from the file alone (its layers in name order, so many per stack for a shape),
the first time the file is merged, and the per-layer factors become views into them (no memory
added). A layer's difference is therefore always computed by the same batched matmul on the same
operands, whatever else is merged: choosing a LoRA again gives bit-identical weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from .host_copies import packed_empty

STACK_BYTES = 64 << 20


@dataclass(eq=False)
class LayerStack:
    """Same-shape plain-LoRA layers of one file: layer i adds gammas[i] * ups[i] @ downs[i]."""

    layers: tuple  # ((component, layer), ...)
    downs: object  # [n, rank, in]
    ups: object  # [n, out, rank]
    gammas: object  # [n, 1, 1], float32

    def differences(self, device, strength: float):
        """Every layer's difference at `strength`, float32 on `device`, [n, out, in].

        Elementwise the per-layer path's arithmetic (lycoris' (up * gamma) @ down, then times
        the strength), with the product batched. Copied over as they are, then converted: a copy
        to the GPU that also converts converts on the CPU, into pageable memory, and the host
        waits for that copy."""
        import torch

        ups = self.ups.to(device, non_blocking=True).float() * self.gammas.to(device, non_blocking=True)
        return torch.bmm(ups, self.downs.to(device, non_blocking=True).float()).mul_(strength)


def stackable(patch) -> bool:
    return patch.algorithm == "LoRA" and patch.dora_scale is None and patch.factors[2] is None


def stack_layers(layers: dict, pin: bool = False) -> list[LayerStack]:
    """Stacks for the plain-LoRA layers of `layers` (component -> layer -> LayerPatch); each such
    patch's factors are replaced by views into its stack. `pin`: in pinned memory (merging on a
    GPU), so that their copies to the card are queued, not waited for."""
    import torch

    groups: dict[tuple, list] = {}
    for component in sorted(layers):
        for name in sorted(layers[component]):
            patch = layers[component][name]
            if stackable(patch):
                down, up = patch.factors[0], patch.factors[1]
                key = (down.shape[0], down.numel() // down.shape[0], up.shape[0], down.dtype, up.dtype)
                groups.setdefault(key, []).append(((component, name), patch))
    chunks = []
    for (rank, n_in, n_out, down_dtype, up_dtype), members in groups.items():
        per_stack = max(1, STACK_BYTES // (n_out * n_in * 4))
        chunks += [(members[start : start + per_stack], rank, n_in, n_out, down_dtype, up_dtype)
                   for start in range(0, len(members), per_stack)]
    # Packed: few allocations (pinned ones are costly).
    buffers = iter(packed_empty([shape for chunk in chunks for shape in _stack_shapes(*chunk)], pin))
    stacks = []
    for members, rank, n_in, n_out, _, _ in chunks:
        patches = [patch for _, patch in members]
        downs, ups, gammas = next(buffers), next(buffers), next(buffers)
        torch.stack([_shaped(p.factors[0], (rank, n_in)) for p in patches], out=downs)
        torch.stack([_shaped(p.factors[1], (n_out, rank)) for p in patches], out=ups)
        gammas.copy_(torch.tensor([p.gamma for p in patches], dtype=torch.float32).view(-1, 1, 1))
        for patch, down, up in zip(patches, downs.unbind(0), ups.unbind(0)):
            patch.factors = (_shaped(down, patch.factors[0].shape), _shaped(up, patch.factors[1].shape), None)
        stacks.append(LayerStack(tuple(key for key, _ in members), downs, ups, gammas))
    return stacks


def _stack_shapes(members, rank, n_in, n_out, down_dtype, up_dtype):
    import torch

    n = len(members)
    return ((n, rank, n_in), down_dtype), ((n, n_out, rank), up_dtype), ((n, 1, 1), torch.float32)


def _shaped(tensor, shape):
    return tensor if tensor.shape == shape else tensor.reshape(shape)


class StackedDifferences:
    """The differences of the stacks one rewrite needs, each computed once: the layers to rewrite
    come in parts of bounded size, and a stack can span two parts. Holds the last `keep` (two
    LoRAs, two stacks each)."""

    def __init__(self, device, keep: int = 4):
        self.device = device
        self.keep = keep
        self._held: dict[tuple, tuple] = {}

    def of(self, stack: LayerStack, strength: float) -> list:
        """The stack's differences at `strength`, one [out, in] float32 tensor per layer (views)."""
        key = (id(stack), strength)
        if key not in self._held:
            if len(self._held) >= self.keep:
                del self._held[next(iter(self._held))]
            self._held[key] = (stack, stack.differences(self.device, strength).unbind(0))
        return self._held[key][1]
