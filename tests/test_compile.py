"""performance.compile: the UNet compiled once; rotating LoRAs and repeating sizes never recompile.

torch.compile's eager backend traces exactly as inductor does (same guards, same recompiles) but
generates no kernels, so these run in seconds on a CPU."""

import pytest

from sdxld.tiny import write_tiny_lora


@pytest.fixture
def no_recompiles():
    """After warm-up, any recompilation raises instead of silently costing a compile."""
    import contextlib

    import torch

    torch._dynamo.reset()
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
    torch._dynamo.reset()


def five_loras(root):
    """Different ranks, formats and alphas."""
    write_tiny_lora(root / "loras/character/a.safetensors", "kohya", seed=1, rank=2, scale=0.2)
    write_tiny_lora(root / "loras/character/b.safetensors", "diffusers", seed=2, rank=4, scale=0.2)
    write_tiny_lora(root / "loras/character/c.safetensors", "kohya", seed=3, rank=6, scale=0.2, alpha=1.0)
    write_tiny_lora(root / "loras/style/d.safetensors", "kohya", seed=4, rank=4, scale=0.2)
    write_tiny_lora(root / "loras/style/e.safetensors", "diffusers", seed=5, rank=3, scale=0.2)


def graphs():
    import torch

    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("mode", ["full", "regional"])
def test_rotating_five_loras_over_ten_images_never_recompiles(mode, root, make_engine, no_recompiles):
    five_loras(root)
    engine = make_engine(performance__compile=mode, performance__compile_backend="eager",
                         generation__t2i__steps=3)
    first = engine.stage1_once(seed=100)  # compiles
    compiled = graphs()
    assert compiled > 0, "the UNet should have been compiled"
    no_recompiles()
    used = {tuple(u.name for u in first.record.loras)}
    for seed in range(10):
        result = engine.stage1_once(seed=seed)
        used.add(tuple(u.name for u in result.record.loras))
    assert {name for pair in used for name in pair} == {"a", "b", "c", "d", "e"}
    assert len(used) >= 4, "several character/style combinations should have rotated through"
    assert graphs() == compiled


def test_loras_added_while_running_do_not_recompile_either(root, make_engine, no_recompiles):
    engine = make_engine(performance__compile="regional", performance__compile_backend="eager", generation__t2i__steps=2)
    engine.stage1_once(seed=1)  # compiles, without any LoRA
    no_recompiles()
    write_tiny_lora(root / "loras/style/small.safetensors", seed=1, rank=2, scale=0.2)
    assert [u.name for u in engine.stage1_once(seed=2).record.loras] == ["small"]
    write_tiny_lora(root / "loras/character/big.safetensors", "diffusers", seed=2, rank=8, scale=0.2)
    assert [u.name for u in engine.stage1_once(seed=3).record.loras] == ["big", "small"]


def test_upscaling_a_second_image_reuses_the_compiled_sizes(root, make_engine, no_recompiles):
    five_loras(root)
    engine = make_engine(performance__compile="regional", performance__compile_backend="eager",
                         generation__t2i__steps=2, generation__stage2__steps=4, generation__stage3__steps=4,
                         generation__stage3__use_refiner=False, generation__stage2__use_refiner=False,
                         model__refiner=None)
    images = [engine.stage1_once(seed=seed) for seed in (1, 2, 3)]
    engine.upscale(images[0].record, images[0].image)  # stage 2 and 3 sizes compile here
    no_recompiles()
    for image in images[1:]:
        engine.upscale(image.record, image.image)
