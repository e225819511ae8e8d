"""When stage 1 waits, and when the daemon gives up on itself (no models: the rules alone)."""

from __future__ import annotations

import time

import pytest

from sdxld import pacing, store
from sdxld.config import load
from sdxld.layout import Layout
from sdxld.pacing import Stage1Pacing


@pytest.fixture
def setting(root):
    config = load(root / "config.yaml")
    layout = Layout.from_config(config)
    layout.ensure_output_dirs()
    return config.daemon, layout


def stage1_image(layout, n: int) -> None:
    (layout.stage1 / store.image_name(f"20260101_00000{n}", "stage1", 768, 1344)).write_bytes(b"png")


def test_stage1_runs_when_nothing_holds_it(setting):
    daemon, layout = setting
    assert Stage1Pacing(wait=time.sleep).pause_reason(daemon, layout, images_in_flight=0) is None


def test_uncurated_images_pause_stage1_counting_those_not_yet_on_disk(setting):
    daemon, layout = setting
    daemon.max_pending = 3
    for n in range(2):
        stage1_image(layout, n)
    gate = Stage1Pacing(wait=time.sleep)
    assert gate.pause_reason(daemon, layout, images_in_flight=0) is None
    reason = gate.pause_reason(daemon, layout, images_in_flight=1)
    assert reason == "3 stage-1 images waiting to be curated (daemon.max_pending 3)"
    daemon.max_pending = 0  # never pause
    assert gate.pause_reason(daemon, layout, images_in_flight=1) is None


def test_a_failed_save_pauses_stage1_with_the_error_until_the_retry_time(setting):
    daemon, layout = setting
    gate = Stage1Pacing(wait=time.sleep)
    gate.save_failed(OSError(28, "No space left on device"), retry_s=0.3)
    reason = gate.pause_reason(daemon, layout, images_in_flight=0)
    assert "saving failed ([Errno 28] No space left on device)" in reason
    time.sleep(0.35)
    assert gate.pause_reason(daemon, layout, images_in_flight=0) is None


def test_low_disk_space_pauses_stage1(setting):
    daemon, layout = setting
    daemon.min_free_gb = 1e9  # more than any disk has
    assert "GB free on the outputs disk (daemon.min_free_gb" in Stage1Pacing(wait=time.sleep).pause_reason(daemon, layout, 0)


def test_a_deleted_outputs_folder_is_made_again(setting):
    daemon, layout = setting
    for folder in (layout.stage1, layout.metadata, layout.final):
        folder.rmdir()
    layout.outputs.rmdir()
    Stage1Pacing(wait=time.sleep).pause_reason(daemon, layout, 0)
    assert layout.stage1.is_dir() and layout.final.is_dir()


def test_failures_in_a_row_back_off_then_end_the_process_and_a_success_resets_the_count(monkeypatch):
    waits = []
    gate = Stage1Pacing(wait=waits.append)
    for _ in range(pacing.MAX_FAILURES_IN_A_ROW - 1):
        gate.image_failed()
    assert waits == [2.0, 4.0, 8.0, 16.0]
    gate.image_made()
    gate.image_failed()
    assert gate.failures_in_a_row == 1
    for _ in range(pacing.MAX_FAILURES_IN_A_ROW - 2):
        gate.image_failed()
    with pytest.raises(RuntimeError, match="5 stage-1 images failed in a row; exiting so that sdxld is restarted"):
        gate.image_failed()
