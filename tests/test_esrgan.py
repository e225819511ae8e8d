"""The esrgan package: real spandrel, random RRDBNet weights in every layout, tiling, safety."""

import logging
import pickle

import numpy as np
import pytest
import torch
from support.esrgan_weights import write_esrgan
from PIL import Image

from esrgan import Upscaler, UpscalerError


def noise_image(width=96, height=80, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("layout", ["old", "new", "safetensors"])
def test_every_layout_loads_as_esrgan_x4(layout, tmp_path):
    path = write_esrgan(tmp_path / f"net.{'safetensors' if layout == 'safetensors' else 'pth'}", layout)
    upscaler = Upscaler.load(path)
    assert upscaler.scale == 4
    assert upscaler.method == f"ESRGAN x4 ({path.name})"


def test_old_and_new_layouts_are_the_same_network(tmp_path):
    old = Upscaler.load(write_esrgan(tmp_path / "old.pth", "old", seed=3))
    new = Upscaler.load(write_esrgan(tmp_path / "new.pth", "new", seed=3))
    pixels = np.asarray(noise_image(40, 32))
    assert np.array_equal(old.run(pixels), new.run(pixels))


def test_output_is_resized_to_the_exact_target(tmp_path):
    upscaler = Upscaler.load(write_esrgan(tmp_path / "x4.pth"))
    assert upscaler.upscale(noise_image(48, 40), (100, 84)).size == (100, 84)
    two = Upscaler.load(write_esrgan(tmp_path / "x2.pth", scale=2))
    assert two.scale == 2
    assert two.run(np.asarray(noise_image(24, 16))).shape == (32, 48, 3)
    assert two.upscale(noise_image(24, 16), (96, 64)).size == (96, 64)


def test_the_output_resized_where_it_was_made_is_pillows_image(tmp_path, monkeypatch):
    """On a GPU the network's output is resized there (output_on_device, automatic on CUDA); the
    CPU runs the same code on a CPU tensor. The first image of a size is compared with Pillow."""
    from esrgan import lanczos

    weights = write_esrgan(tmp_path / "x4.pth")
    image = noise_image(48, 40)
    pillow = Upscaler.load(weights, output_on_device=False).upscale(image, (100, 84))
    on_device = Upscaler.load(weights, output_on_device=True)
    automatic = Upscaler.load(weights)
    assert automatic.output_on_device is None and not automatic._on_device(), "on the CPU: Pillow, as before"
    calls = []
    real_resize = lanczos.resize
    monkeypatch.setattr(lanczos, "resize", lambda pixels, size: calls.append(size) or real_resize(pixels, size))
    for _ in range(2):
        assert np.array_equal(np.asarray(on_device.upscale(image, (100, 84))), np.asarray(pillow))
    assert calls == [(100, 84), (100, 84)]
    assert on_device._device_resize_matches == {(192, 160, 100, 84): True}
    # The network's own size needs no resize at all.
    assert on_device.upscale(image, (192, 160)).size == (192, 160) and len(calls) == 2


def test_a_device_resize_that_differs_from_pillow_is_dropped_for_that_size(tmp_path, monkeypatch, caplog):
    """A future Pillow that changes its arithmetic: the first image still comes out as Pillow
    makes it, the log says so, and that size is resized by Pillow from then on."""
    from esrgan import lanczos

    weights = write_esrgan(tmp_path / "x4.pth")
    image = noise_image(48, 40)
    pillow = np.asarray(Upscaler.load(weights, output_on_device=False).upscale(image, (100, 84)))
    upscaler = Upscaler.load(weights, output_on_device=True)
    calls = []

    def nearest(pixels, size):  # not Lanczos: differs from Pillow
        calls.append(size)
        return torch.nn.functional.interpolate(pixels.permute(2, 0, 1)[None].float(), size=size[::-1])[0].permute(1, 2, 0).byte()

    monkeypatch.setattr(lanczos, "resize", nearest)
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(np.asarray(upscaler.upscale(image, (100, 84))), pillow)
    assert "differs from Pillow" in caplog.text and "192x160 -> 100x84" in caplog.text
    assert np.array_equal(np.asarray(upscaler.upscale(image, (100, 84))), pillow)
    assert calls == [(100, 84)]


def test_tiled_matches_untiled_within_one_level_on_average(tmp_path):
    upscaler = Upscaler.load(write_esrgan(tmp_path / "x4.pth"), tile_size=32, tile_pad=16)
    pixels = np.asarray(noise_image(96, 80))
    assert upscaler.tile_count(96, 80) == 9
    tiled = upscaler.run(pixels).astype(int)
    whole = upscaler.run(pixels, tiled=False).astype(int)
    difference = np.abs(tiled - whole)
    # Stated tolerance: mean absolute difference under 1 of 255, no pixel off by more than 8.
    assert difference.mean() < 1.0 and difference.max() <= 8, (difference.mean(), difference.max())
    assert (difference == 0).mean() > 0.5
    assert np.abs(whole - np.kron(pixels, np.ones((4, 4, 1))).astype(int)).mean() > 1, "the net must not be a no-op"


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"params_ema": Payload()}, handle)
    with pytest.raises(UpscalerError, match="evil.pth: cannot be read as weights"):
        Upscaler.load(path)
    assert not marker.exists()
    # The same file through the fallback path: Lanczos, still nothing executed.
    assert Upscaler.load_or_fallback(path).method == "lanczos"
    assert not marker.exists()


def test_a_torch_save_with_a_code_object_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil2.pth"

    class Sneaky:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    torch.save({"model.0.weight": Sneaky()}, path)
    with pytest.raises(UpscalerError):
        Upscaler.load(path)
    assert not marker.exists()


def test_missing_weights_fall_back_to_lanczos_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        upscaler = Upscaler.load_or_fallback(tmp_path / "RealESRGAN_x4plus_anime_6B.pth")
    assert upscaler.method == "lanczos" and upscaler.scale == 1
    assert "RealESRGAN_x4plus_anime_6B.pth" in caplog.text and "Lanczos" in caplog.text
    image = noise_image(32, 24)
    assert np.array_equal(np.asarray(upscaler.upscale(image, (128, 96))), np.asarray(image.resize((128, 96), Image.LANCZOS)))


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "cannot be read as weights"),
        (b"not a zip and not a pickle", "cannot be read as weights"),
    ],
)
def test_corrupt_weights_name_the_file(content, words, tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(UpscalerError, match=rf"broken.pth: {words}"):
        Upscaler.load(path)


def test_an_unsupported_architecture_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "unknown.pth"
    torch.save({"some.layer.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(UpscalerError, match="does not recognise this network's architecture"):
        Upscaler.load(path)
    fallback = Upscaler.load_or_fallback(path)
    assert fallback.method == "lanczos" and "does not recognise" in fallback.fallback_reason


def test_other_file_types_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"x")
    with pytest.raises(UpscalerError, match="unsupported file type"):
        Upscaler.load(path)


def test_no_gpu_memory_for_the_resize_means_pillow_resizes_that_image(tmp_path, monkeypatch, caplog):
    from esrgan import lanczos

    weights = write_esrgan(tmp_path / "x4.pth")
    image = noise_image(48, 40)
    pillow = np.asarray(Upscaler.load(weights, output_on_device=False).upscale(image, (100, 84)))

    def out_of_memory(pixels, size):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(lanczos, "resize", out_of_memory)
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(np.asarray(Upscaler.load(weights, output_on_device=True).upscale(image, (100, 84))), pillow)
    assert "no GPU memory to resize" in caplog.text
