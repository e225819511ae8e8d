"""What each daemon is doing: written by the daemon, read by `sdxld status`.

The status files live under `<root>/.sdxld/status/`, one per daemon process, written atomically
at most once a second (and on every state change). `sdxld status` reads them without loading or
even parsing config.yaml, so it answers exactly when the config is broken and the user needs it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import deque
from pathlib import Path

from . import store
from .layout import status_folder


# A running daemon's status file is rewritten at least every heartbeat_s (daemon.heartbeat_s: a
# thread does it while the loop is busy or the models load); one unchanged for GONE_AFTER_BEATS
# times the heartbeat its file names belongs to a daemon that is gone (its host died or lost the
# share), judged by the share's clock.
HEARTBEAT_S = 10.0
GONE_AFTER_BEATS = 3
# A daemon of another host that ended (stopped, gone) stays listed this long; this host's own
# ended ones until the next start here.
ENDED_KEPT_S = 24 * 3600


class StatusBoard:
    """What the daemon is doing, written atomically for `sdxld status` (and mirrored to systemd)."""

    def __init__(self, root: Path, notifier, heartbeat_s: float = HEARTBEAT_S):
        try:
            forget_ended(root)
        except OSError:
            pass  # a read-only or vanished status folder: this daemon's own writes say what is wrong
        self.path = status_folder(root) / f"{socket.gethostname()}.{os.getpid()}.json"
        self.notifier = notifier
        self.data = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "state": "starting",
            "current": None,
            "approved_queued": 0,
            "stage1_made": 0,
            "finals_made": 0,
            "failed": 0,
            # Mean of the last 20 stage-1 images (a batch's time shared by its images), and of the
            # last 20 finals from claim to saved final: one mean of both would say neither.
            "seconds_per_image": None,
            "seconds_per_final": None,
            "images_per_hour": None,
            "loras": {"loaded": 0, "rejected": []},
            "paused": None,
            "last_error": None,
            # Set while the config file on disk is invalid and the daemon runs on its last good one.
            "config_error": None,
            "restart_needed": [],
            "watch": None,
            # Approval rate of the last 24 hours' images and what learned rotation applies to.
            "taste": None,
            # How often this file is rewritten at the least: readers judge "gone" by it.
            "heartbeat_s": heartbeat_s,
        }
        # The loop and the heartbeat thread both write the file: one at a time, from whole data.
        self._lock = threading.Lock()
        self._written = 0.0
        self._durations = {"stage1": deque(maxlen=20), "final": deque(maxlen=20)}
        self._stopped = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="sdxld-status", daemon=True)
        self._heartbeat.start()

    @property
    def heartbeat_s(self) -> float:
        return self.data["heartbeat_s"]

    @heartbeat_s.setter
    def heartbeat_s(self, seconds: float) -> None:
        with self._lock:
            self.data["heartbeat_s"] = seconds

    def _beat(self) -> None:
        """Rewrite the status file so other hosts see this daemon alive while the loop is busy.
        Rewritten, not touched: a new file's mtime comes from the share's clock on every network
        file system, a touch's may come from this host's (sshfs sends the client's time)."""
        while not self._stopped.wait(min(self.heartbeat_s, 1.0)):
            with self._lock:
                if time.monotonic() - self._written < self.data["heartbeat_s"]:
                    continue
                try:
                    self._write()
                except OSError:
                    pass  # the share is away for a moment: the next beat tries again

    def _write(self) -> None:
        store.write_json(self.path, self.data)
        self._written = time.monotonic()

    def update(self, force: bool = False, **changes) -> None:
        with self._lock:
            self.data.update(changes)
            self.data["updated"] = time.time()
            if force or time.monotonic() - self._written >= 1.0:
                self._write()
        self.notifier.status(self.line())

    def image_done(self, seconds: float, kind: str) -> None:
        """A stage-1 image (`kind` stage1) or a final (final) took `seconds`."""
        with self._lock:
            durations = self._durations[kind]
            durations.append(seconds)
            self.data["stage1_made" if kind == "stage1" else "finals_made"] += 1
            self.data["seconds_per_image" if kind == "stage1" else "seconds_per_final"] = round(sum(durations) / len(durations), 2)
            hours = (time.time() - self.data["started"]) / 3600
            self.data["images_per_hour"] = round(self.data["stage1_made"] / hours, 1) if hours > 0 else None

    def step_reporter(self, job: str):
        """A stage's per-step callback: keeps systemd's watchdog fed through a long stage and shows
        the step in the status (written at most once a second: steps can be many per second)."""
        shown_at = 0.0

        def on_step(phase: str, step: int, total: int) -> None:
            nonlocal shown_at
            self.notifier.watchdog()
            # update() also sends systemd a STATUS line: once a second is plenty.
            if time.monotonic() - shown_at >= 1.0:
                shown_at = time.monotonic()
                self.update(current={"job": job, "phase": phase, "step": step, "total": total})

        return on_step

    def line(self) -> str:
        return status_line(self.data)

    def finish(self) -> None:
        self._stopped.set()
        self.update(force=True, state="stopped", current=None)


def status_line(d: dict) -> str:
    """One daemon's state in a line: systemd's STATUS and the review page's header."""
    parts = [d["state"]]
    if d.get("paused"):
        parts[0] = f"paused: {d['paused']}"
    parts.append(f"stage1 #{d['stage1_made']}")
    if d.get("seconds_per_image") is not None:
        parts.append(f"{d['seconds_per_image']:.1f} s/img")
    parts.append(f"{d['approved_queued']} approved queued")
    rejected = len(d["loras"]["rejected"])
    unchecked = d["loras"].get("unchecked")  # status files of older versions have none
    parts.append(f"{d['loras']['loaded']} LoRAs ({rejected} rejected{f', {unchecked} to check' if unchecked else ''})")
    if d.get("taste"):
        parts.append(describe_taste(d["taste"], short=True))
    if d.get("config_error"):
        parts.append("config.yaml invalid, running on the last good one")
    return " · ".join(parts)


def describe_taste(taste: dict, short: bool = False) -> str:
    """'approved 12 of 52 (23%) in 24 h, learning: LoRAs and prompt options'."""
    if taste.get("judged"):
        rate = f"approved {taste['approved']} of {taste['judged']} ({taste['rate']:.0%}) in {taste['hours']:g} h"
    else:
        rate = f"none approved or rejected in {taste['hours']:g} h"
    return f"{rate}, learning {taste['learning']}" if short else f"{rate}; learning: {taste['learning']}"


def read_status(root: Path) -> list[dict]:
    """Status of every daemon on this root, of every host sharing it. A daemon of this host whose
    process is gone is marked dead at once; one of any host whose file has not changed for
    GONE_AFTER_BEATS of its heartbeats (by the share's clock) is marked gone."""
    return [data for _, data, _ in _status_files(root)]


def forget_ended(root: Path) -> None:
    """Remove the status files of daemons that ended: this host's (stopped, dead) and any host's
    unchanged for ENDED_KEPT_S. Run as a daemon starts, so `sdxld status` shows what runs and what
    ended lately, not every restart since the root was made (systemd restarts, reboots, pods)."""
    for path, data, age in _status_files(root):
        ended_here = data.get("host") == socket.gethostname() and data["state"].startswith(("stopped", "dead"))
        if ended_here or (not is_live(data) and age > ENDED_KEPT_S):
            path.unlink(missing_ok=True)


def _status_files(root: Path):
    """(path, status with its state judged, seconds since last written by the share's clock)."""
    from .owners import pid_alive_since

    folder = status_folder(root)
    if not folder.is_dir():
        return
    now = store.share_clock(folder)
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            age = now - path.stat().st_mtime
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("state") == "stopped":
            pass
        elif data.get("host") == socket.gethostname() and not pid_alive_since(
            int(data.get("pid", 0)), float(data.get("started", 0))
        ):
            data["state"] = "dead (stale status)"
        elif age > GONE_AFTER_BEATS * float(data.get("heartbeat_s") or HEARTBEAT_S):
            data["state"] = f"gone (no sign of life for {age:.0f} s)"
        yield path, data, age


def is_live(data: dict) -> bool:
    return not data.get("state", "").startswith(("stopped", "dead", "gone"))


def summary_line(entries: list[dict]) -> str:
    """'3 daemons on 2 hosts: 2 running, 1 gone; 1,410 stage-1 images/hour in all'."""
    live = [d for d in entries if is_live(d)]
    gone = [d for d in entries if d.get("state", "").startswith(("dead", "gone"))]
    hosts = {d.get("host") for d in entries}
    rate = sum(d.get("images_per_hour") or 0 for d in live)
    parts = [f"{len(live)} running"] + ([f"{len(gone)} gone"] if gone else [])
    stopped = len(entries) - len(live) - len(gone)
    if stopped:
        parts.append(f"{stopped} stopped")
    return (f"{len(entries)} daemons on {len(hosts)} host{'s' if len(hosts) != 1 else ''}: {', '.join(parts)}; "
            f"{rate:,.0f} stage-1 images/hour in all")


def config_health(config_file: Path) -> str | None:
    """None when the config file loads; else what is wrong with it, in one line."""
    from .config import ConfigError, load

    if not config_file.exists():
        return f"{config_file}: not found (make a root with `sdxld init {config_file.parent}`)"
    try:
        load(config_file)
    except ConfigError as err:
        return str(err)
    return None


def describe_job(current: dict) -> str:
    """'stage 1, step 6/8 (refiner)' or 'upscaling a.png: stage 3 tile 2/6, step 3/5'."""
    job = current.get("job")
    phase = str(current.get("phase") or "")
    refiner = phase.endswith(" refiner")
    phase = phase.removesuffix(" refiner").replace("stage1", "stage 1").replace("stage2", "stage 2")
    phase = phase.replace("stage3 latent", "stage 3").replace("stage3", "stage 3")
    if job == "stage1":
        head, phase = "stage 1", phase.removeprefix("stage 1").strip()
    else:
        head = f"upscaling {current['file']}" if current.get("file") else str(job)
    parts = [phase] if phase else []
    if current.get("step"):
        parts.append(f"step {current['step']}/{current['total']}" + (" (refiner)" if refiner else ""))
    return head + (": " if job != "stage1" and parts else ", " if parts else "") + ", ".join(parts)


def format_status(entries: list[dict], config_problem: str | None = None) -> str:
    lines = []
    if config_problem:
        running = any(is_live(d) for d in entries)
        lines.append(f"config.yaml invalid: {config_problem}")
        lines.append(
            "  a running daemon keeps its last good config; fix the file and it applies at once"
            if running else "  fix it before starting sdxld (it would stop with exit status 78)"
        )
    if not entries:
        lines.append("no sdxld daemon has run on this root (no status files); start one with `sdxld run`")
        return "\n".join(lines)
    if len(entries) > 1:
        lines.append(summary_line(entries))
    for d in entries:
        uptime = time.time() - d.get("started", time.time())
        lines.append(f"sdxld pid {d['pid']} on {d['host']}: {d['state']}" + (f" (paused: {d['paused']})" if d.get("paused") else ""))
        if d.get("current"):
            lines.append(f"  now:        {describe_job(d['current'])}")
        lines.append(f"  uptime:     {uptime / 3600:.1f} h; stage-1 images {d['stage1_made']}, finals {d['finals_made']}, failed {d['failed']}")
        if d.get("seconds_per_image") is not None:
            per_hour = f", {d['images_per_hour']:,.0f} stage-1 images/hour" if d.get("images_per_hour") else ""
            lines.append(f"  rate:       {d['seconds_per_image']} s per stage-1 image{per_hour}")
        if d.get("seconds_per_final") is not None:
            lines.append(f"  finals:     {d['seconds_per_final']} s each, from taking the approved image to its saved final")
        lines.append(f"  queue:      {d['approved_queued']} approved waiting")
        rejected = d["loras"]["rejected"]
        unchecked = d["loras"].get("unchecked")
        lines.append(f"  LoRAs:      {d['loras']['loaded']} loaded, {len(rejected)} rejected"
                     + (f", {unchecked} still to check (a few between images)" if unchecked else ""))
        for item in rejected:
            lines.append(f"              {Path(item['file']).name}: {item['reason']}")
        if d.get("taste"):
            lines.append(f"  taste:      {describe_taste(d['taste'])}")
        if d.get("config_error"):
            lines.append(f"  config:     {d['config_error']}; running on the last good config")
        if d.get("restart_needed"):
            lines.append(f"  restart needed for: {', '.join(d['restart_needed'])}")
        if d.get("last_error"):
            lines.append(f"  last error: {d['last_error']}")
    return "\n".join(lines)


LOADING_STATES = ("starting", "loading models")


def probe(entries: list[dict], what: str, max_age_s: float = 300.0, now: float | None = None) -> tuple[bool, str]:
    """For a container's probes, about the daemon(s) of this host: `ready` once one has loaded its
    models and runs; `alive` while one's loop has updated its status within `max_age_s` (a stuck
    loop stops updating it, while the heartbeat alone keeps a file fresh for other hosts)."""
    now = time.time() if now is None else now
    mine = [d for d in entries if d.get("host") == socket.gethostname() and is_live(d)]
    if not mine:
        return False, f"no running sdxld daemon on {socket.gethostname()}"
    if what == "ready":
        ready = [d for d in mine if d.get("state") not in LOADING_STATES and d.get("state") != "stopping"]
        return bool(ready), (f"pid {ready[0]['pid']}: {ready[0]['state']}" if ready else f"pid {mine[0]['pid']}: {mine[0]['state']}")
    ages = [now - float(d.get("updated", 0)) for d in mine]
    fresh = min(ages)
    return fresh <= max_age_s, f"the loop updated its status {fresh:.0f} s ago (limit {max_age_s:g} s)"
