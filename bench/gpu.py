"""Full-size SDXL on one GPU: every stage, ESRGAN, memory strategies and compile, random weights.

Builds SDXL base + refiner + VAE + both text encoders from the SDXL architecture configs with
random weights directly on the GPU (no downloads; the tiny demo tokenizer stands in for CLIP's),
then runs sdxld's own stage code and reports seconds, achieved TFLOP/s (FLOPs counted once per
distinct call shape with torch.utils.flop_counter, times the calls the run made), peak VRAM and
the card. Writes <out>/<card>.md.

    python bench/gpu.py                 # CUDA, full size (about 5 minutes on an H100)
    python bench/gpu.py --tiny          # CPU smoke test with the tiny model (CI)

    # The throughput figures (batch sizes, quantize, compile max, approved path) in one call:
    python bench/gpu.py --skip stages,pixel,esrgan,switches,compile,offload,sequential,graphs --budget-s 450

    # What that call left untimed (CUDA graphs, regional compile, fp8 compiled), bench/device.sh's:
    python bench/gpu.py --skip stages,pixel,esrgan,throughput,loras,switches,compile,fast,offload,sequential --budget-s 450
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import random
import shutil
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


# SDXL 1.0's published architecture (unet/vae/text_encoder configs of the base and refiner).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
REFINER_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), use_linear_projection=True,
    cross_attention_dim=1280, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560, norm_num_groups=32,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")


@dataclass
class Geometry:
    base: tuple[int, int]
    mid: tuple[int, int]
    final: tuple[int, int]
    steps: int
    stage2_steps: int
    stage3_steps: int
    tile: int
    overlap: int
    esrgan_input: tuple[int, int]


FULL = Geometry((768, 1344), (1536, 2688), (3072, 5376), 30, 22, 18, 2048, 256, (1536, 2688))
TINY = Geometry((128, 224), (256, 448), (512, 896), 8, 6, 6, 352, 48, (256, 448))


@dataclass
class Row:
    name: str
    seconds: float
    flops: float = 0.0
    peak_gib: float = 0.0
    note: str = ""


@dataclass
class FlopTally:
    """Counts calls per (module, input shapes); FLOPs are counted once per shape afterwards."""

    modules: dict
    calls: Counter = field(default_factory=Counter)
    samples: dict = field(default_factory=dict)
    handles: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    def __enter__(self):
        for name, module in self.modules.items():
            def hook(mod, args, kwargs, _name=name):
                key = (_name, _signature(args, kwargs))
                self.calls[key] += 1
                if key not in self.samples:
                    self.samples[key] = (mod, _detach(args), _detach(kwargs))
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def total(self) -> float:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        flops = 0.0
        for key, count in self.calls.items():
            if key not in self.cache:
                module, args, kwargs = self.samples[key]
                # The pipeline may have run this module upcast (the SDXL VAE's force_upcast):
                # recount it in the dtype it has now.
                dtype = next(module.parameters()).dtype
                args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
                with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                    module(*args, **kwargs)
                self.cache[key] = counter.get_total_flops()
            flops += self.cache[key] * count
        self.samples.clear()
        return flops


def _signature(args, kwargs):
    import torch

    def sig(value):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        if isinstance(value, dict):
            return tuple(sorted((k, sig(v)) for k, v in value.items()))
        if isinstance(value, (list, tuple)):
            return tuple(sig(v) for v in value)
        return None

    return sig(args), sig(kwargs)


def _cast(value, dtype):
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _detach(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


def build_full(device, dtype, with_refiner=True):
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdxld.tiny import build_tokenizer, sdxl_scheduler

    tokenizer = build_tokenizer()
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    scheduler = sdxl_scheduler()
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **ids)).to(dtype)
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
        refiner_unet = UNet2DConditionModel(**REFINER_UNET).to(dtype) if with_refiner else None
        vae = AutoencoderKL(**SDXL_VAE).to(dtype)
    with torch.no_grad():
        # Default init makes activations explode across 70 transformer layers; keep them finite.
        for module in filter(None, (unet, refiner_unet, vae, text_encoder, text_encoder_2)):
            for param in module.parameters():
                if param.dim() > 1:
                    param.mul_(0.5)
    base = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    if not with_refiner:
        return base, None
    refiner = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
                                               tokenizer_2=tokenizer, unet=refiner_unet, scheduler=scheduler,
                                               requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    return base, refiner


def make_bank(base, refiner, device, dtype_name):
    from sdxld.models import ModelBank, img2img_from, make_scheduler

    base.scheduler = make_scheduler("UniPC", base.scheduler.config)
    if refiner is not None:
        refiner.scheduler = make_scheduler("UniPC", refiner.scheduler.config)
    for pipe in (base, refiner):
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
            pipe.vae.enable_tiling()
    img2img = img2img_from(base)
    img2img.set_progress_bar_config(disable=True)
    return ModelBank(base=base, img2img=img2img, refiner=refiner, device=device, dtype_name=dtype_name,
                     base_id="random-sdxl", sampler="UniPC")


def make_record(geometry: Geometry, refiner: bool):
    from sdxld.records import Record

    return Record(tag="bench", prompt="masterpiece, best quality, 1girl, solo, cherry blossoms, sunset",
                  negative="worst quality, low quality", seed=1, width=geometry.base[0], height=geometry.base[1],
                  sampler="UniPC", steps=geometry.steps, cfg=8.0, refiner_split=0.8 if refiner else None)


def stage_settings(geometry: Geometry, mode: str, tile_batch: int, use_refiner: bool):
    from sdxld.config import Stage2Config, Stage3Config

    stage2 = Stage2Config(steps=geometry.stage2_steps, use_refiner=use_refiner)
    stage3 = Stage3Config(steps=geometry.stage3_steps, use_refiner=use_refiner, tile_size=geometry.tile,
                          tile_overlap=geometry.overlap, mode=mode, tile_batch=tile_batch)
    return stage2, stage3


class Bench:
    def __init__(self, device: str, out: Path, card: str, budget_s: float | None = None):
        self.device, self.out, self.card = device, out, card
        self.rows: list[Row] = []
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.compiled_code = compiled_code_found()

    def left_s(self) -> float:
        """Seconds left of --budget-s (infinite without one)."""
        if self.budget_s is None:
            return float("inf")
        return self.budget_s - (time.perf_counter() - self.started)

    def ratio(self, row, baseline, what: str = "time") -> None:
        """Note `row` as a multiple of `baseline` (both measured in this run)."""
        if row is None or baseline is None or not row.seconds or not baseline.seconds:
            return
        row.note = (row.note + f" {row.seconds / baseline.seconds:.2f}x the {what} of '{baseline.name}'").strip()
        print(f"{'':48} {row.note}", flush=True)
        self.write()

    def sync(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def reset_peak(self):
        import torch

        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float:
        import torch

        return torch.cuda.max_memory_allocated() / 2**30 if self.device.startswith("cuda") else 0.0

    def failed(self, name: str, err: Exception) -> None:
        """A row that could not be measured, with the reason: the rows before and after stand."""
        self.rows.append(Row(name, 0.0, note=f"FAILED: {type(err).__name__}: {str(err)[:120]}"))
        print(f"{name:48} FAILED: {type(err).__name__}: {err}", flush=True)
        self.write()

    def measure(self, name, fn, modules=None, note=""):
        from sdxld.stages import NaNImageError

        self.reset_peak()
        tally = FlopTally(modules or {})
        self.sync()
        started = time.perf_counter()
        with tally:
            try:
                fn()
            except NaNImageError:
                # Random weights may overflow; all the work was done before the check refused it.
                note = (note + " NaN output (random weights)").strip()
            except Exception as err:  # noqa: BLE001 - report the failure, measure the rest
                import traceback

                traceback.print_exc()
                self.sync()
                self.failed(name, err)
                return None
        self.sync()
        seconds = time.perf_counter() - started
        peak = self.peak()
        try:
            flops = tally.total() if modules else 0.0
        except Exception as err:  # noqa: BLE001 - offload hooks can refuse a re-run; keep the timing
            flops = 0.0
            note = (note + f" FLOPs not counted ({type(err).__name__})").strip()
        row = Row(name, seconds, flops, peak, note)
        self.rows.append(row)
        tflops = f"{flops / seconds / 1e12:8.1f} TFLOP/s" if flops else ""
        print(f"{name:48} {seconds:8.2f} s {flops / 1e12:9.1f} TFLOP {tflops} peak {peak:6.1f} GiB {note}", flush=True)
        self.write()
        return row

    def write(self):
        lines = [
            f"# bench/gpu.py on {self.card}",
            "",
            f"torch {self._torch()}, diffusers {self._diffusers()}, Python {platform.python_version()}{self._driver()}; "
            "random weights with SDXL 1.0's architecture, bf16, SDPA attention, UniPC. "
            "TFLOP counted with torch.utils.flop_counter (once per call shape, times the calls). "
            f"{self.compiled_code}",
            "",
            "| measurement | seconds | TFLOP | TFLOP/s | peak VRAM (GiB) | note |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            rate = f"{r.flops / r.seconds / 1e12:.0f}" if r.flops else ""
            flop = f"{r.flops / 1e12:.1f}" if r.flops else ""
            lines.append(f"| {r.name} | {r.seconds:.2f} | {flop} | {rate} | {r.peak_gib:.1f} | {r.note} |")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', self.card)}.md").write_text("\n".join(lines) + "\n")

    @staticmethod
    def _torch():
        import torch

        return torch.__version__

    @staticmethod
    def _diffusers():
        import diffusers

        return diffusers.__version__

    def _driver(self) -> str:
        if not self.device.startswith("cuda"):
            return ""
        import subprocess

        try:
            found = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            found = []
        return f", driver {found[0]}" if found else ""


def compiled_code_found() -> str:
    """What inductor's cache folder held before anything was built: with the compiled code of
    earlier calls (bench/compile_carry.sh) a build whose graph is among it is a warm start."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    folder = Path(cache_dir())
    graphs = [entry for entry in folder.glob("fxgraph/*/*/*") if entry.is_file()]
    if not graphs:
        return f"inductor's cache ({folder}) was empty at the start: every build row is a cold build."
    megabytes = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20
    return (f"inductor's cache ({folder}) held {len(graphs)} compiled graphs ({megabytes:.0f} MiB) at the start, "
            "from earlier runs or calls: a build row whose graph was among them is a warm start (a restart's cost).")


@dataclass
class Run:
    """What every section of the benchmark works with; the offload sections replace the models."""

    args: argparse.Namespace
    device: str
    dtype: object
    dtype_name: str
    geometry: Geometry
    bench: Bench
    base: object
    refiner: object
    models: object
    unets: dict
    plain: object
    refined: object
    stage1_image: object
    mid_image: object
    library: object = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: proves the script works")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--skip", default="",
                        help="comma-separated sections to skip: stages,throughput,loras,switches,compile,fast,graphs,offload,sequential,pixel,esrgan")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds this run may take: the compile max part of 'fast' is skipped, saying so, when too little is left")
    parser.add_argument("--graphs-parts", default=",".join(GRAPHS_PARTS),
                        help="the graphs section's parts to run, comma-separated: " + ",".join(GRAPHS_PARTS))
    args = parser.parse_args()
    args.graphs_parts = set(filter(None, args.graphs_parts.split(",")))
    if args.graphs_parts - set(GRAPHS_PARTS):
        parser.error(f"--graphs-parts: unknown {sorted(args.graphs_parts - set(GRAPHS_PARTS))}; known: {GRAPHS_PARTS}")
    skip = set(filter(None, args.skip.split(",")))
    # The LoRA and upscaler files the sections write (a gigabyte at full size) live apart from
    # --out, which a GPU call may hand back as it is when its time runs out.
    args.scratch = Path(tempfile.mkdtemp(prefix="sdxld-gpu-bench-"))
    try:
        run_sections(args, skip)
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)


def run_sections(args, skip: set[str]) -> None:
    run = setup(args)
    bench_stages(run, skip)
    if "esrgan" not in skip:
        bench_esrgan(run)
    if "throughput" not in skip:
        bench_throughput(run)
    if "loras" not in skip:
        run.library = bench_loras(run.bench, run.base, run.models, run.plain, run.unets, args, quick=args.tiny)
    if "switches" not in skip:
        bench_switches(run)
    if "compile" not in skip:
        bench_compile(run)
    if "fast" not in skip:
        bench_fast(run)
    if "graphs" not in skip:
        bench_graphs(run)
    if run.device == "cuda" and "offload" not in skip:
        bench_offload(run)
    if run.device == "cuda" and "sequential" not in skip:
        bench_sequential(run)
    run.bench.write()
    print(f"wrote {args.out}", flush=True)


def setup(args) -> Run:
    """The models on the device (full-size random SDXL on CUDA, the tiny model with --tiny), the
    records and the input images every section uses."""
    import numpy as np
    import torch
    from PIL import Image

    from sdxld.models import quiet_libraries

    quiet_libraries()
    if args.tiny:
        from sdxld.tiny import build_pipelines

        device, dtype, dtype_name, geometry, card = "cpu", torch.float32, "fp32", TINY, "tiny-cpu"
        torch.manual_seed(0)
        base, refiner = build_pipelines()
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --tiny for the CPU smoke test")
        device, dtype, dtype_name, geometry = "cuda", torch.bfloat16, "bf16", FULL
        card = torch.cuda.get_device_name(0)
        print(f"torch {torch.__version__} on {card}", flush=True)
        started = time.perf_counter()
        base, refiner = build_full(device, dtype)
        print(f"built full-size SDXL base + refiner on {card} in {time.perf_counter() - started:.1f} s", flush=True)
    base.to(device)
    refiner.to(device)
    unets = {"unet": base.unet, "refiner": refiner.unet, "vae_dec": base.vae.decoder, "vae_enc": base.vae.encoder,
             "te1": base.text_encoder, "te2": base.text_encoder_2}
    rng = np.random.default_rng(0)
    return Run(
        args=args, device=device, dtype=dtype, dtype_name=dtype_name, geometry=geometry,
        bench=Bench(device, args.out, card, args.budget_s), base=base, refiner=refiner,
        models=make_bank(base, refiner, device, dtype_name), unets=unets,
        plain=make_record(geometry, False), refined=make_record(geometry, True),
        stage1_image=Image.fromarray(rng.integers(0, 256, (*geometry.base[::-1], 3), dtype=np.uint8)),
        mid_image=Image.fromarray(rng.integers(0, 256, (*geometry.mid[::-1], 3), dtype=np.uint8)),
    )


def bench_stages(run: Run, skip: set) -> None:
    """Stage 1 (and the bare UNet's ceiling on CUDA), stage 1 + refiner, stage 2, stage 3 both modes."""
    import torch

    from sdxld.stages import stage1, stage2, stage3_latent, stage3_pixel

    bench, models, geometry, unets = run.bench, run.models, run.geometry, run.unets
    plain, refined = run.plain, run.refined
    stage2_settings, latent_settings = stage_settings(geometry, "latent", 2, True)
    _, pixel_settings = stage_settings(geometry, "pixel", 2, True)
    final_image = run.mid_image.resize(geometry.final)

    bench.measure("warm-up: stage 1, 4 steps", lambda: stage1(models, _steps(plain, 4)))
    if run.device == "cuda":
        # The UNet alone at stage 1's shape (CFG batch 2): the ceiling the pipeline runs against.
        device, dtype = run.device, run.dtype
        latent = torch.randn(2, 4, geometry.base[1] // 8, geometry.base[0] // 8, device=device, dtype=dtype)
        text = torch.randn(2, 77, 2048, device=device, dtype=dtype)
        cond = {"text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
                "time_ids": torch.randn(2, 6, device=device, dtype=dtype)}
        t = torch.tensor(500, device=device)

        def unet_steps():
            with torch.inference_mode():
                for _ in range(10):
                    run.base.unet(latent, t, encoder_hidden_states=text, added_cond_kwargs=cond)

        bench.measure("UNet alone, stage-1 shape, 10 CFG steps", unet_steps, {"unet": run.base.unet},
                      note=f"flash SDPA {torch.backends.cuda.flash_sdp_enabled()}")
    bench.measure(f"stage 1 {geometry.base[0]}x{geometry.base[1]}, {geometry.steps} steps", lambda: stage1(models, plain), unets)
    if "stages" not in skip:
        bench.measure("stage 1 + refiner (split 0.8)", lambda: stage1(models, refined), unets)
        bench.measure(f"stage 2 {geometry.mid[0]}x{geometry.mid[1]} (strength 0.25, refiner)",
                      lambda: stage2(models, refined, run.stage1_image, stage2_settings, geometry.mid), unets)
        for batch in (2, 4):
            latent_settings.tile_batch = batch
            bench.measure(f"stage 3 latent {geometry.final[0]}x{geometry.final[1]}, tile_batch {batch}",
                          lambda: stage3_latent(models, refined, final_image, latent_settings), unets)
    if "pixel" not in skip and "stages" not in skip:
        bench.measure(f"stage 3 pixel {geometry.final[0]}x{geometry.final[1]}",
                      lambda: stage3_pixel(models, refined, final_image, pixel_settings), unets)


def bench_throughput(run: Run) -> None:
    """Batched stage 1 (generation.batch_size): images per hour and peak VRAM per batch size, each
    batch one stage1_batch call of distinct seeds, as the daemon makes them."""
    from dataclasses import replace

    from sdxld.stages import stage1_batch

    single = None
    for batch in (1, 2, 4) if run.args.tiny else (1, 2, 4, 8):
        records = [replace(run.plain, seed=seed) for seed in range(batch)]
        row = run.bench.measure(f"stage 1 batch {batch}", lambda: stage1_batch(run.models, records), run.unets)
        if row is None or not row.seconds:
            continue
        per_hour = batch * 3600 / row.seconds
        single = single or per_hour
        row.note = f"{per_hour:,.0f} images/hour, {per_hour / single:.2f}x batch 1"
        print(f"{'':48} {row.note}", flush=True)
    run.bench.write()


def random_upscaler(run: Run, name: str, blocks: int, filters: int):
    """An ESRGAN-shaped x4 network with random weights, loaded the way sdxld loads weights files."""
    from safetensors.torch import save_file
    from spandrel.architectures.ESRGAN import ESRGAN

    from esrgan import Upscaler

    path = run.args.scratch / f"esrgan-{name}.safetensors"
    save_file(ESRGAN(in_nc=3, out_nc=3, num_filters=filters, num_blocks=blocks, scale=4).state_dict(), str(path))
    upscaler = Upscaler.load(path, device=run.device, dtype="fp16" if run.device == "cuda" else "fp32")
    path.unlink()
    return upscaler


def bench_esrgan(run: Run) -> None:
    """ESRGAN-shaped networks (anime 6-block and x4plus; one tiny one with --tiny) at stage 3's input size."""
    import numpy as np

    args, geometry = run.args, run.geometry
    for name, blocks, filters in (("anime_6B", 6, 64), ("x4plus", 23, 64)) if not args.tiny else (("tiny", 1, 8),):
        upscaler = random_upscaler(run, name, blocks, filters)
        pixels = np.asarray(run.mid_image.resize(geometry.esrgan_input))
        upscaler.run(pixels[:64, :64])
        run.bench.measure(f"ESRGAN {name}-shaped x4 on {geometry.esrgan_input[0]}x{geometry.esrgan_input[1]} ({upscaler.dtype_name}, tile 512)",
                          lambda: upscaler.run(pixels), {"esrgan": upscaler.model.model})


def bench_switches(run: Run) -> None:
    """performance.fuse_qkv and channels_last on stage 1; what tile_batch auto picks on this card."""
    import torch

    from sdxld.stages import auto_tile_batch, stage1

    base, models, plain = run.base, run.models, run.plain
    run.bench.measure("stage 1, performance.fuse_qkv (UNet + VAE)",
                      lambda: (base.fuse_qkv_projections(), stage1(models, plain)), run.unets)
    base.unfuse_qkv_projections()
    base.unet.to(memory_format=torch.channels_last)
    base.vae.to(memory_format=torch.channels_last)
    run.bench.measure("stage 1, performance.channels_last", lambda: stage1(models, plain), run.unets)
    base.unet.to(memory_format=torch.contiguous_format)
    base.vae.to(memory_format=torch.contiguous_format)
    _, auto_settings = stage_settings(run.geometry, "latent", 2, True)
    auto_settings.tile_batch = "auto"
    run.bench.rows.append(Row(f"generation.stage3.tile_batch auto on this card: {auto_tile_batch(auto_settings, torch.device(run.device))}", 0.0))


def bench_compile(run: Run) -> None:
    """Regional compile: first and next image, and whether rotating LoRAs recompiles anything."""
    import torch

    from sdxld.stages import stage1

    bench, base, models, plain, library = run.bench, run.base, run.models, run.plain, run.library
    backend = "inductor" if run.device == "cuda" else "eager"
    try:
        torch._dynamo.reset()
        base.unet.compile_repeated_blocks(backend=backend)
        bench.measure("stage 1, regional compile: first image (compiles)", lambda: stage1(models, plain))
        bench.measure("stage 1, regional compile: next image", lambda: stage1(models, plain), run.unets)
        if library is not None:
            rng = random.Random(5)
            bench.measure("stage 1, regional compile, 2 LoRAs: first image", lambda: (library.activate(library.pick(rng)), stage1(models, plain)))
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            for i in range(3):
                bench.measure(f"stage 1, regional compile, LoRAs rotated ({i + 1})",
                              lambda: (library.activate(library.pick(rng)), stage1(models, plain)), run.unets)
            added = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
            bench.rows.append(Row(f"graphs compiled while rotating LoRAs over 3 images: {added}", 0.0))
    except Exception as err:  # noqa: BLE001 - a bench reports what failed and goes on
        print(f"compile failed: {type(err).__name__}: {err}", flush=True)
        bench.rows.append(Row("stage 1, regional compile", 0.0, note=f"failed: {type(err).__name__}: {str(err)[:120]}"))
    finally:
        _uncompile(base.unet)


def _uncompile(unet) -> None:
    """The UNet and its blocks back to eager (whole-model and regional compiles both), and
    dynamo's caches and CUDA graphs dropped, for the next section's build."""
    import torch

    for module in unet.modules():
        module._compiled_call_impl = None
    torch._dynamo.reset()


# Seconds the compile max part of bench_fast is allowed to need before --budget-s skips it: a
# safety margin (max-autotune builds the UNet once per shape), not a measurement.
COMPILE_MAX_NEEDS_S = 240


def bench_fast(run: Run) -> None:
    """The throughput switches, each against a baseline measured in this call: one stage-1 image,
    a batch, the approved path (stage 2, ESRGAN anime_6B-shaped, stage 3 latent), a LoRA swap,
    the stage-1 VAE decode tiled and whole, a batch's prompts through the text encoders (alone and
    as a batch); then the UNets quantized (fp8 where the card has it, else int8), with the
    quantized UNet's error against the unquantized one on fixed inputs; then compile max (CUDA
    graphs) on top; then, budget allowing, the diagnostics (`_diagnose`). Leaves the models as it
    found them."""
    import torch

    from sdxld import quantize
    from sdxld.stages import stage1

    bench, models, plain, geometry = run.bench, run.models, run.plain, run.geometry
    batch = 4 if run.args.tiny else 8
    approved_path = _approved_path(run)
    single = bench.measure("fast: stage 1, one image (baseline)", lambda: stage1(models, plain), run.unets)
    batched = _batched_stage1(run, batch, "baseline", single, 1)
    approved = bench.measure("fast: approved image, stage 2 + ESRGAN + stage 3 latent + final PNG (baseline)", approved_path, run.unets)
    plain_swap = _measure_swap(run, run.library, "fast: LoRA swap (baseline)")
    _measure_vae_decode(run)
    _measure_text_encoders(run, batch)

    mode = "fp8" if run.device == "cuda" and not quantize.fp8_unsupported(run.device) else "int8"
    unet = run.base.unet
    probe_args, probe_kwargs = quantize.fixed_unet_inputs(unet, batch=2, latent_hw=(geometry.base[1] // 8, geometry.base[0] // 8))
    with torch.inference_mode():
        reference = unet(*probe_args, **probe_kwargs).sample.float()
    kept: dict = {}

    def quantize_both():
        for name, pipe in (("base", run.base), ("refiner", run.refiner)):
            kept[name] = quantize.quantize_unet(pipe.unet, mode, keep_originals=True)

    try:
        if bench.measure(f"fast: quantize both UNets to {mode}", quantize_both) is None:
            # torchao missing or refusing: the compile max runs go on, on the unquantized UNets.
            _unquantize_all(run, kept)
            _bench_compile_max(run, run.dtype_name, single, batched, batch, batch_too=not run.args.tiny)
            _diagnose(run, approved)
            return
        with torch.inference_mode():
            error = quantize.relative_error(reference, unet(*probe_args, **probe_kwargs).sample)
        bench.rows.append(Row(f"fast: {mode} UNet output against {run.dtype_name} at stage 1's shape, fixed random "
                              f"inputs: relative error {error:.4f} ({kept['base'].layers} linear layers quantized)", 0.0))
        print(f"{'':48} {bench.rows[-1].name}", flush=True)
        # No FLOP counting on quantized UNets: torch's counter knows fp8's _scaled_mm but not
        # int8's _int_mm, so the rows of the two modes would count different work.
        bench.ratio(bench.measure(f"fast: stage 1, one image, {mode}", lambda: stage1(models, plain)), single)
        _batched_stage1(run, batch, mode, batched, batch, count_flops=False)
        bench.ratio(bench.measure(f"fast: approved image, {mode}", approved_path), approved)
        if run.library is not None:
            from sdxld.loras import LoraLibrary

            library = LoraLibrary(run.base, run.library.dirs, run.library.strengths, quantized=kept["base"], keep_in_memory_bytes=default_kept_lora_bytes())
            library.sync()
            bench.ratio(_measure_swap(run, library, f"fast: LoRA swap, {mode} (merge into kept originals, re-quantize)"), plain_swap)
            library.activate([])
        _bench_compile_max(run, mode, single, batched, batch, batch_too=not run.args.tiny)
    finally:
        _unquantize_all(run, kept)
    _diagnose(run, approved)


# Seconds the diagnostic rows at the end of bench_fast need (a profiled image, six alternated
# images, an approved path): below this they are skipped, saying so.
DIAGNOSE_NEEDS_S = 45


def _diagnose(run: Run, approved) -> None:
    """After the switches (they come first: the call's budget is theirs), on the unquantized,
    uncompiled models: where stage 1's time goes, what UniPC's host waits cost, and the approved
    path with tile_fit shrink_tiles (less work, not faster work) against its baseline."""
    if run.bench.left_s() < DIAGNOSE_NEEDS_S:
        run.bench.rows.append(Row(f"fast: diagnostics skipped: {run.bench.left_s():.0f} s of --budget-s left", 0.0))
        return
    _profile_stage1(run)
    _measure_scheduler_waits(run, repeats=1 if run.args.tiny else 3)
    run.bench.ratio(run.bench.measure("fast: approved image, generation.stage3.tile_fit shrink_tiles",
                                      _approved_path(run, "shrink_tiles"), run.unets), approved)


def _bench_compile_max(run: Run, mode: str, single, batched, batch: int, batch_too: bool) -> None:
    """compile max on the base UNet as it is now (`mode` says how): the build, then one image and,
    with `batch_too`, a batch."""
    from sdxld.config import Config
    from sdxld.models import compile_unets

    config = Config()
    config.performance.compile = "max"
    config.performance.compile_backend = "inductor" if run.device == "cuda" else "eager"
    config.memory.strategy = "gpu"
    # The plain record never calls the refiner.
    _compiled_stage1(run, "fast", f"{mode} + compile max", lambda unet: compile_unets(config, [run.base], []),
                     single, batched, batch, static=True, needs_s=COMPILE_MAX_NEEDS_S,
                     batch_needs_s=COMPILE_MAX_NEEDS_S / 2, batch_too=batch_too)


def _compiled_stage1(run: Run, section: str, label: str, compile_unet, single, batched, batch: int, static: bool,
                     needs_s: float, batch_needs_s: float, batch_too: bool = True, library=None,
                     in_a_row: bool = False) -> None:
    """The base UNet compiled by `compile_unet`: the first image (the build), one image against
    `single`, the first batch (a build per shape under static shapes), the batch against `batched`;
    each build only with `needs_s` / `batch_needs_s` of --budget-s left (else a row says so). With
    a LoRA `library`, also a character swap followed by one image, the file kept in memory and
    read from disk (what each batch-1 image costs when the LoRAs rotate; the compiled UNet reads
    the swapped weights in place), and an image that merges the next file while the card works
    (the daemon's order with the weights on the card). `in_a_row`: also images in a row with each
    one's prompts encoded at its start, against the next image's encoded while the card runs the
    one before (the daemon's order with the weights on the card). No FLOP
    counting: its hooks on the UNet would make the compiled UNet build again. The UNet is eager
    again afterwards."""
    import torch

    bench, models, plain = run.bench, run.models, run.plain

    def skipped(what: str, why: str) -> None:
        bench.rows.append(Row(f"{section}: {what} skipped: {why}", 0.0))
        print(bench.rows[-1].name, flush=True)

    if bench.left_s() < needs_s:
        return skipped(label, f"{bench.left_s():.0f} s of --budget-s left")
    torch._dynamo.reset()
    compile_unet(run.base.unet)
    models.static_shapes = static
    try:
        if bench.measure(f"{section}: stage 1, {label}: first image (builds)", lambda: _stage1_work(run, plain)) is None:
            return
        bench.ratio(bench.measure(f"{section}: stage 1, one image, {label}", lambda: _stage1_work(run, plain)), single)
        if in_a_row:
            count = 2 if run.args.tiny else IMAGES_IN_A_ROW
            at_start = bench.measure(f"{section}: {count} images in a row, prompts encoded at each start, {label}",
                                     _images_in_a_row(run, count, ahead=False))
            bench.ratio(bench.measure(f"{section}: {count} images in a row, each next one's prompts encoded while "
                                      f"the card runs the one before, {label}",
                                      _images_in_a_row(run, count, ahead=True)), at_start)
        if (pairs := _swap_pairs(library)) is not None:
            for where in _kept_then_from_disk(library):
                library.activate(pairs[1])
                library.activate(pairs[0])
                bench.ratio(bench.measure(f"{section}: LoRA character swap ({where}) + one image, {label}",
                                          lambda: (library.activate(pairs[1]), _stage1_work(run, plain))), single)
            # As the daemon runs it with the weights on the card: the next character read (from
            # disk) and merged while the card runs the image before.
            library.activate(pairs[0])
            library.ready.forget(pairs[1][0].path)
            bench.ratio(bench.measure(
                f"{section}: one image merging the next character ahead (read from disk), {label}",
                lambda: _stage1_work(run, plain, lambda: library.activate(pairs[1]))), single)
            library.activate([])
        if not batch_too or bench.left_s() < batch_needs_s:
            why = "not asked for (--tiny, or --graphs-parts without batches)" if not batch_too else f"{bench.left_s():.0f} s of --budget-s left"
            return skipped(f"{label} batch {batch}", why)
        bench.measure(f"{section}: stage 1 batch {batch}, {label}: first batch (builds)", lambda: _stage1_records(run, batch))
        _batched_stage1(run, batch, label, batched, batch, count_flops=False, section=section)
    finally:
        models.static_shapes = False
        _uncompile(run.base.unet)


# Seconds a CUDA-graph build needs left in --budget-s before the graphs section starts one: a
# margin (the H100 built stage 1's graphs in 122 s, fp8's took longer than 190 s).
GRAPHS_BUILD_NEEDS_S = 90
# The graphs section's parts, in the order they run (--graphs-parts picks some).
GRAPHS_PARTS = ("approved", "vae", "refiner", "batches", "waits", "loras", "bf16", "cudagraphs", "quantized", "regional",
                "max")


def bench_graphs(run: Run) -> None:
    """Compiled stage 1 against eager rows of the same call, most telling first. On the H100
    stage 1 at batch 1 kept the card busy 1.3 s of 3.2 s: the host launching kernels set the
    pace. Parts (GRAPHS_PARTS, all by default; each timed row a ratio to this section's eager
    rows, each build a row of its own):
    - refiner: one eager image with the refiner taking over at 0.8 (the default), against the
      baseline, and on a GPU where the host waits for the card in it, by line;
    - batches: eager and compiled batches of 8 beside the single images;
    - waits: where the host waits for the card in one eager image and in LoRA swaps, by line;
    - loras: the LoRA rows (stacked merges; a file read from disk and one kept in memory), a
      batch with the next character read or merged ahead against one after a swap read from disk
      (eager), and a swap before one image under each compiled UNet below;
    - bf16: stage 1's UNet replayed as CUDA graphs for its fixed shapes without autotuning
      (inductor's reduce-overhead mode: what performance.compile graphs runs);
    - cudagraphs: CUDA graphs around eager kernels (torch's cudagraphs backend: no code generation);
    - quantized: an fp8 UNet (int8 without fp8 hardware) under regional compile (a quick build),
      then under the same CUDA graphs, the swap merging into the kept originals and quantizing
      again (uncompiled fp8 was 5.95x slower);
    - regional: regional compile; max: sdxld's compile max (max-autotune, builds of minutes);
    - under bf16 CUDA graphs, fp8 CUDA graphs and regional compile: images in a row with each
      one's prompts encoded at its start, against the next one's encoded while the card runs the
      one before (the daemon's order with the weights on the card);
    - approved: stages 2 and 3 under the same CUDA graphs (performance.compile_approved) against
      the same path eager, first of all: the approved image is the goal furthest away; with vae,
      also the eager approved image with the VAE compiled (performance.compile_vae: about ten
      compiles of the VAE for its tiles, minutes on a GPU, so not in bench/device.sh's default)."""
    bench, plain = run.bench, run.plain
    parts = run.args.graphs_parts
    batch = 4 if run.args.tiny else 8
    # The CPU smoke test traces with the eager backend: the same guards and shapes, no kernels.
    cuda = run.device == "cuda"
    graphs = {"mode": "reduce-overhead"} if cuda else {"backend": "eager"}
    bench.measure("graphs: warm-up, one image", lambda: _stage1_work(run, plain))
    if "approved" in parts:
        _graphs_approved(run, graphs)
    single = bench.measure("graphs: stage 1, one image, eager (baseline)", lambda: _stage1_work(run, plain), run.unets)
    if "refiner" in parts:
        _refiner_rows(run, single)
    batches = "batches" in parts
    batched = _batched_stage1(run, batch, "eager (baseline)", single, 1, section="graphs") if batches else None
    waits = cuda and "waits" in parts
    if waits:
        _host_waits_by_line(run)
    library = None
    if "loras" in parts:
        library = bench_loras(bench, run.base, run.models, plain, run.unets, run.args, quick=run.args.tiny,
                              section="graphs")
        _read_ahead_rows(run, library, batch, "graphs")
    if waits and (pairs := _swap_pairs(library)) is not None:
        library.activate(pairs[0])
        _host_waits_by_line(run, "one LoRA swap", lambda: library.activate(pairs[1]))
        library.activate([])

    def compiled(label: str, compile_unet, static: bool, library=None, in_a_row: bool = False) -> None:
        _compiled_stage1(run, "graphs", label, compile_unet, single, batched, batch, static=static,
                         needs_s=GRAPHS_BUILD_NEEDS_S, batch_needs_s=GRAPHS_BUILD_NEEDS_S, library=library,
                         batch_too=batches, in_a_row=in_a_row)

    cuda_graphs = "CUDA graphs (reduce-overhead)" if cuda else "static shapes (eager backend)"
    if "bf16" in parts:
        compiled(cuda_graphs, lambda unet: unet.compile(dynamic=False, **graphs), static=True, library=library,
                 in_a_row=True)
    if cuda and "cudagraphs" in parts:
        # The same CUDA graphs around the eager kernels, no inductor: a build of a trace instead of
        # code generation; what is left of the gain without inductor's fusions.
        compiled("CUDA graphs of eager kernels (backend cudagraphs)",
                 lambda unet: unet.compile(backend="cudagraphs", dynamic=False), static=True)
    if "quantized" in parts:
        _graphs_quantized(run, library, compiled, cuda_graphs, graphs, waits)
    if "regional" in parts:
        backend = "inductor" if cuda else "eager"
        compiled("regional compile", lambda unet: unet.compile_repeated_blocks(backend=backend), static=False,
                 in_a_row=True)
    if "max" in parts:
        _bench_compile_max(run, run.dtype_name, single, batched, batch, batch_too=batches and not run.args.tiny)


def _refiner_rows(run: Run, single) -> None:
    """Stage 1 as the defaults make it, the refiner taking the last fifth of the steps: same
    FLOPs as the base alone (the H200's rows: 417 and 411 TFLOP), but 2.37 s against 2.06 s there.
    Its hand-off made the host wait for the base's steps before queuing the refiner's (now
    queued without a wait: tests/test_stages.py counts it on the meta device); the waits row says
    what is left, by line."""
    bench = run.bench
    bench.measure("graphs: stage 1 + refiner, one image, eager: warm-up", lambda: _stage1_work(run, run.refined))
    bench.ratio(bench.measure("graphs: stage 1 + refiner (split 0.8), one image, eager", lambda: _stage1_work(run, run.refined),
                              run.unets), single)
    if run.device == "cuda":
        _host_waits_by_line(run, "one eager stage-1 image with the refiner", lambda: _stage1_work(run, run.refined))


def _graphs_approved(run: Run, graphs: dict) -> None:
    """An approved image (stage 2, ESRGAN, stage 3 latent, PNG) with the base UNet compiled for
    its shapes as performance.compile_approved does, against the same path eager in this call.
    Both without the refiner: its two builds beside the base's two would not fit one call, and
    the refiner is the last fifth of each stage's steps. Each row's note has its parts' seconds."""
    import torch

    bench = run.bench
    pieces: dict = {}
    approved = _approved_path(run, use_refiner=False, pieces=pieces)

    def measure(name: str, baseline=None):
        row = bench.measure(name, approved)
        if row is not None:
            row.note = "; ".join(filter(None, (_pieces_note(pieces), row.note)))
            bench.ratio(row, baseline)
            bench.write()
        return row

    # The first approved image of a process also pays for its sizes' first allocations.
    measure("graphs: approved image without the refiner, eager, warm-up")
    baseline = measure("graphs: approved image without the refiner, eager (baseline)")
    if baseline is None:
        return
    if run.device == "cuda":
        # cuDNN picks each convolution's algorithm by heuristics unless told to time them per
        # shape; the VAE at 3072x5376 and the upscaler are convolutions on shapes stage 1 never
        # sees (the VAE decode row ran at ~100 TFLOP/s on the H100, the UNet at ~270).
        torch.backends.cudnn.benchmark = True
        try:
            if measure("graphs: approved image without the refiner, eager, cudnn.benchmark: first (times each "
                       "convolution shape)"):
                measure("graphs: approved image without the refiner, eager, cudnn.benchmark", baseline)
        finally:
            torch.backends.cudnn.benchmark = False
    label = "CUDA graphs (reduce-overhead)" if run.device == "cuda" else "static shapes (eager backend)"
    if bench.left_s() < 2 * GRAPHS_BUILD_NEEDS_S:
        bench.rows.append(Row(f"graphs: approved image, {label}, skipped: {bench.left_s():.0f} s of --budget-s left", 0.0))
        return
    torch._dynamo.reset()
    run.base.unet.compile(dynamic=False, **graphs)  # the img2img pipeline shares this UNet
    try:
        if not measure(f"graphs: approved image without the refiner, {label}: first (builds stage 2's and stage 3's shapes)"):
            return
        measure(f"graphs: approved image without the refiner, {label}", baseline)
        if bench.left_s() < GRAPHS_BUILD_NEEDS_S:
            return
        # A later start finds the compiled code on disk (models.lasting_compile_cache): traced
        # again, its graphs and kernels loaded. Here in the same process with dynamo's and
        # inductor's in-memory caches emptied, which is as close to a restart as one call gets.
        from torch._inductor.utils import clear_inductor_caches

        _uncompile(run.base.unet)  # dynamo's caches too
        clear_inductor_caches()
        run.base.unet.compile(dynamic=False, **graphs)
        measure(f"graphs: approved image without the refiner, {label}: first after a restart, the compiled code kept")
    finally:
        _uncompile(run.base.unet)
    if "vae" in run.args.graphs_parts:
        _approved_with_compiled_vae(run, baseline)


def _approved_with_compiled_vae(run: Run, baseline) -> None:
    """The eager approved image with the VAE's encoder and decoder compiled (performance.compile_vae;
    dynamic sizes after the second, no CUDA graphs), against the eager baseline. Without the
    parts' timing hooks, which would sit inside the compiled modules."""
    bench = run.bench
    if bench.left_s() < GRAPHS_BUILD_NEEDS_S:
        bench.rows.append(Row(f"graphs: approved image, VAE compiled, skipped: {bench.left_s():.0f} s of --budget-s left", 0.0))
        return
    vae = run.base.vae
    backend = "inductor" if run.device == "cuda" else "eager"
    approved = _approved_path(run, use_refiner=False)
    vae.encoder.compile(backend=backend)
    vae.decoder.compile(backend=backend)
    try:
        if bench.measure("graphs: approved image without the refiner, eager, VAE compiled: first (builds the VAE's sizes)",
                         approved):
            bench.ratio(bench.measure("graphs: approved image without the refiner, eager, VAE compiled", approved),
                        baseline)
    finally:
        _uncompile(vae)


def _graphs_quantized(run: Run, library, compiled, cuda_graphs: str, graphs: dict, waits: bool) -> None:
    """The base UNet quantized (fp8 where the card has it, else int8) under the same CUDA graphs;
    with a LoRA `library`, the same files merged into the kept originals and quantized again."""
    from sdxld import quantize
    from sdxld.loras import LoraLibrary

    mode = "fp8" if run.device == "cuda" and not quantize.fp8_unsupported(run.device) else "int8"
    kept: dict = {}
    try:
        if not run.bench.measure(f"graphs: quantize the base UNet to {mode}",
                                 lambda: kept.update(base=quantize.quantize_unet(run.base.unet, mode, keep_originals=True))):
            return
        quantized_library = None
        if library is not None:
            quantized_library = LoraLibrary(run.base, library.dirs, library.strengths, quantized=kept["base"],
                                            keep_in_memory_bytes=default_kept_lora_bytes())
            quantized_library.sync()
            if waits and (pairs := _swap_pairs(quantized_library)) is not None:
                quantized_library.activate(pairs[0])
                _host_waits_by_line(run, f"one {mode} LoRA swap", lambda: quantized_library.activate(pairs[1]))
                quantized_library.activate([])
        # First the quick build: the transformer blocks compiled one by one (regional, no CUDA
        # graphs; seconds to build where the whole UNet's graphs took minutes, fp8's outlasting a
        # call's budget). Every quantized linear layer is inside those blocks, so this row says
        # whether the fp8 arithmetic pays once torchao's per-layer quantization is fused, against
        # the bf16 regional row of the same call.
        backend = "inductor" if run.device == "cuda" else "eager"
        compiled(f"{mode} + regional compile", lambda unet: unet.compile_repeated_blocks(backend=backend), static=False)
        compiled(f"{mode} + {cuda_graphs}", lambda unet: unet.compile(dynamic=False, **graphs), static=True,
                 library=quantized_library, in_a_row=True)
    finally:
        _unquantize_all(run, kept)


def _host_waits_by_line(run: Run, what: str = "one eager stage-1 image", work=None) -> None:
    """`work` (default: one eager stage-1 image) under torch.cuda.set_sync_debug_mode("warn"): each
    operation that makes the host wait for the card warns, attributed to the Python line that
    called it. The counts by line say which code to change (sdxld's samplers wait nowhere:
    tests/test_samplers.py)."""
    import warnings

    import torch

    waits: Counter = Counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                (work or (lambda: _stage1_work(run, run.plain)))()
                run.bench.sync()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    except Exception as err:  # noqa: BLE001 - a diagnosis; the timed rows stand without it
        run.bench.failed(f"graphs: host waits in {what}", err)
        return
    for warning in caught:
        if "synchroniz" in str(warning.message):
            waits[f"{Path(warning.filename).name}:{warning.lineno}"] += 1
    note = ", ".join(f"{where} x{count}" for where, count in waits.most_common(12)) or "none"
    run.bench.rows.append(Row(f"graphs: host waits in {what}, {sum(waits.values())} in all", 0.0, note=note))
    print(f"{run.bench.rows[-1].name}: {note}", flush=True)
    run.bench.write()


# Images per "in a row" row: the prompts' encoding is a few percent of an image under CUDA
# graphs, so one image's run-to-run noise would hide it.
IMAGES_IN_A_ROW = 4


def _images_in_a_row(run: Run, count: int, ahead: bool):
    """The work of `count` stage-1 images one after the other, each with a prompt of its own, to
    time. Either way it encodes prompts `count` times: each image's at its start, or (`ahead`)
    the next image's while the card runs the one before, as sdxld's engine does with the weights
    on the card; then the first image's are encoded now, before the timing."""
    from dataclasses import replace

    from sdxld.stages import NaNImageError, batch_prompt_embeddings, stage1_batch

    records = [replace(run.plain, seed=index, prompt=f"{run.plain.prompt}, take {index}") for index in range(count + 1)]
    encoded = {}

    def encode(index: int) -> None:
        encoded[index] = batch_prompt_embeddings(run.models.base, [records[index]])

    if ahead:
        encode(0)

    def work() -> None:
        for index in range(count):
            try:
                stage1_batch(run.models, [records[index]], base_embeddings=encoded.pop(index, None),
                             while_card_works=(lambda i=index: encode(i + 1)) if ahead else None)
            except NaNImageError:
                pass

    return work


def _stage1_records(run: Run, count: int):
    from dataclasses import replace

    from sdxld.stages import stage1_batch

    return stage1_batch(run.models, [replace(run.plain, seed=seed) for seed in range(count)])


def _batched_stage1(run: Run, batch: int, label: str, baseline, baseline_images: int, count_flops: bool = True,
                    section: str = "fast"):
    """A batch of distinct seeds in one stage1_batch call: images/hour, against `baseline` (a row
    that made `baseline_images` images)."""
    row = run.bench.measure(f"{section}: stage 1 batch {batch}, {label}", lambda: _stage1_records(run, batch),
                            run.unets if count_flops else None)
    if row is not None and row.seconds:
        per_hour = batch * 3600 / row.seconds
        row.note = f"{per_hour:,.0f} images/hour"
        if baseline is not None and baseline.seconds:
            row.note += f", {per_hour / (baseline_images * 3600 / baseline.seconds):.2f}x the images/hour of '{baseline.name}'"
        print(f"{'':48} {row.note}", flush=True)
        run.bench.write()
    return row


def _approved_path(run: Run, tile_fit: str = "grow_overlap", use_refiner: bool = True, pieces: dict | None = None):
    """What the daemon does for an approved image, up to the final's bytes: stage 2, the ESRGAN
    upscale (an anime_6B-shaped network), stage 3 latent with tile_batch 2 and `tile_fit`, the
    final encoded as PNG (what a user waits for; the file write and fsync left out, they are the
    disk's). With `pieces`, each part's seconds of the last run go into it (the card waited for
    between parts: at these sizes a wait is a small share)."""
    from sdxld import png
    from sdxld.stages import stage2, stage3, upscale_for_stage3

    geometry = run.geometry
    upscaler = random_upscaler(run, "fast", *((1, 8) if run.args.tiny else (6, 64)))
    # The daemon checks the first image of each size it resizes on the GPU against Pillow (once
    # per process, ~1 s): done here, so that no timed row pays for it.
    upscaler.upscale(run.mid_image, geometry.final)
    stage2_settings, stage3_settings = stage_settings(geometry, "latent", 2, use_refiner)
    stage3_settings.tile_fit = tile_fit
    record = run.refined if use_refiner else run.plain
    timed = _PieceTimer(run.bench, pieces)
    vae = run.base.vae

    def approved():
        timed.start()
        with timed.each_call("VAE", vae.encoder, vae.decoder):
            with timed("stage 2"):
                _, mid = stage2(run.models, record, run.stage1_image, stage2_settings, geometry.mid)
            with timed("ESRGAN"):
                upscaled = upscale_for_stage3(run.models, upscaler, mid, geometry.final)
            with timed("stage 3"):
                final = stage3(run.models, record, upscaled, stage3_settings)[0]
        with timed("PNG"):
            return png.encode(final, record.png_chunks())

    return approved


@dataclass
class _PieceTimer:
    """Seconds of an approved image's parts into `pieces` (nothing without them), the card waited
    for at each part's ends: `with timed(name):` for a part, `with timed.each_call(name, *modules)`
    for the calls of some modules within parts (the VAE's tiles inside stages 2 and 3)."""

    bench: "Bench"
    pieces: dict | None

    def start(self) -> None:
        if self.pieces is not None:
            self.pieces.clear()

    def _add(self, name: str, seconds: float) -> None:
        self.pieces[name] = self.pieces.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.pieces is None:
            yield
            return
        self.bench.sync()
        started = time.perf_counter()
        yield
        self.bench.sync()
        self._add(name, time.perf_counter() - started)

    @contextlib.contextmanager
    def each_call(self, name: str, *modules):
        if self.pieces is None:
            yield
            return
        began: list[float] = []

        def before(*_):
            self.bench.sync()
            began.append(time.perf_counter())

        def after(*_):
            self.bench.sync()
            self._add(name, time.perf_counter() - began.pop())

        handles = [hook for module in modules
                   for hook in (module.register_forward_pre_hook(before), module.register_forward_hook(after))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _pieces_note(pieces: dict) -> str:
    """Each part's seconds; the VAE's are inside stage 2's and stage 3's."""
    note = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in pieces.items() if name != "VAE")
    if "VAE" in pieces:
        note += f" (VAE encodes and decodes within stages 2 and 3: {pieces['VAE']:.2f} s)"
    return note


def _stage1_work(run: Run, record, while_card_works=None, batch: int = 1) -> None:
    """One stage-1 image (`batch` of them, seeds counting up from the record's); a NaN refusal
    (random weights may overflow) comes after all the work, so it counts as done, as in
    Bench.measure. `while_card_works`: stage1_batch's."""
    from dataclasses import replace

    from sdxld.stages import NaNImageError, stage1_batch

    records = [record] + [replace(record, seed=record.seed + index) for index in range(1, batch)]
    try:
        stage1_batch(run.models, records, while_card_works=while_card_works)
    except NaNImageError:
        pass


def _read_ahead_rows(run: Run, library, batch: int, section: str) -> None:
    """A batch with a character swap read from disk before it, against the same batch getting
    the next character ready while the card works, as the daemon does: merged there (memory.strategy
    gpu, the weights staying on the card), or only read there and swapped after (offload
    strategies). Eager: at a batch of 8 the card, not the host, sets the pace (the H100 ran it at
    345 TFLOP/s), so the host's work has card time to hide in without any compile."""
    if (pairs := _swap_pairs(library)) is None:
        return
    character = pairs[1][0]

    def swap_then_batch():
        library.activate(pairs[1])
        _stage1_work(run, run.plain, batch=batch)

    def batch_reading_ahead():
        _stage1_work(run, run.plain, lambda: library.prepare(pairs[1]), batch=batch)
        library.activate(pairs[1])

    def batch_merging_ahead():
        _stage1_work(run, run.plain, lambda: library.activate(pairs[1]), batch=batch)

    rows = []
    for label, work in ((f"LoRA character swap (read from disk) + a batch of {batch}", swap_then_batch),
                        (f"a batch of {batch} reading the next character ahead (from disk), then the swap",
                         batch_reading_ahead),
                        (f"a batch of {batch} merging the next character ahead (read from disk)", batch_merging_ahead)):
        library.activate(pairs[0])
        library.ready.forget(character.path)
        rows.append(run.bench.measure(f"{section}: {label}", work))
    for row in rows[1:]:
        run.bench.ratio(row, rows[0])
    library.activate([])


def _measure_scheduler_waits(run: Run, repeats: int = 3) -> None:
    """Stage 1 with sdxld's UniPC (sdxld/samplers.py: its steps never wait for the GPU) against
    diffusers' own, whose steps make the host wait ~7 times each (bench/scheduler_waits.py): the
    same UNet work and the same samples, so the difference is what the waits cost. Alternated,
    medians of `repeats` (a small difference on a drifting card)."""
    import statistics
    from dataclasses import replace

    from sdxld.config import SAMPLERS

    diffusers_unipc = "UniPC (diffusers)"
    SAMPLERS[diffusers_unipc] = ("UniPCMultistepScheduler", {})
    samplers = {"sdxld": run.plain, "diffusers": replace(run.plain, sampler=diffusers_unipc)}
    seconds = {name: [] for name in samplers}
    try:
        for _ in range(repeats):
            for name, record in samplers.items():
                run.bench.sync()
                started = time.perf_counter()
                _stage1_work(run, record)
                run.bench.sync()
                seconds[name].append(time.perf_counter() - started)
    except Exception as err:  # noqa: BLE001 - a diagnosis; the rows before it stand
        run.bench.failed("fast: stage 1, UniPC: sdxld's / diffusers'", err)
        return
    finally:
        del SAMPLERS[diffusers_unipc]
    ours, theirs = (statistics.median(seconds[name]) for name in samplers)
    row = Row(f"fast: stage 1, UniPC: sdxld's (no host waits) / diffusers' (~7 a step), medians of {repeats} alternated",
              ours, note=f"{ours:.3f} s / {theirs:.3f} s = {ours / theirs:.3f}")
    run.bench.rows.append(row)
    print(f"{'fast: stage 1, UniPC sdxld / diffusers':48} {row.note}", flush=True)
    run.bench.write()


def _profile_stage1(run: Run) -> None:
    """Where one stage-1 image's time goes, from torch's profiler: the device's busy time in the
    text encoders, the UNet (all steps) and the VAE decode, the rest of its work (scheduler,
    latents, pixel conversion), its idle time, and how often the host waited for it (syncs and
    scalar reads; each one leaves the device idle while the host catches up). The profiler adds
    host overhead, so the wall time here is longer than the timed rows'; busy times are the
    kernels' own."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = run.device == "cuda"
    parts = {"text encoders": [run.base.text_encoder, run.base.text_encoder_2], "UNet": [run.base.unet],
             "VAE decode": [run.base.vae.decoder]}
    handles, open_ranges = [], []
    for label, modules in parts.items():
        for module in modules:
            def enter(*_, _label=label):
                open_ranges.append(record_function(f"sdxld: {_label}"))
                open_ranges[-1].__enter__()

            def leave(*_):
                open_ranges.pop().__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        run.bench.sync()
        started = time.perf_counter()
        with profile(activities=activities) as profiler:
            _stage1_work(run, run.plain)
            run.bench.sync()
        wall = time.perf_counter() - started
    except Exception as err:  # noqa: BLE001 - the profile is a diagnosis; the timed rows stand without it
        run.bench.failed("fast: stage 1 profiled", err)
        return
    finally:
        for handle in handles:
            handle.remove()

    def seconds(event, name: str) -> float:
        value = getattr(event, name, None)  # torch >= 2.4: device_time_*, before: cuda_time_*
        return (value if value is not None else getattr(event, name.replace("device", "cuda"), 0.0)) / 1e6

    # Host-side events only: their device times are their kernels' (the device's copies of the
    # ranges would count the gaps between kernels as well).
    events = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CPU]
    kind = "device" if cuda else "cpu"
    busy = sum(seconds(e, f"self_{kind}_time_total") for e in events) if cuda else wall
    by_part = {label: sum(seconds(e, f"{kind}_time_total") for e in events if e.name == f"sdxld: {label}") for label in parts}
    waits = Counter(e.name for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                        "cudaEventSynchronize", "cudaMemcpy", "aten::_local_scalar_dense"))
    shares = ", ".join(f"{label} {value:.3f} s" for label, value in by_part.items())
    note = (f"{'device busy' if cuda else 'host'} {busy:.3f} s of {wall:.3f} s wall: {shares}, "
            f"the rest {busy - sum(by_part.values()):.3f} s"
            + (f"; idle {wall - busy:.3f} s; host waits {dict(sorted(waits.items()))}" if cuda else ""))
    run.bench.rows.append(Row("fast: stage 1 profiled (profiler overhead included)", wall, note=note))
    print(f"{'fast: stage 1 profiled':48} {note}", flush=True)
    run.bench.write()


def _swap_pairs(library):
    """([first character, style], [second character, style]): a pair merged, then the swap to
    time; None without a library of two characters and a style."""
    if library is None or len(library.available("character")) < 2 or not library.available("style"):
        return None
    first, second = library.available("character")[:2]
    style = library.available("style")[0]
    return [first, style], [second, style]


def _measure_swap(run: Run, library, name: str):
    """One LoRA pair merged, then the character swapped: the swap is what is timed."""
    if (pairs := _swap_pairs(library)) is None:
        return None
    library.activate(pairs[0])
    row = run.bench.measure(name, lambda: library.activate(pairs[1]))
    library.activate([])
    return row


def _measure_vae_decode(run: Run) -> None:
    """One stage-1 latent decoded tiled (memory.vae_tiling) and whole."""
    import torch

    vae, geometry = run.base.vae, run.geometry
    latent = torch.randn(1, 4, geometry.base[1] // 8, geometry.base[0] // 8, device=run.device, dtype=vae.dtype)

    def decode():
        with torch.inference_mode():
            vae.decode(latent / vae.config.scaling_factor)

    vae.enable_tiling()
    tiled = run.bench.measure("fast: VAE decode of one stage-1 latent, tiled", decode, {"vae_dec": vae.decoder})
    vae.disable_tiling()
    run.bench.ratio(run.bench.measure("fast: VAE decode of one stage-1 latent, whole", decode, {"vae_dec": vae.decoder}), tiled)
    vae.enable_tiling()


def _measure_text_encoders(run: Run, batch: int) -> None:
    """A batch's prompts (one negative) through both text encoders, each record on its own and as
    stage1_batch encodes them (each distinct text once)."""
    from dataclasses import replace

    from sdxld.stages import batch_prompt_embeddings, prompt_embeddings

    records = [replace(run.plain, prompt=f"{run.plain.prompt}, variation {index}") for index in range(batch)]
    modules = {"te1": run.base.text_encoder, "te2": run.base.text_encoder_2}
    alone = run.bench.measure(f"fast: text encoders, {batch} records one at a time (prompt + negative each)",
                              lambda: [prompt_embeddings(run.base, record) for record in records], modules)
    run.bench.ratio(run.bench.measure(f"fast: text encoders, {batch} records as a batch (the shared negative once)",
                                      lambda: batch_prompt_embeddings(run.base, records), modules), alone)


def _unquantize_all(run: Run, kept: dict) -> None:
    """Put the kept full-precision weights back (bench only: sections after this one run
    unquantized); `kept`: "base"/"refiner" -> quantize.Quantized, emptied."""
    import torch

    for name, pipe in (("base", run.base), ("refiner", run.refiner)):
        if name not in kept:
            continue
        for (_, layer), original in kept.pop(name).originals.items():
            module = pipe.unet.get_submodule(layer)
            module.weight = torch.nn.Parameter(original.to(module.weight.device), requires_grad=False)


def _fresh_base(run: Run):
    """A new full-size base pipeline on the CPU (for an offload strategy), and its ModelBank."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    fresh, _ = build_full("cuda", run.dtype, with_refiner=False)
    fresh.to("cpu")
    return fresh, make_bank(fresh, None, "cuda", run.dtype_name)


def _lora_swap(run: Run, pipe, seed: int):
    """A library over the same LoRA files for this pipeline; returns a swap step."""
    from sdxld.loras import LoraLibrary

    other = LoraLibrary(pipe, run.library.dirs, run.library.strengths, keep_in_memory_bytes=default_kept_lora_bytes())
    other.sync()
    rng = random.Random(seed)
    return lambda: other.activate(other.pick(rng))


def bench_offload(run: Run) -> None:
    """model_offload, then group_offload on a fresh pipeline; with LoRAs swapped under each."""
    import torch

    from sdxld.stages import stage1

    bench, plain = run.bench, run.plain
    for pipe in (run.base, run.refiner):
        pipe.to("cpu")
    run.models.refiner = None
    run.base.enable_model_cpu_offload()
    bench.measure("stage 1, memory.strategy model_offload", lambda: stage1(run.models, plain), run.unets)
    if run.library is not None:
        bench.measure("LoRA swap under model_offload", _lora_swap(run, run.base, 3))
        bench.measure("stage 1, model_offload, 2 LoRAs merged", lambda: stage1(run.models, plain), run.unets)
    run.base = run.refiner = run.models = None
    run.unets = {}
    run.base, run.models = _fresh_base(run)
    # The pipeline-level call also covers the transformers text encoders (no method of their own).
    run.base.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                  offload_type="leaf_level", use_stream=True)
    bench.measure("stage 1, group_offload (leaf level, streams)", lambda: stage1(run.models, plain))
    if run.library is not None:
        bench.measure("LoRA swap under group_offload", _lora_swap(run, run.base, 4))
        bench.measure("stage 1, group_offload, 2 LoRAs merged", lambda: stage1(run.models, plain))


def bench_sequential(run: Run) -> None:
    """sequential_offload on a fresh pipeline: a LoRA swap (hooks removed and re-added), 2 steps."""
    from sdxld.stages import stage1

    run.base = run.models = None
    run.base, run.models = _fresh_base(run)
    run.base.enable_sequential_cpu_offload()
    if run.library is not None:
        run.bench.measure("LoRA swap under sequential_offload (hooks removed and re-added)", _lora_swap(run, run.base, 5))
    run.bench.measure("stage 1, sequential_offload, 2 steps only", lambda: stage1(run.models, _steps(run.plain, 2)), note="2 steps")


def bench_loras(bench, base, models, plain, unets, args, quick: bool, section: str = ""):
    """Three random full-size LoRAs (rank 32 or 4 with --tiny) merged and swapped; the rows' names
    start with `section` when given."""
    from sdxld.loras import LoraLibrary
    from sdxld.stages import stage1
    from sdxld.tiny import write_tiny_lora

    folder = args.scratch / "loras"
    dirs = {"character": folder / "character", "style": folder / "style"}
    rank = 4 if quick else 32
    started = time.perf_counter()
    files = [write_tiny_lora(dirs["character"] / "c1.safetensors", "diffusers", seed=1, rank=rank, scale=0.01, pipe=base),
             write_tiny_lora(dirs["character"] / "c2.safetensors", "kohya", seed=2, rank=rank, scale=0.01, pipe=base),
             write_tiny_lora(dirs["style"] / "s1.safetensors", "diffusers", seed=3, rank=rank // 2, scale=0.01, pipe=base)]
    size_mb = sum(f.stat().st_size for f in files) / 3 / 1e6
    print(f"wrote 3 LoRAs ({size_mb:.0f} MB each on average) in {time.perf_counter() - started:.1f} s", flush=True)
    library = LoraLibrary(base, dirs, {"character": 1.0, "style": 0.85}, keep_in_memory_bytes=default_kept_lora_bytes())
    started = time.perf_counter()
    report = library.sync()
    prefix = f"{section}: " if section else ""
    bench.rows.append(Row(f"{prefix}LoRA check of 3 files ({size_mb:.0f} MB avg): {len(report.added)} loaded, "
                          f"rejected {report.rejected}", time.perf_counter() - started))
    if not library.available("character"):
        return None
    entries = library.available("character") + library.available("style")
    style = library.available("style")[0]
    bench.measure(f"{prefix}LoRA merge of the first pair (saves the original layers)",
                  lambda: library.activate([entries[0], style]))
    bench.measure(f"{prefix}LoRA swap: a character read from disk (its first draw) and merged",
                  lambda: library.activate([entries[1], style]))
    bench.measure(f"{prefix}LoRA swap: a character drawn before, kept in memory (lora.keep_in_memory_mb)",
                  lambda: library.activate([entries[0], style]))
    # Where a swap's host time goes, by function (a swap never waits for the card: the GPU test).
    for where in _kept_then_from_disk(library):
        library.activate([entries[1], style])
        _profiled_row(bench, f"{prefix}LoRA swap ({where}) profiled", lambda: library.activate([entries[0], style]))
    bench.measure(f"{prefix}stage 1 with 2 LoRAs merged", lambda: stage1(models, plain), unets,
                  note=f"{library.merger.saved_layers()} layers adapted")
    bench.measure(f"{prefix}LoRAs unmerged (originals restored)", lambda: library.activate([]))
    # The same kept swap with the originals beside the weights (memory.lora_originals gpu): a copy
    # within the card instead of 5.4 GiB from host memory.
    beside = LoraLibrary(base, dirs, {"character": 1.0, "style": 0.85}, keep_in_memory_bytes=default_kept_lora_bytes(),
                         originals_on_device=True)
    beside.sync()
    first, second = beside.available("character")[:2]
    beside_style = beside.available("style")[0]
    beside.activate([first, beside_style])
    beside.activate([second, beside_style])
    bench.measure(f"{prefix}LoRA swap: a character kept in memory, originals on the card (memory.lora_originals gpu)",
                  lambda: beside.activate([first, beside_style]))
    beside.activate([])
    return library


def _profiled_row(bench, name: str, work) -> None:
    """`work` under cProfile (its overhead included): a row with the functions that took the most
    host time of their own."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    bench.sync()
    started = time.perf_counter()
    profile.enable()
    work()
    bench.sync()
    profile.disable()
    seconds = time.perf_counter() - started
    stats = pstats.Stats(profile).stats
    top = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:8]
    note = "; ".join(f"{Path(file).name}:{line}({function}) {own:.3f} s" if file != "~" else f"{function} {own:.3f} s"
                     for (file, line, function), (_, _, own, _, _) in top)
    bench.rows.append(Row(name, seconds, note=f"own time: {note}"))
    print(f"{name}: {seconds:.2f} s; {note}", flush=True)
    bench.write()


def _kept_then_from_disk(library):
    """Yields where a swap's incoming LoRA file comes from, under the budget that makes it so:
    "kept in memory" (the library's budget: a file merged before), then "read from disk" (no
    budget: lora.keep_in_memory_mb 0, or a file's first draw); the budget is restored after."""
    kept_bytes = library.ready.budget_bytes
    try:
        for where, budget in (("kept in memory", kept_bytes), ("read from disk", 0)):
            library.ready.budget_bytes = budget
            yield where
    finally:
        library.ready.budget_bytes = kept_bytes


def default_kept_lora_bytes() -> int:
    """The daemon's default memory for LoRA files kept ready (lora.keep_in_memory_mb)."""
    from sdxld.config import LoraConfig

    return LoraConfig().keep_in_memory_mb << 20


def _steps(record, steps):
    import dataclasses

    return dataclasses.replace(record, steps=steps)


if __name__ == "__main__":
    main()
