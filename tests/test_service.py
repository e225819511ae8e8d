"""systemd units: shipped files are the rendered templates, they verify, the system unit is hardened."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sdxld.service import UNIT_TEMPLATES, install_unit, render_default

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
@pytest.mark.parametrize("name", ["sdxld.service", "sdxld@.service"])
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
def test_service_install_writes_absolute_paths_of_this_installation(tmp_path, user_unit):
    root = tmp_path / "factory"
    root.mkdir()
    path = install_unit(root, user_unit=user_unit, target_dir=tmp_path / "units")
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
    from helpers import run_sdxld

    result = run_sdxld("service", "install", "--user", "--root", str(root), "--target-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"--root {root.resolve()}" in (tmp_path / "sdxld.service").read_text()
    assert "systemctl --user daemon-reload" in result.stdout
