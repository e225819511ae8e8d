"""Images from other tools: A1111/Forge PNGs and JPEG/WebP (EXIF), captioned and bare images."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from support.daemons import DaemonProcess, set_config, wait_for

from sdxld.foreign import Defaults, decode_user_comment, embedded_parameters, record_for
from sdxld.init import init_root
from sdxld.records import LoraUse, Record, read_png_record

A1111_TEXT = (
    "1girl, (smile:1.2), city street <lora:kuro:0.7>\n"
    "Negative prompt: lowres, bad hands\n"
    "Steps: 24, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 832x1216, "
    'Model: illustriousXL, Lora hashes: "kuro: 0123456789ab"'
)
DEFAULTS = Defaults("manual prompt text", "manual negative", "UniPC", 8, 7.0, {"base": "tiny"}, seed=99, syntax="a1111")


class NoLoras:
    def available(self, kind):
        return []


class FolderEntry:
    def __init__(self, kind, name, hash):
        self.kind, self.name, self.hash, self.triggers = kind, name, hash, ""
        self.path = Path(f"loras/{kind}/{name}.safetensors")


class Loras:
    """What the LoRA library answers about loaded files, for these entries."""

    def __init__(self, *entries):
        self.entries = entries

    def available(self, kind):
        return [e for e in self.entries if e.kind == kind]


def a1111_png(path, text=A1111_TEXT, size=(120, 200)):
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", size, "teal").save(path, pnginfo=info)
    return path


def exif_image(path, text=A1111_TEXT, size=(120, 200), little_endian=False):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-le" if little_endian else "utf-16-be")
    Image.new("RGB", size, "purple").save(path, exif=exif)
    return path


def test_a1111_parameters_give_prompt_negative_seed_steps_cfg_and_sampler(tmp_path):
    record = record_for(a1111_png(tmp_path / "a.png"), (120, 200), None, DEFAULTS, NoLoras(), "fail")
    assert record.prompt == "1girl, (smile:1.2), city street <lora:kuro:0.7>"  # as written
    assert (record.negative, record.seed, record.steps, record.cfg) == ("lowres, bad hands", 1234, 24, 6.5)
    assert record.sampler == "DPM++ 2M Karras"  # Forge's sampler + schedule type, as sdxld names it
    assert (record.width, record.height) == (120, 200)  # the image's own size, not the parameters'
    assert record.prompt_syntax == "a1111"
    assert record.origin["prompt"] == record.origin["seed"] == "A1111 parameters (PNG text)"
    assert "832x1216" in record.origin["size"]
    assert "kuro" in record.origin["loras"] and "not found" in record.origin["loras"]
    assert record.model["made_with"] == "illustriousXL"


@pytest.mark.parametrize("suffix", ["jpg", "webp"])
@pytest.mark.parametrize("little_endian", [False, True])
def test_jpeg_and_webp_carry_the_parameters_in_exif(tmp_path, suffix, little_endian):
    path = exif_image(tmp_path / f"a.{suffix}", little_endian=little_endian)
    text, where = embedded_parameters(path)
    assert text == A1111_TEXT and where == f"A1111 parameters (EXIF UserComment of the {suffix.upper()})"


def test_user_comment_encodings():
    assert decode_user_comment(b"ASCII\x00\x00\x00hello") == "hello"
    assert decode_user_comment(b"UNICODE\x00" + "héllo".encode("utf-16-be")) == "héllo"
    assert decode_user_comment(b"\x00" * 8) is None


def test_a_caption_beside_the_image_is_its_prompt(tmp_path):
    image = tmp_path / "b.png"
    Image.new("RGB", (100, 100)).save(image)
    (tmp_path / "b.txt").write_text("a cat\non a mat\n")
    record = record_for(image, (100, 100), None, DEFAULTS, NoLoras(), "fail")
    assert record.prompt == "a cat on a mat" and record.origin["prompt"] == "the caption b.txt"
    assert record.negative == "manual negative" and record.seed == 99 and record.origin["seed"] == "drawn fresh by sdxld"


def test_a_bare_image_takes_the_manual_prompt_or_fails_as_configured(tmp_path):
    image = tmp_path / "c.png"
    Image.new("RGB", (100, 100)).save(image)
    assert record_for(image, (100, 100), None, DEFAULTS, NoLoras(), "fail") is None
    record = record_for(image, (100, 100), None, DEFAULTS, NoLoras(), "manual_prompt")
    assert (record.prompt, record.origin["prompt"]) == ("manual prompt text", "the manual prompt file")


def test_sdxld_parameters_read_back_give_the_same_settings(tmp_path):
    """An sdxld PNG stripped of its sdxld chunk still upscales with its own prompt, seed, settings
    and LoRAs: the rotated pair from the tag line sdxld adds, the tagged one from the prompt."""
    folders = Loras(FolderEntry("character", "alice", "0123456789ab"), FolderEntry("style", "ink", "ba9876543210"),
                    FolderEntry("extra", "glow", "00ff00ff00ff"))
    uses = [LoraUse("character", "alice", "alice.safetensors", 1.0, "0123456789ab"),
            LoraUse("style", "ink", "ink.safetensors", 0.85, "ba9876543210"),
            LoraUse("extra", "glow", "glow.safetensors", 0.6, "00ff00ff00ff", via="tag")]
    original = Record(tag="20260101_000000", prompt=r"alice_\(demo\), (smile:1.2), 1girl, <lora:glow:0.6>",
                      negative="lowres", seed=424242, width=768, height=1344, sampler="Euler a", steps=30, cfg=5.5,
                      prompt_syntax="a1111", loras=uses)
    path = a1111_png(tmp_path / "stripped.png", original.a1111_parameters(), size=(768, 1344))
    back = record_for(path, (768, 1344), None, DEFAULTS, folders, "fail")
    for field in ("prompt", "negative", "seed", "steps", "cfg", "width", "height", "sampler"):
        assert getattr(back, field) == getattr(original, field), field
    assert [(u.kind, u.name, u.strength, u.via) for u in back.loras] == [(u.kind, u.name, u.strength, u.via) for u in uses]


def test_a_real_daemon_upscales_images_from_other_tools_and_says_where_each_field_came_from(tmp_path):
    root = init_root(tmp_path / "root", demo=True).root
    set_config(root, daemon={"max_pending": 1})
    approved = root / "inbox" / "approved"
    a1111_png(approved / "forge.png")
    exif_image(approved / "phone.jpg", A1111_TEXT.replace("<lora:kuro:0.7>", ""), size=(96, 160))
    Image.new("RGB", (104, 136), "olive").save(approved / "captioned.webp")
    (approved / "captioned.txt").write_text("a lighthouse at dusk")
    Image.new("RGB", (100, 100), "gray").save(approved / "bare.png")
    daemon = DaemonProcess(root)
    try:
        done = root / "inbox" / "done"
        wanted = {"forge.png", "phone.jpg", "captioned.webp", "bare.png"}
        wait_for(lambda: wanted <= {p.name for p in done.iterdir()} if done.exists() else False, 240,
                 what="four foreign images in done/")
    finally:
        daemon.terminate()
        daemon.close()
    failed = root / "inbox" / "failed"
    assert not failed.exists() or not any(failed.iterdir())
    finals = {}
    for path in (root / "outputs" / "final").glob("*.png"):
        record = read_png_record(path)
        finals[record.origin.get("prompt", "")] = (record, Image.open(path).size)
    forge, size = finals["A1111 parameters (PNG text)"]
    assert size == (480, 800)  # 120x200 x 4
    assert forge.seed == 1234 and forge.loras[0].name == "kuro" and forge.loras[0].strength == 0.7
    assert forge.origin["loras"] == "A1111 parameters (PNG text)"
    phone, size = finals["A1111 parameters (EXIF UserComment of the JPG)"]
    assert size == (384, 640) and phone.seed == 1234 and phone.loras == []
    captioned, size = finals["the caption captioned.txt"]
    assert captioned.prompt == "a lighthouse at dusk" and size == (416, 544)
    bare, size = finals["the manual prompt file"]
    assert size == (400, 400) and bare.origin["seed"] == "drawn fresh by sdxld"
    assert (done / "captioned.txt").exists()  # the caption travels with its image
