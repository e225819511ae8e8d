"""sdxld's PNG writer: files any reader opens, pixel for pixel, with the text chunks intact."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sdxld import png


def random_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def chunk_kinds(data: bytes) -> list[bytes]:
    kinds, offset = [], len(png.SIGNATURE)
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kinds.append(data[offset + 4:offset + 8])
        offset += 12 + length
    return kinds


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (300, 17), (17, 300)])
def test_pixels_come_back_exactly_as_written(mode, size):
    image = random_image(mode, *size)
    decoded = Image.open(io.BytesIO(png.encode(image)))
    decoded.load()
    assert decoded.mode == mode and decoded.size == size
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_every_chunk_checksum_is_valid():
    data = png.encode(random_image("RGB", 64, 48), {"parameters": "a cat"})
    Image.open(io.BytesIO(data)).verify()  # raises on a bad CRC or a truncated stream


def test_text_chunks_come_before_the_pixels_ascii_as_text_and_the_rest_as_utf8():
    text = {"parameters": "1girl, smile\nSteps: 30", "sdxld": '{"prompt": "桜の下の少女, café"}'}
    data = png.encode(random_image("RGB", 16, 16), text)
    assert chunk_kinds(data) == [b"IHDR", b"tEXt", b"iTXt", b"IDAT", b"IEND"]
    assert Image.open(io.BytesIO(data)).text == text


def test_a_keyword_png_cannot_hold_is_refused_with_the_rule():
    image = random_image("RGB", 4, 4)
    for bad in ["", " padded", "k" * 80, "名前"]:
        with pytest.raises(ValueError, match="PNG text keyword"):
            png.encode(image, {bad: "x"})


def test_large_pixel_data_is_split_over_several_idat_chunks(monkeypatch):
    monkeypatch.setattr(png, "IDAT_BYTES", 1000)
    image = random_image("RGB", 120, 90)
    data = png.encode(image)
    assert chunk_kinds(data).count(b"IDAT") > 10
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(image))


def test_without_isal_the_standard_zlib_writes_the_same_pixels(monkeypatch):
    monkeypatch.setattr(png, "_deflater", zlib)
    assert png.deflate_library() == "zlib"
    image = random_image("RGBA", 33, 21)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.encode(image)))), np.asarray(image))


@pytest.mark.parametrize("mode", ["P", "I;16", "1"])
def test_other_modes_are_written_by_pillow_with_their_text(mode):
    image = random_image("L", 20, 10).convert(mode) if mode != "I;16" else Image.fromarray(
        np.arange(200, dtype=np.uint16).reshape(10, 20) * 300)
    decoded = Image.open(io.BytesIO(png.encode(image, {"parameters": "x"})))
    assert decoded.text == {"parameters": "x"}
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_the_up_filter_stores_each_row_minus_the_one_above():
    pixels = np.array([[[10, 20, 30]], [[5, 20, 255]]], dtype=np.uint8)  # 1 pixel wide, 2 rows
    assert png.up_filtered(pixels).tolist() == [[png.UP_FILTER, 10, 20, 30], [png.UP_FILTER, 251, 0, 225]]


def test_a_colour_profile_the_image_carries_is_kept():
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    image = random_image("RGB", 8, 8)
    image.info["icc_profile"] = profile
    decoded = Image.open(io.BytesIO(png.encode(image, {"parameters": "x"})))
    assert decoded.info["icc_profile"] == profile and decoded.text == {"parameters": "x"}
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_a_transparent_colour_key_goes_through_pillow_and_survives():
    image = random_image("RGB", 8, 8)
    image.info["transparency"] = (1, 2, 3)
    assert Image.open(io.BytesIO(png.encode(image))).info["transparency"] == (1, 2, 3)


def test_an_empty_image_is_refused():
    with pytest.raises(ValueError, match="empty image"):
        png.encode(Image.new("RGB", (0, 5)))


def idat_stream(data: bytes) -> bytes:
    """The zlib stream a PNG's IDAT chunks hold, joined."""
    parts, offset = [], len(png.SIGNATURE)
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        if data[offset + 4:offset + 8] == b"IDAT":
            parts.append(data[offset + 8:offset + 8 + length])
        offset += 12 + length
    return b"".join(parts)


@pytest.mark.skipif(png.deflate_library() != "isal", reason="the threaded deflate is isal's; without isal, zlib's on one thread")
def test_a_large_image_is_deflated_on_several_threads_into_one_zlib_stream(monkeypatch):
    # Blocks of 4 KiB: a 300x200 image is 44 of them, deflated by 3 threads, joined into one
    # stream with zlib's frame and checksum.
    monkeypatch.setattr(png, "THREADED_FROM_BYTES", 1)
    monkeypatch.setattr(png, "THREADED_BLOCK_BYTES", 4096)
    image = random_image("RGB", 300, 200)
    threaded, alone = png.encode(image, threads=3), png.encode(image, threads=1)
    filtered = png.up_filtered(np.asarray(image)).tobytes()
    assert idat_stream(threaded) != idat_stream(alone), "the threads wrote their own blocks"
    assert zlib.decompress(idat_stream(threaded)) == filtered  # zlib checks the header and the Adler-32
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(threaded))), np.asarray(image))


def test_small_images_are_deflated_in_one_call_on_one_thread(monkeypatch):
    image = random_image("RGB", 64, 48)
    filtered = png.up_filtered(np.asarray(image))
    assert filtered.nbytes < png.THREADED_FROM_BYTES
    assert idat_stream(png.encode(image, threads=8)) == png._deflater.compress(filtered, png.DEFLATE_LEVEL)


@pytest.mark.skipif(png.deflate_library() != "isal", reason="the threaded deflate is isal's; without isal, zlib's on one thread")
def test_no_more_threads_deflate_than_there_are_blocks(monkeypatch):
    monkeypatch.setattr(png, "THREADED_FROM_BYTES", 1)
    monkeypatch.setattr(png, "THREADED_BLOCK_BYTES", 4096)
    started = []
    real = png._deflate_on_threads
    monkeypatch.setattr(png, "_deflate_on_threads", lambda data, threads: started.append(threads) or real(data, threads))
    data = np.zeros((3, 3000), dtype=np.uint8)  # 9,000 bytes: three blocks
    assert zlib.decompress(png.deflate(data, threads=64)) == data.tobytes()
    assert started == [3]
