"""Two hosts on one shared root, for real: two daemons under different host names (each in its
own UTS namespace), each on its own sshfs mount of one folder served by a local sshd. Nothing but
the shared files connects them: no inotify event crosses the mounts, pids mean nothing across
hosts, only leases and the share's clock tell a dead host's claims from a live one's."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time

import pytest
from support.daemons import DaemonProcess, files, set_config, wait_for
from support.helpers import run_sdxld
from support.share import SshShare, missing_tools

LEASE_S = 4.0
RESCAN_S = 1.0

missing = missing_tools()
pytestmark = pytest.mark.skipif(
    bool(missing) and not os.environ.get("SDXLD_REQUIRE_SHARE"),
    reason=f"sharing a folder over sshfs needs {', '.join(missing)} (CI installs them: openssh-server, sshfs)",
)


@pytest.fixture
def share(root, tmp_path_factory):
    """The root served by sshd, mounted twice: host-a's view and host-b's view."""
    assert not missing, f"missing: {', '.join(missing)}"
    served = SshShare(root, tmp_path_factory.mktemp("sshd"))
    mounts = tmp_path_factory.mktemp("mounts")
    try:
        yield served.mount(mounts / "host-a"), served.mount(mounts / "host-b")
    finally:
        served.close()


def claims(root, host=None):
    """Claims in processing/ (of `host` only, if given): their names start with the owner's host."""
    found = [p for p in files(root / "inbox" / "processing") if "__" in p.name]
    return [p for p in found if host is None or p.name.startswith(f"{host}.")]


def done(root, image) -> bool:
    return (root / "inbox" / "done" / image.name).exists()


def status_of(view):
    """`sdxld status` as a third machine sees the share: {host: state}."""
    result = run_sdxld("status", "--root", str(view), cwd=view.parent)
    assert result.returncode == 0, result.stderr
    states = dict(re.findall(r"^sdxld pid \d+ on (\S+): (.*)$", result.stdout, re.M))
    return states, result.stdout


def test_two_hosts_on_one_share_finish_every_image_once_and_take_over_a_dead_hosts_claim(root, share, tmp_path, make_stage1):
    images = make_stage1(23, into=tmp_path / "held")
    batch, spares = images[:20], images[20:]
    # Small finals without the diffusion passes: the point is who processes what, not the upscale.
    set_config(root, daemon={"max_pending": 1, "settle_s": 0.2, "rescan_s": RESCAN_S, "lease_s": LEASE_S,
                             "heartbeat_s": 1.0, "poll_s": 0.5},
               generation={"mid_scale": 1.5, "final_scale": 2, "stage2": {"enabled": False}, "stage3": {"enabled": False}})
    approved = root / "inbox" / "approved"
    approved.mkdir(parents=True, exist_ok=True)
    view_a, view_b = share
    hosts = {"host-a": DaemonProcess(view_a, name="host-a", hostname="host-a", log_dir=tmp_path),
             "host-b": DaemonProcess(view_b, name="host-b", hostname="host-b", log_dir=tmp_path)}
    try:
        wait_for(lambda: all("sdxld running" in d.log for d in hosts.values()), 120, what="both daemons")
        boards = [json.loads(p.read_text()) for p in (root / ".sdxld" / "status").glob("*.json")]
        assert sorted((b["host"], b["watch"].endswith("(shared root: fuse.sshfs)")) for b in boards) == \
            [("host-a", True), ("host-b", True)], "each found the share in its mount table and polls"
        states, text = status_of(view_a)
        assert set(states) == {"host-a", "host-b"} and not any(s.startswith(("gone", "dead")) for s in states.values()), text

        # 20 approved images, dropped into the share by a third party (no host gets an event).
        for image in batch:
            shutil.move(image, approved / image.name)
        wait_for(lambda: len(files(root / "inbox" / "done")) == 20, 240, interval=0.5, what="20 images in done/")
        tags = sorted(p.name.split("_stage1_")[0] for p in batch)
        assert sorted(p.name.split("_final_")[0] for p in files(root / "outputs" / "final")) == tags
        assert files(root / "inbox" / "failed") == []
        made = {name: [line for line in d.log.splitlines() if re.search(r"approved \S+ -> ", line)] for name, d in hosts.items()}
        per_image = {}
        for lines in made.values():
            for line in lines:
                name = re.search(r"approved (\S+) -> ", line).group(1)
                per_image[name] = per_image.get(name, 0) + 1
        assert per_image == {p.name: 1 for p in batch}, "each image made into a final exactly once"
        assert all(made.values()), {name: len(lines) for name, lines in made.items()}
        states, text = status_of(view_b)
        assert set(states) == {"host-a", "host-b"} and not any(s.startswith(("gone", "dead")) for s in states.values()), text
        assert "2 daemons on 2 hosts: 2 running" in text

        # Kill a host for good while it holds a claim: stopped the moment its claim shows, so the
        # claim is certainly still held when SIGKILL lands.
        victim = survivor = None
        for spare in spares:
            shutil.move(spare, approved / spare.name)
            claim = wait_for(lambda: claims(root) or ([True] if done(root, spare) else []), 30, interval=0.01, what="a claim on the spare")[0]
            if claim is True:
                continue  # made into a final between two looks: try the next spare
            victim = claim.name.split(".")[0]
            hosts[victim].process.send_signal(signal.SIGSTOP)
            if claim.exists():
                break
            victim = None  # finished before the stop landed: let it go and try the next spare
            for daemon in hosts.values():
                daemon.process.send_signal(signal.SIGCONT)
        assert victim, "no claim was caught while held"
        lease = root / "inbox" / ".leases" / f"{claim.name}.lease"
        last_renewal = lease.stat().st_mtime
        hosts[victim].kill()
        survivor = next(name for name in hosts if name != victim)

        # The survivor's log, not processing/: a small final is made faster than a look at the
        # folder comes round, and the claim is gone again.
        wait_for(lambda: f"recovered {spare.name} (attempt 2), left unfinished: host {victim} did not renew its lease"
                 in hosts[survivor].log, LEASE_S + 30, interval=0.05, what="the take-over")
        takeover_s = time.time() - last_renewal
        print(f"\ntake-over {takeover_s:.1f} s after the dead host's last renewal (lease {LEASE_S:g} s, rescan {RESCAN_S:g} s)")
        assert takeover_s >= LEASE_S, "never before the lease expired"
        assert takeover_s <= LEASE_S + RESCAN_S + 5
        wait_for(lambda: done(root, spare), 60, what="the survivor finishing it")
        assert len(files(root / "outputs" / "final")) == 21 and files(root / "inbox" / "failed") == []

        states, text = wait_for(lambda: (s := status_of(view_b))[0].get(victim, "").startswith("gone") and s, 15,
                                interval=0.5, what=f"{victim} shown as gone")
        assert not states[survivor].startswith(("gone", "dead")), text
        assert "2 daemons on 2 hosts: 1 running, 1 gone" in text
        assert hosts[survivor].terminate(20) == 0
    finally:
        for daemon in hosts.values():
            daemon.process.send_signal(signal.SIGCONT)
            daemon.close()
