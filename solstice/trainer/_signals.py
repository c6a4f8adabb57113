"""`SignalWatch`: SIGINT and SIGTERM during `fit` become a stop at the next step boundary
(or validation batch)."""

import signal
import threading
from types import FrameType
from typing import Any

WATCHED = (signal.SIGINT, signal.SIGTERM)


def deliver(signum: int, previous: Any, frame: FrameType | None = None) -> None:
    """End the way signal `signum` would have without Solstice's handler.

    A Python handler that was installed before is called (the default SIGINT handler raises
    `KeyboardInterrupt`); otherwise SIGINT raises `KeyboardInterrupt` and SIGTERM raises
    `SystemExit(128 + 15)`, the status a shell reports for a process ended by SIGTERM.
    """
    if callable(previous):
        previous(signum, frame)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


class SignalWatch:
    """Records SIGINT/SIGTERM while active instead of acting on them at once.

    The Trainer polls `received` at every step boundary; when set, it saves a checkpoint,
    flushes the loggers and calls `finish()`, which restores the previous handlers and ends
    the way the signal would have (`deliver`). A second signal of the same kind does not wait
    for the boundary: it is delivered at once. Handlers are only installed in the main thread
    (Python allows no other), and never over a signal that is ignored (`SIG_IGN`) or whose
    handler was not set from Python. Leaving the block restores the previous handlers; a
    signal received but not acted on yet is then delivered.

    **Example:**

    ```python
    with SignalWatch() as watch:
        for step in range(n):
            train_one_step()
            if watch.received is not None:
                save_checkpoint()
                watch.finish()
    ```
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def active(self) -> bool:
        return bool(self._previous)

    def __enter__(self) -> "SignalWatch":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in WATCHED:
            previous = signal.getsignal(sig)
            if previous is None or previous is signal.SIG_IGN:
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.restore()
        deliver(signum, previous, frame)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def finish(self, signum: int | None = None) -> None:
        """Restore the handlers and end the way the received signal (or `signum`, e.g. one
        another process received) would have."""
        signum = self.received if signum is None else signum
        previous = signal.SIG_DFL if signum is None else self._previous.get(signum, signal.SIG_DFL)
        self.received = None
        self.restore()
        if signum is not None:
            deliver(signum, previous)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and self.received is not None:
            self.finish()
        self.restore()
