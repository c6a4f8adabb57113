"""`FanoutLogger`: send every call to several loggers; a failing one is disabled, not fatal."""

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._closed import check_open
from ._convert import to_floats
from ._failures import LoggerFailure, report_failure
from ._hparams import check_hparams
from ._logger import Logger, check_loggers
from ._media import to_host_arrays, to_host_images


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class FanoutLogger(Logger):
    """Sends every call to each of several loggers, in order.

    A logger that raises is reported with a `RuntimeWarning` naming it and its error, and is
    disabled: it receives no more calls, while the other loggers keep logging. Training never
    stops because of a logger. Off the main thread (inside an `AsyncLogger`) this holds for
    anything a logger raises, `SystemExit` and `KeyboardInterrupt` included; on the main
    thread those two propagate, as they may come from the user's Ctrl-C. Inside an `AsyncLogger` (the Trainer uses
    `AsyncLogger(FanoutLogger(loggers))`), the warning is issued on the main thread at the
    `AsyncLogger`'s next call.

    Metric values are converted to `float` once, here, for all the loggers (so inside an
    `AsyncLogger` that happens on its background thread), and images and histograms to host
    arrays. `close()` closes every logger, the
    disabled ones too (best effort, as they may hold open files; an error there is not
    reported again). `run_id` is `None`: ask each of `loggers`.

    **Arguments:**

    - `loggers`: the loggers to send to. They must be distinct objects.

    **Example:**

    ```python
    logger = FanoutLogger([PythonLogger(), CSVLogger("runs/exp1")])
    logger.log_metrics({"train/loss": 0.25, "epoch": 0}, step=10)
    logger.close()
    ```
    """

    def __init__(self, loggers: Iterable[Logger]):
        loggers = tuple(check_loggers(loggers, "FanoutLogger"))
        self._loggers = loggers
        self._enabled = list(loggers)
        self._failures: list[LoggerFailure] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def loggers(self) -> tuple[Logger, ...]:
        """All the loggers this one sends to, including disabled ones."""
        return self._loggers

    @property
    def enabled(self) -> tuple[Logger, ...]:
        """The loggers still receiving calls (those that have not raised)."""
        with self._lock:
            return tuple(self._enabled)

    @property
    def failures(self) -> tuple[LoggerFailure, ...]:
        """Every failure so far, as `(logger, error, method)` named tuples."""
        with self._lock:
            return tuple(self._failures)

    def _call_each(self, method: str, call: Callable[[Logger], None]) -> None:
        for logger in self.enabled:
            try:
                call(logger)
            except BaseException as error:  # noqa: B036 -- see below
                # Off the main thread, anything a logger raises is its own failure (`SystemExit`
                # and `KeyboardInterrupt` too: a signal only ever raises on the main thread).
                # On the main thread a `KeyboardInterrupt` may be the user's Ctrl-C: let it
                # (and `SystemExit`) end the program as usual.
                if not isinstance(error, Exception) and _on_main_thread():
                    raise
                failure = LoggerFailure(logger, error, method)
                with self._lock:
                    self._enabled.remove(logger)
                    self._failures.append(failure)
                report_failure(failure)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        check_open(self, self._closed)
        # Converted once for all backends; a mistake in the caller's metrics raises here, as it
        # is not a backend failure.
        values = to_floats(metrics)
        self._call_each("log_metrics", lambda logger: logger.log_metrics(values, step))

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        check_open(self, self._closed)
        check_hparams(params)
        self._call_each("log_hyperparams", lambda logger: logger.log_hyperparams(params))

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        check_open(self, self._closed)
        host = to_host_images(images)  # once for all backends (a mistake raises here)
        self._call_each("log_images", lambda logger: logger.log_images(host, step))

    def log_histograms(self, values: Mapping[str, Any], step: int) -> None:
        check_open(self, self._closed)
        host = to_host_arrays(values)
        self._call_each("log_histograms", lambda logger: logger.log_histograms(host, step))

    def after_save_checkpoint(self, path: str, info: Mapping[str, Any]) -> None:
        check_open(self, self._closed)
        self._call_each(
            "after_save_checkpoint", lambda logger: logger.after_save_checkpoint(path, info)
        )

    def flush(self) -> None:
        if not self._closed:
            self._call_each("flush", lambda logger: logger.flush())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        disabled = [logger for logger in self._loggers if logger not in self.enabled]
        self._call_each("close", lambda logger: logger.close())
        for logger in disabled:
            try:
                logger.close()
            except BaseException as error:  # noqa: B036 -- already reported when disabled
                if not isinstance(error, Exception) and _on_main_thread():
                    raise

    def __repr__(self) -> str:
        return f"FanoutLogger([{', '.join(repr(logger) for logger in self._loggers)}])"
