"""Running real `sdxld run --demo` processes in tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml


def set_config(root: Path, **sections) -> None:
    """Merge {section: {key: value}} into root/config.yaml."""
    path = root / "config.yaml"
    data = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


class DaemonProcess:
    def __init__(self, root: Path, env: dict | None = None, name: str = "daemon", hostname: str | None = None,
                 log_dir: Path | None = None):
        """`hostname`: run as another host, in a UTS namespace of its own (needs root)."""
        self.root = root
        self.log_path = (log_dir or root) / f"{name}.log"
        self.log_file = open(self.log_path, "w")
        command = [sys.executable, "-m", "sdxld.cli", "run", "--demo"]
        if hostname:
            # exec keeps the daemon's pid the one Popen knows, so kill() kills the daemon itself.
            command = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *command]
        self.process = subprocess.Popen(
            command,
            cwd=root,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def terminate(self, timeout: float = 10) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.log_file.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log_file.close()


def wait_for(predicate, timeout: float = 60, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def records(root: Path) -> list[dict]:
    folder = root / "outputs" / "metadata"
    found = []
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return found


def files(folder: Path, pattern: str = "*") -> list[Path]:
    """The files in `folder`, leaving out hidden ones: a daemon's passing probes of the share's
    clock (.clock.*.tmp) among them, which a test's wait would otherwise take for a claim."""
    return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".")) if folder.exists() else []


def partial_files(root: Path) -> list[Path]:
    """Temporary files left anywhere under outputs/ (there must never be any once a process ended)."""
    return [p for p in (root / "outputs").rglob("*") if p.is_file() and re.search(r"\.tmp$", p.name)]
