"""`sdxld upscale` and the inbox: approved -> claim -> done/ or failed/ with a specific reason."""

import shutil
import threading

import pytest
from support.daemons import set_config
from support.helpers import run_sdxld
from PIL import Image

from sdxld.inbox import Inbox, InboxError
from sdxld.jobs import open_image
from sdxld.records import RecordLookupError, find_record
from sdxld.layout import Layout


def approved(root):
    folder = root / "inbox" / "approved"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def finals(root):
    folder = root / "outputs" / "final"
    return sorted(folder.glob("*.png")) if folder.exists() else []


def test_an_approved_image_gets_its_final_and_moves_to_done(root, make_stage1):
    [stage1] = make_stage1()
    shutil.move(stage1, approved(root) / stage1.name)
    result = run_sdxld("upscale", "--demo", cwd=root)
    assert result.returncode == 0, result.stderr
    tag = stage1.name.split("_stage1_")[0]
    assert [p.name for p in finals(root)] == [f"{tag}_final_512x896.png"]
    assert (root / "inbox" / "done" / stage1.name).exists()
    assert list(approved(root).iterdir()) == []
    assert list((root / "inbox" / "processing").iterdir()) == []
    assert result.stdout.strip() == str(finals(root)[0])


def test_bad_files_land_in_failed_with_a_specific_reason_and_the_rest_go_on(root, make_stage1):
    set_config(root, upscale={"unknown_images": "fail"})  # else a bare image is upscaled with the manual prompt
    good, renamed_source = make_stage1(count=2)
    inbox = approved(root)
    shutil.copy(good, inbox / good.name)
    # Renamed, no JSON anywhere to match its name: found through the PNG's own sdxld chunk.
    shutil.copy(renamed_source, inbox / "my favourite.png")
    Image.new("RGB", (128, 224), "red").save(inbox / "no_record.png")
    (inbox / "not_an_image.png").write_text("hello, I am text")
    (inbox / "truncated.png").write_bytes(good.read_bytes()[:3000])
    (inbox / "empty.png").write_bytes(b"")

    result = run_sdxld("upscale", "--demo", cwd=root)
    assert result.returncode == 1  # some failed
    failed = root / "inbox" / "failed"
    reasons = {p.name[: -len(".error.txt")]: p.read_text() for p in failed.glob("*.error.txt")}
    assert set(reasons) == {"no_record.png", "not_an_image.png", "truncated.png", "empty.png"}
    assert "has no record" in reasons["no_record.png"] and "sdxld chunk" in reasons["no_record.png"]
    assert "A1111 parameters in the image, a caption no_record.txt" in reasons["no_record.png"]
    assert "upscale.unknown_images: manual_prompt" in reasons["no_record.png"]
    assert "not an image" in reasons["not_an_image.png"]
    assert "truncated or corrupt" in reasons["truncated.png"]
    assert "empty (0 bytes)" in reasons["empty.png"]
    assert all("What to do:" in text for text in reasons.values())
    for name in reasons:
        assert (failed / name).exists(), "the file itself is kept beside its error"
    done = sorted(p.name for p in (root / "inbox" / "done").iterdir())
    assert done == sorted([good.name, "my favourite.png"])
    assert len(finals(root)) == 2


def test_a_record_beside_the_image_is_preferred_and_travels_with_it(root, make_stage1):
    [stage1] = make_stage1()
    tag = stage1.name.split("_stage1_")[0]
    inbox = approved(root)
    shutil.move(stage1, inbox / stage1.name)
    shutil.move(root / "outputs" / "metadata" / f"{tag}.json", inbox / f"{tag}.json")
    result = run_sdxld("upscale", "--demo", cwd=root)
    assert result.returncode == 0, result.stderr
    assert (root / "inbox" / "done" / f"{tag}.json").exists()
    assert len(finals(root)) == 1


def test_an_image_that_already_has_a_final_is_skipped_and_moved_to_done(root, make_stage1):
    [stage1] = make_stage1()
    (root / "inbox" / "done").mkdir(parents=True, exist_ok=True)
    shutil.copy(stage1, root / "inbox" / "done" / stage1.name)  # approved once already...
    tag = stage1.name.split("_stage1_")[0]
    (root / "outputs" / "final").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (256, 448)).save(root / "outputs" / "final" / f"{tag}_final_256x448.png")  # ...and made
    before = finals(root)[0].stat().st_mtime_ns
    shutil.copy(stage1, approved(root) / stage1.name)
    result = run_sdxld("upscale", "--demo", cwd=root)
    assert result.returncode == 0
    assert "skipped" in result.stderr
    assert finals(root)[0].stat().st_mtime_ns == before
    assert sorted(p.name for p in (root / "inbox" / "done").iterdir()) == sorted([stage1.name, stage1.stem + " (2).png"])


def test_upscale_stage1_processes_the_backlog_in_place(root, make_stage1):
    images = make_stage1(count=2)
    (root / "outputs" / "metadata" / (images[1].name.split("_stage1_")[0] + ".json")).unlink()
    result = run_sdxld("upscale", "--demo", "--stage1", cwd=root)
    assert result.returncode == 0, result.stderr
    assert [p.name.split("_final_")[0] for p in finals(root)] == [images[0].name.split("_stage1_")[0]]
    assert all(p.exists() for p in images), "the seed's mode 3 does not move stage-1 images"
    again = run_sdxld("upscale", "--demo", "--stage1", cwd=root)
    assert "nothing to upscale" in again.stderr


def test_upscale_given_files(root, make_stage1):
    [stage1] = make_stage1()
    result = run_sdxld("upscale", "--demo", str(stage1), cwd=root)
    assert result.returncode == 0, result.stderr
    assert len(finals(root)) == 1 and stage1.exists()


# --- the inbox on its own -----------------------------------------------------------------------


def test_only_one_of_many_racing_claims_wins(root):
    from sdxld.config import load

    layout = Layout.from_config(load(root / "config.yaml"))
    path = approved(root) / "image.png"
    Image.new("RGB", (8, 8)).save(path)
    inboxes = [Inbox(layout) for _ in range(8)]
    results = []
    barrier = threading.Barrier(len(inboxes))

    def race(inbox):
        barrier.wait()
        results.append(inbox.claim(path))

    threads = [threading.Thread(target=race, args=(i,)) for i in inboxes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert [p.name for p in (root / "inbox" / "processing").iterdir()] == [winners[0].path.name]


def test_claims_of_dead_processes_are_recovered_and_counted(root):
    from sdxld.config import load

    layout = Layout.from_config(load(root / "config.yaml"))
    inbox = Inbox(layout, max_attempts=2)
    path = approved(root) / "image.png"
    Image.new("RGB", (8, 8)).save(path)
    (approved(root) / "image.json").write_text("{}")

    def die(claim):
        """Make the claim look like it belongs to a process that no longer exists."""
        host, boot, _, start, n, attempt = claim.path.name.split("__")[0].split(".")
        for item in (claim.path, claim.sidecar):
            item.rename(item.with_name(f"{host}.{boot}.999999999.{start}.{n}.{attempt}__{item.name.split('__', 1)[1]}"))

    claim = inbox.claim(path)
    assert claim.sidecar is not None and claim.attempt == 1
    die(claim)
    [recovered] = inbox.recover()
    assert (recovered.name, recovered.attempt) == ("image.png", 2)
    assert recovered.sidecar is not None and recovered.sidecar.exists()
    assert inbox.recover() == [], "a live process's claim is not taken"
    die(recovered)
    assert inbox.recover() == []
    failed = root / "inbox" / "failed"
    assert sorted(p.name for p in failed.iterdir()) == ["image.json", "image.png", "image.png.error.txt"]
    assert "cut short 2 times" in (failed / "image.png.error.txt").read_text()
    assert list((root / "inbox" / "processing").iterdir()) == []


def test_temporary_and_hidden_files_are_never_work(root):
    from sdxld.config import load

    inbox = Inbox(Layout.from_config(load(root / "config.yaml")))
    folder = approved(root)
    for name in (".hidden.png", "x.png.part", "x.png.crdownload", "x.png~", "x.tmp", "record.json", "a.png.error.txt"):
        (folder / name).write_bytes(b"x")
    (folder / "real.png").write_bytes(b"x")
    assert [p.name for p in inbox.pending()] == ["real.png"]


def test_a_png_bomb_is_refused_before_decoding(tmp_path):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(InboxError, match="100000x100000 pixels.*refused before decoding"):
        open_image(tmp_path / "bomb.png")


def test_symlinks_and_folders_are_refused(tmp_path):
    target = tmp_path / "real.png"
    Image.new("RGB", (8, 8)).save(target)
    (tmp_path / "link.png").symlink_to(target)
    with pytest.raises(InboxError, match="symbolic link"):
        open_image(tmp_path / "link.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(InboxError, match="folder"):
        open_image(tmp_path / "folder.png")


def test_an_invalid_embedded_record_is_named(root, tmp_path):
    from PIL.PngImagePlugin import PngInfo

    from sdxld.config import load

    info = PngInfo()
    info.add_text("sdxld", '{"tag": 5}')
    Image.new("RGB", (8, 8)).save(tmp_path / "odd.png", pnginfo=info)
    with pytest.raises(RecordLookupError, match="embedded sdxld record is invalid"):
        find_record(tmp_path / "odd.png", Layout.from_config(load(root / "config.yaml")))


def test_an_embedded_record_with_a_path_in_its_tag_fails_and_writes_nothing_outside(root, make_stage1):
    import json

    from PIL.PngImagePlugin import PngInfo

    [stage1] = make_stage1()
    with Image.open(stage1) as image:
        record = json.loads(image.text["sdxld"])
        pixels = image.convert("RGB")
    record["tag"] = "../../../escaped"
    info = PngInfo()
    info.add_text("sdxld", json.dumps(record))
    pixels.save(approved(root) / "crafted.png", pnginfo=info)
    result = run_sdxld("upscale", "--demo", cwd=root)
    assert result.returncode == 1
    text = (root / "inbox" / "failed" / "crafted.png.error.txt").read_text()
    assert "embedded sdxld record is invalid" in text and "not an sdxld tag" in text
    assert not list(root.parent.glob("escaped*")) and not list(root.rglob("escaped*"))
