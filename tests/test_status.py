"""`sdxld status` answers whatever state the root is in, and says what each daemon is doing."""

import json

from support.helpers import run_sdxld

from sdxld.status import describe_job, format_status


def test_the_current_job_reads_as_the_stage_and_its_step_of_the_whole_stage():
    assert describe_job({"job": "stage1", "phase": "stage1", "step": 2, "total": 8}) == "stage 1, step 2/8"
    assert describe_job({"job": "stage1", "phase": "stage1 refiner", "step": 7, "total": 8}) == "stage 1, step 7/8 (refiner)"
    assert describe_job({"job": "stage1"}) == "stage 1"
    upscale = {"job": "upscale", "file": "a.png", "phase": "stage3 tile 2/6", "step": 3, "total": 5}
    assert describe_job(upscale) == "upscaling a.png: stage 3 tile 2/6, step 3/5"
    assert describe_job({"job": "upscale", "file": "a.png", "phase": "stage3 latent", "step": 1, "total": 7}) == \
        "upscaling a.png: stage 3, step 1/7"
    assert describe_job({"job": "upscale", "file": "a.png"}) == "upscaling a.png"


def test_a_broken_config_is_reported_above_the_daemons_that_run_on_their_last_good_one():
    daemon = {"pid": 7, "host": "h", "state": "generating", "started": 0, "current": None, "stage1_made": 3,
              "finals_made": 0, "failed": 0, "approved_queued": 0, "loras": {"loaded": 4, "rejected": []},
              "config_error": "/r/config.yaml: prompts.max_extra: unknown key (did you mean 'max_extras'?)"}
    text = format_status([daemon], "/r/config.yaml: prompts.max_extra: unknown key (did you mean 'max_extras'?)")
    assert text.splitlines()[0].startswith("config.yaml invalid: /r/config.yaml: prompts.max_extra")
    assert "keeps its last good config" in text
    assert "config:     /r/config.yaml: prompts.max_extra: unknown key (did you mean 'max_extras'?); running on the last good config" in text
    stopped = format_status([dict(daemon, state="stopped")], "bad")
    assert "it would stop with exit status 78" in stopped


def test_status_in_a_folder_that_is_no_root_says_so_and_how_to_make_one(tmp_path):
    result = run_sdxld("status", "--root", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"sdxld init {tmp_path}" in result.stdout and "no sdxld daemon has run on this root" in result.stdout


def test_status_reads_a_root_whose_config_does_not_even_parse(root):
    (root / "config.yaml").write_text("model: [unclosed\n")
    result = run_sdxld("status", "--config", str(root / "config.yaml"), "--json", cwd=root.parent)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["root"] == str(root) and report["daemons"] == []
    assert "invalid YAML at line" in report["config_error"]


def _daemon(host, pid, state="generating", per_hour=600.0):
    return {"pid": pid, "host": host, "state": state, "started": 0, "current": None, "stage1_made": 3, "finals_made": 0,
            "failed": 0, "approved_queued": 0, "loras": {"loaded": 4, "rejected": []}, "images_per_hour": per_hour}


def test_daemons_of_other_hosts_go_stale_by_the_shares_clock_and_the_rest_are_summed(tmp_path):
    import os

    from sdxld.layout import status_folder
    from sdxld.status import GONE_AFTER_BEATS, HEARTBEAT_S, read_status
    from sdxld.store import share_clock

    folder = status_folder(tmp_path)
    folder.mkdir(parents=True)
    for host, pid, age in (("gpu-a", 11, 1.0), ("gpu-b", 12, 2.0), ("gpu-c", 13, GONE_AFTER_BEATS * HEARTBEAT_S + 60)):
        path = folder / f"{host}.{pid}.json"
        path.write_text(json.dumps(_daemon(host, pid)))
        stamp = share_clock(folder) - age
        os.utime(path, (stamp, stamp))
    (folder / "gpu-d.14.json").write_text(json.dumps(_daemon("gpu-d", 14, state="stopped", per_hour=None)))
    entries = {d["host"]: d["state"] for d in read_status(tmp_path)}
    assert entries["gpu-a"] == entries["gpu-b"] == "generating" and entries["gpu-d"] == "stopped"
    assert entries["gpu-c"].startswith("gone (no sign of life for ")
    text = format_status(read_status(tmp_path))
    assert text.splitlines()[0] == "4 daemons on 4 hosts: 2 running, 1 gone, 1 stopped; 1,200 stage-1 images/hour in all"
    assert not list(folder.glob(".clock*")), "the clock probe is removed"


def test_a_daemons_rate_reads_as_whole_images_per_hour():
    daemon = {**_daemon("gpu-a", 11, per_hour=16184.4), "seconds_per_image": 0.19}
    assert "  rate:       0.19 s per stage-1 image, 16,184 stage-1 images/hour" in format_status([daemon]).splitlines()


def test_a_starting_daemon_forgets_the_ended_ones_of_its_host_and_those_of_others_after_a_day(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from sdxld.layout import status_folder
    from sdxld.status import ENDED_KEPT_S, StatusBoard, read_status
    from sdxld.store import share_clock

    me = socket.gethostname()
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    folder = status_folder(tmp_path)
    folder.mkdir(parents=True)
    files = {
        "stopped here": _daemon(me, 21, state="stopped"),
        "died here": dict(_daemon(me, exited.pid), started=0.0),
        "running here": dict(_daemon(me, os.getppid()), started=share_clock(folder)),
        "stopped elsewhere lately": _daemon("gpu-b", 22, state="stopped"),
        "stopped elsewhere long ago": _daemon("gpu-c", 23, state="stopped"),
        "silent elsewhere for a day": _daemon("gpu-d", 24),
    }
    for name, data in files.items():
        path = folder / f"{name.replace(' ', '-')}.json"
        path.write_text(json.dumps(dict(data, name=name)))
        if name.endswith(("long ago", "for a day")):
            stamp = share_clock(folder) - ENDED_KEPT_S - 60
            os.utime(path, (stamp, stamp))

    class Quiet:
        def status(self, line):
            pass

    board = StatusBoard(tmp_path, Quiet())
    try:
        board.update(force=True, state="loading models")
        listed = {d.get("name", "this one") for d in read_status(tmp_path)}
        assert listed == {"running here", "stopped elsewhere lately", "this one"}
    finally:
        board.finish()


def test_gone_means_three_missed_heartbeats_of_the_daemons_own_interval(tmp_path):
    import os

    from sdxld.layout import status_folder
    from sdxld.status import read_status
    from sdxld.store import share_clock

    folder = status_folder(tmp_path)
    folder.mkdir(parents=True)
    for host, heartbeat_s in (("quick", 1.0), ("default", None)):
        path = folder / f"{host}.1.json"
        data = _daemon(host, 1)
        if heartbeat_s:
            data["heartbeat_s"] = heartbeat_s
        path.write_text(json.dumps(data))
        stamp = share_clock(folder) - 5
        os.utime(path, (stamp, stamp))
    states = {d["host"]: d["state"] for d in read_status(tmp_path)}
    assert states["quick"].startswith("gone") and states["default"] == "generating"


def test_a_running_daemons_heartbeat_keeps_its_status_fresh(tmp_path):
    import os
    import time

    from sdxld import status

    class Quiet:
        def status(self, line):
            pass

    board = status.StatusBoard(tmp_path, Quiet(), heartbeat_s=0.5)
    board.update(force=True, state="loading models")
    old = time.time() - 3600
    os.utime(board.path, (old, old))
    time.sleep(1.7)
    assert board.path.stat().st_mtime > old + 3000, "rewritten while the loop is busy elsewhere"
    assert json.loads(board.path.read_text())["heartbeat_s"] == 0.5, "readers judge gone by this daemon's own heartbeat"
    board.finish()


def test_container_probes_ask_about_this_hosts_daemon():
    import os
    import socket

    from sdxld.status import probe

    me = socket.gethostname()
    loading = dict(_daemon(me, os.getpid(), state="loading models"), updated=1000.0)
    assert probe([loading], "ready", now=1010.0)[0] is False
    running = dict(loading, state="generating")
    assert probe([running], "ready", now=1010.0) == (True, f"pid {os.getpid()}: generating")
    assert probe([running], "alive", max_age_s=300, now=1010.0)[0] is True
    assert probe([running], "alive", max_age_s=300, now=2000.0) == (False, "the loop updated its status 1000 s ago (limit 300 s)")
    elsewhere = dict(running, host="another-pod")
    assert probe([elsewhere], "ready") == (False, f"no running sdxld daemon on {me}")
    assert probe([dict(running, state="gone (no sign of life for 99 s)")], "alive")[0] is False


def test_stage1_and_finals_have_rates_of_their_own(root):
    from sdxld.service import Notifier
    from sdxld.status import StatusBoard

    board = StatusBoard(root, Notifier())
    try:
        for _ in range(4):
            board.image_done(2.0, "stage1")  # e.g. a batch of 4 that took 8 s
        board.image_done(17.0, "final")
        board.image_done(19.0, "final")
    finally:
        board.finish()
    data = json.loads(board.path.read_text())
    assert (data["seconds_per_image"], data["seconds_per_final"]) == (2.0, 18.0)
    assert (data["stage1_made"], data["finals_made"]) == (4, 2)
    report = format_status([data])
    assert "2.0 s per stage-1 image" in report and "18.0 s each, from taking the approved image to its saved final" in report
    assert "2.0 s/img" in board.line()
