"""ModelBank: the pipelines, loaded once and kept resident.

The base text-to-image pipeline owns the weights; the img2img pipeline is made with `from_pipe`
so it shares them (no second copy of a 2.6 B-parameter UNet), and the optional refiner shares the
base's VAE and second text encoder. Device, dtype, memory strategy, attention backend, scheduler
and compile are all decided here, once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import diffusers_private, offload, quantize
from .config import DTYPES, SAMPLERS, Config, ModelSource, model_source

log = logging.getLogger(__name__)

class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which setting and what to do."""


def quiet_libraries() -> None:
    """Keep diffusers/transformers chatter (load reports, progress of weight loading) out of our logs,
    and torch's notes to library authors (torchao's registrations with torch's pytree)."""
    import diffusers
    import transformers

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def make_scheduler(sampler: str, scheduler_config):
    """The scheduler for an A1111-style sampler name, configured from the model's own schedule."""
    import diffusers

    from . import samplers

    class_name, options = SAMPLERS[sampler]
    scheduler_class = getattr(samplers, class_name, None) or getattr(diffusers, class_name)
    return scheduler_class.from_config(scheduler_config, **options)


def pick_device(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def model_display_name(location: str) -> str:
    """What A1111 shows as Model: the checkpoint's or folder's name, or the hub repo's name."""
    name = re.split(r"[\\/]", location.rstrip("/\\"))[-1]
    return re.sub(r"\.(safetensors|ckpt)$", "", name)


def file_hash(path: Path) -> str:
    """A1111's model hash: sha256 of the whole file, first 10 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


@dataclass
class ModelBank:
    base: object
    img2img: object
    refiner: object | None
    device: str
    dtype_name: str
    base_id: str
    base_hash: str | None = None
    base_name: str = ""
    refiner_id: str | None = None
    sampler: str = "UniPC"
    notes: list[str] = field(default_factory=list)
    # model_offload's coordinator: which one model is on the GPU now (None for other strategies).
    residency: offload.OneModelOnDevice | None = None
    # performance.quantize: the base UNet's quantized layers and their kept originals (LoRA merges).
    quantized: quantize.Quantized | None = None
    # performance.compile graphs and max: every new input shape is a UNet build of its own
    # (minutes), so stage 1 keeps its batches to a few shapes.
    static_shapes: bool = False
    # performance.compile_approved: stages 2 and 3 build their shapes too (static_shapes only).
    compile_approved: bool = False

    def __post_init__(self) -> None:
        for pipe in self.pipelines():
            diffusers_private.queue_pipeline_setup(pipe, self.device)

    @property
    def execution_device(self):
        return diffusers_private.execution_device(self.base)

    def set_sampler(self, sampler: str) -> None:
        """Give every pipeline a fresh scheduler of this kind (cheap: built from config)."""
        if sampler == self.sampler:
            return
        for pipe in self.pipelines():
            pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
        self.sampler = sampler

    def pipelines(self) -> list:
        return [p for p in (self.base, self.img2img, self.refiner) if p is not None]

    def approved_path(self, may_build: bool):
        """Context for stages 2 and 3. Under compile graphs and max every new shape is a build of
        its own (minutes: SDXL's reduce-overhead build of stage 1's shape took 122 s on an H100).
        Without compile_approved they run uncompiled, so an approved image never waits for one.
        With it, an image that `may_build` (the engine says: stage 1's size and sampler, the shapes
        every approval repeats) builds what it lacks; any other image runs the shapes already
        built and the rest uncompiled, never starting a build for a size it may be alone in
        having."""
        import torch

        if self.static_shapes and not self.compile_approved and hasattr(torch.compiler, "set_stance"):  # torch 2.6+
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext() if may_build else self.no_new_builds()

    def no_new_builds(self):
        """Compiled shapes run as built; a shape not built yet runs uncompiled instead of building
        (an out-of-memory retry's smaller tiles, another image's size)."""
        import torch

        if not self.static_shapes or not self.compile_approved or not hasattr(torch.compiler, "set_stance"):
            return contextlib.nullcontext()
        return torch.compiler.set_stance("eager_on_recompile")

    def describe(self) -> dict:
        return {"base": self.base_id, "name": self.base_name, "hash": self.base_hash, "refiner": self.refiner_id}


def _from_source(pipeline_cls, source: ModelSource, config_folder: str | None, config: Config, **kwargs):
    with warnings.catch_warnings():
        # diffusers 0.42 renamed torch_dtype to dtype; torch_dtype works in every supported version.
        warnings.simplefilter("ignore", FutureWarning)
        return _from_source_unfiltered(pipeline_cls, source, config_folder, config, **kwargs)


def _from_source_unfiltered(pipeline_cls, source: ModelSource, config_folder: str | None, config: Config, **kwargs):
    if source.kind == "file":
        if config_folder:
            kwargs["config"] = str(config.path(config_folder))
        else:
            log.info(
                "%s: single-file checkpoint without model.config; diffusers will fetch the model's "
                "configs from the Hub (set model.config to a local diffusers folder to work offline)",
                source.location,
            )
        return pipeline_cls.from_single_file(source.location, **kwargs)
    return pipeline_cls.from_pretrained(source.location, **kwargs)


def _load_vae(location: str, config: Config, dtype):
    from diffusers import AutoencoderKL

    source = model_source(config, location)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if source.kind != "file":
            return AutoencoderKL.from_pretrained(source.location, torch_dtype=dtype)
        # A single-file VAE holds weights only; its config is the base model's VAE config, read
        # from model.config (or the base's own folder) so that nothing is fetched from the Hub.
        folder = _vae_config_folder(config)
        if folder is None:
            log.info(
                "%s: single-file VAE without a local model config; diffusers will fetch the VAE config "
                "from the Hub (set model.config to a local diffusers folder to work offline)",
                source.location,
            )
            return AutoencoderKL.from_single_file(source.location, torch_dtype=dtype)
        return AutoencoderKL.from_single_file(source.location, config=folder, subfolder="vae", torch_dtype=dtype)


def _vae_config_folder(config: Config) -> str | None:
    if config.model.config:
        return str(config.path(config.model.config))
    base = model_source(config, config.model.base)
    return base.location if base.kind == "folder" else None


@contextlib.contextmanager
def explained_load_failure(config: Config, key: str, source: ModelSource):
    """Turn whatever loading a model raises into one message: which setting, why, what to do.

    A hub id that is neither cached nor downloadable fails before diffusers starts, in seconds,
    instead of after its retries with "check out the root cause in the stacktrace above"."""
    if source.kind == "hub":
        _check_hub_model(config, key, source.location)
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - turned into one actionable message
        advice = {
            "file": "check that it is a complete SDXL checkpoint (not SD1.5, a LoRA or a VAE) and not still being copied",
            "folder": "check that it is a complete diffusers folder of an SDXL model",
            "hub": "check the name, the network and the free disk space of the Hugging Face cache",
        }[source.kind]
        raise ModelLoadError(f"model.{key} '{getattr(config.model, key)}' could not be loaded: {_reasons(err)}. To fix: "
                             f"{advice}; or set model.{key} in {config.source or 'config.yaml'} to another model") from err


def _reasons(err: BaseException) -> str:
    """The error and its causes in one line, without library hints pointing at a traceback."""
    parts: list[str] = []
    while err is not None and len(parts) < 4:
        text = re.sub(r"\s*Please check out the root cause in the stacktrace above\.?", "", str(err)).strip()
        if text and not any(text in p for p in parts):
            parts.append(text)
        err = err.__cause__ or err.__context__
    return ": ".join(parts) or "unknown error"


def _check_hub_model(config: Config, key: str, repo_id: str) -> None:
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    marker = "config.json" if key == "vae" else "model_index.json"
    if isinstance(try_to_load_from_cache(repo_id, marker), str):
        return
    where = config.source or "config.yaml"
    if constants.HF_HUB_OFFLINE:
        reason = "downloads are switched off here (HF_HUB_OFFLINE is set; unset it to download)"
    else:
        try:
            model_info(repo_id, timeout=15)
            return  # reachable: diffusers downloads it (once; an SDXL model is about 7 GB)
        except GatedRepoError:
            raise ModelLoadError(
                f"model.{key} '{repo_id}' is a gated model: accept its terms on https://huggingface.co/{repo_id} "
                "and log in on this machine with `hf auth login`") from None
        except RepositoryNotFoundError:
            raise ModelLoadError(
                f"model.{key} '{repo_id}' does not exist on the Hugging Face Hub (or is private: then log in with "
                f"`hf auth login`). Check the spelling in {where}, or set it to a local .safetensors checkpoint "
                "or diffusers folder") from None
        except Exception as err:  # noqa: BLE001 - any network failure means the same to the user
            reason = f"the Hub cannot be reached ({type(err).__name__}: {_reasons(err)[:200]})"
    raise ModelLoadError(
        f"model.{key} '{repo_id}' is a Hugging Face Hub id that is not in this machine's model cache "
        f"({constants.HF_HUB_CACHE}), and {reason}. To fix: connect this machine to the internet once so sdxld "
        f"can download it (an SDXL model is about 7 GB), or set model.{key} in {where} to a local .safetensors "
        "checkpoint or diffusers folder. To try sdxld without any model, add --demo (the built-in tiny model)"
    )


def load_models(config: Config) -> ModelBank:
    """Load everything the stages need, honouring device, dtype and memory strategy."""
    quiet_libraries()  # before the pipelines' import, which imports torchao when it is installed
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    notes: list[str] = []
    device = pick_device(config.performance.device)
    dtype_name = config.performance.dtype
    if device == "cpu" and dtype_name != "fp32":
        notes.append(f"performance.dtype {dtype_name} does not run well on the CPU; using fp32")
        dtype_name = "fp32"
    dtype = getattr(torch, DTYPES[dtype_name])

    base_source = model_source(config, config.model.base)
    with explained_load_failure(config, "base", base_source):
        base = _from_source(StableDiffusionXLPipeline, base_source, config.model.config, config, torch_dtype=dtype)
    if config.model.vae:
        with explained_load_failure(config, "vae", model_source(config, config.model.vae)):
            base.vae = _load_vae(config.model.vae, config, dtype)
    base.scheduler = make_scheduler(config.generation.sampler, base.scheduler.config)

    refiner = None
    refiner_id = None
    if config.refiner_wanted():
        refiner_source = model_source(config, config.model.refiner)
        with explained_load_failure(config, "refiner", refiner_source):
            # The SDXL refiner uses the base's second text encoder and VAE unchanged: share them.
            refiner = _from_source(
                StableDiffusionXLImg2ImgPipeline,
                refiner_source,
                config.model.refiner_config,
                config,
                torch_dtype=dtype,
                text_encoder_2=base.text_encoder_2,
                vae=base.vae,
            )
        refiner.scheduler = make_scheduler(config.generation.sampler, refiner.scheduler.config)
        refiner_id = config.model.refiner

    img2img = img2img_from(base)

    _layout_tensors(config, [base, refiner])
    quantized = _quantize(config, device, base, refiner, notes)
    residency = _place(config, device, base, refiner, notes)
    _configure_vae(config, base.vae)
    _configure_attention(config, device, [base, refiner], notes)
    compile_unets(config, [base, refiner], notes)
    compile_vae(config, base.vae, notes)
    keep_compiled_code(config, notes)

    for pipe in (base, img2img, refiner):
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)

    base_hash = file_hash(base_source.path) if base_source.kind == "file" else None
    for note in notes:
        log.info("%s", note)
    return ModelBank(
        base=base,
        img2img=img2img,
        refiner=refiner,
        device=device,
        dtype_name=dtype_name,
        base_id=config.model.base,
        base_hash=base_hash,
        base_name="sdxld-tiny-demo" if config.demo else model_display_name(config.model.base),
        refiner_id=refiner_id,
        sampler=config.generation.sampler,
        notes=notes,
        residency=residency,
        quantized=quantized,
        static_shapes=config.performance.static_shapes,
        compile_approved=config.performance.compile_approved,
    )


def img2img_from(base):
    """The img2img pipeline over the base's own modules (no copy).

    from_pipe casts the shared modules to its dtype argument, which defaults to float32: without
    passing the base's dtype an fp16/bf16 base silently becomes fp32 (twice the VRAM), and the
    refiner, which shares the VAE and text encoder 2, then fails on mixed dtypes.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return StableDiffusionXLImg2ImgPipeline.from_pipe(base, torch_dtype=base.unet.dtype)


def _place(config: Config, device: str, base, refiner, notes: list[str]):
    strategy = config.memory.strategy
    if not device.startswith("cuda"):
        if strategy != "gpu":
            notes.append(f"memory.strategy {strategy} applies on CUDA only; on {device} all models stay in memory")
        strategy = "gpu"
    return offload.place(strategy, device, base, refiner)


def _layout_tensors(config: Config, pipes: list) -> None:
    import torch

    for pipe in pipes:
        if pipe is None:
            continue
        if config.performance.fuse_qkv:
            # LoraSlots unfuses the UNet again when the first LoRA needs its q/k/v layers.
            # The refiner shares the base's VAE: fuse it once.
            pipe.fuse_qkv_projections(unet=True, vae=pipe is pipes[0])
        if config.performance.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)


def _quantize(config: Config, device: str, base, refiner, notes: list[str]) -> quantize.Quantized | None:
    """performance.quantize on the UNets, on the execution device (seconds there, minutes on a
    CPU), before the memory strategy places them. LoRAs only merge into the base UNet: only its
    originals are kept."""
    mode = config.performance.quantize
    if mode == "none":
        return None
    if device.startswith("cuda") and config.memory.strategy in ("group_offload", "sequential_offload"):
        notes.append(f"performance.quantize {mode} works with memory.strategy gpu or model_offload, not "
                     f"{config.memory.strategy} (its per-layer hooks move plain tensors); not quantizing")
        return None
    if mode == "fp8":
        reason = quantize.fp8_unsupported(device)
        if reason:
            notes.append(f"performance.quantize fp8: {reason}; using int8 instead")
            mode = "int8"
    try:
        base.unet.to(device)
        kept = quantize.quantize_unet(base.unet, mode, keep_originals=True)
        if refiner is not None:
            refiner.unet.to(device)
            quantize.quantize_unet(refiner.unet, mode, keep_originals=False)
    except quantize.QuantizeUnavailable as err:
        raise ModelLoadError(str(err)) from None
    notes.append(f"performance.quantize {mode}: {kept.layers} linear layers per UNet run as {mode} matmuls (torchao); "
                 f"their originals for LoRA merges take {kept.original_bytes() / 2**20:,.0f} MiB of RAM")
    if config.performance.compile == "off":
        notes.append(f"performance.quantize {mode} with performance.compile off is slower, not faster: uncompiled, every "
                     f"quantized layer quantizes its input in extra small steps (measured on an H100: fp8 made a "
                     f"stage-1 image take 5.95x as long as unquantized bf16); set performance.compile to use it")
    return kept


def compile_unets(config: Config, pipes: list, notes: list[str]) -> None:
    """torch.compile the UNets in place (pipelines keep their modules, and img2img shares them).

    Compilation happens at the first call. LoRAs are merged into the weights in place, which no
    guard looks at, so rotating them never recompiles. The first image of a new size compiles
    again once; after that torch marks the sizes dynamic, except under graphs and max, which
    compile each shape for itself (stages.stage1_batch then keeps its batches to powers of two)."""
    mode = config.performance.compile
    if mode == "off":
        return
    backend = config.performance.compile_backend
    for pipe in pipes:
        if pipe is None:
            continue
        if mode == "regional":
            # Each BasicTransformerBlock is compiled once and reused for all its copies.
            pipe.unet.compile_repeated_blocks(backend=backend)
        elif config.performance.static_shapes:
            # Both modes record CUDA graphs: a whole denoising step replays without launching its
            # kernels one by one; max-autotune also benchmarks candidate kernels for each matmul.
            inductor_mode = "max-autotune" if mode == "max" else "reduce-overhead"
            options = {"mode": inductor_mode} if backend == "inductor" else {"backend": backend}
            pipe.unet.compile(dynamic=False, **options)
        else:
            pipe.unet.compile(backend=backend)
    if config.performance.static_shapes:
        _allow_static_shapes()
        if config.performance.device != "cpu" and config.memory.strategy != "gpu":
            notes.append(f"performance.compile {mode} records CUDA graphs at the weights' addresses; memory.strategy "
                         f"{config.memory.strategy} moves the UNet, so graphs are recorded again: use memory.strategy gpu")
    notes.append(f"performance.compile {mode} ({backend}): the first image of each size compiles, expect it to be slow")
    if config.performance.compile_approved:
        notes.append("performance.compile_approved: the first approved image of stage 1's size builds stage 2's and "
                     "stage 3's shapes (one per UNet and shape: up to four builds of minutes each with the refiner), "
                     "so its final takes that much longer; later ones run as built")


def compile_vae(config: Config, vae, notes: list[str]) -> None:
    """performance.compile_vae: the VAE's encoder and decoder compiled in place (the base, img2img
    and refiner pipelines share this VAE). Not as CUDA graphs: its calls are few and large. Its
    tiles come in several sizes and layouts (edge tiles, views of the latent), so the first
    approved image compiles it several times (10 on the demo model) until its sizes are dynamic;
    after that, other image sizes compiled nothing more (tests/test_compile.py). Under compile
    graphs and max the approved path's stance applies to it as to the UNets (uncompiled unless
    compile_approved)."""
    if not config.performance.compile_vae:
        return
    backend = config.performance.compile_backend
    vae.encoder.compile(backend=backend)
    vae.decoder.compile(backend=backend)
    notes.append(f"performance.compile_vae ({backend}): the first stage-1 decode compiles the VAE, and the first "
                 f"approved image compiles it for its tiles (several compiles, once)")


def keep_compiled_code(config: Config, notes: list[str]) -> None:
    """What inductor compiles is kept for later starts (lasting_compile_cache); the start says where."""
    performance = config.performance
    if performance.compile_backend == "inductor" and (performance.compile != "off" or performance.compile_vae):
        notes.append(f"compiled code is kept in {lasting_compile_cache()}: later starts reuse it")


# inductor's own variable: a folder the user chose is used as it is.
COMPILE_CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def lasting_compile_cache() -> Path:
    """The folder inductor keeps compiled graphs and kernels in, made to outlast the process.

    inductor's default is /tmp/torchinductor_<user>: emptied at reboot, and under the system
    unit's PrivateTmp a fresh /tmp at every start, so every start would build every shape again
    (SDXL's stage-1 shape under compile graphs: 122 s on an H100). sdxld's cache folder (the root's
    .cache under the system unit) keeps them. inductor reads the variable whenever it looks for a
    cached graph or kernel, but writes its default into it when torch._inductor is first imported
    (diffusers' import does): that value counts as not chosen."""
    from .tiny import cache_root

    chosen = os.environ.get(COMPILE_CACHE_VARIABLE)
    if chosen and Path(chosen).absolute() != _inductor_default_cache():
        return Path(chosen)
    folder = cache_root() / "torchinductor"
    os.environ[COMPILE_CACHE_VARIABLE] = str(folder)
    return folder


def _inductor_default_cache() -> Path:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # torch before 2.5 kept it beside the other runtime helpers
        from torch._inductor.runtime.runtime_utils import default_cache_dir
    return Path(default_cache_dir()).absolute()


def _allow_static_shapes() -> None:
    """compile graphs and max specialise on every shape: up to five stage-1 batch sizes, for the
    base and the refiner (one forward function), and on older torch without set_stance stages 2
    and 3 as well. torch's default of 8 compiled versions per function would run the rest uncompiled."""
    import torch

    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, max(getattr(dynamo, name), 64))


def _configure_vae(config: Config, vae) -> None:
    if config.memory.vae_slicing:
        vae.enable_slicing()
    if config.memory.vae_tiling:
        vae.enable_tiling()
    diffusers_private.vectorize_tile_blending(vae)


def _configure_attention(config: Config, device: str, pipes: list, notes: list[str]) -> None:
    choice = config.performance.attention
    if choice == "sdpa" or not device.startswith("cuda"):
        if choice == "xformers":
            notes.append("xformers needs CUDA; using PyTorch SDPA attention")
        return
    try:
        import xformers  # noqa: F401
    except ImportError:
        if choice == "xformers":
            notes.append("performance.attention is xformers but xformers is not installed; using SDPA")
        return
    for pipe in pipes:
        if pipe is not None:
            pipe.enable_xformers_memory_efficient_attention()
