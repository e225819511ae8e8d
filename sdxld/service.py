"""systemd integration: sd_notify, journal logging, unit installation.

systemd-python is optional: without it the notify protocol (one datagram to $NOTIFY_SOCKET) is
spoken directly, and logs go to stderr, which journald captures anyway. Outside systemd
(no NOTIFY_SOCKET) every notification is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


class Notifier:
    """READY / STATUS / WATCHDOG / STOPPING / EXTEND_TIMEOUT_USEC to the service manager."""

    def __init__(self, min_watchdog_interval: float = 1.0):
        self.socket_path = os.environ.get("NOTIFY_SOCKET")
        self.enabled = bool(self.socket_path)
        self._last_watchdog = 0.0
        self._last_status = None
        self.min_watchdog_interval = min_watchdog_interval
        try:
            from systemd import daemon as systemd_daemon

            self._notify = systemd_daemon.notify
        except ImportError:
            self._notify = self._send

    def _send(self, state: str) -> bool:
        address = self.socket_path
        if address.startswith("@"):
            address = "\0" + address[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True

    def notify(self, state: str) -> None:
        if not self.enabled:
            return
        try:
            self._notify(state)
        except OSError as err:
            log.debug("sd_notify %r failed: %s", state, err)

    def ready(self) -> None:
        self.notify("READY=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def extend_timeout(self, seconds: float) -> None:
        self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def status(self, line: str) -> None:
        if line != self._last_status:
            self.notify(f"STATUS={line}")
            self._last_status = line

    def watchdog(self) -> None:
        """Called from the daemon loop (never a helper thread): per denoising step and between jobs."""
        now = time.monotonic()
        if now - self._last_watchdog >= self.min_watchdog_interval:
            self.notify("WATCHDOG=1")
            self._last_watchdog = now


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{stat.st_dev}:{stat.st_ino}"


def journal_handler() -> logging.Handler | None:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER="sdxld")


# --- units ---------------------------------------------------------------------------------------
#
# One source for every unit: the files in systemd/ are these templates rendered with the default
# installation (code in /opt/sdxld/.venv, data in /var/lib/sdxld; a test keeps them in sync), and
# `sdxld service install` renders them with this installation's real paths.

_SERVICE_COMMON = """Type=notify
NotifyAccess=main
ExecStart=@EXEC_START@
WorkingDirectory=@ROOT@
@ENVIRONMENT@Environment=PYTHONUNBUFFERED=1
Environment=PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# Model loading extends this with EXTEND_TIMEOUT_USEC while it makes progress.
TimeoutStartSec=300
TimeoutStopSec=60
# The loop pings the watchdog every denoising step and between jobs.
WatchdogSec=300
Restart=on-failure
RestartSec=10
# 78 = EX_CONFIG: a bad config.yaml will not fix itself by restarting.
RestartPreventExitStatus=78
"""

_HARDENING = """# Hardened, but able to reach the GPU: no PrivateDevices (hides /dev/nvidia*), no
# MemoryDenyWriteExecute (CUDA and torch JIT-compile kernels), network kept for model downloads.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ReadWritePaths=@ROOT@
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
KeyringMode=private
UMask=0027
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
DevicePolicy=closed
DeviceAllow=/dev/nvidiactl rw
DeviceAllow=/dev/nvidia-uvm rw
DeviceAllow=/dev/nvidia-uvm-tools rw
DeviceAllow=/dev/nvidia-modeset rw
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-caps rw
"""

UNIT_TEMPLATES = {
    "sdxld.service": """[Unit]
Description=sdxld SDXL image factory
After=network-online.target
Wants=network-online.target

[Service]
User=@USER@
Group=@USER@
""" + _SERVICE_COMMON + _HARDENING + """
[Install]
WantedBy=multi-user.target
""",
    "sdxld@.service": """[Unit]
Description=sdxld SDXL image factory on GPU %i
After=network-online.target
Wants=network-online.target

[Service]
User=@USER@
Group=@USER@
# One instance per GPU on the same folders: each sees only its GPU; the inbox hands every
# approved image to exactly one of them.
Environment=CUDA_VISIBLE_DEVICES=%i
""" + _SERVICE_COMMON + _HARDENING + """
[Install]
WantedBy=multi-user.target
""",
    "sdxld-user.service": """[Unit]
Description=sdxld SDXL image factory (desktop session)

[Service]
""" + _SERVICE_COMMON + """NoNewPrivileges=yes
UMask=0022

[Install]
WantedBy=default.target
""",
}

DEFAULT_VENV_BIN = "/opt/sdxld/.venv/bin"
DEFAULT_ROOT = "/var/lib/sdxld"


def render_unit(name: str, *, exec_start: str, root: Path | str, user: str = "sdxld", path: str | None = None) -> str:
    environment = f"Environment=PATH={path}\n" if path else ""
    return (
        UNIT_TEMPLATES[name]
        .replace("@EXEC_START@", exec_start)
        .replace("@ROOT@", str(root))
        .replace("@USER@", user)
        .replace("@ENVIRONMENT@", environment)
    )


def render_default(name: str) -> str:
    """The unit as shipped in systemd/: found through PATH so it verifies without an install."""
    root = "%h/sdxld" if name == "sdxld-user.service" else DEFAULT_ROOT
    return render_unit(
        name,
        exec_start=f"/usr/bin/env sdxld run --root {root}",
        root=root,
        path=f"{DEFAULT_VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
    )


def sdxld_executable() -> str:
    """The absolute path of this installation's `sdxld` script (the one running now)."""
    candidate = Path(sys.executable).parent / "sdxld"
    if candidate.exists():
        return str(candidate.absolute())
    return f"{Path(sys.executable).absolute()} -m sdxld.cli"


def install_unit(root: Path, *, user_unit: bool, target_dir: Path | None = None, service_user: str = "sdxld") -> Path:
    """Write sdxld.service for this installation and root; returns its path."""
    from .store import atomic_write

    root = Path(root).resolve()
    name = "sdxld-user.service" if user_unit else "sdxld.service"
    text = render_unit(name, exec_start=f"{sdxld_executable()} run --root {root}", root=root, user=service_user)
    if target_dir is None:
        if user_unit:
            base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
            target_dir = Path(base) / "systemd" / "user"
        else:
            target_dir = Path("/etc/systemd/system")
    target_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write(target_dir / "sdxld.service", text.encode())
