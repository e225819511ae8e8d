"""What a LoRA file holds for one layer, and the weight difference it makes: plain LoRA and every
LyCORIS format (LoCon, Tucker `lora_mid`, LoHa, LoKr, full diffs) with or without DoRA.

The math of each format is the `lycoris-lora` package's (`lycoris.functional`), the library its
trainers use; sdxld only reads the tensors out of the file and says how they scale, the way
A1111 and ComfyUI scale them: alpha / rank once, full-matrix LoKr unscaled, a missing alpha
meaning 1. (The module classes of lycoris-lora 4.1 apply alpha / rank twice for LoHa and LoKr
when they merge; docs/design.md has the measurement. The functional API does not.)

DoRA: the file's magnitude is applied after its difference is added, to the original weight,
and the result blends with the original by the strength, as ComfyUI does, so strength 0 is the
original and 1 is exactly the trained weight, and several LoRAs on one layer add up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

# lycoris.functional can pick fused Triton kernels or torch.compile per call; merges run once per
# layer and shape, where a compile per shape would cost minutes, so the eager path is pinned.
_BACKEND = "torch"

# Key endings in a LoRA file, longest first so "lora_down.weight" is not read as "weight".
TENSOR_SUFFIXES = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2", "lokr_t1", "lokr_t2",
    "lora_magnitude_vector", "dora_scale", "alpha", "diff",
)
# What only LyCORIS (or DoRA) files carry; a file with none of them is a plain LoRA.
LYCORIS_MARKERS = ("hada_", "lokr_", "lora_mid.", "dora_scale", "lora_magnitude_vector", ".diff", "lycoris_")
# LyCORIS algorithms and extras that are not a weight difference sdxld can merge.
UNSUPPORTED = {
    ".oft_blocks": "an OFT/BOFT file (orthogonal fine-tuning)",
    ".oft_diag": "an OFT file (orthogonal fine-tuning)",
    ".a1.weight": "a GLoRA file",
    ".on_input": "an (IA)³ file",
    ".w_norm": "a file that also trains normalization layers (LyCORIS train_norm)",
    ".b_norm": "a file that also trains normalization layers (LyCORIS train_norm)",
    ".diff_b": "a full fine-tune difference with biases",
}


def split_key(key: str) -> tuple[str, str] | None:
    """'lora_unet_x.hada_w1_a' -> ('lora_unet_x', 'hada_w1_a'); None for a key of no known kind."""
    for suffix in TENSOR_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def unsupported_kind(keys) -> str | None:
    """Why a file's keys are a LyCORIS kind sdxld does not merge (None when it can)."""
    for marker, kind in UNSUPPORTED.items():
        example = next((k for k in keys if marker in k), None)
        if example:
            return f"{kind} (e.g. {example})"
    return None


def is_lycoris(keys) -> bool:
    return any(marker in key for key in keys for marker in LYCORIS_MARKERS)


@dataclass(eq=False)
class LayerPatch:
    """One layer's part of a LoRA file.

    `factors` are the file's tensors in the argument order of the format's lycoris.functional
    diff_weight; `gamma` is that function's scale argument (alpha / rank, except LoKr, whose
    function divides by its rank itself and so takes alpha)."""

    algorithm: str  # "LoRA" | "LoCon" | "LoHa" | "LoKr" | "full"
    factors: tuple
    gamma: float = 1.0
    dora_scale: object = None

    @property
    def label(self) -> str:
        return f"DoRA ({self.algorithm})" if self.dora_scale is not None else self.algorithm

    def difference(self, device=None):
        """The weight difference at strength 1, in float32 (on `device`), before DoRA."""
        factors = tuple(None if f is None else f.to(device).float() for f in self.factors)
        return _DIFFERENCE[self.algorithm](factors, self.gamma)

    def difference_shape(self) -> tuple:
        """The shape `difference` has, computed without computing it: lycoris's own function on
        meta tensors, once per combination of factor shapes (a LoRA's hundreds of layers come in
        a few; checked layer by layer, a full-size SDXL LoRA took 0.29 s to read, now 0.13 s)."""
        shapes = tuple(None if f is None else tuple(f.shape) for f in self.factors)
        return _difference_shape(self.algorithm, shapes, self.gamma)

    def misfit(self, weight_shape) -> str:
        """Why this cannot be merged into a weight of this shape ('' when it can)."""
        shape = tuple(self.difference_shape())
        weight_shape = tuple(weight_shape)
        fits = shape[0] == weight_shape[0] and math.prod(shape) == math.prod(weight_shape)
        if fits and len(shape) == len(weight_shape):
            fits = shape == weight_shape
        if not fits:
            return f"{self.algorithm} gives {_dims(shape)}, layer is {_dims(weight_shape)}"
        if self.dora_scale is not None:
            size = self.dora_scale.numel()
            if size not in (weight_shape[0], weight_shape[1] if len(weight_shape) > 1 else -1):
                return f"DoRA magnitude has {size} values, layer is {_dims(weight_shape)}"
        return ""

    def contribution(self, original, device=None):
        """What this adds to `original` (float32, on `device`) at strength 1."""
        from lycoris.functional import weight_decompose

        difference = self.difference(device).reshape(original.shape)
        if self.dora_scale is None:
            return difference
        magnitude = self.dora_scale.to(device).float()
        on_output_axis = magnitude.numel() == original.shape[0] and (magnitude.dim() < 2 or magnitude.shape[0] != 1)
        if on_output_axis:
            magnitude = magnitude.reshape(original.shape[0], *[1] * (original.dim() - 1))
        else:
            magnitude = magnitude.reshape(1, original.shape[1], *[1] * (original.dim() - 2))
        rescaled = weight_decompose(original + difference, magnitude, 1, on_output_axis, backend=_BACKEND)
        return rescaled - original


def _dims(shape) -> str:
    return "x".join(str(n) for n in shape)


def _locon(factors, gamma):
    from lycoris.functional import locon

    return locon.diff_weight(*factors, gamma=gamma, backend=_BACKEND)


def _loha(factors, gamma):
    from lycoris.functional import loha

    return loha.diff_weight(*factors, gamma=gamma, backend=_BACKEND)


def _lokr(factors, gamma):
    from lycoris.functional import lokr

    return lokr.diff_weight(*factors, gamma=gamma, backend=_BACKEND)


def _full(factors, gamma):
    return factors[0]


_DIFFERENCE = {"LoRA": _locon, "LoCon": _locon, "LoHa": _loha, "LoKr": _lokr, "full": _full}


@lru_cache(maxsize=4096)
def _difference_shape(algorithm: str, shapes: tuple, gamma: float) -> tuple:
    import torch

    factors = tuple(None if shape is None else torch.empty(shape, device="meta") for shape in shapes)
    return tuple(_DIFFERENCE[algorithm](factors, gamma).shape)


class LayerFormatError(ValueError):
    """A layer's tensors do not make up any known format (a damaged or unusual file)."""


def patch_from_tensors(tensors: dict, alpha: float | None) -> LayerPatch:
    """The LayerPatch for one layer's tensors (suffix -> tensor, the suffixes of TENSOR_SUFFIXES).

    `alpha`: the layer's alpha, from the file or the trainer's config; None means alpha = rank."""
    dora = tensors.get("dora_scale", tensors.get("lora_magnitude_vector"))
    down = tensors.get("lora_down.weight", tensors.get("lora_A.weight"))
    up = tensors.get("lora_up.weight", tensors.get("lora_B.weight"))
    if "hada_w1_a" in tensors:
        parts = [tensors.get(k) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")]
        if any(p is None for p in parts):
            raise LayerFormatError("a LoHa layer without all four of hada_w1_a/b and hada_w2_a/b")
        w1a, w1b, w2a, w2b = parts
        rank = w1b.shape[0]
        t1, t2 = tensors.get("hada_t1"), tensors.get("hada_t2")
        return LayerPatch("LoHa", (w1b, w1a, w2b, w2a, t1, t2), _scale(alpha, rank), dora)
    if any(k.startswith("lokr_") for k in tensors):
        w1 = tensors.get("lokr_w1")
        w1a, w1b = tensors.get("lokr_w1_a"), tensors.get("lokr_w1_b")
        w2 = tensors.get("lokr_w2")
        w2a, w2b = tensors.get("lokr_w2_a"), tensors.get("lokr_w2_b")
        if (w1 is None and (w1a is None or w1b is None)) or (w2 is None and (w2a is None or w2b is None)):
            raise LayerFormatError("a LoKr layer without both of its halves (lokr_w1 or w1_a/b, lokr_w2 or w2_a/b)")
        rank = w1a.shape[1] if w1a is not None else w2a.shape[1] if w2a is not None else 0
        # lycoris.functional.lokr divides gamma by the rank itself; full halves on both sides
        # are unscaled whatever the file says (gamma / gamma).
        gamma = float(alpha) if alpha and rank else float(rank or 1)
        return LayerPatch("LoKr", (w1, w1a, w1b, w2, w2a, w2b, tensors.get("lokr_t2")), gamma, dora)
    if down is not None or up is not None:
        if down is None or up is None:
            raise LayerFormatError("a LoRA layer with a down but no up matrix (or the reverse)")
        mid = tensors.get("lora_mid.weight")
        rank = down.shape[0]
        algorithm = "LoCon" if mid is not None or down.dim() > 2 and down.shape[2:].numel() > 1 else "LoRA"
        return LayerPatch(algorithm, (down, up, mid), _scale(alpha, rank), dora)
    if "diff" in tensors:
        return LayerPatch("full", (tensors["diff"],), 1.0, dora)
    raise LayerFormatError(f"no weights of a known format (it has {', '.join(sorted(tensors))})")


def _scale(alpha: float | None, rank: int) -> float:
    return 1.0 if not alpha else float(alpha) / rank
