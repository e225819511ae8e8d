"""Hostile inputs against one real `sdxld run --demo` process.

Everything a user (or another program) might drop into sdxld's folders, all at once: broken and
crafted images in the inbox, broken LoRAs and trigger files, a LoRA replaced while in use, prompt
files and config edits that make no sense, upscaler weights carrying a pickle payload. One daemon
takes all of it (starting one per case would cost minutes); each case is then its own test, which
checks (a) the message names the file and the problem, (b) the file went where it belongs, and
(c) the daemon went on generating afterwards.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from support.daemons import DaemonProcess, files, records, set_config, wait_for
from support.helpers import run_sdxld
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdxld.init import init_root
from sdxld.tiny import write_sd15_shaped_lora, write_tiny_lora



def png_bomb(path: Path) -> None:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def crafted(source: Path, target: Path, change=None, chunk: str | None = None, size=None) -> None:
    """A stage-1 image saved under another name with its embedded record changed."""
    with Image.open(source) as image:
        record = json.loads(image.text["sdxld"])
        pixels = image.convert("RGB")
    if change:
        change(record)
    info = PngInfo()
    info.add_text("sdxld", chunk if chunk is not None else json.dumps(record))
    (pixels.resize(size) if size else pixels).save(target, pnginfo=info)


class PicklePayload:
    """Unpickling this would create MARKER: proof that a .pth payload ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


# name in inbox/approved -> what the .error.txt must say
FAILING = {
    "not_an_image.png": "is not an image",
    "truncated.png": "truncated or corrupt",
    "empty.png": "empty (0 bytes)",
    "folder.png": "is a folder",
    "link.png": "symbolic link",
    "wrong_size.png": "size",
    "bomb.png": "refused before decoding",
    "no_record.png": "has no record",
    "chunk_not_json.png": "invalid JSON",
    "chunk_wrong_types.png": "steps",
    "steps_1e9.png": "'steps' 1000000000 is outside 1..1000",
    "width_1e6.png": "'width' 1000000 is outside 64..8192",
    "lora_strength_7.png": "strength 7",
    "tag_traversal.png": "is not an sdxld tag",
    "lora_name_traversal.png": "is not a plain file name",
}
SUCCEEDING = ["ünïcödé name with spaces.png", "twice_a.png", "twice_b.png"]
LORA_REJECTIONS = {
    "random_bytes": "not a safetensors file",
    "not_a_lora": "not a LoRA",
    "sd15": "another architecture",
    "half_copied": "truncated",
}


@dataclass
class Run:
    root: Path
    log: str = ""
    marker: Path | None = None
    checkpoints: dict[str, int] = field(default_factory=dict)
    stage1_after_all: int = 0
    source_tag: str = ""
    beside_root: list = field(default_factory=list)
    beside_root_after: list = field(default_factory=list)

    def reason(self, name: str) -> str:
        return (self.root / "inbox" / "failed" / f"{name}.error.txt").read_text()


def stage1_count(root: Path) -> int:
    return len(files(root / "outputs" / "stage1", "*.png"))


def more_stage1(daemon, root: Path, what: str, count: int = 2, timeout: float = 90) -> int:
    start = stage1_count(root)
    wait_for(lambda: stage1_count(root) >= start + count or daemon.process.poll() is not None, timeout, what=what)
    assert daemon.process.poll() is None, f"the daemon died after {what}:\n{daemon.log[-3000:]}"
    return stage1_count(root)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_cache):
    root = init_root(tmp_path_factory.mktemp("hostile")).root
    loras = {kind: root / "loras" / kind for kind in ("character", "style")}
    result = run_sdxld("generate", "--demo", "--stage1", "--count", "2", "--seed", "900", cwd=root)
    assert result.returncode == 0, result.stderr
    source, other = files(root / "outputs" / "stage1", "*.png")
    run = Run(root, source_tag=source.name.split("_stage1_")[0])

    # LoRAs: four broken files, one good LoRA per kind with usable, binary, huge or no trigger file.
    (loras["style"] / "random_bytes.safetensors").write_bytes(np.random.default_rng(0).bytes(5000))
    from safetensors.torch import save_file
    import torch

    save_file({"model.diffusion_model.out.weight": torch.zeros(4, 4)}, str(loras["style"] / "not_a_lora.safetensors"))
    write_sd15_shaped_lora(loras["style"] / "sd15.safetensors")
    good = write_tiny_lora(loras["character"] / "replaced_later.safetensors", seed=1, scale=0.2)
    (loras["character"] / "half_copied.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    write_tiny_lora(loras["character"] / "steady.safetensors", seed=2, scale=0.2)
    (loras["character"] / "steady.txt").write_bytes(b"\x00\xffbinary trigger")
    write_tiny_lora(loras["style"] / "inked.safetensors", seed=3, scale=0.2)
    (loras["style"] / "inked.txt").write_text("ink, " * 30_000)

    # Upscaler weights that would run code if unpickled.
    run.marker = root / "PAYLOAD_RAN"
    PicklePayload.marker = str(run.marker)
    (root / "weights").mkdir(exist_ok=True)
    with open(root / "weights" / "payload.pth", "wb") as handle:
        pickle.dump({"params_ema": PicklePayload()}, handle)
    set_config(root, upscaler={"weights": "weights/payload.pth"}, upscale={"unknown_images": "fail"})

    run.beside_root = sorted(p.name for p in root.parent.iterdir())
    daemon = DaemonProcess(root)
    try:
        wait_for(lambda: stage1_count(root) >= 3, 120, what="the first stage-1 image")

        approved = root / "inbox" / "approved"
        approved.mkdir(parents=True, exist_ok=True)
        staging = root / "staging"
        staging.mkdir()
        (staging / "not_an_image.png").write_text("hello, I am text")
        (staging / "truncated.png").write_bytes(source.read_bytes()[:3000])
        (staging / "empty.png").write_bytes(b"")
        (staging / "folder.png").mkdir()
        (staging / "link.png").symlink_to(other)
        crafted(source, staging / "wrong_size.png", size=(136, 224))
        png_bomb(staging / "bomb.png")
        Image.new("RGB", (128, 224), "red").save(staging / "no_record.png")
        crafted(source, staging / "chunk_not_json.png", chunk="{not json")
        crafted(source, staging / "chunk_wrong_types.png", lambda r: r.update(steps="many"))
        crafted(source, staging / "steps_1e9.png", lambda r: r.update(steps=10**9))
        crafted(source, staging / "width_1e6.png", lambda r: r.update(width=10**6))
        crafted(source, staging / "lora_strength_7.png",
                lambda r: r.update(loras=[{"kind": "style", "name": "inked", "file": "inked.safetensors", "strength": 7, "hash": "", "triggers": ""}]))
        crafted(source, staging / "tag_traversal.png", lambda r: r.update(tag="../../../escaped"))
        crafted(source, staging / "lora_name_traversal.png",
                lambda r: r.update(loras=[{"kind": "style", "name": "../../../etc/passwd", "file": "x", "strength": 1, "hash": "", "triggers": ""}]))
        shutil.copy(other, staging / "ünïcödé name with spaces.png")
        shutil.copy(source, staging / "twice_a.png")
        shutil.copy(source, staging / "twice_b.png")
        for path in staging.iterdir():
            os.rename(path, approved / path.name)  # all at once, as a file manager's move does

        def inbox_settled():
            busy = [p for p in approved.iterdir()] + [p for p in (root / "inbox" / "processing").glob("*")]
            return not busy
        wait_for(inbox_settled, 240, interval=0.5, what="every approved file to be handled")
        run.checkpoints["inbox"] = more_stage1(daemon, root, "the hostile inbox")

        # A LoRA in rotation replaced by garbage while the daemon runs.
        (loras["character"] / "replaced_later.safetensors").write_bytes(b"\x00" * 4096)
        run.checkpoints["lora replaced"] = more_stage1(daemon, root, "a LoRA replaced with garbage", count=3)

        # Prompt files: empty, deleted, binary, enormous.
        prompts = root / "prompts"
        (prompts / "prompt_options.txt").write_text("")
        (prompts / "manual_prompt.txt").unlink()
        (prompts / "manual_negative_prompt.txt").write_bytes(b"\x00\x01\x02\xff" * 100)
        run.checkpoints["prompts broken"] = more_stage1(daemon, root, "broken prompt files")
        (prompts / "prompt_options.txt").write_text("word, " * 400_000)
        run.checkpoints["prompts enormous"] = more_stage1(daemon, root, "an enormous options file")

        # Config: invalid YAML, valid YAML with wrong types, then the file deleted.
        config = root / "config.yaml"
        good_config = config.read_text()
        config.write_text(good_config + "\n  : [unclosed\n")
        run.checkpoints["config invalid yaml"] = more_stage1(daemon, root, "invalid YAML")
        config.write_text(good_config.replace("steps: 30", "steps: thirty"))
        run.checkpoints["config wrong types"] = more_stage1(daemon, root, "a wrong type")
        config.unlink()
        run.checkpoints["config deleted"] = more_stage1(daemon, root, "config.yaml deleted")
        run.stage1_after_all = stage1_count(root)
        assert daemon.terminate(30) == 0
    finally:
        daemon.close()
    run.log = daemon.log
    run.beside_root_after = sorted(p.name for p in root.parent.iterdir())
    return run


@pytest.mark.parametrize("name", sorted(FAILING))
def test_a_bad_approved_file_goes_to_failed_with_a_reason_naming_it(hostile, name):
    text = hostile.reason(name)
    assert text.startswith(f"{name}: "), text
    assert FAILING[name] in text, text
    assert "Move the file back into inbox/approved/" in text
    assert (hostile.root / "inbox" / "failed" / name).exists() or (hostile.root / "inbox" / "failed" / name).is_symlink()
    assert f"approved {name} failed" in hostile.log


def test_the_symlink_was_moved_aside_not_followed(hostile):
    link = hostile.root / "inbox" / "failed" / "link.png"
    assert link.is_symlink()
    target = Path(os.readlink(link))
    assert target.exists(), "the file the link pointed to is untouched"


def test_nothing_was_written_outside_the_root_or_under_an_escaped_name(hostile):
    assert hostile.beside_root_after == hostile.beside_root, "the root's parent folder changed"
    assert not list(hostile.root.parent.glob("escaped*"))
    assert not list(hostile.root.rglob("*escaped*"))
    assert not list(hostile.root.rglob("*passwd*"))


def test_a_unicode_name_with_spaces_is_upscaled(hostile):
    done = hostile.root / "inbox" / "done"
    assert (done / "ünïcödé name with spaces.png").exists()


def test_the_same_image_dropped_twice_gets_one_final(hostile):
    finals = files(hostile.root / "outputs" / "final", f"{hostile.source_tag}_final_*.png")
    assert len(finals) == 1
    done = hostile.root / "inbox" / "done"
    assert (done / "twice_a.png").exists() and (done / "twice_b.png").exists()
    assert "a final already exists" in hostile.log


def test_every_approved_file_ended_in_done_or_failed(hostile):
    done = {p.name for p in (hostile.root / "inbox" / "done").iterdir()}
    failed = {p.name for p in (hostile.root / "inbox" / "failed").iterdir() if not p.name.endswith(".error.txt")}
    assert done == set(SUCCEEDING)
    assert failed == set(FAILING)
    assert not list((hostile.root / "inbox" / "approved").iterdir())


@pytest.mark.parametrize("name", sorted(LORA_REJECTIONS))
def test_a_broken_lora_is_rejected_with_its_reason_and_never_used(hostile, name):
    lines = [line for line in hostile.log.splitlines() if f"{name}.safetensors rejected" in line]
    assert lines and LORA_REJECTIONS[name] in lines[0], lines
    used = {u["name"] for r in records(hostile.root) for u in r.get("loras", [])}
    assert name not in used


def test_good_loras_with_binary_or_huge_trigger_files_still_rotate(hostile):
    used = {u["name"]: u for r in records(hostile.root) for u in r.get("loras", [])}
    assert {"steady", "inked"} <= set(used)
    assert used["steady"]["triggers"] == "" and used["inked"]["triggers"] == ""
    assert "trigger file" in hostile.log and "is binary" in hostile.log or "not UTF-8" in hostile.log
    assert "inked.txt is" in hostile.log and "ignoring it" in hostile.log


def test_a_lora_replaced_with_garbage_while_running_leaves_the_rotation(hostile):
    assert "replaced_later.safetensors rejected" in hostile.log
    assert hostile.checkpoints["lora replaced"] >= hostile.checkpoints["inbox"] + 3
    late = sorted(records(hostile.root), key=lambda r: r["tag"])[-3:]
    assert all(u["name"] != "replaced_later" for r in late for u in r.get("loras", []))


def test_upscaler_weights_with_a_pickle_payload_never_run_and_lanczos_is_used(hostile):
    assert not hostile.marker.exists(), "the pickle payload ran"
    finals = files(hostile.root / "outputs" / "final", "*.png")
    assert finals
    with Image.open(finals[0]) as image:
        stages = json.loads(image.text["sdxld"])["stages"]
    assert stages["stage3"]["upscaler"] == "lanczos"
    assert "payload.pth" in hostile.log


@pytest.mark.parametrize("edit, words", [
    ("prompts broken", ["prompt_options.txt", "manual_prompt.txt", "manual_negative_prompt.txt"]),
    ("prompts enormous", ["prompt_options.txt"]),
])
def test_broken_prompt_files_fall_back_with_a_warning_and_generation_goes_on(hostile, edit, words):
    previous = list(hostile.checkpoints)[list(hostile.checkpoints).index(edit) - 1]
    assert hostile.checkpoints[edit] >= hostile.checkpoints[previous] + 2
    for word in words:
        assert word in hostile.log


@pytest.mark.parametrize("edit, words", [
    ("config invalid yaml", "invalid YAML"),
    ("config wrong types", "generation.t2i.steps"),
    ("config deleted", "config.yaml"),
])
def test_a_broken_config_edit_keeps_the_last_good_config(hostile, edit, words):
    previous = list(hostile.checkpoints)[list(hostile.checkpoints).index(edit) - 1]
    assert hostile.checkpoints[edit] >= hostile.checkpoints[previous] + 2
    assert words in hostile.log
    assert "keeping the last good config" in hostile.log


def test_the_daemon_was_still_generating_after_everything(hostile):
    assert hostile.stage1_after_all >= hostile.checkpoints["inbox"] + 10
    assert "Traceback" not in hostile.log or "upscale" in hostile.log
