"""What earlier runs found out about each LoRA file, so that a restart does not read them all again.

Checking a LoRA reads the whole file: its hash (A1111's, over the tensors) and the check that
every layer fits this model. A full-size SDXL LoRA took 0.87 s that way on two cores with the
file already in memory (`python bench/lora_startup.py`), and a user's folders hold hundreds:
minutes before the first image, at every start. The verdicts (loaded with hash and format, or
rejected with the reason) are kept in `<root>/.sdxld/lora-checks/<fingerprint>.json`, each
with the file's signature (modification time, size, inode), and are reused while the file keeps
its signature. The signature is what the library already trusts while running (a file is
re-read when it is chosen only if its signature is unchanged), so a remembered verdict is the
one a new check would give.

The fingerprint names what else a verdict depends on: the shapes of every weight of the model's
UNet and text encoders, the source of the code that checks (lora_files, lora_formats, loras: not
lora_merge, whose changes do not alter a verdict) and the versions of the libraries it calls. Another model, or another sdxld, reads its own file; hosts
sharing a root with different models do not overwrite each other's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

REMEMBERED = ("status", "reason", "hash", "format")


def fingerprint(pipe) -> str:
    """What LoRA verdicts depend on besides the file: the model's weight shapes and the checking code."""
    import diffusers
    import safetensors

    from . import lora_files, lora_formats

    digest = hashlib.sha256()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        for name, parameter in module.named_parameters() if module is not None else ():
            digest.update(f"{component}.{name}:{tuple(parameter.shape)}\n".encode())
    for source in (lora_files, lora_formats):
        digest.update(Path(source.__file__).read_bytes())
    try:
        from importlib.metadata import version

        lycoris = version("lycoris-lora")
    except Exception:  # noqa: BLE001 - not installed: its formats are refused, and that is a verdict too
        lycoris = "none"
    digest.update(f"diffusers {diffusers.__version__} safetensors {safetensors.__version__} lycoris {lycoris}".encode())
    return digest.hexdigest()[:16]


class LoraMemory:
    """The remembered verdicts of one model's LoRA checks (nothing is kept when `path` is None)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._verdicts: dict[str, dict] = self._read() if path else {}
        self._changed = False

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            verdicts = data["files"]
            if not isinstance(verdicts, dict):
                raise TypeError("files is not a mapping")
            return verdicts
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError) as err:
            log.warning("%s cannot be read (%s); every LoRA is checked again", self.path, err)
            return {}

    def recall(self, key: str, signature: tuple) -> dict | None:
        """The verdict on this file if it was checked with this signature, else None."""
        verdict = self._verdicts.get(key)
        if not isinstance(verdict, dict) or verdict.get("signature") != list(signature):
            return None
        if verdict.get("status") not in ("loaded", "rejected") or not all(isinstance(verdict.get(f), str) for f in REMEMBERED):
            return None
        return {field: verdict[field] for field in REMEMBERED}

    def learn(self, key: str, signature: tuple, **verdict: str) -> None:
        self._verdicts[key] = {"signature": list(signature), **verdict}
        self._changed = True

    def keep_only(self, keys: set[str]) -> None:
        """Forget the files that left the folders."""
        gone = set(self._verdicts) - keys
        for key in gone:
            del self._verdicts[key]
        self._changed |= bool(gone)

    def save(self) -> None:
        if not self.path or not self._changed:
            return
        from .store import write_json

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {"files": self._verdicts})
            self._changed = False
        except OSError as err:
            # Not remembering only costs the next start its time; this run goes on.
            log.warning("cannot save the LoRA checks to %s (%s); the next start checks every LoRA again", self.path, err)
