"""A root shared by several hosts: found from the mount table, watched by polling."""

from __future__ import annotations

import time

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
