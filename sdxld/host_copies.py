"""Copies of model weights in CPU memory, packed into a few large buffers.

LoRA merges keep each touched layer's original weight on the CPU (lora_merge.py), and
performance.quantize keeps the full-precision originals of the layers it quantizes. When the model
runs on a GPU they are pinned, so copying them back to the card is a DMA the host does not wait for.

One pinned tensor per layer, as sdxld used to make them, costs twice: PyTorch's pinned-memory
allocator rounds every allocation up to a power of two (a 1280x1280 bf16 layer, 3.1 MiB, takes
4 MiB; a 2048x1280 one 8 MiB for 5 MiB), so the 986 layers a typical SDXL LoRA adapts pinned
7.25 GiB of host memory for 5.44 GiB of weights; and every allocation is a separate call into
the driver to lock its pages (the first LoRA merge on the H100 machine took 11.4 s). Here the
copies are views into buffers of PAGE_BYTES (a power of two: nothing is rounded) and one last
buffer rounded to the next power of two, made in one pass.
"""

from __future__ import annotations

PAGE_BYTES = 256 << 20


def packed_cpu_copies(tensors: list, pin: bool = False) -> list:
    """CPU copies of `tensors` (same shapes and dtypes), views into shared buffers; pinned with
    `pin` (for copies back to a GPU: pinning starts CUDA, so only when one is in use)."""
    import torch

    copies = packed_empty([(t.shape, t.dtype) for t in tensors], pin)
    with torch.no_grad():
        torch._foreach_copy_(copies, [t.detach() for t in tensors], non_blocking=pin)
    if pin and any(t.is_cuda for t in tensors):
        # The copies are read (or handed to another stream) right after; a pinned destination
        # makes the device-to-host copies asynchronous.
        torch.cuda.synchronize()
    return copies


def packed_empty(shapes: list[tuple], pin: bool = False) -> list:
    """Uninitialized CPU tensors of these (shape, dtype), views into shared buffers; pinned with
    `pin`."""
    import math

    import torch

    views: list = [None] * len(shapes)
    by_dtype: dict = {}
    for index, (_, dtype) in enumerate(shapes):
        by_dtype.setdefault(dtype, []).append(index)
    for dtype, indices in by_dtype.items():
        element_size = torch.empty((), dtype=dtype).element_size()
        sizes = [math.prod(shapes[i][0]) for i in indices]
        for page in groups_within(sizes, max(PAGE_BYTES // element_size, 1)):
            needed = sum(sizes[i] for i in page)
            # The last page is rounded as the allocator would round it; full pages already are.
            buffer = torch.empty(_power_of_two(needed * element_size) // element_size, dtype=dtype, pin_memory=pin)
            offset = 0
            for i in page:
                views[indices[i]] = buffer[offset : offset + sizes[i]].view(shapes[indices[i]][0])
                offset += sizes[i]
    return views


def groups_within(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices of `sizes` in order, in consecutive groups whose total fits `budget` (a size larger
    than the budget gets a group of its own)."""
    groups: list[list[int]] = []
    used = budget
    for index, size in enumerate(sizes):
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += size
    return groups


def _power_of_two(size: int) -> int:
    return 1 << max(size - 1, 0).bit_length()


def pinned_bytes(tensors: list) -> int:
    """Bytes of the distinct buffers behind `tensors`, with the allocator's rounding (what they
    hold of the host's page-locked memory when pinned)."""
    return sum(_power_of_two(size) for size in _buffer_sizes(tensors))


def storage_bytes(tensors: list) -> int:
    """Bytes of the distinct buffers behind `tensors` as allocated (packed_empty's buffers are
    already rounded as the pinned allocator rounds them)."""
    return sum(_buffer_sizes(tensors))


def _buffer_sizes(tensors: list) -> list[int]:
    """The size of each distinct buffer behind `tensors` (views share theirs)."""
    return list({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
