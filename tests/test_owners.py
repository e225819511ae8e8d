"""Claims and temporary files name their owner so that a reboot or a reused pid is never taken for
the process that made them: recovery and start-up clean-up act on dead owners only."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.daemons import DaemonProcess, files, set_config, wait_for

from sdxld import leases, owners, store
from sdxld.inbox import Inbox
from sdxld.layout import Layout


@pytest.fixture
def sleeper():
    """An unrelated live process (stands for whoever got a dead daemon's pid)."""
    processes = []

    def start(pid: int | None = None) -> subprocess.Popen:
        process = _spawn_at(pid) if pid else subprocess.Popen(["sleep", "300"])
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


def _spawn_at(pid: int) -> subprocess.Popen | None:
    """`sleep 300` running as `pid`: the kernel hands out ns_last_pid + 1 next (root only)."""
    for _ in range(50):
        if owners.pid_running(pid):
            return None  # something unrelated already took it: that is the situation to test
        try:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        except OSError as err:
            pytest.skip(f"placing a process at a chosen pid needs root (/proc/sys/kernel/ns_last_pid: {err})")
        process = subprocess.Popen(["sleep", "300"])
        if process.pid == pid:
            return process
        process.kill()
        process.wait()
    raise AssertionError(f"could not start a process as pid {pid}")


def _claim(inbox: Inbox, token: str, name: str = "20260101_000000_stage1_64x64.png") -> Path:
    inbox.ensure_dirs()
    path = inbox.processing / f"{token}.1.1__{name}"
    path.write_bytes(b"image")
    return path


def _config(root):
    from support.helpers import demo_config

    return demo_config(root)


def _free_pid() -> int:
    """A pid no process has now, inside the kernel's pid range."""
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except OSError:
        pid_max = 32768
    pid = 300 + (os.getpid() + 5000) % (pid_max - 400)
    while owners.pid_running(pid) or owners.pid_running(pid - 1):
        pid = 300 + (pid + 7) % (pid_max - 400)
    return pid


def test_recovery_takes_claims_of_a_previous_boot_and_of_a_reused_pid_but_not_of_a_live_owner(root, sleeper):
    inbox = Inbox(Layout.from_config(_config(root)))
    me = owners.current()
    other = sleeper()
    other_owner = owners.Owner(me.host, me.boot, other.pid, owners.start_ticks(other.pid))
    _claim(inbox, owners.Owner(me.host, "0badb007", me.pid, me.start).token, "previous_boot.png")
    _claim(inbox, owners.Owner(me.host, me.boot, other.pid, other_owner.start - 1).token, "reused_pid.png")
    _claim(inbox, other_owner.token, "live_owner.png")
    _claim(inbox, owners.Owner("elsewhere", me.boot, 1, 1).token, "other_host.png")

    recovered = inbox.recover()
    assert sorted(claim.name for claim in recovered) == ["previous_boot.png", "reused_pid.png"]
    assert {claim.attempt for claim in recovered} == {2}
    assert inbox.recover() == []  # now claimed by this live process
    left = sorted(p.name.split("__")[1] for p in inbox.processing.iterdir() if not p.name.startswith("."))
    assert left == ["live_owner.png", "other_host.png", "previous_boot.png", "reused_pid.png"]
    assert all(leases.lease_path(claim.path).exists() for claim in recovered), "each recovered claim is leased"


def test_a_process_start_time_is_known_to_a_tick_not_to_the_second(sleeper):
    # /proc/stat's btime is whole seconds: a start time built on it was up to a second early,
    # which made a process started a second after a claim look like its possible writer.
    before = time.time()
    process = sleeper()
    after = time.time()
    started = owners.started_at(process.pid)
    assert before - 0.05 <= started <= after + 0.05


def test_a_claim_named_by_a_bare_pid_is_recovered_once_that_pid_belongs_to_a_later_process(root, sleeper):
    inbox = Inbox(Layout.from_config(_config(root)))
    host = owners.host()
    older = sleeper()
    time.sleep(1.6)
    live = _claim(inbox, f"{host}.{older.pid}", "live.png")
    reused_pid = _free_pid()
    _claim(inbox, f"{host}.{reused_pid}", "stale.png")
    time.sleep(1.6)
    later = sleeper(reused_pid)
    assert later is None or later.pid == reused_pid

    assert [claim.name for claim in inbox.recover()] == ["stale.png"]
    assert live.exists()


def test_start_up_clean_up_removes_temporaries_of_dead_writers_only(tmp_path, sleeper):
    me = owners.current()
    folder = tmp_path / "outputs" / "stage1"
    folder.mkdir(parents=True)
    gone = _free_pid()
    names = {
        "previous boot": f".a_stage1_64x64.png.{owners.Owner(me.host, '0badb007', me.pid, me.start).token}.7f.tmp",
        "reused pid": f".b_stage1_64x64.png.{owners.Owner(me.host, me.boot, me.pid, me.start + 1).token}.7f.tmp",
        "bare dead pid": f".c.json.{gone}.7f.tmp",
        "live writer": f".d_stage1_64x64.png.{me.token}.7f.tmp",
        "other host": f".e.json.{owners.Owner('elsewhere', me.boot, 1, 1).token}.7f.tmp",
        "not ours": ".f.partial.tmp",
    }
    for name in names.values():
        (folder / name).write_bytes(b"half")
    removed = store.remove_stale_temporaries([tmp_path / "outputs"])
    assert sorted(p.name for p in removed) == sorted(names[k] for k in ("previous boot", "reused pid", "bare dead pid"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(names[k] for k in ("live writer", "other host", "not ours"))


def test_a_killed_daemons_claim_gets_its_final_although_its_pid_now_runs_another_process(root, sleeper, make_stage1):
    set_config(root, daemon={"settle_s": 0.3, "rescan_s": 2})
    [image] = make_stage1(1)
    processing = root / "inbox" / "processing"

    first = DaemonProcess(root, name="first")
    try:
        wait_for(lambda: "sdxld running" in first.log, 120, what="the first daemon")
        shutil.move(image, root / "inbox" / "approved" / image.name)
        claim = wait_for(lambda: next(iter(files(processing)), None), 60, what="the claim")
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
    finally:
        first.close()
    dead = owners.parse(".".join(claim.name.split("__")[0].split(".")[:4]))
    assert dead is not None and dead.pid == first.process.pid

    holder = sleeper(dead.pid)  # an unrelated process now runs as the dead daemon's pid
    assert owners.pid_running(dead.pid) and (holder is None or holder.pid == dead.pid)
    # What a kill during a save leaves: the dead daemon's temporary file.
    leftover = root / "outputs" / "stage1" / f".x_stage1_128x224.png.{dead.token}.7f.tmp"
    leftover.write_bytes(b"half")

    second = DaemonProcess(root, name="second")
    try:
        wait_for(lambda: files(root / "outputs" / "final", "*.png"), 180, what="the final of the recovered image")
        wait_for(lambda: (root / "inbox" / "done" / image.name).exists(), 30, what="the image in done/")
        assert len(files(root / "outputs" / "final", "*.png")) == 1
        assert files(processing) == [] and files(root / "inbox" / "failed") == []
        assert not leftover.exists()
        assert "recovered " + image.name in second.log
        assert owners.pid_running(dead.pid)  # the unrelated process was left alone
        assert second.terminate(20) == 0
    finally:
        second.close()
