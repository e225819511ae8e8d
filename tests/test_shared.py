"""A root shared by several hosts: found from the mount table, watched by polling; claims carry
leases that another host may take over once they expire."""

from __future__ import annotations

import os
import threading
import time

import pytest

from sdxld import leases, owners
from sdxld.inbox import Inbox
from sdxld.watch import Watcher, filesystem_type, is_shared_filesystem

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /srv/sdxld rw,relatime shared:20 - nfs4 nas:/export/sdxld rw,vers=4.2
41 40 0:36 / /srv/sdxld/local rw,relatime shared:21 - ext4 /dev/sdb1 rw
42 22 0:37 / /mnt/gpu\\040box rw,nosuid shared:22 - fuse.sshfs gpu@box:/data rw,user_id=0
"""


def test_the_file_system_of_a_root_comes_from_its_longest_mount_point():
    assert filesystem_type("/srv/sdxld/outputs", MOUNTINFO) == "nfs4"
    assert filesystem_type("/srv/sdxld/local/x", MOUNTINFO) == "ext4"
    assert filesystem_type("/srv/sdxld-other", MOUNTINFO) == "ext4", "a prefix of the name is not a parent folder"
    assert filesystem_type("/mnt/gpu box/root", MOUNTINFO) == "fuse.sshfs"
    assert [is_shared_filesystem(k) for k in ("nfs4", "cifs", "ceph", "fuse.sshfs", "glusterfs", "ext4", "xfs", "tmpfs")] == \
        [True, True, True, True, True, False, False, False]


def test_this_machines_own_mount_table_names_the_test_folder(tmp_path):
    assert filesystem_type(tmp_path) != ""


def test_a_polling_watcher_reports_files_that_no_inotify_event_would(tmp_path):
    watcher = Watcher({"approved": tmp_path}, None, poll_s=0.2)
    assert watcher.start() == "polling"
    try:
        (tmp_path / "a.png").write_bytes(b"png")
        deadline = time.monotonic() + 5
        seen = []
        while time.monotonic() < deadline and not seen:
            seen = [c for c in watcher.drain(timeout=0.5) if c.path.name == "a.png"]
        assert seen and seen[0].area == "approved"
    finally:
        watcher.stop()


# --- leases: claims of a host that died ------------------------------------------------------

@pytest.fixture
def layout(root):
    from sdxld.config import load
    from sdxld.layout import Layout

    layout = Layout.from_config(load(root / "config.yaml"))
    Inbox(layout).ensure_dirs()
    return layout


def other_hosts_claim(layout, name="a.png", lease_age=None):
    """A claim as a daemon on another host leaves it: the image under its owner's name, a lease."""
    token = owners.Owner("gpu-box-2", "deadbeef", 4242, 99).token
    claim = layout.processing / f"{token}.1.1__{name}"
    claim.write_bytes(b"png")
    if lease_age is not None:
        lease = leases.lease_path(claim)
        lease.parent.mkdir(exist_ok=True)
        lease.write_text(token)
        stamp = time.time() - lease_age
        os.utime(lease, (stamp, stamp))
    return claim


def test_a_shared_root_polls_the_inbox_loras_and_prompts_but_leaves_the_piles_to_the_rescan(layout):
    from sdxld.daemon import watched_folders

    local, shared = watched_folders(layout, shared=False), watched_folders(layout, shared=True)
    assert {"approved", "loras:character", "loras:style"} <= set(shared)
    assert any(name.startswith("prompts:") for name in shared)
    # Thousands of done and final images, stat'ed every poll_s over the network: left to the relist.
    assert not [name for name in shared if name.startswith("piles:")]
    assert set(local) - set(shared) == {f"piles:{pile}" for pile in layout.piles() if pile != "approved"}


def test_a_claim_has_a_lease_renewed_while_held_and_removed_when_done(layout, monkeypatch):
    (layout.approved / "a.png").write_bytes(b"png")
    inbox = Inbox(layout, lease_s=0.3)
    claim = inbox.claim(layout.approved / "a.png")
    lease = leases.lease_path(claim.path)
    assert lease.exists() and lease in leases.KEEPER.held()
    old = time.time() - 100
    os.utime(lease, (old, old))
    time.sleep(0.4)
    assert lease.stat().st_mtime > old + 90, "renewed every lease_s / 3"
    inbox.done(claim)
    assert not lease.exists() and lease not in leases.KEEPER.held()
    assert [p.name for p in layout.processing.iterdir()] == []


def test_a_lease_is_renewed_by_a_write_and_a_dropped_one_is_never_brought_back(layout):
    lease = layout.root / "a.png.lease"
    lease.write_text("")
    old = time.time() - 100
    os.utime(lease, (old, old))
    leases.renew(lease)
    # A write is stamped by the server's clock on a share; a touch could carry this host's.
    assert lease.stat().st_mtime > old + 90 and lease.read_text() == owners.current().token + "\n"
    lease.unlink()
    with pytest.raises(FileNotFoundError):
        leases.renew(lease)
    assert not lease.exists()


def test_another_hosts_claim_is_taken_over_only_once_its_lease_expired(layout):
    expired_claim = other_hosts_claim(layout, "a.png", lease_age=700)
    other_hosts_claim(layout, "b.png", lease_age=10)  # alive: renewed 10 s ago
    other_hosts_claim(layout, "c.png")  # no lease: an older sdxld; never taken
    recovered = Inbox(layout, lease_s=600).recover()
    assert [(c.name, c.attempt) for c in recovered] == [("a.png", 2)]
    assert not expired_claim.exists() and not leases.lease_path(expired_claim).exists()
    assert leases.lease_path(recovered[0].path).exists(), "the new claimant holds a lease at once"
    assert sorted(p.name.split("__")[1] for p in layout.processing.iterdir() if not p.name.startswith(".")) == \
        ["a.png", "b.png", "c.png"]


def test_of_hosts_racing_for_an_expired_claim_exactly_one_wins(layout):
    other_hosts_claim(layout, "a.png", lease_age=700)
    inboxes = [Inbox(layout, lease_s=600) for _ in range(6)]
    results, start = [], threading.Barrier(len(inboxes))

    def take(inbox):
        start.wait()
        results.append(inbox.recover())

    threads = [threading.Thread(target=take, args=(inbox,)) for inbox in inboxes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [claim for found in results for claim in found]
    assert len(won) == 1 and won[0].path.exists()
    assert len([p for p in layout.processing.iterdir() if not p.name.startswith(".")]) == 1
    assert len(list((layout.inbox / leases.LEASES).iterdir())) == 1, "losers drop their leases"


def test_a_claimant_that_lost_its_claim_leaves_the_image_to_the_new_one(layout, caplog):
    (layout.approved / "a.png").write_bytes(b"png")
    slow = Inbox(layout)
    claim = slow.claim(layout.approved / "a.png")
    os.rename(claim.path, layout.processing / f"{owners.Owner('gpu-box-2', 'deadbeef', 7, 1).token}.1.2__a.png")
    assert slow.done(claim) is None
    assert "taken over by another host" in caplog.text
    assert list(layout.done.iterdir()) == [] and len(list(layout.processing.glob("*__a.png"))) == 1
