"""systemd units: shipped files are the rendered templates, they verify, the system unit is hardened."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sdxld.service import UNIT_TEMPLATES, Host, install_unit, render_default

REPO = Path(__file__).resolve().parents[1]
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


@pytest.mark.parametrize("name", sorted(UNIT_TEMPLATES))
def test_shipped_units_are_the_rendered_templates(name):
    assert (REPO / "systemd" / name).read_text() == render_default(name)


@needs_systemd_analyze
@pytest.mark.parametrize("name", sorted(UNIT_TEMPLATES))
def test_every_shipped_unit_verifies_without_warnings(name):
    result = subprocess.run(["systemd-analyze", "verify", str(REPO / "systemd" / name)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("name", ["sdxld.service", "sdxld@.service", "sdxld-review.service"])
def test_system_units_score_at_most_3_5_in_the_security_analysis(name):
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(REPO / "systemd" / name)],
                            capture_output=True, text=True)
    score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout).group(1))
    assert score <= 3.5, result.stdout[-2000:]


def test_units_keep_what_the_gpu_needs_and_stop_restart_loops():
    text = render_default("sdxld.service")
    assert "Type=notify" in text and "WatchdogSec=" in text
    assert "RestartPreventExitStatus=78" in text and "Restart=on-failure" in text
    assert not re.search(r"^(PrivateDevices|MemoryDenyWriteExecute)=", text, re.M)
    assert "DeviceAllow=/dev/nvidiactl rw" in text and "DevicePolicy=closed" in text
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in text
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in render_default("sdxld@.service")


@pytest.mark.parametrize("user_unit", [False, True])
def test_service_install_review_writes_the_review_pages_unit(tmp_path, user_unit):
    root = tmp_path / "factory"
    root.mkdir()
    result = install_unit(root, user_unit=user_unit, target_dir=tmp_path / "units", review=True)
    text = result.path.read_text()
    assert result.path.name == "sdxld-review.service"
    assert re.search(rf"^ExecStart=\S+ review --root {re.escape(str(root.resolve()))}$", text, re.M)
    assert "sdxld-review" in result.next_steps
    if not user_unit:  # no GPU to reach: the strict switches the daemon's unit cannot have
        assert "PrivateDevices=yes" in text and "MemoryDenyWriteExecute=yes" in text
        assert f"ReadWritePaths={root.resolve()}" in text


@pytest.mark.parametrize("user_unit", [False, True])
def test_service_install_writes_absolute_paths_of_this_installation(tmp_path, user_unit):
    root = tmp_path / "factory"
    root.mkdir()
    path = install_unit(root, user_unit=user_unit, target_dir=tmp_path / "units").path
    text = path.read_text()
    exec_start = re.search(r"^ExecStart=(\S+) run --root (\S+)$", text, re.M)
    assert Path(exec_start.group(1)).is_absolute() and Path(exec_start.group(1)).exists()
    assert exec_start.group(2) == str(root.resolve())
    assert f"WorkingDirectory={root.resolve()}" in text
    assert ("User=sdxld" in text) != user_unit
    if shutil.which("systemd-analyze"):
        result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_cli_service_install(root, tmp_path):
    from support.helpers import run_sdxld

    result = run_sdxld("service", "install", "--user", "--root", str(root), "--target-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"--root {root.resolve()}" in (tmp_path / "sdxld.service").read_text()
    assert "systemctl --user daemon-reload" in result.stdout


# --- service install checks what would stop the unit from working, and says what to do ---------


def test_service_install_on_a_folder_that_is_no_root_offers_sdxld_init(tmp_path):
    from support.helpers import run_sdxld

    new = tmp_path / "new"
    new.mkdir()
    result = run_sdxld("service", "install", "--user", "--root", str(new), "--target-dir", str(tmp_path / "units"), cwd=tmp_path)
    assert result.returncode == 78
    assert f"sdxld init {new}" in result.stderr and "--demo" in result.stderr
    assert not (tmp_path / "units" / "sdxld.service").exists()


@pytest.mark.parametrize("user_unit", [False, True])
def test_service_install_carries_demo_into_the_unit(tmp_path, user_unit):
    root = tmp_path / "demo-root"
    root.mkdir()
    text = install_unit(root, user_unit=user_unit, target_dir=tmp_path / "units", demo=True).path.read_text()
    assert re.search(rf"^ExecStart=\S+ run --demo --root {re.escape(str(root.resolve()))}$", text, re.M)


def test_a_system_unit_keeps_model_caches_inside_the_root_it_may_write(tmp_path):
    text = install_unit(tmp_path, user_unit=False, target_dir=tmp_path / "units").path.read_text()
    assert f"Environment=XDG_CACHE_HOME={tmp_path.resolve()}/.cache" in text
    assert f"ReadWritePaths={tmp_path.resolve()}" in text


def test_service_install_warns_when_the_units_user_does_not_exist(tmp_path):
    result = install_unit(tmp_path, user_unit=False, target_dir=tmp_path / "units", service_user="no-such-user-sdxld")
    assert result.path.exists()
    warning = next(w for w in result.warnings if "no-such-user-sdxld" in w)
    assert "does not exist" in warning and "useradd" in warning and "--service-user" in warning


def test_service_install_warns_when_systemd_is_not_running(tmp_path):
    host = Host(booted_marker=tmp_path / "no-systemd-here", linger_dir=tmp_path, env={})
    result = install_unit(tmp_path, user_unit=False, target_dir=tmp_path / "units", service_user="root", host=host)
    warning = next(w for w in result.warnings if "systemd is not running" in w)
    assert f"run --root {tmp_path.resolve()}" in warning and "tmux" in warning


def test_a_user_unit_without_a_session_bus_says_how_to_get_one(tmp_path):
    booted = tmp_path / "run-systemd-system"
    booted.mkdir()
    host = Host(booted_marker=booted, linger_dir=tmp_path / "linger", env={"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    result = install_unit(tmp_path, user_unit=True, host=host)
    assert result.path == tmp_path / "cfg" / "systemd" / "user" / "sdxld.service"
    warning = next(w for w in result.warnings if "systemctl --user" in w)
    assert "XDG_RUNTIME_DIR is not set" in warning and "loginctl enable-linger" in warning
    assert "enable-linger" in result.next_steps  # or it stops when the user logs out

    runtime = tmp_path / "runtime"
    (runtime / "systemd").mkdir(parents=True)
    (runtime / "systemd" / "private").touch()
    (tmp_path / "linger").mkdir()
    (tmp_path / "linger" / __import__("getpass").getuser()).touch()
    fine = install_unit(tmp_path, user_unit=True, host=Host(booted, tmp_path / "linger", {"XDG_RUNTIME_DIR": str(runtime),
                                                                                        "XDG_CONFIG_HOME": str(tmp_path / "cfg")}))
    assert fine.warnings == [] and "enable-linger" not in fine.next_steps


def test_a_system_unit_for_a_root_under_home_says_protecthome_hides_it(tmp_path):
    result = install_unit(Path("/home/someone/sdxld"), user_unit=False, target_dir=tmp_path, service_user="root")
    assert any("ProtectHome=yes" in w and "--user" in w for w in result.warnings)


def test_the_watchdog_is_only_ever_told_to_wait_longer(tmp_path, monkeypatch):
    import socket

    from sdxld.service import Notifier

    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(0.5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        assert not Notifier().allow_silence(3600), "no watchdog configured: nothing to say"
        monkeypatch.setenv("WATCHDOG_USEC", str(7200 * 10**6))
        assert not Notifier().allow_silence(3600), "it already waits longer"
        monkeypatch.setenv("WATCHDOG_USEC", str(300 * 10**6))
        assert Notifier().allow_silence(3600)
        assert server.recv(100).decode() == "WATCHDOG_USEC=3600000000"
    finally:
        server.close()
