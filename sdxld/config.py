"""config.yaml -> a validated, typed Config.

Every problem is reported as one ConfigError that names the file, the dotted key and what to do,
because the user reading it is looking at a YAML file, not at a traceback. The CLI turns it into
exit status 78 (EX_CONFIG), which the systemd unit treats as "do not restart".
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from .prompt_syntax import Syntax

EX_CONFIG = 78

log = logging.getLogger(__name__)

# A1111's sampler names -> the scheduler class (diffusers', or sdxld's own subclass of one in
# sdxld/samplers.py) and its options (models.make_scheduler).
SAMPLERS = {
    "UniPC": ("NoWaitUniPCScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("NoWaitEulerAncestralScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
}
# performance.dtype -> the torch dtype's name.
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class ConfigError(Exception):
    """A config problem a user can fix: carries the file and the dotted key it is about."""

    def __init__(self, message: str, key: str = "", file: Path | str | None = None):
        self.key, self.file, self.detail = key, file, message
        where = f"{file}: " if file else ""
        what = f"{key}: " if key else ""
        super().__init__(f"{where}{what}{message}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, key)


def _multiple_of_8(value: int, key: str) -> None:
    _check(value % 8 == 0, key, f"{value} is not a multiple of 8 (try {value // 8 * 8})")


def _unit_strength(value: float, key: str) -> None:
    _check(0 < value <= 1, key, f"{value} is outside (0, 1]: 0 changes nothing, 1 replaces the image")


@dataclass
class ModelConfig:
    # A hub id ("owner/name"), a local diffusers folder, or a single-file .safetensors checkpoint.
    base: str = "WhiteAiZ/Illustrious-xl-v1.0"
    refiner: str | None = "stabilityai/stable-diffusion-xl-refiner-1.0"
    use_refiner: bool = True
    # For single-file checkpoints: a local diffusers folder whose configs describe the model.
    # Without it diffusers fetches the configs from the Hub, which fails offline.
    config: str | None = None
    refiner_config: str | None = None
    # Optional VAE replacement, e.g. madebyollin/sdxl-vae-fp16-fix (fp16-safe).
    vae: str | None = None

    def validate(self) -> None:
        _check(bool(self.base.strip()), "model.base", "is empty: name a hub id, a diffusers folder or a .safetensors file")
        if self.use_refiner:
            _check(bool(self.refiner), "model.refiner", "is empty but model.use_refiner is true")


@dataclass
class PerformanceConfig:
    dtype: Literal[tuple(DTYPES)] = "fp16"  # type: ignore[valid-type]
    # off; regional: torch.compile each repeated transformer block (fast to compile, most of the
    # gain); full: the whole UNet; graphs: the whole UNet for stage 1's fixed shapes, each
    # denoising step replayed as CUDA graphs (about 2 minutes to compile per batch size on an
    # H100, where it halved a stage-1 image's time; made for the daemon's long runs; stages 2 and
    # 3 run uncompiled unless compile_approved); max: graphs with every matmul autotuned (longer
    # builds, not timed yet).
    # LoRAs are merged into the weights in place, so none of them recompiles per LoRA.
    compile: Literal["off", "regional", "full", "graphs", "max"] = "off"
    # graphs and max only: stages 2 and 3 compiled for their fixed shapes too, for approved images
    # of stage 1's size and sampler (the first such approval builds each shape: minutes); other
    # images reuse what was built where the shapes match and run uncompiled elsewhere.
    compile_approved: bool = False
    # torch.compile the VAE's encoder and decoder too (any compile mode, or alone): inductor fuses
    # the normalizations and activations its convolutions are wrapped in. The first stage-1 image
    # and the first approved image compile it (its tiles: several compiles); later ones do not.
    compile_vae: bool = False
    # torch.compile backend: inductor generates kernels; eager only traces (tests, debugging).
    compile_backend: str = "inductor"
    # Fuse the q/k/v projections of the UNet's and VAE's attention into one matmul. The UNet's
    # are only fused while no LoRA is in the folders (a fused layer has no q/k/v for a LoRA).
    fuse_qkv: bool = False
    # NHWC tensors for the UNet and VAE convolutions.
    channels_last: bool = False
    # none; fp8: the UNets' linear layers as fp8 matmuls with fp8 activations (NVIDIA Ada and
    # Hopper: compute capability 8.9+); int8: int8 weights and activations (any GPU, and the CPU).
    # Needs torchao (pip install 'sdxld[quantize]'). LoRAs merge into kept full-precision copies.
    quantize: Literal["none", "fp8", "int8"] = "none"
    # auto: CUDA when present, else CPU.
    device: str = "auto"
    # auto: xformers when installed on CUDA, else PyTorch SDPA.
    attention: Literal["auto", "sdpa", "xformers"] = "auto"

    @property
    def static_shapes(self) -> bool:
        """The UNet is compiled for each shape it meets (a build per stage-1 batch size)."""
        return self.compile in ("graphs", "max")

    @property
    def builds_for_minutes(self) -> bool:
        """A compile may outlast systemd's watchdog inside one call that pings nothing: the whole
        UNet's (graphs' build of one shape took 122 s on an H100 with 16 host cores; a host with
        fewer compiles slower), or the VAE's for several tile shapes within one decode. Regional
        compiles one transformer block (11 s for the first image on the H200)."""
        return self.compile in ("full", "graphs", "max") or self.compile_vae

    def validate(self) -> None:
        ok = re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device)
        _check(bool(ok), "performance.device", f"'{self.device}' is not one of auto, cpu, cuda, cuda:N, mps")
        if self.compile_approved and not self.static_shapes:
            already = " (regional and full compile stages 2 and 3 already)" if self.compile != "off" else ""
            _check(False, "performance.compile_approved",
                   f"is for compile graphs or max, not {self.compile}{already}: set compile to graphs or max, "
                   f"or compile_approved to false")


@dataclass
class MemoryConfig:
    strategy: Literal["gpu", "model_offload", "group_offload", "sequential_offload"] = "model_offload"
    vae_slicing: bool = True
    vae_tiling: bool = True
    # Where the original weights of the layers LoRAs touch are kept (the base every merge starts
    # from): host (RAM, pinned) or gpu (beside the weights: a swap copies them within the card
    # instead of over PCIe, for ~5.4 GiB of GPU memory with full SDXL LoRAs; memory.strategy gpu).
    lora_originals: Literal["host", "gpu"] = "host"

    def validate(self) -> None:
        _check(self.lora_originals == "host" or self.strategy == "gpu", "memory.lora_originals",
               f"gpu needs memory.strategy gpu: under {self.strategy} the weights leave the card between uses "
               f"(set lora_originals to host, or strategy to gpu)")


@dataclass
class LoraConfig:
    character_dir: str = "loras/character"
    style_dir: str = "loras/style"
    # Never rotated: LoRAs only a `<lora:name:weight>` tag in a prompt asks for.
    extra_dir: str = "loras/extra"
    character_strength: float = 1.0
    style_strength: float = 0.85
    # uniform: every LoRA of a kind equally often; learned: more often the ones whose images get
    # approved (Thompson sampling, rotation.py), with `explore` of the draws kept uniform.
    rotation: Literal["uniform", "learned"] = "learned"
    explore: float = 0.2
    # Host memory for LoRA files kept ready to merge again after they leave the model (read,
    # parsed and stacked once; pinned on a GPU), besides the files merged now; the least recently
    # merged leave first. 0: every file is read from disk each time it is drawn.
    keep_in_memory_mb: int = 1024

    def validate(self) -> None:
        for key in ("character_strength", "style_strength"):
            value = getattr(self, key)
            _check(-4 <= value <= 4, f"lora.{key}", f"{value} is outside [-4, 4]; typical values are 0.5 to 1.2")
        _explore(self.explore, "lora.explore")
        _check(self.keep_in_memory_mb >= 0, "lora.keep_in_memory_mb",
               f"{self.keep_in_memory_mb} is negative; 0 keeps no LoRA file in memory, 1024 keeps about 1 GB")


def _explore(value: float, key: str) -> None:
    _check(0 <= value <= 1, key, f"{value} is outside 0..1 (the share of draws kept uniform; 0.2 is a good start)")


@dataclass
class PromptsConfig:
    manual_prompt: str = "prompts/manual_prompt.txt"
    negative_prompt: str = "prompts/manual_negative_prompt.txt"
    options: str = "prompts/prompt_options.txt"
    # __name__ in any prompt text draws a line of <wildcards>/name.txt.
    wildcards: str = "prompts/wildcards"
    max_extras: int = 5
    # a1111: (word:1.3), (word), [word], BREAK and \( escapes, as A1111/Forge read them; plain: the
    # text as written. Either way prompts longer than 75 tokens are encoded whole, never cut.
    syntax: Syntax = "a1111"
    # uniform or learned, as lora.rotation, for the options drawn from the options file.
    rotation: Literal["uniform", "learned"] = "learned"
    explore: float = 0.2

    def validate(self) -> None:
        _check(0 <= self.max_extras <= 100, "prompts.max_extras", f"{self.max_extras} is outside 0..100")
        _explore(self.explore, "prompts.explore")


@dataclass
class TextToImageConfig:
    steps: int = 30
    cfg: float = 8.0
    # Fraction of the schedule the base runs before the refiner takes over.
    denoise_split: float = 0.8

    def validate(self, key: str = "generation.t2i") -> None:
        _check(1 <= self.steps <= 500, f"{key}.steps", f"{self.steps} is outside 1..500")
        _check(0 <= self.cfg <= 50, f"{key}.cfg", f"{self.cfg} is outside 0..50")
        _check(0 < self.denoise_split < 1, f"{key}.denoise_split", f"{self.denoise_split} is outside (0, 1)")


@dataclass
class Img2ImgConfig:
    """What stages 2 and 3 share: an img2img pass at `strength`, the refiner after `denoise_split`."""

    key: ClassVar[str] = ""  # the section's dotted name, for error messages

    enabled: bool = True
    steps: int = 22
    cfg: float = 4.5
    strength: float = 0.25
    use_refiner: bool = True
    denoise_split: float = 0.8

    def validate(self) -> None:
        TextToImageConfig(self.steps, self.cfg, self.denoise_split).validate(self.key)
        _unit_strength(self.strength, f"{self.key}.strength")


@dataclass
class Stage2Config(Img2ImgConfig):
    key: ClassVar[str] = "generation.stage2"


@dataclass
class Stage3Config(Img2ImgConfig):
    key: ClassVar[str] = "generation.stage3"

    steps: int = 18
    strength: float = 0.4
    tile_size: int = 2048
    tile_overlap: int = 256
    # grow_overlap: tiles of tile_size, the spare image length widening their overlaps (Tiled
    # Diffusion's grid); shrink_tiles: as many tiles, shrunk until the overlaps are tile_overlap
    # (at 3072x5376: 1664x1984 instead of 2048x2048, 27% fewer UNet FLOPs; other pixels).
    tile_fit: Literal["grow_overlap", "shrink_tiles"] = "grow_overlap"
    blend_mode: Literal["cosine", "linear"] = "cosine"
    # latent: per-step fusion of tile predictions (no seams, no tile divergence); pixel: generate.py's
    # independent tiles blended afterwards.
    mode: Literal["latent", "pixel"] = "latent"
    # Latent mode: tiles per UNet call. auto: 2 (faster than 1, no slower than 4 on an H200),
    # 1 when free VRAM is short; an out-of-memory tile batch is retried smaller either way.
    tile_batch: int | Literal["auto"] = "auto"

    def validate(self) -> None:
        super().validate()
        if self.tile_batch != "auto":
            _check(1 <= self.tile_batch <= 64, "generation.stage3.tile_batch", f"{self.tile_batch} is outside 1..64")
        _multiple_of_8(self.tile_size, "generation.stage3.tile_size")
        _multiple_of_8(self.tile_overlap, "generation.stage3.tile_overlap")
        _check(self.tile_size >= 64, "generation.stage3.tile_size", f"{self.tile_size} is below 64")
        _check(
            0 <= self.tile_overlap < self.tile_size // 2,
            "generation.stage3.tile_overlap",
            f"{self.tile_overlap} must be at least 0 and under half of tile_size ({self.tile_size})",
        )


@dataclass
class GenerationConfig:
    # -1: a fresh random seed per image. N: the first image uses N, the next N+1, and so on.
    seed: int = -1
    base_width: int = 768
    base_height: int = 1344
    mid_scale: float = 2.0
    final_scale: float = 4.0
    sampler: Literal[tuple(SAMPLERS)] = "UniPC"  # type: ignore[valid-type]
    # Stage-1 images per UNet call. A batch shares one LoRA draw (each image keeps its own seed,
    # prompt and record); waiting approved images wait for at most one batch. auto: 1 on the CPU;
    # on a GPU, as many as 80% of the free VRAM holds by the first image's measured peak (<= 8).
    # auto is the default: batches of 8 made 3.19x the images per hour of single images on an H100.
    batch_size: int | Literal["auto"] = "auto"
    t2i: TextToImageConfig = field(default_factory=TextToImageConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    stage3: Stage3Config = field(default_factory=Stage3Config)

    def validate(self) -> None:
        _check(-1 <= self.seed < 2**63, "generation.seed", f"{self.seed} is not -1 (random) or a seed in 0..2^63-1")
        if self.batch_size != "auto":
            _check(1 <= self.batch_size <= 16, "generation.batch_size", f"{self.batch_size} is outside 1..16 (or auto)")
        for key in ("base_width", "base_height"):
            value = getattr(self, key)
            _multiple_of_8(value, f"generation.{key}")
            _check(64 <= value <= 4096, f"generation.{key}", f"{value} is outside 64..4096")
        _check(1 <= self.mid_scale <= 8, "generation.mid_scale", f"{self.mid_scale} is outside 1..8")
        _check(
            self.mid_scale <= self.final_scale <= 16,
            "generation.final_scale",
            f"{self.final_scale} must be between mid_scale ({self.mid_scale}) and 16",
        )
        self.t2i.validate()
        self.stage2.validate()
        self.stage3.validate()

    def scaled_size(self, scale: float) -> tuple[int, int]:
        """Width and height at `scale` x the base size, rounded down to multiples of 8."""
        return (int(self.base_width * scale) // 8 * 8, int(self.base_height * scale) // 8 * 8)


@dataclass
class UpscalerConfig:
    # Missing weights are not an error: the upscale falls back to Lanczos, as the seed did.
    weights: str = "weights/RealESRGAN_x4plus_anime_6B.pth"
    tile: int = 512
    pad: int = 32

    def validate(self) -> None:
        _check(self.tile >= 32, "upscaler.tile", f"{self.tile} is below 32")
        _check(0 <= self.pad < self.tile // 2, "upscaler.pad", f"{self.pad} must be in 0..tile/2")


@dataclass
class OutputConfig:
    dir: str = "outputs"
    save_intermediates: bool = False
    # Text embedded in the PNGs: full (A1111 parameters + the sdxld record, both free of local
    # paths), parameters (A1111 text only), none (no text at all).
    embed: Literal["full", "parameters", "none"] = "full"


@dataclass
class UpscaleConfig:
    # An approved image with no sdxld record, A1111 parameters or caption: manual_prompt upscales
    # it with the manual prompt and a fresh (recorded) seed; fail sends it to inbox/failed/.
    unknown_images: Literal["manual_prompt", "fail"] = "manual_prompt"


@dataclass
class DaemonConfig:
    # Stage 1 pauses while outputs/stage1/ holds this many uncurated images (0: never pause).
    max_pending: int = 500
    # ... or while the outputs folder's disk has less free space than this.
    min_free_gb: float = 5.0
    # A file in approved/ or loras/ is taken once it has not changed for this long.
    settle_s: float = 1.0
    # Events are hints: the folders are rescanned this often anyway.
    rescan_s: float = 30.0
    # An approved image whose processing was cut short this many times goes to failed/.
    max_attempts: int = 3
    # After a save failed (disk full, read-only outputs), wait this long before the next try.
    save_retry_s: float = 30.0
    # A file in approved/ that a writer still holds open (a slow copy from a network share, a USB
    # disk, a browser download) is waited for up to this long; one that decodes as truncated is
    # put back and tried again while it is younger than this.
    copy_wait_s: float = 300.0
    # A root on a network or FUSE file system shared by several hosts: auto detects it from the
    # mount table; true/false force it. Shared: the folders are polled every poll_s (other
    # hosts' changes reach no inotify watch here).
    shared: bool | Literal["auto"] = "auto"
    poll_s: float = 2.0
    # A claim whose lease was not renewed for this long (its host died or lost the share) may be
    # taken over by any host; renewed every lease_s / 3.
    lease_s: float = 600.0
    # The daemon's status file is rewritten at least this often; `sdxld status` on any host shows a
    # daemon whose file is 3 heartbeats old as gone.
    heartbeat_s: float = 10.0

    def validate(self) -> None:
        _check(self.max_pending >= 0, "daemon.max_pending", f"{self.max_pending} is negative")
        _check(self.min_free_gb >= 0, "daemon.min_free_gb", f"{self.min_free_gb} is negative")
        _check(0 <= self.settle_s <= 60, "daemon.settle_s", f"{self.settle_s} is outside 0..60 seconds")
        _check(1 <= self.rescan_s <= 3600, "daemon.rescan_s", f"{self.rescan_s} is outside 1..3600 seconds")
        _check(1 <= self.max_attempts <= 100, "daemon.max_attempts", f"{self.max_attempts} is outside 1..100")
        _check(0.1 <= self.save_retry_s <= 3600, "daemon.save_retry_s", f"{self.save_retry_s} is outside 0.1..3600 seconds")
        _check(0 <= self.copy_wait_s <= 86400, "daemon.copy_wait_s", f"{self.copy_wait_s} is outside 0..86400 seconds")
        _check(0.2 <= self.poll_s <= 60, "daemon.poll_s", f"{self.poll_s} is outside 0.2..60 seconds")
        _check(3 <= self.lease_s <= 86400, "daemon.lease_s", f"{self.lease_s} is outside 3..86400 seconds")
        _check(0.5 <= self.heartbeat_s <= 600, "daemon.heartbeat_s", f"{self.heartbeat_s} is outside 0.5..600 seconds")


@dataclass
class TasteConfig:
    # Learn only from images made at or after this date or time (YYYY-MM-DD, YYYY-MM-DD HH:MM):
    # set it to now to start learning over. null: from every image.
    since: str | None = None

    def since_time(self) -> float | None:
        """`since` as epoch seconds (None: from the start)."""
        from .taste import parse_since

        return None if self.since is None else parse_since(self.since)

    def validate(self) -> None:
        try:
            self.since_time()
        except ValueError as err:
            _check(False, "taste.since", str(err))


@dataclass
class ReviewConfig:
    # Where `sdxld review` listens. Any address but loopback (127.0.0.1, ::1, localhost) asks
    # every request for the token.
    listen: str = "127.0.0.1:8765"
    # The review page's token; empty: a new one is made at each start and printed in the URL
    # (only used when listening beyond loopback, or when set here).
    token: str = ""
    # Extra host names the page may be reached by (comma-separated), e.g. a VPN name; the machine's
    # own names and addresses are always allowed.
    hosts: str = ""

    def validate(self) -> None:
        try:
            listen_address(self.listen)
        except ValueError as err:
            _check(False, "review.listen", str(err))
        _check(not self.token or len(self.token) >= 16, "review.token", "is shorter than 16 characters; use a long random one")


def listen_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:8765', '[::1]:8765', ':8765' (all addresses) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8765)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@dataclass
class Config:
    # "reload": changing the section means loading the models again, so a running daemon reports
    # "restart needed" and keeps the loaded settings instead of half-applying them.
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"reload": True})
    performance: PerformanceConfig = field(default_factory=PerformanceConfig, metadata={"reload": True})
    memory: MemoryConfig = field(default_factory=MemoryConfig, metadata={"reload": True})
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    upscaler: UpscalerConfig = field(default_factory=UpscalerConfig)
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    taste: TasteConfig = field(default_factory=TasteConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    # The folder relative paths resolve against: the config file's folder.
    root: Path = field(default_factory=Path.cwd, metadata={"internal": True})
    source: Path | None = field(default=None, metadata={"internal": True})
    # Set by --demo: the built-in tiny model is in use (recorded in every Record).
    demo: bool = field(default=False, metadata={"internal": True})

    def refiner_wanted(self) -> bool:
        """The refiner is loaded when any stage uses it: model.use_refiner for stage 1, and each
        of generation.stage2/stage3.use_refiner for its own stage (as generate.py did)."""
        gen = self.generation
        used = self.model.use_refiner or (gen.stage2.enabled and gen.stage2.use_refiner) or (
            gen.stage3.enabled and gen.stage3.use_refiner)
        return bool(self.model.refiner) and used

    def path(self, value: str | Path) -> Path:
        """A configured path, resolved against the config file's folder."""
        return (self.root / Path(value).expanduser()).resolve()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if not f.metadata.get("internal") and hasattr(section, "validate"):
                section.validate()
        self._validate_model_paths()

    def _validate_model_paths(self) -> None:
        for key in ("base", "refiner", "config", "refiner_config", "vae"):
            value = getattr(self.model, key)
            if not value or (key == "refiner" and not self.refiner_wanted()):
                continue
            if key in ("config", "refiner_config"):
                _check(self.path(value).is_dir(), f"model.{key}", f"folder '{self.path(value)}' not found")
                continue
            source = model_source(self, value)
            if source.kind != "hub":
                _check(source.path.exists(), f"model.{key}", f"'{source.path}' not found (a file or folder)")
            if source.kind == "folder":
                _check(
                    (source.path / "model_index.json").exists() or (source.path / "config.json").exists(),
                    f"model.{key}",
                    f"'{source.path}' is not a diffusers folder (no model_index.json)",
                )


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["hub", "folder", "file"]
    location: str
    path: Path | None = None


def model_source(config: Config, value: str) -> ModelSource:
    """Decide whether a model setting names a hub id, a local folder or a single-file checkpoint.

    A value is a path when it exists relative to the config's folder, is absolute, starts with
    ./ ../ or ~, or ends like a checkpoint file; otherwise it must look like 'owner/name'.
    """
    candidate = config.path(value)
    looks_like_path = (
        candidate.exists()
        or value.startswith(("/", "./", "../", "~"))
        or value.lower().endswith(CHECKPOINT_SUFFIXES)
    )
    if looks_like_path:
        kind = "file" if value.lower().endswith(CHECKPOINT_SUFFIXES) or candidate.is_file() else "folder"
        return ModelSource(kind, str(candidate), candidate)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        raise ConfigError(
            f"'{value}' is neither an existing path nor a hub id of the form owner/name", "model"
        )
    return ModelSource("hub", value)


# --- YAML -> dataclasses -------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and len(args) < len(typing.get_args(tp)):
        return f"{_type_name(args[0])} or null"
    if len(args) > 1:
        return " or ".join(_type_name(a) for a in args)
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text"}.get(tp, str(tp))


def did_you_mean(value: Any, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice (case, '-' for '_', typos), else ''."""
    import difflib

    if not isinstance(value, str):
        return ""
    choices = [str(c) for c in choices]
    wanted = value.strip().lower().replace("-", "_").replace(" ", "_")
    by_form = {c.lower().replace("-", "_").replace(" ", "_"): c for c in choices}
    match = by_form.get(wanted) or next(iter(difflib.get_close_matches(wanted, list(by_form), n=1, cutoff=0.6)), None)
    if match is None:
        return ""
    return f" (did you mean '{by_form.get(match, match)}'?)"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner[:-1]:
            try:
                return _coerce(value, candidate, key)
            except ConfigError:
                pass
        try:
            return _coerce(value, inner[-1], key)
        except ConfigError:
            raise ConfigError(f"{value!r} is not {_type_name(tp)}", key) from None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "off" in choices:
            value = "off"  # YAML 1.1 reads an unquoted off as false
        if value not in choices:
            raise ConfigError(f"{value!r} is not {_type_name(tp)}{did_you_mean(value, choices)}", key)
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    # YAML's bool is a subclass of int: refuse it where a number is meant, and vice versa.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a programming error in the dataclasses above
        raise TypeError(f"unsupported config type {tp} at {key}")
    if not ok:
        raise ConfigError(f"{value!r} is not {_type_name(tp)}", key)
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a section of key: value pairs, got {type(data).__name__}", prefix or "(top level)")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            hint = did_you_mean(key, known) or f"; the keys of {prefix or 'the top level'} are: {', '.join(known)}"
            raise ConfigError(f"unknown key{hint}", dotted)
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def from_dict(data: Any, root: Path, source: Path | None = None) -> Config:
    try:
        config = _build(Config, data, "")
        config.root, config.source = Path(root).resolve(), source
        config.validate()
    except ConfigError as err:
        raise ConfigError(err.detail, err.key, source) from None
    return config


def load(path: Path) -> Config:
    """Read and validate a config file; relative paths in it resolve against its folder."""
    path = Path(path).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot be read: {err}", file=path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"invalid YAML{where}: {getattr(err, 'problem', err)}", file=path) from None
    from .seed_compat import migrate_config

    data, mapped = migrate_config(data)
    if mapped:
        log.warning(
            "%s uses generate.py's key names; read as: %s. Run `sdxld config migrate` to rewrite the file "
            "with the new names", path, "; ".join(mapped),
        )
    return from_dict(data, path.parent, path)


def keep_loaded_settings(new: Config, loaded: Config) -> list[str]:
    """Put back into `new` the sections that only a model reload could apply; return the dotted
    keys that changed in them (what a restart would apply)."""
    changed = []
    for f in dataclasses.fields(Config):
        if not f.metadata.get("reload"):
            continue
        before, after = dataclasses.asdict(getattr(loaded, f.name)), dataclasses.asdict(getattr(new, f.name))
        changed += [f"{f.name}.{key}" for key in after if after[key] != before[key]]
        setattr(new, f.name, getattr(loaded, f.name))
    return changed


def to_dict(config: Config) -> dict:
    """The settings as plain data (for records and `sdxld check`), without internal fields."""
    out = {}
    for f in dataclasses.fields(config):
        if not f.metadata.get("internal"):
            out[f.name] = dataclasses.asdict(getattr(config, f.name))
    return out
