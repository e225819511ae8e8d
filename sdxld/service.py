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
from dataclasses import dataclass, field
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

    def allow_silence(self, seconds: float) -> bool:
        """Let the watchdog wait at least `seconds` between pings from now on (WATCHDOG_USEC);
        nothing when no watchdog is configured or it already waits that long. True if sent."""
        configured = os.environ.get("WATCHDOG_USEC", "")
        wanted = int(seconds * 1_000_000)
        if not self.enabled or not configured.isdigit() or int(configured) >= wanted:
            return False
        self.notify(f"WATCHDOG_USEC={wanted}")
        return True

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

# Both system units: only the root is writable, no privileges, no kernel or host settings.
_HARDENING_COMMON = """NoNewPrivileges=yes
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
"""

_HARDENING = """# Hardened, but able to reach the GPU: no PrivateDevices (hides /dev/nvidia*), no
# MemoryDenyWriteExecute (CUDA and torch JIT-compile kernels), network kept for model downloads.
""" + _HARDENING_COMMON + """DeviceAllow=/dev/nvidiactl rw
DeviceAllow=/dev/nvidia-uvm rw
DeviceAllow=/dev/nvidia-uvm-tools rw
DeviceAllow=/dev/nvidia-modeset rw
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-caps rw
"""

# The review page: no GPU, no JIT, nothing to download; only the root's folders are written.
_REVIEW_SERVICE = """Type=exec
ExecStart=@EXEC_START@
WorkingDirectory=@ROOT@
@ENVIRONMENT@Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=5
# 78 = EX_CONFIG, and 2: a bad config.yaml or --listen will not fix itself by restarting.
RestartPreventExitStatus=78 2
"""

_REVIEW_HARDENING = _HARDENING_COMMON + """PrivateDevices=yes
MemoryDenyWriteExecute=yes
ProcSubset=pid
"""

def _system_unit(description: str, after: str, service: str) -> str:
    """A unit for the system manager, run as the service account."""
    return f"""[Unit]
Description={description}
{after}
[Service]
User=@USER@
Group=@USER@
{service}
[Install]
WantedBy=multi-user.target
"""


def _user_unit(description: str, service: str) -> str:
    """A unit for a desktop session's user manager (it runs as that user, with its umask)."""
    return f"""[Unit]
Description={description}

[Service]
{service}NoNewPrivileges=yes
UMask=0022

[Install]
WantedBy=default.target
"""


_AFTER_NETWORK = "After=network-online.target\nWants=network-online.target\n"

UNIT_TEMPLATES = {
    "sdxld.service": _system_unit("sdxld SDXL image factory", _AFTER_NETWORK, _SERVICE_COMMON + _HARDENING),
    "sdxld@.service": _system_unit("sdxld SDXL image factory on GPU %i", _AFTER_NETWORK, """\
# One instance per GPU on the same folders: each sees only its GPU; the inbox hands every
# approved image to exactly one of them.
Environment=CUDA_VISIBLE_DEVICES=%i
""" + _SERVICE_COMMON + _HARDENING),
    "sdxld-user.service": _user_unit("sdxld SDXL image factory (desktop session)", _SERVICE_COMMON),
    "sdxld-review.service": _system_unit("sdxld review page", "After=network.target\n", _REVIEW_SERVICE + _REVIEW_HARDENING),
    "sdxld-review-user.service": _user_unit("sdxld review page (desktop session)", _REVIEW_SERVICE),
}

DEFAULT_VENV_BIN = "/opt/sdxld/.venv/bin"
DEFAULT_ROOT = "/var/lib/sdxld"


def render_unit(name: str, *, exec_start: str, root: Path | str, user: str = "sdxld", path: str | None = None) -> str:
    variables = {"PATH": path} if path else {}
    if not name.endswith("user.service") and "review" not in name:
        # A system account's home is rarely writable under ProtectSystem=strict: keep the Hugging
        # Face downloads and the demo model's cache inside the root, the one folder the unit may write.
        variables["XDG_CACHE_HOME"] = f"{root}/.cache"
    environment = "".join(f"Environment={key}={value}\n" for key, value in variables.items())
    return (
        UNIT_TEMPLATES[name]
        .replace("@EXEC_START@", exec_start)
        .replace("@ROOT@", str(root))
        .replace("@USER@", user)
        .replace("@ENVIRONMENT@", environment)
    )


def render_default(name: str) -> str:
    """The unit as shipped in systemd/: found through PATH so it verifies without an install."""
    root = "%h/sdxld" if name.endswith("user.service") else DEFAULT_ROOT
    return render_unit(
        name,
        exec_start=f"/usr/bin/env sdxld {'review' if 'review' in name else 'run'} --root {root}",
        root=root,
        path=f"{DEFAULT_VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
    )


def sdxld_executable() -> str:
    """The absolute path of this installation's `sdxld` script (the one running now)."""
    candidate = Path(sys.executable).parent / "sdxld"
    if candidate.exists():
        return str(candidate.absolute())
    return f"{Path(sys.executable).absolute()} -m sdxld.cli"


class ServiceError(Exception):
    """The unit cannot be installed; the message says why and what to do."""


@dataclass
class Host:
    """Where this machine's systemd state is read from (tests point these at their own folders)."""

    booted_marker: Path = Path("/run/systemd/system")  # exists iff systemd is PID 1 (sd_booted)
    linger_dir: Path = Path("/var/lib/systemd/linger")
    env: dict = field(default_factory=lambda: dict(os.environ))


@dataclass
class Installed:
    path: Path
    warnings: list[str]
    next_steps: str


def install_unit(root: Path, *, user_unit: bool, target_dir: Path | None = None, service_user: str = "sdxld",
                 demo: bool = False, host: Host | None = None, review: bool = False) -> Installed:
    """Write sdxld.service (or, with `review`, sdxld-review.service) for this installation and
    root, saying what will stop it from working."""
    from .store import atomic_write

    host = host or Host()
    root = Path(root).resolve()
    unit = "sdxld-review" if review else "sdxld"
    name = f"{unit}-user.service" if user_unit else f"{unit}.service"
    executable = sdxld_executable()
    command = "review" if review else "run"
    exec_start = f"{executable} {command} {'--demo ' if demo else ''}--root {root}"
    text = render_unit(name, exec_start=exec_start, root=root, user=service_user)
    if target_dir is None:
        if user_unit:
            base = host.env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
            target_dir = Path(base) / "systemd" / "user"
        else:
            target_dir = Path("/etc/systemd/system")
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        path = atomic_write(target_dir / f"{unit}.service", text.encode())
    except PermissionError:
        raise ServiceError(
            f"cannot write {target_dir / f'{unit}.service'}: permission denied. A system unit needs root: "
            f"`sudo {executable} service install {'--review ' if review else ''}--root {root}`; or install one for your "
            "own account with --user"
        ) from None
    if user_unit:
        warnings, steps = _user_unit_checks(host, unit)
    else:
        warnings, steps = _system_unit_checks(host, root, service_user, executable, unit)
    if not host.booted_marker.is_dir():
        warnings.append(
            f"systemd is not running on this machine (no {host.booted_marker}; a container, or WSL without "
            f"systemd): the unit is written but nothing will start it. Run `{exec_start}` in a terminal instead (inside tmux or screen it keeps "
            "going after you log out)"
        )
    return Installed(path, warnings, steps)


def _system_unit_checks(host: Host, root: Path, service_user: str, executable: str, unit: str) -> tuple[list[str], str]:
    import pwd

    warnings = []
    try:
        account = pwd.getpwnam(service_user)
    except KeyError:
        warnings.append(
            f"the unit runs as user '{service_user}', which does not exist on this machine: create it with "
            f"`sudo useradd --system --home-dir {root} --shell /usr/sbin/nologin {service_user}` and "
            f"`sudo chown -R {service_user}: {root}`, or pass --service-user NAME for an existing account"
        )
    else:
        if root.exists() and root.stat().st_uid != account.pw_uid:
            warnings.append(
                f"{root} is not owned by '{service_user}', the account the service runs as, which must write there: "
                f"`sudo chown -R {service_user}: {root}`"
            )
    hidden = [str(p) for p in (Path(executable.split()[0]), root) if p.is_relative_to("/home") or p.is_relative_to("/root")]
    if hidden:
        warnings.append(
            f"{' and '.join(hidden)} {'is' if len(hidden) == 1 else 'are'} under /home or /root, which a system "
            "unit cannot see (ProtectHome=yes): install sdxld under /opt and the root under /var/lib (README, "
            "\"Run it as a service\"), or install a unit for your own account with --user"
        )
    steps = f"sudo systemctl daemon-reload && sudo systemctl enable --now {unit}; then " + (
        f"`sdxld status --root {root}` or `journalctl -u sdxld -f`" if unit == "sdxld" else f"`journalctl -u {unit}` shows its URL")
    return warnings, steps


def _user_unit_checks(host: Host, unit: str) -> tuple[list[str], str]:
    import getpass

    warnings = []
    user = getpass.getuser()
    runtime = host.env.get("XDG_RUNTIME_DIR")
    manager = runtime and any((Path(runtime) / p).exists() for p in ("systemd/private", "bus"))
    if not manager:
        why = "XDG_RUNTIME_DIR is not set" if not runtime else f"no user manager answers in {runtime}"
        warnings.append(
            f"no systemd user session here ({why}), so `systemctl --user` will fail with \"Failed to connect to "
            f"bus\". Log in as {user} directly (a desktop or ssh session, not su or sudo -u), or run "
            f"`sudo loginctl enable-linger {user}` once and then `export XDG_RUNTIME_DIR=/run/user/{os.getuid()}`"
        )
    steps = f"systemctl --user daemon-reload && systemctl --user enable --now {unit}; logs: journalctl --user -u {unit} -f"
    if not (host.linger_dir / user).exists():
        steps += f"; to keep it running after you log out (and start at boot): sudo loginctl enable-linger {user}"
    return warnings, steps
