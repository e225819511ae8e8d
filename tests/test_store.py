"""Tags, names and atomic writes: nothing half-written is ever visible, no two images share a tag."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdxld import store


def test_a_thousand_tags_in_a_tight_loop_are_unique_and_sorted():
    tags = [store.new_tag() for _ in range(1000)]
    assert len(set(tags)) == 1000
    assert tags == sorted(tags)


def test_tags_keep_the_seeds_timestamp_form():
    tag = store.new_tag()
    assert store.tag_of(tag + ".json") == tag
    assert tag[:8].isdigit() and tag[8] == "_" and tag[9:15].isdigit()
    # The seed's own tags still parse, so its outputs can be upscaled.
    assert store.tag_of("20260207_143022_stage1_768x1344.png") == "20260207_143022"


def test_tags_from_concurrent_processes_never_collide():
    tests = Path(__file__).resolve().parent
    procs = [subprocess.Popen([sys.executable, "-m", "support.print_tags", "500"], cwd=tests, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    tags = [line for p in procs for line in p.communicate()[0].split()]
    assert len(tags) == 1500 and len(set(tags)) == 1500


def test_names_follow_the_seed():
    assert store.image_name("20260207_143022", "stage1", 768, 1344) == "20260207_143022_stage1_768x1344.png"
    parsed = store.parse_image_name("20261126_080102_000001_1f_final_3072x5376.png")
    assert parsed == {"tag": "20261126_080102_000001_1f", "kind": "final", "width": 3072, "height": 5376}
    assert store.parse_image_name("holiday.png") is None


def test_atomic_write_leaves_only_the_target(tmp_path):
    target = tmp_path / "out" / "image.png"
    store.atomic_write(target, b"complete")
    assert target.read_bytes() == b"complete"
    assert sorted(p.name for p in target.parent.iterdir()) == ["image.png"]


def test_failed_write_leaves_no_target_and_no_temp(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.atomic_write(tmp_path / "image.png", b"x" * 10_000)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    store.atomic_write(target, b"old")

    def crash(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_written_files_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = store.atomic_write(tmp_path / "f.json", b"{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


def test_temporary_names_are_recognisable():
    assert store.is_temporary(".image.png.123.abc.tmp")
    assert not store.is_temporary("image.png")


def test_the_background_writer_writes_in_order_and_reports_failures_to_the_caller(tmp_path):
    writer = store.BackgroundWriter(max_pending=2)
    for i in range(5):
        writer.submit(store.atomic_write, tmp_path / f"{i}.bin", bytes([i]) * 1000)
    writer.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.bin" for i in range(5)]

    def fail():
        raise OSError(errno.ENOSPC, "No space left on device")

    writer.submit(fail)
    with pytest.raises(OSError, match="No space left"):
        writer.flush()
    writer.flush()  # reported once, then the writer goes on
    writer.submit(store.atomic_write, tmp_path / "after.bin", b"x")
    writer.flush()
    assert (tmp_path / "after.bin").exists()


# --- shared roots: several hosts, network file systems ----------------------------------------

def test_tags_of_two_hosts_differ_at_the_same_microsecond_and_pid(monkeypatch):
    from sdxld import owners

    made = []
    for host in ("gpu-box-1", "gpu-box-2"):
        monkeypatch.setattr(owners, "host", lambda host=host: host)
        store.host_mark.cache_clear()
        monkeypatch.setattr(store.time, "time_ns", lambda: 1_764_200_000_123_456_000)
        made.append(store.TagClock().next_tag())
    store.host_mark.cache_clear()
    assert made[0] != made[1] and made[0][:-4] == made[1][:-4]
    assert all(store.tag_of(f"{tag}_stage1_64x64.png") == tag for tag in made)


def test_publishing_never_replaces_an_image(tmp_path):
    existing = tmp_path / "20261127_100000_000001_1a2b_stage1_64x64.png"
    existing.write_bytes(b"the first image")
    with pytest.raises(FileExistsError, match="never replaces"):
        store.atomic_write(existing, b"another image", overwrite=False)
    assert existing.read_bytes() == b"the first image"
    assert [p.name for p in tmp_path.iterdir()] == [existing.name], "no temporary left behind"
    store.atomic_write(tmp_path / "new.png", b"new", overwrite=False)
    assert (tmp_path / "new.png").read_bytes() == b"new"


def test_a_link_whose_reply_was_lost_counts_as_published(tmp_path, monkeypatch):
    """NFS retransmits a LINK whose reply was lost; the retry finds the name taken (by our own
    link) and reports EEXIST."""
    real_link = os.link

    def link_then_lose_the_reply(source, target):
        real_link(source, target)
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(store.os, "link", link_then_lose_the_reply)
    path = store.atomic_write(tmp_path / "final.png", b"final", overwrite=False)
    assert path.read_bytes() == b"final" and [p.name for p in tmp_path.iterdir()] == ["final.png"]


def test_without_hard_links_publishing_still_refuses_a_taken_name(tmp_path, monkeypatch):
    def no_links(source, target):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(store.os, "link", no_links)
    store.atomic_write(tmp_path / "a.png", b"a", overwrite=False)
    with pytest.raises(FileExistsError):
        store.atomic_write(tmp_path / "a.png", b"b", overwrite=False)
    assert (tmp_path / "a.png").read_bytes() == b"a" and len(list(tmp_path.iterdir())) == 1


def test_a_rename_reported_as_enoent_after_it_happened_is_a_move(tmp_path, monkeypatch):
    source, target = tmp_path / "a.png", tmp_path / "claimed__a.png"
    source.write_bytes(b"x")
    real_rename = os.rename

    def rename_then_lose_the_reply(a, b):
        real_rename(a, b)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(store.os, "rename", rename_then_lose_the_reply)
    assert store.move(source, target) is True
    assert store.move(tmp_path / "gone.png", tmp_path / "claimed__gone.png") is False


def test_a_claim_whose_rename_reply_was_lost_is_still_ours(root, monkeypatch):
    """The inbox's claim, done and failed moves go through store.move: an ENOENT after the
    rename happened neither loses the image nor leaves it orphaned in processing/."""
    from sdxld.config import load
    from sdxld.inbox import Inbox
    from sdxld.layout import Layout

    layout = Layout.from_config(load(root / "config.yaml"))
    inbox = Inbox(layout)
    inbox.ensure_dirs()
    (layout.approved / "a.png").write_bytes(b"png")
    real_rename = os.rename

    def rename_then_lose_the_reply(a, b):
        real_rename(a, b)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(store.os, "rename", rename_then_lose_the_reply)
    claim = inbox.claim(layout.approved / "a.png")
    assert claim is not None and claim.path.exists()
    done = inbox.done(claim)
    assert done == layout.done / "a.png" and done.read_bytes() == b"png"
    assert list(layout.processing.iterdir()) == [] and list(layout.approved.iterdir()) == []
