"""Who owns a claim or a temporary file, told apart from whoever holds that pid later.

A pid alone does not name a process for long: after a crash and a reboot, or once pids wrap,
the dead daemon's pid can belong to an unrelated live process, and a claim or temporary file
judged by its pid alone would be thought alive forever. An owner token therefore holds the host,
the boot (the kernel's boot id) and the pid's start time since boot: a process is the owner only
if all of them still match. Where /proc does not exist (not Linux) boot and start are 0 and the
check falls back to the pid.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

_TOKEN = re.compile(r"(?P<host>[A-Za-z0-9-]{1,32})\.(?P<boot>[0-9a-f]{8})\.(?P<pid>\d+)\.(?P<start>\d+)")


@functools.cache
def host() -> str:
    return "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:32] or "host"


@functools.cache
def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return "00000000"


def start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (None: no such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def started_at(pid: int) -> float | None:
    """Wall-clock time (seconds since the epoch) at which `pid` started, if /proc tells."""
    ticks = start_ticks(pid)
    if ticks is None:
        return None
    # A process's start is counted on the boot-time clock. /proc/stat's btime gives the boot in
    # whole seconds, truncated: up to a second early, enough to take a process started a second
    # after a file for one that may have written it. The two clocks read now give it exactly.
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Owner:
    host: str
    boot: str
    pid: int
    start: int

    @property
    def token(self) -> str:
        return f"{self.host}.{self.boot}.{self.pid}.{self.start}"

    def is_local(self) -> bool:
        return self.host == host()

    def alive(self) -> bool:
        """Whether the process that wrote this token still runs. An owner on another host is
        assumed alive: only its own host can tell."""
        if not self.is_local():
            return True
        if self.boot != boot_id():
            return False  # the machine rebooted since: every process of that boot is gone
        if not pid_running(self.pid):
            return False
        now = start_ticks(self.pid)
        return now is None or now == self.start  # None: no /proc, the pid is all there is


_me: Owner | None = None


def current() -> Owner:
    """This process (computed once per pid)."""
    global _me
    if _me is None or _me.pid != os.getpid():
        pid = os.getpid()
        _me = Owner(host(), boot_id(), pid, start_ticks(pid) or 0)
    return _me


def parse(token: str) -> Owner | None:
    match = _TOKEN.fullmatch(token)
    if not match:
        return None
    return Owner(match["host"], match["boot"], int(match["pid"]), int(match["start"]))


def pid_alive_since(pid: int, made_at: float) -> bool:
    """For names written before owner tokens (a bare pid): the pid runs and its process started
    before the file was made, so it may be the writer. A process that started later is not."""
    if not pid_running(pid):
        return False
    started = started_at(pid)
    return started is None or started <= made_at + 1.0
