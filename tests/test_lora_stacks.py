"""How a LoRA swap rewrites the model's layers: a file's same-shape plain-LoRA layers in one batched
matmul per stack (not a dozen operations per layer), LyCORIS layers one by one, all of them summed
in the same fixed order, in parts of bounded size, from originals packed into a few host buffers."""

from __future__ import annotations

import pytest
import torch
from support.lycoris_files import write_lycoris
from test_lycoris import all_weights, reference_difference

from sdxld import host_copies, lora_merge
from sdxld.host_waits import CountHostWaits, CountOperations
from sdxld.lora_stacks import LayerStack
from sdxld.loras import LoraLibrary
from sdxld.tiny import write_tiny_lora


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionXLPipeline

    from sdxld.tiny import ensure_tiny_model

    return StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model()[0])


@pytest.fixture
def library(pipe, tmp_path):
    write_tiny_lora(tmp_path / "character" / "c1.safetensors", seed=1, scale=0.05, pipe=pipe)
    write_tiny_lora(tmp_path / "character" / "c2.safetensors", "diffusers", seed=2, scale=0.05, pipe=pipe)
    write_tiny_lora(tmp_path / "style" / "s1.safetensors", seed=3, rank=8, scale=0.05, pipe=pipe)
    library = LoraLibrary(pipe, {"character": tmp_path / "character", "style": tmp_path / "style"},
                          {"character": 1.0, "style": 0.85})
    library.sync()
    yield library
    library.activate([])


def test_a_swap_dispatches_one_batched_matmul_per_stack_not_a_dozen_operations_per_layer(library):
    c1, c2 = library.available("character")
    (s1,) = library.available("style")
    library.activate([c1, s1])
    with CountOperations() as operations:
        library.activate([c2, s1])
    merged = [library.merger.current(slot).weights for slot in ("character", "style")]
    stacks = {id(stack) for weights in merged for stack, _ in weights.stacked().values()}
    layers = library.merger.saved_layers()

    assert operations.counts["aten.bmm"] == len(stacks)  # every stack of both files, once
    assert operations.counts["aten.mm"] == operations.counts["aten.matmul"] == 0
    # Reading the file, stacking it, the differences, the sums and the writes: one layer at a
    # time this swap took 31 operations per layer, 29 of them more than a view.
    assert operations.beyond_views < 1.0 * layers, operations.counts.most_common(10)


def test_the_weights_do_not_depend_on_how_the_rewrite_is_split_into_parts(library, monkeypatch):
    c1, c2 = library.available("character")
    (s1,) = library.available("style")
    library.activate([c2, s1])
    in_one_part = all_weights(library.merger.pipe)

    library.activate([])
    # Parts of a few layers: stacks span parts, and their differences are reused or computed again.
    monkeypatch.setattr(lora_merge, "PART_BYTES", 16 << 10)
    library.activate([c1, s1])
    library.activate([c2, s1])
    assert all(torch.equal(in_one_part[key], weight) for key, weight in all_weights(library.merger.pipe).items())


def test_a_files_plain_layers_become_views_into_its_stacks(library):
    c1, _ = library.available("character")
    library.activate([c1])
    weights = library.merger.current("character").weights
    stacked = weights.stacked()

    assert len(stacked) == sum(len(layers) for layers in weights.layers.values())  # all plain LoRA layers
    assert len({id(stack) for stack, _ in stacked.values()}) < len(stacked) / 4
    for (component, layer), (stack, index) in stacked.items():
        down, up, _ = weights.layers[component][layer].factors
        assert down.untyped_storage().data_ptr() == stack.downs.untyped_storage().data_ptr()
        assert torch.equal(down.reshape(stack.downs[index].shape), stack.downs[index])
        assert torch.equal(up.reshape(stack.ups[index].shape), stack.ups[index])


def test_plain_and_lycoris_loras_on_the_same_layers_add_up(pipe, tmp_path):
    plain = write_lycoris(tmp_path / "character" / "plain.safetensors", pipe, "lora", seed=4)
    loha = write_lycoris(tmp_path / "style" / "loha.safetensors", pipe, "loha", seed=5)
    library = LoraLibrary(pipe, {"character": tmp_path / "character", "style": tmp_path / "style"},
                          {"character": 0.7, "style": 0.6})
    library.sync()
    before = all_weights(pipe)
    try:
        library.activate([library.find("character", "plain"), library.find("style", "loha")])
        after = all_weights(pipe)
        assert library.merger.current("character").weights.stacked(), "the plain file's linear layers are stacked"
    finally:
        library.activate([])
    loha_layers = {(layer.component, layer.module): layer for layer in loha}
    shared = [layer for layer in plain if (layer.component, layer.module) in loha_layers]
    assert len(shared) >= 5
    for layer in shared:
        key = (layer.component, layer.module)
        expected = (before[key] + 0.7 * reference_difference(layer, before[key])
                    + 0.6 * reference_difference(loha_layers[key], before[key]))
        assert torch.allclose(after[key], expected, rtol=1e-5, atol=1e-6), (key, (after[key] - expected).abs().max())


def test_a_stacks_copies_to_the_device_are_queued_not_waited_for(library):
    c1, _ = library.available("character")
    library.activate([c1])
    weights = library.merger.current("character").weights
    stack, _ = next(iter(weights.stacked().values()))
    # As LoRA files usually are: half precision, converted to float32 for the arithmetic.
    half = LayerStack(stack.layers, stack.downs.bfloat16(), stack.ups.bfloat16(), stack.gammas)
    patch = next(patch for layers in weights.layers.values() for patch in layers.values())

    with CountHostWaits() as waits:  # the meta device stands in for a GPU
        half.differences("meta", 0.85)
    assert waits.counts["host->device copies"] == 0
    with CountHostWaits() as waits:  # a copy that also converts would wait (converted on the CPU)
        half.downs.to("meta", torch.float32, non_blocking=True)
    assert waits.counts["host->device copies"] == 1
    with CountHostWaits() as waits:  # as each layer's factors used to go over
        patch.difference("meta")
    assert waits.counts["host->device copies"] == 2


def test_originals_are_copies_packed_into_few_buffers_that_waste_little(monkeypatch):
    monkeypatch.setattr(host_copies, "PAGE_BYTES", 64 << 10)
    generator = torch.Generator().manual_seed(0)
    # 5 KiB, 20 KiB and 100 KiB (more than a page) layers in two dtypes.
    tensors = [torch.randn(shape, generator=generator).to(dtype) for shape, dtype in
               [((40, 32), torch.float32), ((80, 64), torch.float32), ((40, 32), torch.bfloat16),
                ((160, 160), torch.float32), ((80, 64), torch.bfloat16), ((40, 32), torch.float32)]]

    copies = host_copies.packed_cpu_copies(tensors, pin=False)

    assert all(torch.equal(t, c) and t.dtype == c.dtype and c.device.type == "cpu" for t, c in zip(tensors, copies))
    assert all(c.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t, c in zip(tensors, copies))
    buffers = {c.untyped_storage().data_ptr() for c in copies}
    # In order: float32 5 + 20 KiB on a page, the 100 KiB layer on its own, 5 KiB on a new page;
    # bfloat16 on one page.
    assert len(buffers) == 4
    one_each = sum(host_copies._power_of_two(t.numel() * t.element_size()) for t in tensors)
    weights = sum(t.numel() * t.element_size() for t in tensors)
    assert host_copies.pinned_bytes(copies) < one_each
    assert host_copies.pinned_bytes(copies) < 1.3 * weights


def test_originals_kept_beside_the_weights_give_the_weights_originals_in_host_memory_give(pipe, tmp_path):
    """memory.lora_originals gpu: the originals are copies on the weights' own device (here the
    CPU: the same code as on a card), each its own tensor, not views into host buffers."""
    write_tiny_lora(tmp_path / "character" / "c1.safetensors", seed=1, scale=0.05, pipe=pipe)
    write_tiny_lora(tmp_path / "character" / "c2.safetensors", "diffusers", seed=2, scale=0.05, pipe=pipe)
    write_tiny_lora(tmp_path / "style" / "s1.safetensors", seed=3, rank=8, scale=0.05, pipe=pipe)
    pristine = all_weights(pipe)
    merged = {}
    for beside in (False, True):
        library = LoraLibrary(pipe, {"character": tmp_path / "character", "style": tmp_path / "style"},
                              {"character": 1.0, "style": 0.85}, originals_on_device=beside)
        library.sync()
        c1, c2 = library.available("character")
        (s1,) = library.available("style")
        library.activate([c1, s1])
        library.activate([c2, s1])
        merged[beside] = all_weights(pipe)
        originals = library.merger.saved_originals()
        shared = len({t.untyped_storage().data_ptr() for t in originals}) < len(originals)
        assert shared is not beside, "host originals are packed; originals beside the weights are their own copies"
        library.activate([])
        assert all(torch.equal(pristine[key], value) for key, value in all_weights(pipe).items())
    assert all(torch.equal(merged[False][key], value) for key, value in merged[True].items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a swap on CUDA needs an NVIDIA GPU; this machine has none")
@pytest.mark.parametrize("strategy", ["gpu", "model_offload", "gpu, originals on the card"])
def test_a_swap_on_cuda_gives_the_cpus_weights_and_never_waits_with_the_model_on_the_card(tmp_path, strategy):
    """model_offload keeps the weights in host memory between uses: the merge runs on the card and
    copies each merged layer back, which waits by design."""
    from diffusers import StableDiffusionXLPipeline

    from sdxld.lora_files import read_lora_weights
    from sdxld.lora_merge import LoraMerger, Merged
    from sdxld.tiny import ensure_tiny_model

    pipes = {device: StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model()[0]).to(torch.bfloat16)
             for device in ("cpu", "cuda")}
    if strategy.startswith("gpu"):
        pipes["cuda"].to("cuda")
    else:
        pipes["cuda"].enable_model_cpu_offload(device="cuda")
    files = [write_tiny_lora(tmp_path / f"{name}.safetensors", seed=seed, scale=0.05, pipe=pipes["cpu"])
             for name, seed in (("c1", 1), ("c2", 2), ("s1", 3))]
    weights = {}
    for device, pipe in pipes.items():
        merger = LoraMerger(pipe, originals_on_device=device == "cuda" and strategy.endswith("on the card"))

        def pair(character, style):
            return {slot: Merged((path, 0), read_lora_weights(pipe, path.read_bytes()), strength)
                    for slot, path, strength in (("character", character, 1.0), ("style", style, 0.85))}

        merger.apply(pair(files[0], files[2]))  # the first merge keeps the originals
        wanted = pair(files[1], files[2])
        if device == "cuda" and strategy.startswith("gpu"):
            # Any copy the host waits for, any value read back, raises here.
            torch.cuda.set_sync_debug_mode("error")
        try:
            merger.apply(wanted)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        weights[device] = {key: value.cpu() for key, value in all_weights(pipe).items()}
    for key, on_cpu in weights["cpu"].items():
        # Both sum in float32 and round once to bf16; the batched products may differ in the last
        # float32 bit, which can move a value by one bf16 step.
        torch.testing.assert_close(weights["cuda"][key], on_cpu, rtol=8e-3, atol=1e-5, msg=str(key))
