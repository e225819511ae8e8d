"""ModelBank: the pipelines, loaded once and kept resident.

The base text-to-image pipeline owns the weights; the img2img pipeline is made with `from_pipe`
so it shares them (no second copy of a 2.6 B-parameter UNet), and the optional refiner shares the
base's VAE and second text encoder. Device, dtype, memory strategy, attention backend, scheduler
and compile are all decided here, once.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import offload
from .config import Config, ModelSource, model_source

log = logging.getLogger(__name__)

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which setting and what to do."""


def quiet_libraries() -> None:
    """Keep diffusers/transformers chatter (load reports, progress of weight loading) out of our logs."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def make_scheduler(sampler: str, scheduler_config):
    """The scheduler for an A1111-style sampler name, configured from the model's own schedule."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    if sampler == "UniPC":
        return UniPCMultistepScheduler.from_config(scheduler_config)
    if sampler == "Euler":
        return EulerDiscreteScheduler.from_config(scheduler_config)
    if sampler == "Euler a":
        return EulerAncestralDiscreteScheduler.from_config(scheduler_config)
    if sampler in ("DPM++ 2M", "DPM++ 2M Karras"):
        return DPMSolverMultistepScheduler.from_config(
            scheduler_config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            use_karras_sigmas=sampler.endswith("Karras"),
        )
    raise ValueError(f"unknown sampler {sampler!r}")


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

    @property
    def execution_device(self):
        return self.base._execution_device

    def set_sampler(self, sampler: str) -> None:
        """Give every pipeline a fresh scheduler of this kind (cheap: built from config)."""
        if sampler == self.sampler:
            return
        for pipe in self.pipelines():
            pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
        self.sampler = sampler

    def pipelines(self) -> list:
        return [p for p in (self.base, self.img2img, self.refiner) if p is not None]

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


def load_models(config: Config) -> ModelBank:
    """Load everything the stages need, honouring device, dtype and memory strategy."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    quiet_libraries()
    notes: list[str] = []
    device = pick_device(config.performance.device)
    dtype_name = config.performance.dtype
    if device == "cpu" and dtype_name != "fp32":
        notes.append(f"performance.dtype {dtype_name} does not run well on the CPU; using fp32")
        dtype_name = "fp32"
    dtype = getattr(torch, DTYPES[dtype_name])

    base_source = model_source(config, config.model.base)
    try:
        base = _from_source(StableDiffusionXLPipeline, base_source, config.model.config, config, torch_dtype=dtype)
    except Exception as err:  # noqa: BLE001 - turned into one actionable message
        raise ModelLoadError(f"model.base '{config.model.base}' could not be loaded: {err}") from err
    if config.model.vae:
        try:
            base.vae = _load_vae(config.model.vae, config, dtype)
        except Exception as err:  # noqa: BLE001
            raise ModelLoadError(f"model.vae '{config.model.vae}' could not be loaded: {err}") from err
    base.scheduler = make_scheduler(config.generation.sampler, base.scheduler.config)

    refiner = None
    refiner_id = None
    if config.refiner_wanted():
        refiner_source = model_source(config, config.model.refiner)
        try:
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
        except Exception as err:  # noqa: BLE001
            raise ModelLoadError(f"model.refiner '{config.model.refiner}' could not be loaded: {err}") from err
        refiner.scheduler = make_scheduler(config.generation.sampler, refiner.scheduler.config)
        refiner_id = config.model.refiner

    img2img = img2img_from(base)

    _layout_tensors(config, [base, refiner])
    residency = _place(config, device, base, refiner, notes)
    _configure_vae(config, base.vae)
    _configure_attention(config, device, [base, refiner], notes)
    _compile(config, [base, refiner], notes)

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


def _compile(config: Config, pipes: list, notes: list[str]) -> None:
    """torch.compile the UNets in place (pipelines keep their modules, and img2img shares them).

    Compilation happens at the first call. LoRAs are merged into the weights in place, which no
    guard looks at, so rotating them never recompiles. The first image of a new
    size compiles again once; after that torch marks the sizes dynamic."""
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
        else:
            pipe.unet.compile(backend=backend)
    notes.append(f"performance.compile {mode} ({backend}): the first image of each size compiles, expect it to be slow")


def _configure_vae(config: Config, vae) -> None:
    if config.memory.vae_slicing:
        vae.enable_slicing()
    if config.memory.vae_tiling:
        vae.enable_tiling()


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
