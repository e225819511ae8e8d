"""What sdxld creates: only under its root, with the user's umask; a flood of files stays a queue."""

from __future__ import annotations

import os
import shutil
import stat

import psutil
from support.daemons import DaemonProcess, files, set_config, wait_for
from support.helpers import run_sdxld


def test_every_file_and_folder_sdxld_creates_respects_the_umask(root):
    before = {p for p in root.rglob("*")}
    result = run_sdxld("generate", "--demo", "--count", "1", "--seed", "3", cwd=root,
                       preexec_fn=lambda: os.umask(0o027))
    assert result.returncode == 0, result.stderr
    created = [p for p in root.rglob("*") if p not in before]
    assert any(p.suffix == ".png" for p in created) and any(p.suffix == ".json" for p in created)
    for path in created:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o027 == 0, f"{path.relative_to(root)} has mode {oct(mode)} despite umask 027"


def test_a_thousand_junk_files_at_once_stay_a_queue_and_the_real_image_gets_its_final(root, make_stage1):
    [real] = make_stage1(1)
    # The real image's final without the diffusion passes: the point is the queue, not the upscale.
    set_config(root, daemon={"max_pending": 0},
               generation={"mid_scale": 1.5, "final_scale": 2, "stage2": {"enabled": False}, "stage3": {"enabled": False}})
    staging = root / "staging"
    staging.mkdir()
    for i in range(1000):
        (staging / f"junk_{i:04d}.png").write_bytes(b"not an image %d" % i)
    shutil.move(real, staging / "zz_real.png")
    daemon = DaemonProcess(root)
    try:
        wait_for(lambda: "sdxld running" in daemon.log, 120, what="the daemon to start")
        approved = root / "inbox" / "approved"
        for path in sorted(staging.iterdir()):
            os.rename(path, approved / path.name)
        wait_for(lambda: files(root / "outputs" / "final", "*.png"), 300, interval=0.5, what="the real image's final")
        wait_for(lambda: not any(approved.iterdir()), 300, interval=0.5, what="the queue to drain")
        rss_mib = psutil.Process(daemon.process.pid).memory_info().rss / 2**20
        start = len(files(root / "outputs" / "stage1", "*.png"))
        wait_for(lambda: len(files(root / "outputs" / "stage1", "*.png")) > start, 60, what="stage 1 to resume")
        assert daemon.terminate(30) == 0
    finally:
        daemon.close()
    failed = root / "inbox" / "failed"
    assert len(files(failed, "junk_*.png")) == 1000 and len(files(failed, "*.error.txt")) == 1000
    assert (root / "inbox" / "done" / "zz_real.png").exists()
    assert rss_mib < 2048, f"daemon RSS {rss_mib:.0f} MiB after the flood"
