"""What changed on disk since the daemon last looked, and what a config edit amounts to.

The watcher only reports; this sorts its reports. Events for approved/ go to Arrivals (is the
file complete yet?); a change of config.yaml or of a LoRA folder makes that work due on the
daemon thread; a file arriving in or leaving a pile (stage1, rejected, approved ... final) is a
verdict to look at again. Prompt files need nothing: they are read again for every image. The
LoRA folders and the piles are also rescanned every `daemon.rescan_s` whatever the events said,
because events can be lost (inotify queue overflow, network filesystems).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .arrivals import Arrivals
from .config import Config, ConfigError, keep_loaded_settings, load
from .watch import Change

log = logging.getLogger(__name__)


@dataclass
class Due:
    config: bool = False
    loras: bool = False
    # Files that appeared in, left or moved within the piles (stage1, approved, ..., final): each
    # is looked at again for its verdict (taste.Ledger.observe).
    pile_files: list[Path] = field(default_factory=list)
    rescan: bool = False  # the periodic look at every folder, events or not


class ChangeRouter:
    def __init__(self) -> None:
        self._config_changed = False
        self._loras_changed = False
        self._pile_files: list[Path] = []
        # None: the first look rescans (monotonic time starts near 0 at boot, so "long ago" cannot
        # be 0.0: a daemon started by systemd within rescan_s of boot would skip its first rescan).
        self._last_rescan: float | None = None

    def route(self, changes: Iterable[Change], arrivals: Arrivals, rescan_s: float) -> Due:
        for change in changes:
            area = change.area.split(":")[0]
            if area == "config":
                self._config_changed = True
            elif area == "loras":
                self._loras_changed = True
            elif area == "approved":
                arrivals.observe(change.kind, change.path, change.src)
                self._pile_files += [change.path] + ([change.src] if change.src else [])
            elif area == "piles":
                self._pile_files += [change.path] + ([change.src] if change.src else [])
            elif area == "prompts":
                log.debug("prompt file changed: %s (read again for the next image)", change.path.name)
        due = Due(config=self._config_changed, pile_files=list(dict.fromkeys(self._pile_files)))
        now = time.monotonic()
        due.rescan = self._last_rescan is None or now - self._last_rescan >= rescan_s
        if self._loras_changed or due.config or due.rescan:
            due.loras = True
        if due.rescan:
            self._last_rescan = now
        self._config_changed = self._loras_changed = False
        self._pile_files = []
        return due

    def look_at_loras_again_soon(self) -> None:
        """A LoRA still being copied: the next pass scans again instead of waiting for rescan_s."""
        self._loras_changed = True


@dataclass
class ConfigEdit:
    """The config file as edited: a config to run on, or why the last good one stays."""

    config: Config | None
    error: str | None = None
    # Dotted keys whose new values only a restart applies (they load models); `config` keeps the old values.
    restart_needed: list[str] = field(default_factory=list)


def reread_config(path: Path, loaded: Config, *, demo: bool) -> ConfigEdit:
    try:
        new = load(path)
    except ConfigError as err:
        return ConfigEdit(None, str(err))
    if demo:
        from .tiny import apply_demo

        apply_demo(new)
    return ConfigEdit(new, restart_needed=keep_loaded_settings(new, loaded))
