"""Random-weight ESRGAN (RRDBNet) files in the layouts users download them in."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def rrdb_state(num_blocks: int = 2, num_filters: int = 16, scale: int = 4, seed: int = 0) -> dict:
    """An old-arch ESRGAN state dict (model.0 ... model.N), the layout spandrel's RRDBNet uses."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=num_filters, num_blocks=num_blocks, scale=scale)
    # Default init is nearly the identity: push the weights so the network visibly does something.
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return {k: v.clone() for k, v in net.state_dict().items()}


def to_new_arch(old: dict, num_blocks: int) -> dict:
    """Rename old-arch keys to the Real-ESRGAN (BasicSR) names: conv_first, body.N.rdbM..., conv_up1."""
    upconvs = sorted({int(m[1]) for k in old if (m := re.fullmatch(r"model\.(\d+)\.weight", k)) and int(m[1]) >= 3})
    *ups, hr, last = upconvs
    names = {0: "conv_first", hr: "conv_hr", last: "conv_last"} | {n: f"conv_up{i + 1}" for i, n in enumerate(ups)}
    new = {}
    for key, value in old.items():
        m = re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key)
        if m:
            new[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
            continue
        m = re.fullmatch(rf"model\.1\.sub\.{num_blocks}\.(weight|bias)", key)
        if m:
            new[f"conv_body.{m[1]}"] = value
            continue
        m = re.fullmatch(r"model\.(\d+)\.(weight|bias)", key)
        new[f"{names[int(m[1])]}.{m[2]}"] = value
    return new


def write_esrgan(path: Path, layout: str = "old", scale: int = 4, num_blocks: int = 2, seed: int = 0) -> Path:
    state = rrdb_state(num_blocks=num_blocks, scale=scale, seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "old":
        torch.save(state, path)
    elif layout == "new":
        # How Real-ESRGAN releases ship: new names under "params_ema".
        torch.save({"params_ema": to_new_arch(state, num_blocks)}, path)
    elif layout == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        raise ValueError(layout)
    return path
