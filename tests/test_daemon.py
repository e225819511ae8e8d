"""`sdxld run` as users run it: a real process, the tiny model, real watchdog events, real signals."""

import re
import shutil
import socket
import threading
import time

import pytest
from support.daemons import DaemonProcess, files, partial_files, records, set_config, wait_for
from support.helpers import run_sdxld

from sdxld.tiny import write_tiny_lora


def stage1_images(root):
    return files(root / "outputs" / "stage1", "*.png")


def finals(root):
    return files(root / "outputs" / "final", "*.png")


def test_the_daemon_generates_upscales_and_follows_live_edits(root, tmp_path):
    set_config(root, daemon={"settle_s": 0.5, "rescan_s": 2})
    daemon = DaemonProcess(root)
    try:
        wait_for(lambda: len(stage1_images(root)) >= 3, 90, what="continuous stage-1 images")

        # Approve: move a stage-1 image into the inbox.
        image = stage1_images(root)[0]
        tag = image.name.split("_stage1_")[0]
        (root / "inbox" / "approved").mkdir(parents=True, exist_ok=True)
        shutil.move(image, root / "inbox" / "approved" / image.name)
        wait_for(lambda: (root / "inbox" / "done" / image.name).exists(), 60, what="the approved image in done/")
        assert [p.name for p in finals(root)] == [f"{tag}_final_512x896.png"]

        # Edit the prompt options: only the new phrase is left to sample.
        (root / "prompts" / "prompt_options.txt").write_text("violet lighthouse at dusk\n")
        wait_for(lambda: any("violet lighthouse at dusk" in r["prompt"] for r in records(root)), 60,
                 what="the new prompt option in a record")

        # Drop a LoRA into loras/style (copied in, as a file manager would).
        lora = write_tiny_lora(tmp_path / "inkwash.safetensors", seed=3)
        shutil.copy(lora, root / "loras" / "style" / "inkwash.safetensors")
        wait_for(lambda: any(u["name"] == "inkwash" for r in records(root) for u in r["loras"]), 60,
                 what="the new LoRA in a record")

        # Delete it: later images no longer use it.
        (root / "loras" / "style" / "inkwash.safetensors").unlink()
        deleted_at = time.time()
        wait_for(lambda: len([r for r in records(root) if r["created"] and _after(r, deleted_at + 4)]) >= 3, 60,
                 what="images made after the LoRA was deleted")
        later = [r for r in records(root) if _after(r, deleted_at + 4)]
        assert later and not any(u["name"] == "inkwash" for r in later for u in r["loras"])

        # A broken config edit is refused; generation goes on with the last good config.
        good = (root / "config.yaml").read_text()
        (root / "config.yaml").write_text(good.replace("base_width: 768", "base_width: 770"))
        wait_for(lambda: "config change not applied" in daemon.log, 30, what="the config error in the log")
        assert "generation.base_width: 770 is not a multiple of 8" in daemon.log
        # sdxld status needs no valid config: exactly now the user needs it.
        status = wait_for(lambda: (r := run_sdxld("status", "--root", str(root), cwd=root.parent)).returncode == 0
                          and "running on the last good config" in r.stdout and r, 30, interval=0.5, what="status")
        assert "config.yaml invalid:" in status.stdout and "base_width: 770 is not a multiple of 8" in status.stdout
        count = len(stage1_images(root))
        wait_for(lambda: len(stage1_images(root)) >= count + 2, 60, what="generation going on")

        # Deleting config.yaml is just another bad edit: the last good config stays.
        (root / "config.yaml").unlink()
        wait_for(lambda: "not found" in daemon.log, 30, what="the missing config in the log")
        status = run_sdxld("status", "--config", str(root / "config.yaml"), cwd=root.parent)
        assert status.returncode == 0 and "not found" in status.stdout
        assert re.search(r"sdxld pid \d+ on \S+: (running|generating)", status.stdout), status.stdout
        count = len(stage1_images(root))
        wait_for(lambda: len(stage1_images(root)) >= count + 2, 60, what="generation going on without config.yaml")

        assert daemon.terminate(10) == 0
    finally:
        daemon.close()
    assert partial_files(root) == []


def _after(record, moment):
    from datetime import datetime

    return datetime.fromisoformat(record["created"]).timestamp() >= moment


def test_sigterm_during_stage1_exits_0_quickly_and_leaves_no_partial_file(root):
    daemon = DaemonProcess(root)
    try:
        wait_for(lambda: len(stage1_images(root)) >= 2, 90, what="stage-1 images")
        started = time.monotonic()
        assert daemon.terminate(10) == 0
        assert time.monotonic() - started < 10
    finally:
        daemon.close()
    assert partial_files(root) == []
    tags = {r["tag"] for r in records(root)}
    assert {p.name.split("_stage1_")[0] for p in stage1_images(root)} <= tags
    assert "SIGTERM received" in daemon.log and "sdxld stopped" in daemon.log


def test_kill_9_during_an_upscale_then_restart_loses_and_duplicates_nothing(root, make_stage1):
    [image] = make_stage1(1)
    tag = image.name.split("_stage1_")[0]
    set_config(root, daemon={"max_pending": 1})  # stage 1 stays paused: the upscale is the only work
    approved = root / "inbox" / "approved"
    processing = root / "inbox" / "processing"
    approved.mkdir(parents=True, exist_ok=True)
    shutil.copy(image, approved / image.name)

    first = DaemonProcess(root, name="first")
    try:
        wait_for(lambda: files(processing), 90, interval=0.02, what="the image being claimed")
        first.kill()
    finally:
        first.close()
    assert finals(root) == [], "killed before the final was written"
    assert len(files(processing)) == 1

    second = DaemonProcess(root, name="second")
    try:
        wait_for(lambda: (root / "inbox" / "done" / image.name).exists(), 90, what="the recovered image in done/")
        assert second.terminate(10) == 0
    finally:
        second.close()
    assert [p.name for p in finals(root)] == [f"{tag}_final_512x896.png"]
    assert files(processing) == [] and files(approved) == [] and files(root / "inbox" / "failed") == []
    assert [p.name for p in files(root / "inbox" / "done")] == [image.name]
    assert "recovered" in second.log and "attempt 2" in second.log
    assert partial_files(root) == []


def test_systemd_notifications_arrive_on_the_notify_socket(root, tmp_path):
    socket_path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(socket_path))
    server.settimeout(0.2)
    messages = []
    done = threading.Event()

    def listen():
        while not done.is_set():
            try:
                messages.append(server.recv(4096).decode())
            except socket.timeout:
                continue

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    # compile graphs (traced only): a build of a new shape pings nothing, so the watchdog is told to wait.
    set_config(root, performance={"compile": "graphs", "compile_backend": "eager"})
    daemon = DaemonProcess(root, env={"NOTIFY_SOCKET": str(socket_path), "WATCHDOG_USEC": "300000000"})
    try:
        wait_for(lambda: any(m.startswith("READY=1") for m in messages), 90, what="READY=1")
        wait_for(lambda: any(m.startswith("WATCHDOG=1") for m in messages), 30, what="WATCHDOG=1")
        wait_for(lambda: any(m.startswith("STATUS=") and "stage1 #" in m for m in messages), 30, what="STATUS=")
        assert daemon.terminate(10) == 0
        wait_for(lambda: any(m.startswith("STOPPING=1") for m in messages), 5, what="STOPPING=1")
    finally:
        done.set()
        listener.join(5)  # out of recv before the socket closes under it
        daemon.close()
        server.close()
    first_ready = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages[:first_ready]), "loading extends the start timeout"
    assert "WATCHDOG_USEC=3600000000" in messages[:first_ready]
    status = next(m for m in messages if m.startswith("STATUS=") and "LoRAs" in m)
    assert "approved queued" in status and "LoRAs (" in status


def test_two_daemons_on_one_root_process_each_approved_image_exactly_once(root, make_stage1):
    images = make_stage1(4)
    # Small finals without the diffusion passes: the point is who processes what, not the upscale.
    set_config(root, daemon={"max_pending": 1, "settle_s": 0.2},
               generation={"mid_scale": 1.5, "final_scale": 2, "stage2": {"enabled": False}, "stage3": {"enabled": False}})
    approved = root / "inbox" / "approved"
    approved.mkdir(parents=True, exist_ok=True)
    a = DaemonProcess(root, name="a")
    b = DaemonProcess(root, name="b")
    try:
        wait_for(lambda: "sdxld running" in a.log and "sdxld running" in b.log, 90, what="both daemons")
        for image in images:
            shutil.move(image, approved / image.name)
        wait_for(lambda: len(files(root / "inbox" / "done")) == 4, 120, what="all four in done/")
        assert a.terminate(10) == 0 and b.terminate(10) == 0
    finally:
        a.close()
        b.close()
    tags = sorted(p.name.split("_stage1_")[0] for p in images)
    assert sorted(p.name.split("_final_")[0] for p in finals(root)) == tags
    assert sorted(p.name for p in files(root / "inbox" / "done")) == sorted(p.name for p in images)
    processed = a.log.count("approved ") + b.log.count("approved ")
    assert processed == 4, (a.log, b.log)
    assert files(root / "inbox" / "failed") == []


def test_stage1_pauses_at_max_pending_and_status_says_why(root):
    set_config(root, daemon={"max_pending": 2})
    daemon = DaemonProcess(root)
    try:
        wait_for(lambda: len(stage1_images(root)) >= 2, 90, what="two stage-1 images")
        result = wait_for(lambda: (r := run_sdxld("status", "--demo", cwd=root)).returncode == 0 and "paused" in r.stdout and r, 30,
                          interval=1, what="status to say paused")
        assert "2 stage-1 images waiting to be curated (daemon.max_pending 2)" in result.stdout
        time.sleep(2)
        assert len(stage1_images(root)) == 2
        before = {p.name for p in stage1_images(root)}
        stage1_images(root)[0].unlink()  # the user curates: deletes one
        wait_for(lambda: {p.name for p in stage1_images(root)} - before, 30, what="generation to resume")
        time.sleep(1.5)
        assert len(stage1_images(root)) == 2, "and pause again at the limit"
        as_json = run_sdxld("status", "--demo", "--json", cwd=root)
        assert '"pid"' in as_json.stdout
        assert daemon.terminate(10) == 0
    finally:
        daemon.close()


def test_a_bad_config_exits_78_without_starting(root):
    set_config(root, generation={"base_width": 770})
    result = run_sdxld("run", "--demo", cwd=root, timeout=60)
    assert result.returncode == 78
    assert "generation.base_width" in result.stderr


def test_five_stage1_failures_in_a_row_end_the_process_for_a_restart(root, monkeypatch):
    """In-process: a stage 1 that always fails makes run() raise, so systemd restarts sdxld."""
    from support.helpers import demo_config

    from sdxld import daemon as daemon_module, pacing
    from sdxld.engine import Engine
    from sdxld.foreground import StopFlag
    from sdxld.service import Notifier
    from sdxld.status import read_status

    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(Engine, "stage1_batch", broken)
    monkeypatch.setattr(pacing, "FAILURE_BACKOFF_S", 0.01)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    runner = daemon_module.Daemon(root / "config.yaml", demo_config(root), demo=True, stop=StopFlag(), notifier=Notifier())
    with pytest.raises(RuntimeError, match="5 stage-1 images failed in a row"):
        runner.run()
    status = read_status(root)[0]
    assert "device-side assert" in status["last_error"] and status["state"] == "stopped"


def test_approvals_and_rejections_change_the_odds_of_the_next_images(root, tmp_path):
    """Learned rotation, live: the user approves one character's images and rejects (or deletes)
    the other's while the daemon runs; the next images' records show the odds moved."""
    for name, seed in (("alice", 1), ("kuro", 2)):
        write_tiny_lora(root / f"loras/character/{name}.safetensors", seed=seed)
    write_tiny_lora(root / "loras/style/ink.safetensors", seed=3)
    # Seeds 102, 103, 104 draw alice, kuro, alice while nothing is judged yet.
    set_config(root, daemon={"settle_s": 0.2}, generation={"seed": 102})
    daemon = DaemonProcess(root)

    def character(record):
        return next(u["name"] for u in record["loras"] if u["kind"] == "character")

    try:
        def written():
            return [r for r in records(root) if (root / "outputs" / "stage1" / r["files"]["stage1"]).exists()]

        made = wait_for(lambda: len(rs := written()) >= 3 and rs, 120, what="three stage-1 images")
        assert {character(r) for r in made} == {"alice", "kuro"}
        first = made[0]["rotation"]["character"]
        assert first["judged"] == [] and first["untried"] == pytest.approx(0.5), "no verdicts yet: even odds"

        moved_at = time.time()
        approved = root / "inbox" / "approved"
        for record in made:
            image = root / "outputs" / "stage1" / record["files"]["stage1"]
            if character(record) == "kuro":
                shutil.move(image, approved / image.name)
            elif not (root / "outputs" / "rejected").exists():
                (root / "outputs" / "rejected").mkdir()
                shutil.move(image, root / "outputs" / "rejected" / image.name)  # the review page's X
            else:
                image.unlink()  # deleted without approving: a rejection too
        kuro = sum(character(r) == "kuro" for r in made)
        alice = len(made) - kuro

        def judged_after_the_moves():
            for record in records(root):
                table = {row[0]: row for row in record.get("rotation", {}).get("character", {}).get("judged", [])}
                if _after(record, moved_at + 1) and table.get("kuro", [0, 0])[1] == kuro and table.get("alice", [0, 0, 0])[2] == alice:
                    return table
        table = wait_for(judged_after_the_moves, 120, what="a new image whose record counts every verdict")
        assert table["kuro"][3] > 0.75 > 0.25 > table["alice"][3], table

        wait_for(lambda: f"approved {kuro} of {kuro + alice} " in run_sdxld("status", "--demo", cwd=root).stdout, 30,
                 interval=1, what="the approval rate in `sdxld status`")
        assert "learning: LoRAs and prompt options" in run_sdxld("status", "--demo", cwd=root).stdout
        assert daemon.terminate(20) == 0
    finally:
        daemon.close()
