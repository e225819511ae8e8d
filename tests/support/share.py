"""One folder shared by several "hosts" for real: an sshd bound to 127.0.0.1 exports it, and each
host gets its own sshfs (FUSE) mount of it, as machines on a network would. Hosts are told apart
by running each daemon in its own UTS namespace (`unshare --uts`) under its own host name."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def missing_tools() -> list[str]:
    """What this machine lacks to share a folder this way (empty: it can)."""
    missing = [tool for tool in ("sshfs", "ssh-keygen", "unshare", "fusermount") if shutil.which(tool) is None]
    if not Path(SSHD).exists():
        missing.append(SSHD)
    if not Path("/dev/fuse").exists():
        missing.append("/dev/fuse")
    if os.geteuid() != 0:
        missing.append("root (for unshare --uts and sshd)")
    return missing


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SshShare:
    """`folder` served over SFTP on 127.0.0.1; `mount(where)` gives one host its own view."""

    def __init__(self, folder: Path, work: Path):
        self.folder = folder
        self.work = work
        self.port = _free_port()
        self.mounts: list[Path] = []
        keys = work / "keys"
        keys.mkdir(parents=True)
        for name in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
        shutil.copy(keys / "client.pub", keys / "authorized_keys")
        self.client_key = keys / "client"
        config = work / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {keys / 'host'}\n"
            f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile {work / 'sshd.pid'}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
        self.log = open(work / "sshd.log", "w")
        self.sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not _listening(self.port):
            if self.sshd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(work / 'sshd.log').read_text()}")
            time.sleep(0.05)

    def mount(self, where: Path) -> Path:
        """Mount the shared folder at `where` with the options the README recommends for sshfs."""
        where.mkdir(parents=True)
        subprocess.run([
            "sshfs", "-p", str(self.port), f"root@127.0.0.1:{self.folder}", str(where),
            "-o", f"IdentityFile={self.client_key},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes",
            "-o", "reconnect,dir_cache=no",
        ], check=True, timeout=30)
        self.mounts.append(where)
        return where

    def close(self) -> None:
        for where in self.mounts:
            subprocess.run(["fusermount", "-u", "-z", str(where)], check=False)
        self.sshd.terminate()
        self.sshd.wait(10)
        self.log.close()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
