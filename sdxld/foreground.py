"""The one-shot commands run in a terminal: progress bars, Ctrl-C/SIGTERM, the generate loop."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from contextlib import contextmanager

from .stages import Hooks, Interrupted

log = logging.getLogger(__name__)


class StopFlag:
    """Set by the first SIGINT/SIGTERM: finish nothing new, stop at the next denoising step.
    A second signal stops at once (atomic writes still leave no partial file)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self) -> bool:
        return self.event.is_set()

    @contextmanager
    def installed(self):
        previous = {}

        def handler(signum, frame):
            if self.event.is_set():
                raise KeyboardInterrupt
            log.info("%s received: stopping after the current denoising step", signal.Signals(signum).name)
            self.event.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


class StepProgress:
    """A tqdm bar per phase when attached to a terminal; silent otherwise (logs say enough)."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._phase = None

    def on_step(self, phase: str, step: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if phase != self._phase or self._bar is None:
            self.close()
            self._bar = tqdm(total=total, desc=phase, leave=False, unit="step")
            self._phase = phase
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._phase = None, None


def generate(engine, *, once: bool, count: int | None, seed: int | None, stop: StopFlag) -> int:
    """The seed's `--stage1` mode: one image, `count` images, or until stopped."""
    progress = StepProgress()
    hooks = Hooks(should_stop=stop, on_step=progress.on_step)
    made = 0
    limit = 1 if once else count
    if seed is not None:
        engine.seeds = type(engine.seeds)(seed)
    try:
        while not stop() and (limit is None or made < limit):
            try:
                result = engine.stage1_once(hooks=hooks)
            except Interrupted:
                break
            finally:
                progress.close()
            made += 1
            print(result.path, flush=True)
    except KeyboardInterrupt:
        log.info("stopped at once on the second signal")
    log.info("made %d stage-1 image(s)", made)
    return 0
