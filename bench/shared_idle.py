"""What an idle daemon costs on a shared root: CPU of polling vs inotify, and of the share itself.

    python bench/shared_idle.py [--seconds 60] [--pending 500] [--done 2000] [--modes local,polling,sshfs]

One root with a realistic backlog: `--pending` stage-1 images waiting to be curated (stage 1
pauses at daemon.max_pending, set to that number, so the daemon has nothing to do) and `--done`
images already upscaled (in inbox/done/ and outputs/final/). The demo daemon runs on it, idle,
in each mode in turn:

- local:   the root on this machine's disk, inotify (what a single host runs);
- polling: the same root with daemon.shared: true (watchdog's polling observer every poll_s);
- sshfs:   the same root served by an sshd on 127.0.0.1 and mounted with sshfs (needs root,
           sshd and sshfs): polling over a FUSE network file system, as a second host sees it.

Once the daemon is paused and its ledger loaded, CPU time is sampled from /proc over `--seconds`:
the daemon's, and (sshfs) that of the sshfs client plus the sshd serving it. Prints CPU % of one
core per mode and the ratio to local. The files are empty placeholders with sdxld's names: the
daemon only lists and stats them while idle.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from support.daemons import DaemonProcess, set_config, wait_for  # noqa: E402
from support.share import SshShare, missing_tools  # noqa: E402

from sdxld.init import init_root  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def sshfs_pids(mount: Path) -> list[int]:
    result = subprocess.run(["pgrep", "-f", f"sshfs .* {mount}"], capture_output=True, text=True)
    return [int(p) for p in result.stdout.split()]


def fill(root: Path, pending: int, done: int) -> None:
    """Placeholders named as sdxld names its files: waiting stage-1 images, done and final ones."""
    for folder in (root / "outputs" / "stage1", root / "inbox" / "done", root / "outputs" / "final"):
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(pending):
        (root / "outputs" / "stage1" / f"20261127_010000_{i:06d}_1a2b3c4d_stage1_768x1344.png").write_bytes(b"")
    for i in range(done):
        tag = f"20261126_010000_{i:06d}_1a2b3c4d"
        (root / "inbox" / "done" / f"{tag}_stage1_768x1344.png").write_bytes(b"")
        (root / "outputs" / "final" / f"{tag}_final_6144x10752.png").write_bytes(b"")


def idle_cpu(view: Path, seconds: float, log_dir: Path, share_pids=lambda: []) -> tuple[float, float, str]:
    """(daemon CPU %, share CPU %, how it watched) over `seconds` once the daemon is idle."""
    daemon = DaemonProcess(view, name=f"bench-{view.name}", log_dir=log_dir)
    try:
        wait_for(lambda: "sdxld running" in daemon.log, 180, what="the daemon")
        status = wait_for(lambda: next((view / ".sdxld" / "status").glob(f"*.{daemon.process.pid}.json"), None), 30,
                          what="its status file")
        wait_for(lambda: '"paused": "' in status.read_text(), 60, what="stage 1 paused at max_pending")
        time.sleep(5)  # the ledger's first load and the first full listing are start-up, not idle
        pids = share_pids()
        start = time.monotonic(), cpu_seconds(daemon.process.pid), sum(map(cpu_seconds, pids))
        time.sleep(seconds)
        elapsed = time.monotonic() - start[0]
        own = (cpu_seconds(daemon.process.pid) - start[1]) / elapsed * 100
        share = (sum(map(cpu_seconds, pids)) - start[2]) / elapsed * 100
        watch = json.loads(status.read_text())["watch"]
        daemon.process.send_signal(signal.SIGTERM)
        daemon.wait(30)
        return own, share, watch
    finally:
        daemon.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--pending", type=int, default=500)
    parser.add_argument("--done", type=int, default=2000)
    parser.add_argument("--modes", default="local,polling,sshfs")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if "sshfs" in modes and missing_tools():
        print(f"sshfs mode skipped: needs {', '.join(missing_tools())}")
        modes.remove("sshfs")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "root"
        init_root(root)
        fill(root, args.pending, args.done)
        set_config(root, daemon={"max_pending": args.pending})
        print(f"idle daemon, {args.pending} stage-1 images waiting, {args.done} done + {args.done} finals, "
              f"{args.seconds:g} s per mode (CPU % of one core)")
        results = {}
        for mode in modes:
            set_config(root, daemon={"shared": True if mode == "polling" else "auto"})
            if mode == "sshfs":
                share = SshShare(root, tmp / "sshd")
                try:
                    view = share.mount(tmp / "sshfs")
                    pids = lambda: sshfs_pids(view) + descendants(share.sshd.pid)  # noqa: E731
                    results[mode] = idle_cpu(view, args.seconds, tmp, pids)
                finally:
                    share.close()
            else:
                results[mode] = idle_cpu(root, args.seconds, tmp)
            own, shared, watch = results[mode]
            extra = f", share (sshfs + sshd) {shared:5.2f} %" if mode == "sshfs" else ""
            print(f"  {mode:8s} daemon {own:5.2f} %{extra}   [{watch}]")
        if "local" in results:
            base = max(results["local"][0], 0.01)
            for mode, (own, shared, _) in results.items():
                if mode != "local":
                    print(f"  {mode} / local: daemon {own / base:.1f}x" + (f", with the share {(own + shared) / base:.1f}x" if mode == "sshfs" else ""))


if __name__ == "__main__":
    main()
