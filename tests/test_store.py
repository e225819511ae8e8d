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
