"""The built-in tiny SDXL: SDXL's topology at toy widths, random weights, built offline.

It exists so that the whole program (LoRA loading, refiner handoff, tiling, the daemon) runs on a
machine with no GPU and no network. Everything is seeded, so two builds are bit-identical, and the
result is saved as an ordinary diffusers folder that is loaded back through the same
``from_pretrained`` path a real model takes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when anything below changes what gets built: the cache folder is keyed on it.
TINY_VERSION = 2
SEED = 20240726

# Words the tokenizer learns merges from, so typical prompts stay well under 77 tokens instead of
# one token per character. Any text still tokenizes: every byte is in the base alphabet.
_CORPUS = """
masterpiece best quality amazing quality very aesthetic absurdres highres newest 1girl 1boy solo
looking at viewer smile open mouth closed eyes long hair short hair blonde hair black hair blue eyes
red eyes green eyes white dress school uniform jacket shirt skirt hat hair ornament ribbon bow
outdoors indoors sky cloud city street night day sunset sunlight rain snow forest flower cherry
blossoms water ocean beach mountain building window room bed chair table cafe library park garden
upper body full body portrait cowboy shot from side from above from below dynamic angle close up
detailed background depth of field bokeh soft lighting dramatic lighting rim light cinematic
watercolor oil painting sketch lineart flat color anime style illustration digital art official art
worst quality low quality bad quality lowres bad anatomy bad hands extra fingers missing fingers
blurry jpeg artifacts signature watermark text username artist name cropped error ugly deformed
character style lora trigger sdxld demo random noise image prompt negative
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (the tokenizer's base alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _learn_merges(words: list[str], count: int) -> list[tuple[str, str]]:
    """Plain BPE over the corpus words, in CLIP's form (last symbol carries ``</w>``)."""
    table = _bytes_to_unicode()
    seqs = Counter()
    for word in words:
        symbols = [table[b] for b in word.encode()]
        symbols[-1] += "</w>"
        seqs[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs = Counter()
        for seq, freq in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        # Ties broken by the pair itself so the result never depends on dict order.
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = Counter()
        for seq, freq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged[tuple(out)] += freq
        seqs = merged
    return merges


def build_tokenizer():
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    merges = _learn_merges(_CORPUS, 400)
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    # model_max_length must be set: without it encoding overflows ("int too big to convert").
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)


# The two encoders differ in width as SDXL's do (768 vs 1280): single-file loading tells them
# apart by that width.
TEXT_WIDTHS = (32, 48)


def _text_config(vocab_size: int, hidden_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _unet(refiner: bool):
    from diffusers import UNet2DConditionModel

    # Refiner: conditioned on text_encoder_2 only, plus an aesthetic score (5 time ids, not 6).
    cross_dim = TEXT_WIDTHS[1] if refiner else sum(TEXT_WIDTHS)
    time_ids = 5 if refiner else 6
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # pooled text (text_encoder_2's projection_dim) + the micro-conditioning time ids
        projection_class_embeddings_input_dim=32 + time_ids * 8,
        cross_attention_dim=cross_dim,
        norm_num_groups=8,
    )


def _vae():
    from diffusers import AutoencoderKL

    # Four levels like SDXL's VAE, so the latent is 1/8 of the image as the real one is.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        # Tiled VAE work starts above 256 px, so demo stage-3 sizes exercise it as 1024 px does for SDXL.
        sample_size=256,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    # SDXL's own training schedule; sdxld swaps in the configured sampler from this config.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def build_pipelines():
    """Return (base, refiner) tiny pipelines; the refiner shares the base's VAE and text encoder 2."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    vocab_size = len(tokenizer)
    base = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(vocab_size, TEXT_WIDTHS[0])),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(vocab_size, TEXT_WIDTHS[1])),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=_unet(refiner=False),
        scheduler=sdxl_scheduler(),
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=_unet(refiner=True),
        scheduler=sdxl_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    return base, refiner


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdxld"


def ensure_tiny_model(root: Path | None = None) -> tuple[Path, Path]:
    """Build the tiny base and refiner folders once; return their paths.

    Built in a temporary folder and renamed into place, so a crash mid-build or two processes
    building at once never leave a half-written model that later runs would trust.
    """
    root = Path(root) if root else cache_root()
    final = root / f"tiny-sdxl-v{TINY_VERSION}"
    base_dir, refiner_dir = final / "base", final / "refiner"
    if (final / "complete.json").exists():
        return base_dir, refiner_dir
    root.mkdir(parents=True, exist_ok=True)
    log.info("building the tiny demo SDXL in %s (once)", final)
    from .models import quiet_libraries

    quiet_libraries()
    staging = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root))
    try:
        base, refiner = build_pipelines()
        base.save_pretrained(staging / "base", safe_serialization=True)
        refiner.save_pretrained(staging / "refiner", safe_serialization=True)
        (staging / "complete.json").write_text(json.dumps({"version": TINY_VERSION, "seed": SEED}))
        try:
            os.rename(staging, final)
        except OSError:
            # Another process finished first; its copy is identical (seeded build).
            if not (final / "complete.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return base_dir, refiner_dir


# Demo sizes keep SDXL's 9:16 bucket (768x1344) at 1/6 scale: seconds per image on two CPU cores.
DEMO_SETTINGS = {
    "base_width": 128,
    "base_height": 224,
    "t2i_steps": 8,
    "stage2_steps": 6,
    "stage3_steps": 6,
    "tile_size": 352,
    "tile_overlap": 48,
}


def apply_demo(config, cache: Path | None = None):
    """Point a config at the tiny model with demo sizes; everything else stays as configured."""
    base_dir, refiner_dir = ensure_tiny_model(cache)
    config.model.base, config.model.refiner = str(base_dir), str(refiner_dir)
    config.model.config = config.model.refiner_config = config.model.vae = None
    config.performance.dtype = "fp32"
    gen = config.generation
    gen.base_width, gen.base_height = DEMO_SETTINGS["base_width"], DEMO_SETTINGS["base_height"]
    gen.t2i.steps = DEMO_SETTINGS["t2i_steps"]
    gen.stage2.steps = DEMO_SETTINGS["stage2_steps"]
    gen.stage3.steps = DEMO_SETTINGS["stage3_steps"]
    gen.stage3.tile_size = DEMO_SETTINGS["tile_size"]
    gen.stage3.tile_overlap = DEMO_SETTINGS["tile_overlap"]
    config.demo = True
    return config


# --- tiny LoRAs, in the two formats users download -------------------------------------------


_SGM_RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
                      "time_emb_proj": "emb_layers.1"}


def _sgm_unet_name(module: str) -> str | None:
    """diffusers UNet module name -> the original (SGM) name kohya LoRAs use, for the layers of
    attention blocks and resnets (layers_per_block 2, as in SDXL)."""
    import re

    patterns = (
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", lambda m: f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"),
        (r"mid_block\.attentions\.0\.(.*)", lambda m: f"middle_block.1.{m[1]}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.{m[3]}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
         lambda m: f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.0.{_SGM_RESNET_LAYERS[m[3]]}"),
        (r"mid_block\.resnets\.(\d+)\.(\w+)", lambda m: f"middle_block.{2 * int(m[1])}.{_SGM_RESNET_LAYERS[m[2]]}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
         lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.0.{_SGM_RESNET_LAYERS[m[3]]}"),
    )
    for pattern, rename in patterns:
        match = re.fullmatch(pattern, module)
        if match:
            return rename(match)
    return None


def _lora_targets(pipe):
    """(component, module name, in, out) for every Linear a typical SDXL LoRA adapts."""
    import torch

    for name, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attentions." in name:
            yield "unet", name, module.in_features, module.out_features
    for component in ("text_encoder", "text_encoder_2"):
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                yield component, name, module.in_features, module.out_features


@lru_cache(maxsize=4)
def _tiny_model_lora_targets(model_folder: str) -> tuple:
    """The tiny model's LoRA targets, read once per process: loading the pipeline to learn them
    took ~0.2 s of every LoRA written (a demo root's four, a test's fifty)."""
    from diffusers import StableDiffusionXLPipeline

    from .models import quiet_libraries

    quiet_libraries()
    return tuple(_lora_targets(StableDiffusionXLPipeline.from_pretrained(model_folder)))


def write_tiny_lora(path: Path, fmt: str = "kohya", seed: int = 0, rank: int = 4, scale: float = 0.5, pipe=None,
                    alpha: float | None = None) -> Path:
    """A random LoRA for the tiny model, in kohya/A1111 naming or diffusers (peft) naming.

    Its layers are those real SDXL LoRAs adapt (attention and feed-forward of the UNet's
    transformer blocks, and the text encoders' q/k/v/out/mlp), so it loads exactly as a
    downloaded LoRA would.
    """
    import torch
    from safetensors.torch import save_file

    targets = _lora_targets(pipe) if pipe is not None else _tiny_model_lora_targets(str(ensure_tiny_model()[0]))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for component, name, n_in, n_out in targets:
        down = torch.randn(rank, n_in, generator=generator) * scale
        up = torch.randn(n_out, rank, generator=generator) * scale
        if fmt == "kohya":
            module = _sgm_unet_name(name) if component == "unet" else name
            key = kohya_prefix[component] + module.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
        elif fmt == "diffusers":
            tensors[f"{component}.{name}.lora_A.weight"] = down
            tensors[f"{component}.{name}.lora_B.weight"] = up
        else:
            raise ValueError(f"unknown LoRA format {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_sd15_shaped_lora(path: Path, seed: int = 0) -> Path:
    """A LoRA with SD1.5's layer names and widths (320-wide UNet, 768-wide text encoder)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (768, 320),
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (768, 1280),
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v": (768, 1280),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj": (768, 768),
        "lora_te_text_model_encoder_layers_0_self_attn_v_proj": (768, 768),
        "lora_te_text_model_encoder_layers_0_self_attn_out_proj": (768, 768),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": (768, 3072),
        "lora_te_text_model_encoder_layers_0_mlp_fc2": (3072, 768),
    }
    tensors = {}
    for key, (n_in, n_out) in shapes.items():
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, n_in, generator=generator)
        tensors[f"{key}.lora_up.weight"] = torch.randn(n_out, 4, generator=generator)
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return Path(path)
