"""performance.compile: the UNet compiled once; rotating LoRAs and repeating sizes never recompile.

torch.compile's eager backend traces exactly as inductor does (same guards, same recompiles) but
generates no kernels, so these run in seconds on a CPU."""

import os

import pytest
from support.helpers import cpp_compiler_missing, inductor_cache_use

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


def unet_output(engine, eager: bool = False):
    """The base UNet on fixed inputs; `eager` calls its forward directly, around the compiled
    version (same module, same weights)."""
    import torch

    from sdxld.quantize import fixed_unet_inputs

    unet = engine.models.base.unet
    args, kwargs = fixed_unet_inputs(unet, batch=2, latent_hw=(16, 16))
    with torch.inference_mode():
        return (unet.forward if eager else unet)(*args, **kwargs).sample


def storage_addresses(unet) -> dict:
    """Where every weight's data lives (a quantized weight's data is its inner tensors)."""
    where = {}
    for name, parameter in unet.named_parameters():
        parts = getattr(type(parameter), "tensor_data_names", None)
        if parts:
            where.update({(name, part): getattr(parameter, part).data_ptr() for part in parts})
        else:
            where[(name, "")] = parameter.data_ptr()
    return where


def long_case(*values):
    return pytest.param(*values, marks=pytest.mark.skipif(
        not os.environ.get("SDXLD_LONG_TESTS"), reason="75 s on a CPU (inductor's int8 build): set SDXLD_LONG_TESTS=1"))


@pytest.mark.parametrize("backend, quantize", [
    # aot_eager lifts the weights into graph inputs as inductor does, without generating code.
    ("aot_eager", "none"),
    # Quantized layers: their inner tensors are written in place (tests/test_quantize.py checks
    # the addresses in the suite); these check that compiled code reads them.
    ("aot_eager", "int8"),
    # The code inductor generates (what compile max runs; 60 s here with a cold build cache).
    ("inductor", "none"),
    long_case("inductor", "int8"),
])
def test_compile_max_reads_lora_weights_written_after_it_compiled(root, make_engine, backend, quantize):
    from sdxld.quantize import relative_error

    if backend == "inductor" and (why := cpp_compiler_missing()):
        pytest.skip(why)
    extra = {} if backend == "inductor" else {"performance__compile_backend": backend}
    engine = make_engine(performance__compile="max", performance__quantize=quantize, **extra)
    before = unet_output(engine)  # compiles
    where = storage_addresses(engine.models.base.unet)
    write_tiny_lora(root / "loras/character/alice.safetensors", seed=1, rank=4, scale=0.1)
    engine.sync_loras()
    engine.loras.activate(engine.loras.available("character"))
    # CUDA graphs read weights at the addresses they were recorded with: merging writes into them.
    assert storage_addresses(engine.models.base.unet) == where
    after = unet_output(engine)
    assert relative_error(before, after) > 0.1, "the compiled UNet ignored the merged LoRA"
    # Compiled int8 kernels round differently from eager ones (about 0.6% here); stale weights
    # would be off by the LoRA's whole effect (about 20%).
    tolerance = 1e-4 if quantize == "none" else 0.02
    assert relative_error(unet_output(engine, eager=True), after) < tolerance


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU; this machine has none")
def test_cuda_graphs_of_the_approved_path_make_the_final_eager_code_makes(make_engine):
    # Stage 3 calls the UNet once per tile batch within a step, and a CUDA graph's outputs are
    # overwritten by its next replay: each call's prediction has to be used up before the next.
    # torch's cudagraphs backend records the eager kernels (builds in seconds), so the finals of
    # a replay and of eager code may only differ by what the graphs get wrong.
    import numpy as np
    import torch
    from PIL import Image

    engine = approved_compiling_engine(make_engine, performance__device="cuda", performance__dtype="bf16",
                                       memory__strategy="gpu", performance__compile_backend="cudagraphs")
    first = engine.stage1_once(seed=1)

    def final_pixels():
        path = engine.upscale(first.record, first.image).path
        with Image.open(path) as final:
            pixels = np.asarray(final, dtype=np.float32)
        path.unlink()  # a final is never replaced: the next upscale of this record writes it anew
        return pixels

    for _ in range(3):  # warm-up, record, replay
        replayed = final_pixels()
    with torch.compiler.set_stance("force_eager"):
        eager = final_pixels()
    assert eager.std() > 1, "the final should be an image, not a flat colour"
    assert np.abs(replayed - eager).mean() < 0.5


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU; this machine has none")
@pytest.mark.parametrize("mode", ["graphs", "max"])
def test_cuda_graphs_replay_with_the_lora_weights_merged_after_recording(root, make_engine, monkeypatch, mode):
    import torch

    from sdxld.quantize import relative_error

    # What is tested is the graph's replay, not the kernels max-autotune picks: with Triton's
    # matmul candidates to build and benchmark, the tiny UNet's build ran past 150 s on an H100.
    monkeypatch.setattr(torch._inductor.config, "max_autotune_gemm_backends", "ATEN")
    engine = make_engine(performance__device="cuda", performance__dtype="bf16", memory__strategy="gpu",
                         performance__compile=mode)
    for _ in range(3):  # warm-up, record, replay
        before = unet_output(engine).clone()
    write_tiny_lora(root / "loras/character/alice.safetensors", seed=1, rank=4, scale=0.1)
    engine.sync_loras()
    engine.loras.activate(engine.loras.available("character"))
    after = unet_output(engine).clone()
    torch.cuda.synchronize()
    assert relative_error(before, after) > 0.1, "the CUDA graph replayed the old weights"
    assert relative_error(unet_output(engine, eager=True), after) < 0.02


@pytest.mark.parametrize("mode", ["graphs", "max"])
def test_compile_for_static_shapes_builds_stage1_in_power_of_two_batches_only_and_upscaling_never_builds(
        root, make_engine, no_recompiles, mode):
    # graphs and max compile each shape for themselves (dynamic=False): a batch of 3 would be a new
    # UNet build (minutes with inductor) unless it runs as 2 + 1; stage 2's size and stage 3's
    # tiles would be builds at the first approval unless they run uncompiled.
    engine = make_engine(performance__compile=mode, performance__compile_backend="eager", generation__t2i__steps=2,
                         generation__stage2__steps=4, generation__stage3__steps=4, generation__final_scale=2,
                         model__use_refiner=False, performance__compile_vae=True)
    first = engine.stage1_batch(1)[0]
    engine.stage1_batch(2)
    no_recompiles()
    made = engine.stage1_batch(3)  # 2 + 1
    assert [r.record.batch for r in made] == [{"size": 3, "index": i, "lora_seed": made[0].record.seed} for i in range(3)]
    assert engine.upscale(first.record, first.image).path.is_file()


def approved_compiling_engine(make_engine, **changes):
    return make_engine(performance__compile="graphs", performance__compile_backend="eager",
                       performance__compile_approved=True, generation__t2i__steps=2, generation__final_scale=2,
                       generation__stage2__steps=4, generation__stage3__steps=4, **changes)


def test_compile_approved_builds_stages_2_and_3_at_the_first_approval_and_never_again(root, make_engine, no_recompiles):
    five_loras(root)
    engine = approved_compiling_engine(make_engine)
    images = [engine.stage1_once(seed=seed) for seed in (1, 2, 3)]
    stage1_built = graphs()
    engine.upscale(images[0].record, images[0].image)
    assert graphs() > stage1_built, "the first approval should have built stage 2's and stage 3's shapes"
    approved_built = graphs()
    no_recompiles()
    for image in images[1:]:  # other seeds and LoRAs, the same shapes
        assert engine.upscale(image.record, image.image).path.is_file()
    engine.stage1_once(seed=4)  # stage 1's builds are still there beside them
    assert graphs() == approved_built


def test_compile_approved_never_builds_for_an_image_unlike_stage1s(root, make_engine, no_recompiles):
    # An image of another size (one the user brought, or made before a config edit) or sampler
    # (the timesteps' dtype) has shapes of its own: a build of minutes for one image.
    from dataclasses import replace

    engine = approved_compiling_engine(make_engine)
    first = engine.stage1_once(seed=1)
    engine.upscale(first.record, first.image)
    built = graphs()
    no_recompiles()
    other = engine.stage1_once(seed=2)
    another_size = replace(other.record, width=192, height=224, tag=f"{other.record.tag}_wide")
    assert engine.upscale(another_size, other.image.resize((192, 224))).path.is_file()
    another_sampler = replace(other.record, sampler="Euler a")
    assert engine.upscale(another_sampler, other.image).path.is_file()
    assert graphs() == built


def test_compile_approved_retries_out_of_memory_without_building_the_smaller_shapes(
        root, make_engine, no_recompiles, monkeypatch):
    from sdxld import stages

    engine = approved_compiling_engine(make_engine, generation__stage3__tile_batch=2)
    first, second = engine.stage1_once(seed=1), engine.stage1_once(seed=2)
    engine.upscale(first.record, first.image)
    no_recompiles()
    stage3_latent = stages.stage3_latent

    def out_of_memory_at_two_tiles_a_call(models, record, image, settings, hooks=None, while_card_works=None):
        if settings.tile_batch > 1:
            raise stages.out_of_memory_error()("CUDA out of memory (injected)")
        return stage3_latent(models, record, image, settings, hooks, while_card_works)

    monkeypatch.setattr(stages, "stage3_latent", out_of_memory_at_two_tiles_a_call)
    result = engine.upscale(second.record, second.image)  # one tile a call: a shape never built
    assert result.notes == ["stage 3 ran out of GPU memory at tile_batch 2, tile_size 352; "
                            "retried with tile_batch 1, tile_size 352"]


@pytest.mark.parametrize("variable", ["unset", "inductor's default"])
def test_compiled_code_is_kept_in_sdxlds_cache_folder_not_in_tmp(monkeypatch, tmp_path, variable):
    # inductor's default, /tmp/torchinductor_<user>, is emptied at reboot and, under the system
    # unit's PrivateTmp, at every start: each start would build every shape again. Importing
    # torch._inductor (diffusers does) writes that default into the variable.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from sdxld.config import Config
    from sdxld.models import keep_compiled_code

    if variable == "unset":
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config, notes = Config(), []
    config.performance.compile = "graphs"
    keep_compiled_code(config, notes)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache/sdxld/torchinductor")
    assert f"compiled code is kept in {tmp_path / 'cache/sdxld/torchinductor'}: later starts reuse it" in notes


def test_a_compile_cache_folder_the_user_chose_is_kept(monkeypatch, tmp_path):
    from sdxld.models import lasting_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert lasting_compile_cache() == tmp_path / "mine"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


# As the daemon starts: diffusers imported before anything compiles (it sets inductor's default
# folder), then sdxld's own.
DAEMON_START = """
import diffusers
from sdxld.models import lasting_compile_cache
lasting_compile_cache()
"""


def test_a_second_start_finds_what_the_first_compiled(tmp_path):
    if why := cpp_compiler_missing():
        pytest.skip(why)
    env = {key: value for key, value in os.environ.items() if key != "TORCHINDUCTOR_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)

    assert inductor_cache_use(env, before=DAEMON_START) == (0, 1)
    assert inductor_cache_use(env, before=DAEMON_START) == (1, 0)
    assert any((tmp_path / "sdxld/torchinductor").rglob("*.py")), "the compiled code should be in sdxld's cache folder"


def test_compile_vae_compiles_at_the_first_images_then_never_for_any_size(root, make_engine, no_recompiles):
    # The first approval meets the VAE's tiles in all their sizes and layouts (views of the latent,
    # edge tiles), after which the sizes are dynamic. Stage 3 hands the VAE tensors made under
    # no_grad as the pipelines do: inference-mode tensors would be a compiled variant of their own.
    from dataclasses import replace

    five_loras(root)
    engine = make_engine(performance__compile_vae=True, performance__compile_backend="eager",
                         generation__t2i__steps=2, generation__stage2__steps=4, generation__stage3__steps=4)
    first = engine.stage1_once(seed=1)
    assert graphs() > 0, "the VAE's decoder should have been compiled (the UNet is not: compile is off)"
    engine.upscale(first.record, first.image)  # encodes, and decodes of stage 2's and stage 3's tiles
    no_recompiles()
    for seed in (2, 3):
        made = engine.stage1_once(seed=seed)
    assert engine.upscale(made.record, made.image).path.is_file()
    wider = replace(made.record, width=192, height=160, tag=f"{made.record.tag}_wide")
    assert engine.upscale(wider, made.image.resize((192, 160))).path.is_file()


def test_a_compiled_vae_makes_the_pixels_the_eager_one_makes(make_engine):
    import numpy as np

    # aot_eager traces and partitions the graph as inductor does, then runs ATen's own kernels.
    compiled = make_engine(performance__compile_vae=True, performance__compile_backend="aot_eager",
                           generation__t2i__steps=2)
    plain = make_engine(generation__t2i__steps=2)
    for engine in (compiled, plain):
        engine.pixels = np.asarray(engine.stage1_once(seed=7).image, dtype=np.float32)
    assert compiled.pixels.std() > 1
    assert np.abs(compiled.pixels - plain.pixels).mean() < 0.5


