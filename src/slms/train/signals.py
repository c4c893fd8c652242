"""Preemption: SIGTERM or a first Ctrl-C asks the loop to stop after the current step (it then
saves a checkpoint and exits cleanly); a second Ctrl-C aborts at once."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType


class StopRequest:
    """Context manager installing the handlers; `requested` names the signal once one came."""

    def __init__(self, verbose: bool = True):
        self.requested: str | None = None
        self.verbose = verbose
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self.verbose:
            print(f"\n{self.requested}: stopping after this step and saving a checkpoint "
                  "(Ctrl-C again to abort now)", file=sys.stderr, flush=True)
