"""What changed on disk since the daemon last looked, and what a config edit amounts to.

The watcher only reports; this sorts its reports. Events for approved/ go to Arrivals (is the
file complete yet?); a change of config.yaml or of a LoRA folder makes that work due on the
daemon thread. Prompt files need nothing: they are read again for every image. The LoRA folders
are also rescanned every `daemon.rescan_s` whatever the events said, because events can be lost
(inotify queue overflow, network filesystems).
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


class ChangeRouter:
    def __init__(self) -> None:
        self._config_changed = False
        self._loras_changed = False
        self._last_lora_scan = 0.0

    def route(self, changes: Iterable[Change], arrivals: Arrivals, rescan_s: float) -> Due:
        for change in changes:
            area = change.area.split(":")[0]
            if area == "config":
                self._config_changed = True
            elif area == "loras":
                self._loras_changed = True
            elif area == "approved":
                arrivals.observe(change.kind, change.path, change.src)
            elif area == "prompts":
                log.debug("prompt file changed: %s (read again for the next image)", change.path.name)
        due = Due(config=self._config_changed)
        now = time.monotonic()
        if self._loras_changed or due.config or now - self._last_lora_scan >= rescan_s:
            due.loras = True
            self._last_lora_scan = now
        self._config_changed = self._loras_changed = False
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
