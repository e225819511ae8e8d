"""Upscaler: any ESRGAN-family super-resolution network (through spandrel), tiled; Lanczos fallback.

spandrel detects the architecture from the weights alone (RealESRGAN_x4plus_anime_6B with its
`params_ema` and new-arch key names, old-arch ESRGAN files, .safetensors, 2x and 4x models ...).
`.pth` files are pickles: they are only ever read through spandrel's restricted unpickler, which
accepts tensors and plain containers and refuses everything else, so a weights file cannot run code.

Inference is tiled (tile_size x tile_size input tiles, each read with tile_pad extra pixels of
context that are cropped off the result) so that a 1536x2688 input fits a small GPU; the output
is assembled as 8-bit pixels. On a GPU it is assembled there and brought to the wanted size there
by Pillow's own Lanczos arithmetic (`esrgan.lanczos`), so a quarter of the pixels cross to the CPU
and no CPU core spends ~0.7 s resizing; elsewhere Pillow resizes on the CPU.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".safetensors", ".ckpt")
# Mirrored pixels added around the image before inference: Real-ESRGAN's own pre-padding (its
# inference script and its ncnn build both use 10).
BORDER_PAD = 10


class UpscalerError(Exception):
    """Weights that cannot be used as an upscaler; the message says why and what to do."""


@dataclass
class Upscaler:
    model: object | None  # spandrel ImageModelDescriptor, None for Lanczos
    source: str
    tile_size: int = 512
    tile_pad: int = 32
    device: str = "cpu"
    dtype_name: str = "fp32"
    fallback_reason: str = ""
    # Assemble and resize the network's output where it was made (None: on CUDA devices only).
    output_on_device: bool | None = None
    # (input width, height, output width, height) -> whether the device's resize gave Pillow's
    # pixels on the first image of that size; False keeps Pillow for the size.
    _device_resize_matches: dict = field(default_factory=dict, repr=False)

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path | str, *, device: str = "cpu", dtype: str = "fp32", tile_size: int = 512, tile_pad: int = 32,
             output_on_device: bool | None = None) -> "Upscaler":
        """Load super-resolution weights; raises UpscalerError with the reason when they can't be used."""
        import torch
        from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

        path = Path(path)
        if not path.is_file():
            raise UpscalerError(f"{path}: file not found")
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise UpscalerError(f"{path}: unsupported file type '{path.suffix}' (use .pth or .safetensors)")
        try:
            # spandrel reads .pth/.ckpt with its RestrictedUnpickle: tensors and plain containers only.
            descriptor = ModelLoader(device="cpu").load_from_file(path)
        except UnsupportedModelError:
            raise UpscalerError(f"{path}: spandrel does not recognise this network's architecture") from None
        except Exception as err:  # noqa: BLE001 - corrupt files fail in many ways; say which file and why
            raise UpscalerError(f"{path}: cannot be read as weights ({type(err).__name__}: {err})") from None
        if not isinstance(descriptor, ImageModelDescriptor) or descriptor.input_channels != 3 or descriptor.output_channels != 3:
            raise UpscalerError(f"{path}: {descriptor.architecture.name} is not an RGB image-to-image upscaler")
        if descriptor.scale < 1:
            raise UpscalerError(f"{path}: scale {descriptor.scale} is not an upscale")
        dtype = _pick_dtype(descriptor, device, dtype)
        descriptor.to(torch.device(device)).eval()
        if dtype != "fp32":
            descriptor.to({"fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
        return cls(descriptor, str(path), tile_size, tile_pad, device, dtype, output_on_device=output_on_device)

    @classmethod
    def lanczos(cls, reason: str) -> "Upscaler":
        return cls(None, "lanczos", fallback_reason=reason)

    @classmethod
    def load_or_fallback(cls, path: Path | str, **kwargs) -> "Upscaler":
        """The configured weights, or Lanczos with a logged reason (the seed's behaviour)."""
        path = Path(path)
        if not path.exists():
            reason = f"no upscaler weights at {path}; using Lanczos (put e.g. RealESRGAN_x4plus_anime_6B.pth there)"
            log.warning("%s", reason)
            return cls.lanczos(reason)
        try:
            return cls.load(path, **kwargs)
        except UpscalerError as err:
            log.warning("upscaler weights refused, using Lanczos instead: %s", err)
            return cls.lanczos(str(err))

    # --- description ----------------------------------------------------------------------

    @property
    def scale(self) -> int:
        return self.model.scale if self.model is not None else 1

    @property
    def method(self) -> str:
        """What went into the record: 'lanczos' or e.g. 'ESRGAN x4 (RealESRGAN_x4plus_anime_6B.pth)'."""
        if self.model is None:
            return "lanczos"
        return f"{self.model.architecture.name} x{self.model.scale} ({Path(self.source).name})"

    # --- inference ------------------------------------------------------------------------

    def upscale(self, image, size: tuple[int, int]):
        """`image` (PIL) to exactly `size` (width, height): the network's scale, then Lanczos to size."""
        from PIL import Image

        size = tuple(size)
        image = image.convert("RGB")
        if self.model is None:
            return image if image.size == size else image.resize(size, Image.LANCZOS)
        if self._on_device():
            pixels = self._network_output(np.asarray(image), tiled=True, where=self.device)
            if pixels is not None:
                return self._to_size_from_device(pixels, size)
        image = Image.fromarray(self.run(np.asarray(image)))
        return image if image.size == size else image.resize(size, Image.LANCZOS)

    def run(self, pixels: np.ndarray, tiled: bool = True) -> np.ndarray:
        """HxWx3 uint8 -> (H*scale)x(W*scale)x3 uint8 through the network, tile by tile."""
        return self._network_output(pixels, tiled, where="cpu").numpy()

    def _network_output(self, pixels: np.ndarray, tiled: bool, where: str):
        """The network's output as an HxWx3 uint8 tensor assembled on `where` (None when there is
        no room for it on the GPU).

        The image is first extended by BORDER_PAD pixels mirrored at its edges, as the official
        Real-ESRGAN implementations do (pre-padding): the networks were not trained to see the
        zeros their convolutions pad with, and without it the border pixels come out visibly
        wrong (up to 211/255 off the official output on a test drawing, identical with it)."""
        border = min(BORDER_PAD, pixels.shape[0] - 1, pixels.shape[1] - 1)
        if border <= 0:
            return self._run_tiles(pixels, tiled, where)
        padded = np.pad(pixels, ((border, border), (border, border), (0, 0)), mode="reflect")
        out = self._run_tiles(padded, tiled, where)
        if out is None:
            return None
        crop = border * self.scale
        return out[crop:-crop, crop:-crop]

    def _run_tiles(self, pixels: np.ndarray, tiled: bool, where: str):
        import torch

        height, width = pixels.shape[:2]
        scale = self.scale
        try:
            out = torch.empty((height * scale, width * scale, 3), dtype=torch.uint8, device=where)
        except torch.cuda.OutOfMemoryError:
            log.warning("no GPU memory for the upscaler's %dx%d output; it is assembled on the CPU", width * scale, height * scale)
            return None
        tile = max(height, width) if not tiled else self.tile_size
        # The whole input crosses to the device once (12 MB for stage 2's 1536x2688), not per tile.
        source = torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].to(self.device)
        with torch.inference_mode():
            for y0 in range(0, height, tile):
                for x0 in range(0, width, tile):
                    y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
                    # Context around the tile so the seams see the same neighbourhood as untiled.
                    py0, px0 = max(y0 - self.tile_pad, 0), max(x0 - self.tile_pad, 0)
                    py1, px1 = min(y1 + self.tile_pad, height), min(x1 + self.tile_pad, width)
                    patch = source[:, :, py0:py1, px0:px1].to(self.device, self._torch_dtype()).div_(255)
                    result = self.model(patch)
                    top, left = (y0 - py0) * scale, (x0 - px0) * scale
                    result = result[:, :, top : top + (y1 - y0) * scale, left : left + (x1 - x0) * scale]
                    out[y0 * scale : y1 * scale, x0 * scale : x1 * scale] = (
                        result[0].float().clamp_(0, 1).mul_(255).round_().byte().permute(1, 2, 0).to(out.device)
                    )
        return out

    # --- on the device: the output assembled there, resized there ------------------------------

    def _on_device(self) -> bool:
        """Whether the output is assembled (and resized) where the network runs, crossing to the
        CPU once at the end: on CUDA unless output_on_device says otherwise."""
        return str(self.device).startswith("cuda") if self.output_on_device is None else self.output_on_device

    def _to_size_from_device(self, pixels, size: tuple[int, int]):
        from PIL import Image

        scaled_size = (pixels.shape[1], pixels.shape[0])
        if scaled_size == size:
            return Image.fromarray(pixels.cpu().numpy())
        if self._device_resize_matches.get((*scaled_size, *size)) is False:
            return _pillow_resize(pixels, size)
        return self._resized_on_device(pixels, size)

    def _resized_on_device(self, pixels, size: tuple[int, int]):
        """Pillow's Lanczos run on the device; the first image of each size is also resized by
        Pillow and compared, and a size where they differ stays with Pillow from then on."""
        import torch
        from PIL import Image

        from esrgan import lanczos

        key = (pixels.shape[1], pixels.shape[0], *size)
        try:
            resized = Image.fromarray(lanczos.resize(pixels, size).cpu().numpy())
        except torch.cuda.OutOfMemoryError:
            log.warning("no GPU memory to resize the upscaler's output; Pillow resizes it on the CPU")
            return _pillow_resize(pixels, size)
        if key in self._device_resize_matches:
            return resized
        reference = _pillow_resize(pixels, size)
        differing = int(np.any(np.asarray(resized) != np.asarray(reference), axis=2).sum())
        self._device_resize_matches[key] = differing == 0
        if differing:
            import PIL

            log.warning(
                "the GPU's Lanczos resize %dx%d -> %dx%d differs from Pillow %s's on %d pixels; "
                "Pillow resizes this size on the CPU from now on", *key, PIL.__version__, differing,
            )
            return reference
        return resized

    def _torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype_name]

    def tile_count(self, width: int, height: int) -> int:
        return math.ceil(width / self.tile_size) * math.ceil(height / self.tile_size)


def _pillow_resize(pixels, size: tuple[int, int]):
    """The network's output (a tensor anywhere) to `size` by Pillow's Lanczos, on the CPU."""
    from PIL import Image

    return Image.fromarray(pixels.cpu().numpy()).resize(size, Image.LANCZOS)


def _pick_dtype(descriptor, device: str, wanted: str) -> str:
    """fp16/bf16 only on CUDA and only where the architecture supports it; the CPU runs fp32."""
    if not str(device).startswith("cuda") or wanted == "fp32":
        return "fp32"
    if wanted == "bf16" and descriptor.supports_bfloat16:
        return "bf16"
    if wanted == "fp16" and descriptor.supports_half:
        return "fp16"
    return "fp32"
