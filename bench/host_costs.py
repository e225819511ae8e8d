"""What an approved image costs the CPU between the GPU's last step and the final on disk.

At the final's size (3072x5376 by default) and a stage-1 image's (768x1344), old against new in
one run, alternating, median of --repeat:

- the PNG: Pillow at compress_level 4 (what sdxld used) vs sdxld.png (Up filter + ISA-L deflate,
  on every core for a large image; on one thread; and with the standard zlib, its fallback),
  seconds and megabytes, on two synthetic images: an
  illustration (flat colours, outlines, soft shading) and the same with film grain (the hardest
  case for any PNG);
- float pixels to 8 bits: the pipelines' numpy output + to_pil vs tensor_to_pil on --device;
- the stage-3 input for the VAE: diffusers' preprocess vs pil_to_tensor on --device;
- the VAE's tile seams at the final's size, as diffusers' tiled decode (1024-pixel tiles, 256
  rows of overlap) and encode (32 latent rows) blend them: its Python loops vs the vectorized
  blend sdxld gives its VAE, fp32 (the SDXL VAE's upcast) on --device;
- the upscaler's 4x output (twice the final's size) to the final's size: to the CPU + Pillow's
  Lanczos vs esrgan.lanczos on --device + the smaller image to the CPU (the daemon resizes on the
  device only on CUDA; on the CPU the row shows what that code costs there).

    python bench/host_costs.py [--device cuda] [--repeat 3] [--final 3072x5376]

No model is needed; the figures are the host's (CPU cores, memory bandwidth), which is why this
also runs on the GPU machine's CPU.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time


def illustration(width: int, height: int, grain: float, seed: int = 0):
    """Flat-coloured outlined shapes, upscaled and softened like a refined final, plus grain."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    small = Image.new("RGB", (width // 4, height // 4), (230, 220, 200))
    draw = ImageDraw.Draw(small)
    for _ in range(300):
        x, y = (int(v) for v in rng.integers(0, small.width, 1).tolist() + rng.integers(0, small.height, 1).tolist())
        size = int(rng.integers(10, max(11, small.width // 4)))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        draw.ellipse([x, y, x + size, y + size * 1.5], fill=colour, outline=(20, 20, 20), width=3)
    pixels = np.asarray(small.resize((width, height), Image.LANCZOS).filter(ImageFilter.GaussianBlur(1.5)))
    if grain:
        pixels = np.clip(pixels + rng.normal(0, grain, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def pillow_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=4)
    return buffer.getvalue()


def bench_png(images: dict, repeat: int) -> list[tuple]:
    import zlib

    from sdxld import png

    rows = []
    for name, image in images.items():
        old_s, old = timed(lambda: pillow_png(image), repeat)
        new_s, new = timed(lambda: png.encode(image), repeat)
        one_thread_s, _ = timed(lambda: png.encode(image, threads=1), repeat)
        fast = png._deflater
        png._deflater = zlib
        try:
            zlib_s, via_zlib = timed(lambda: png.encode(image), repeat)
        finally:
            png._deflater = fast
        rows.append((name, old_s, len(old), new_s, len(new), one_thread_s, zlib_s, len(via_zlib)))
    return rows


def bench_conversions(size: tuple[int, int], device: str, repeat: int) -> list[tuple]:
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from sdxld.stages import pil_to_tensor, tensor_to_pil, to_pil

    processor = VaeImageProcessor(vae_scale_factor=8)
    width, height = size
    decoded = torch.rand(1, 3, height, width, device=device) * 2 - 1  # a VAE decode's range

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def numpy_path():
        image = to_pil(processor.postprocess(decoded, output_type="np"), "bench")
        sync()
        return image

    def device_path():
        image = tensor_to_pil(processor.postprocess(decoded, output_type="pt"), "bench")[0]
        sync()
        return image

    image = numpy_path()

    def preprocess_path():
        pixels = processor.preprocess(image).to(device, torch.float32)
        sync()
        return pixels

    def device_preprocess():
        pixels = pil_to_tensor(image, device, torch.float32)
        sync()
        return pixels

    rows = []
    for label, old, new in (("float pixels -> 8-bit image", numpy_path, device_path),
                            ("image -> VAE input", preprocess_path, device_preprocess)):
        old_s, _ = timed(old, repeat)
        new_s, _ = timed(new, repeat)
        rows.append((label, old_s, new_s))
    return rows


def bench_vae_seams(size: tuple[int, int], device: str, repeat: int) -> tuple[float, float, bool]:
    import torch
    from diffusers import AutoencoderKL

    from sdxld import diffusers_private

    width, height = size

    def tile_grid(channels: int, across: int, down: int, tile: int, stride: int, tile_output):
        """Tiles cut as diffusers' tiled decode / encode cuts its input (`across` x `down`), each
        the size its decoder / encoder gives (`tile_output(height, width)`)."""
        return [[torch.rand(1, channels, *tile_output(min(tile, down - top), min(tile, across - left)), device=device)
                 for left in range(0, across, stride)]
                for top in range(0, down, stride)]

    grids = [
        (tile_grid(3, width // 8, height // 8, 128, 96, lambda h, w: (h * 8, w * 8)), 256),  # decode
        (tile_grid(8, width, height, 1024, 768, lambda h, w: (h // 8, w // 8)), 32),  # encode
    ]

    def blend_all(blend_v, blend_h):
        results = []
        for rows, extent in grids:
            for i, row in enumerate(rows):
                for j, tile in enumerate(row):
                    tile = tile.clone()
                    if i > 0:
                        tile = blend_v(rows[i - 1][j], tile, extent)
                    if j > 0:
                        tile = blend_h(row[j - 1], tile, extent)
                    results.append(tile)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return results

    def looped():
        return blend_all(lambda a, b, e: AutoencoderKL.blend_v(None, a, b, e), lambda a, b, e: AutoencoderKL.blend_h(None, a, b, e))

    def vectorized():
        return blend_all(diffusers_private._blend_rows, diffusers_private._blend_columns)

    old_s, old = timed(looped, repeat)
    new_s, new = timed(vectorized, repeat)
    return old_s, new_s, all(torch.equal(x, y) for x, y in zip(old, new))


def bench_resize(size: tuple[int, int], device: str, repeat: int) -> tuple[float, float, bool]:
    import numpy as np
    import torch
    from PIL import Image

    from esrgan import lanczos

    width, height = size
    upscaled = torch.randint(0, 256, (height * 2, width * 2, 3), dtype=torch.uint8, device=device)

    def pillow_path():
        return Image.fromarray(upscaled.cpu().numpy()).resize(size, Image.LANCZOS)

    def device_path():
        return Image.fromarray(lanczos.resize(upscaled, size).cpu().numpy())

    device_path()  # the taps are computed once per size and kept
    old_s, old = timed(pillow_path, repeat)
    new_s, new = timed(device_path, repeat)
    return old_s, new_s, np.array_equal(np.asarray(old), np.asarray(new))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--final", default="3072x5376", help="the final's WIDTHxHEIGHT")
    args = parser.parse_args()

    import torch

    from sdxld import png

    final = tuple(int(v) for v in args.final.split("x"))
    stage1 = (final[0] // 4, final[1] // 4)
    print(f"host costs, device {args.device}, {torch.get_num_threads()} CPU threads, deflate {png.deflate_library()} "
          f"(a large image on {png.usable_cores()} threads), median of {args.repeat}")
    images = {
        f"final {final[0]}x{final[1]} illustration": illustration(*final, grain=0),
        f"final {final[0]}x{final[1]} with grain": illustration(*final, grain=3),
        f"stage 1 {stage1[0]}x{stage1[1]} illustration": illustration(*stage1, grain=0),
    }
    print("\nPNG                                   Pillow-4 s    MB   sdxld s    MB  x faster  size  | 1 thread s | zlib s")
    finals = {}
    for name, old_s, old_b, new_s, new_b, one_thread_s, zlib_s, _ in bench_png(images, args.repeat):
        print(f"  {name:34} {old_s:8.3f} {old_b / 1e6:6.1f} {new_s:8.3f} {new_b / 1e6:6.1f} {old_s / new_s:8.1f}x"
              f" {new_b / old_b:5.2f}  | {one_thread_s:10.3f} | {zlib_s:.3f}")
        if name.startswith("final"):
            finals[name] = (old_s, new_s)
    print(f"\nconversions at {final[0]}x{final[1]}          old s   new s   ratio new/old")
    conversions_old = conversions_new = 0.0
    for label, old_s, new_s in bench_conversions(final, args.device, args.repeat):
        print(f"  {label:34} {old_s:6.3f} {new_s:7.3f} {new_s / old_s:8.2f}")
        conversions_old += old_s
        conversions_new += new_s
    seams_old, seams_new, seams_same = bench_vae_seams(final, args.device, args.repeat)
    print(f"  {'VAE tile seams (decode + encode)':34} {seams_old:6.3f} {seams_new:7.3f} {seams_new / seams_old:8.2f}"
          f"   {'same values' if seams_same else 'VALUES DIFFER'}")
    resize_old, resize_new, same = bench_resize(final, args.device, args.repeat)
    print(f"  {'upscaler output -> final (Lanczos)':34} {resize_old:6.3f} {resize_new:7.3f} {resize_new / resize_old:8.2f}"
          f"   {'same pixels' if same else 'PIXELS DIFFER'}")
    # What the daemon runs: the device's resize on CUDA only, Pillow elsewhere.
    resize_used = resize_new if args.device.startswith("cuda") else resize_old
    print("\nper approved image, the final's PNG + the conversions + the seams + the resize:")
    for name, (old_s, new_s) in finals.items():
        before = old_s + conversions_old + seams_old + resize_old
        after = new_s + conversions_new + seams_new + resize_used
        print(f"  {name:34} {before:.2f} s -> {after:.2f} s ({after / before:.2f}x)")

if __name__ == "__main__":
    main()
