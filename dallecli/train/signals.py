"""Stopping a training run cleanly on SIGTERM / SIGINT."""
from __future__ import annotations

import signal
from typing import Any


class StopSignals:
    """SIGTERM / SIGINT set a flag; the loop finishes the step it is on, saves it and exits (143 / 130).

    A terminal's Ctrl-C or a scheduler's SIGTERM reach the whole process group, DataLoader workers
    included. Workers ignore SIGINT (data.loader); one killed by SIGTERM must not abort the save, so
    torch's SIGCHLD handler (which raises "DataLoader worker exited unexpectedly" wherever the main
    process happens to be) is set aside as soon as a stop is asked for. A second Ctrl-C quits at once,
    without saving (the previous checkpoint stays intact: saves are atomic)."""

    def __init__(self):
        self.signals: list[int] = []
        self._old: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return bool(self.signals)

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signals and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signals and hasattr(signal, "SIGCHLD") and signal.SIGCHLD not in self._old:
            self._old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.signals.append(signum)

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        return False
