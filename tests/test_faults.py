"""Fault injection: the disk refuses a write, a stage raises, the outputs folder disappears."""

import errno
import os
import shutil

from PIL import Image

from sdxld import store
from sdxld.inbox import Inbox


def approve_one(engine, root):
    first = engine.stage1_once(seed=11)
    inbox = Inbox(engine.layout)
    inbox.ensure_dirs()
    target = engine.layout.approved / first.path.name
    shutil.copy(first.path, target)
    return inbox, target, first


def no_temp_files(root):
    return [p for p in root.rglob("*.tmp")] == []


def test_disk_full_while_saving_a_final_loses_nothing_and_succeeds_later(root, make_engine, monkeypatch):
    from sdxld.jobs import run_claimed

    engine = make_engine()
    inbox, target, first = approve_one(engine, root)
    real_write = store.atomic_write

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def disk_full_for_images(path, data, **options):
        if not str(path).endswith(".png"):
            return real_write(path, data, **options)
        # The real write path: the temp file is written, then flushing it to disk fails.
        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", no_space)
            return real_write(path, data, **options)

    monkeypatch.setattr(store, "atomic_write", disk_full_for_images)
    outcome = run_claimed(engine, inbox, inbox.claim(target))
    assert outcome.status == "deferred" and "No space left" in outcome.detail
    assert target.exists(), "the approved image is back where the user put it"
    assert not list(engine.layout.final.glob("*.png"))
    assert no_temp_files(root)

    monkeypatch.setattr(store, "atomic_write", real_write)
    outcome = run_claimed(engine, inbox, inbox.claim(target))
    assert outcome.status == "final" and outcome.final.exists()
    assert (engine.layout.done / target.name).exists()


def test_an_unexpected_error_in_a_stage_sends_the_image_aside_with_the_reason(root, make_engine, monkeypatch):
    from sdxld import engine as engine_module
    from sdxld.jobs import run_claimed

    engine = make_engine()
    inbox, target, _ = approve_one(engine, root)

    def broken_stage2(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine_module, "stage2", broken_stage2)
    outcome = run_claimed(engine, inbox, inbox.claim(target))
    assert outcome.status == "failed"
    report = (engine.layout.failed / f"{target.name}.error.txt").read_text()
    assert "upscaling failed: RuntimeError: CUDA error: an illegal memory access" in report
    assert (engine.layout.failed / target.name).exists()


def test_the_outputs_folder_is_recreated_when_deleted_while_running(root, make_engine):
    engine = make_engine()
    engine.stage1_once(seed=1)
    shutil.rmtree(engine.layout.outputs)
    result = engine.stage1_once(seed=2)
    assert result.path.exists() and (engine.layout.metadata / f"{result.record.tag}.json").exists()
    with Image.open(result.path) as image:
        image.load()


def test_an_image_of_another_size_than_its_record_is_refused(root, make_engine):
    from sdxld.jobs import run_claimed

    engine = make_engine()
    inbox, target, first = approve_one(engine, root)
    with Image.open(target) as image:
        info = image.info
        image.resize((64, 112)).save(target, pnginfo=_chunks(info))
    outcome = run_claimed(engine, inbox, inbox.claim(target))
    assert outcome.status == "failed"
    assert "is 64x112 but its record" in (engine.layout.failed / f"{target.name}.error.txt").read_text()


def _chunks(info):
    from PIL.PngImagePlugin import PngInfo

    chunks = PngInfo()
    for key, value in info.items():
        if isinstance(value, str):
            chunks.add_text(key, value)
    return chunks
