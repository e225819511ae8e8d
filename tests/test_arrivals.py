"""A slow copy into inbox/approved/ is never read half-way: a file still open for writing is waited
for, and an image that decodes as truncated while it is young is tried again later."""

from __future__ import annotations

import os
import time

from support.daemons import DaemonProcess, files, set_config, wait_for

from sdxld.arrivals import Arrivals


def test_a_file_open_for_writing_is_not_settled_until_closed(tmp_path):
    path = tmp_path / "copy.png"
    path.write_bytes(b"half")
    os.utime(path, (time.time() - 30, time.time() - 30))  # unchanged for long: the mtime rule alone would take it
    arrivals = Arrivals(settle_s=1.0, copy_wait_s=300)
    for kind in ("created", "opened", "modified"):
        arrivals.observe(kind, path)
    assert not arrivals.settled(path)
    arrivals.observe("opened", path)  # a thumbnailer reads it meanwhile
    arrivals.observe("closed_no_write", path)
    assert not arrivals.settled(path)
    arrivals.observe("closed", path)
    assert arrivals.settled(path)


def test_only_a_file_seen_arriving_whole_counts_as_complete(tmp_path):
    arrivals = Arrivals(settle_s=1.0, copy_wait_s=300)
    moved, copied, growing = (tmp_path / n for n in ("moved.png", "copied.png", "growing.png"))
    arrivals.observe("created", moved)  # a rename from another folder on the same disk
    for kind in ("created", "opened", "modified", "closed"):
        arrivals.observe(kind, copied)
    for kind in ("created", "opened", "modified"):
        arrivals.observe(kind, growing)
    assert arrivals.arrived_complete(moved) and arrivals.arrived_complete(copied)
    assert not arrivals.arrived_complete(growing)
    polling = Arrivals(settle_s=1.0, copy_wait_s=300, events_show_opens=False)
    polling.observe("created", moved)
    assert not polling.arrived_complete(moved)  # no opens are ever reported: nothing is known


def test_a_writer_that_never_closes_is_waited_for_only_up_to_copy_wait_s(tmp_path):
    path = tmp_path / "stuck.png"
    path.write_bytes(b"half")
    os.utime(path, (time.time() - 30, time.time() - 30))
    arrivals = Arrivals(settle_s=1.0, copy_wait_s=0.2)
    arrivals.observe("opened", path)
    assert not arrivals.settled(path)
    time.sleep(0.3)
    assert arrivals.settled(path)


def test_a_moved_in_file_is_settled_at_once_and_a_put_back_one_waits(tmp_path):
    path = tmp_path / "moved.png"
    path.write_bytes(b"whole")
    arrivals = Arrivals(settle_s=60, copy_wait_s=300)
    arrivals.observe("moved", path, src=tmp_path / "elsewhere.png")
    assert arrivals.settled(path)
    arrivals.defer(path, 0.2)
    assert not arrivals.settled(path)
    time.sleep(0.3)
    os.utime(path, (time.time() - 120, time.time() - 120))
    assert arrivals.settled(path)


def test_a_copy_that_stalls_half_way_with_the_file_open_gets_its_final(root, make_stage1):
    set_config(root, daemon={"settle_s": 0.5, "rescan_s": 1, "max_pending": 1})
    [image] = make_stage1(1)
    data = image.read_bytes()
    image.unlink()  # the copy below is the only one
    daemon = DaemonProcess(root)
    try:
        wait_for(lambda: "sdxld running" in daemon.log, 120, what="the daemon")
        target = root / "inbox" / "approved" / image.name
        with open(target, "wb") as copy:
            copy.write(data[: len(data) // 2])
            copy.flush()
            time.sleep(3)  # a network share stalls: six times settle_s with the file open
            copy.write(data[len(data) // 2 :])
        wait_for(lambda: (root / "inbox" / "done" / image.name).exists(), 120, what="the copied image in done/")
        assert len(files(root / "outputs" / "final", "*.png")) == 1
        assert files(root / "inbox" / "failed") == []

        assert daemon.terminate(20) == 0
    finally:
        daemon.close()


def test_a_truncated_young_file_goes_back_to_approved_and_an_old_one_fails(make_engine, root):
    from sdxld.inbox import Inbox
    from sdxld.jobs import run_claimed

    engine = make_engine()
    data = engine.stage1_once(seed=3).path.read_bytes()
    inbox = Inbox(engine.layout)
    inbox.ensure_dirs()
    half = engine.layout.approved / "half.png"
    half.write_bytes(data[: len(data) // 2])

    outcome = run_claimed(engine, inbox, inbox.claim(half), young_s=300)
    assert outcome.status == "incomplete" and half.exists() and files(engine.layout.failed) == []

    os.utime(half, (time.time() - 400, time.time() - 400))  # nothing came for longer than copy_wait_s
    outcome = run_claimed(engine, inbox, inbox.claim(half), young_s=300)
    assert outcome.status == "failed" and "truncated" in outcome.detail
    assert (engine.layout.failed / "half.png").exists()
