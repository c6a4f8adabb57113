"""`AsyncLogger`: run any logger on a background thread, so logging never stalls training."""

import atexit
import queue
import threading
import traceback
import weakref
from collections.abc import Mapping
from typing import Any

from ._closed import check_open
from ._convert import check_scalars, to_floats
from ._failures import LoggerFailure, deferred_failures
from ._fanout import FanoutLogger
from ._hparams import check_hparams
from ._logger import Logger

_CLOSE = object()


class _Flush:
    """A queue item: flush the inner logger, then wake the waiting caller."""

    def __init__(self) -> None:
        self.done = threading.Event()


class AsyncLogger(Logger):
    """Runs another logger on one background thread.

    Calls are queued in order and handled one at a time on the background thread, so the
    inner logger sees exactly the calls made here, in the same order, and need not be
    thread-safe. Metric values may be 0-d JAX arrays still on the device: they are copied to
    the host (`jax.device_get`) on the background thread, never on the caller's, so logging
    does not make the training thread wait for the device. Only their shapes and dtypes are
    checked on the caller's thread (this needs no copy).

    The queue is bounded: when `max_queue_size` calls are waiting, the next call blocks until
    there is room. Nothing is ever dropped.

    Errors never pass silently:

    - An exception raised by the inner logger on the background thread is raised again on
      the caller's thread by the next `log_metrics`, `log_hyperparams`, `flush` or `close`,
      as a `RuntimeError` naming the logger, chained to the original exception (a
      `log_metrics`/`log_hyperparams` call that raises it has not been queued). The inner
      logger keeps receiving later calls.
    - Failures that the inner logger reports as warnings (a `FanoutLogger` disabling one of
      its backends) are issued as `RuntimeWarning`s on the caller's thread at the next call.

    `flush()` returns once everything queued before it has been written and the inner
    logger flushed. `close()` does the same, closes the inner logger and stops the thread; it
    is safe to call more than once. A logger that was never closed is closed when the
    interpreter exits.

    **Arguments:**

    - `logger`: the logger to run in the background.
    - `max_queue_size`: how many calls may wait before the caller blocks.

    **Example:**

    ```python
    logger = AsyncLogger(FanoutLogger([TensorBoardLogger("runs/exp1"), CSVLogger("runs/exp1")]))
    logger.log_metrics({"train/loss": loss, "epoch": 0}, step=10)  # `loss` may be on the device
    logger.close()  # everything written
    ```
    """

    def __init__(self, logger: Logger, *, max_queue_size: int = 1024):
        if not isinstance(logger, Logger):
            raise TypeError(
                f"AsyncLogger wraps a `solstice.Logger`, got {logger!r} of type "
                f"{type(logger).__name__}. Subclass `solstice.Logger` and implement "
                "`log_metrics`."
            )
        if not isinstance(max_queue_size, int) or isinstance(max_queue_size, bool):
            raise TypeError(f"`max_queue_size` must be an int, got {max_queue_size!r}.")
        if max_queue_size < 1:
            raise ValueError(
                f"`max_queue_size` must be at least 1, got {max_queue_size}. It bounds how "
                "many calls wait for the background thread; 1024 is a good default."
            )
        self.logger = logger
        self.max_queue_size = max_queue_size
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue_size)
        self._lock = threading.Lock()
        self._errors: list[tuple[str, BaseException]] = []
        self._failures: list[LoggerFailure] = []
        self._closed = False
        self._close_queued = False
        self._thread = threading.Thread(
            target=self._work, name=f"solstice-AsyncLogger({type(logger).__name__})", daemon=True
        )
        self._thread.start()
        _open_loggers.add(self)

    # ---- background thread
    def _work(self) -> None:
        with deferred_failures(self._defer_failure):
            while True:
                item = self._queue.get()
                try:
                    if item is _CLOSE:
                        self._run("close", self.logger.close)
                        return
                    elif isinstance(item, _Flush):
                        self._run("flush", self.logger.flush)
                        item.done.set()
                    else:
                        method, args = item
                        self._run(method, getattr(self, f"_do_{method}"), *args)
                finally:
                    self._queue.task_done()

    def _do_log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self.logger.log_metrics(to_floats(metrics), step)

    def _do_log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self.logger.log_hyperparams(params)

    def _run(self, method: str, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as error:  # noqa: B036 -- everything goes to the caller's thread
            with self._lock:
                self._errors.append((method, error))

    def _defer_failure(self, failure: LoggerFailure) -> None:
        with self._lock:
            self._failures.append(failure)

    # ---- caller's thread
    def _surface(self) -> None:
        """Issue deferred warnings, then raise the first background error (if any)."""
        with self._lock:
            failures, self._failures = self._failures, []
            errors, self._errors = self._errors, []
        for failure in failures:
            failure.warn(stacklevel=3)
        if errors:
            method, error = errors[0]
            more = f" ({len(errors) - 1} later error(s) also occurred)" if len(errors) > 1 else ""
            detail = "".join(traceback.format_exception_only(type(error), error)).strip()
            hint = (
                ""
                if isinstance(self.logger, FanoutLogger)
                else " Wrap loggers in a `FanoutLogger` to disable a failing one with a warning "
                "instead."
            )
            raise RuntimeError(
                f"{self.logger!r} raised on the background thread of AsyncLogger in "
                f"`{method}`: {detail}{more}.{hint}"
            ) from error

    def _put(self, item: Any) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise RuntimeError(
                        f"The background thread of {self!r} has stopped; nothing more can be "
                        "logged. Create a new logger."
                    ) from None

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        check_open(self, self._closed)
        self._surface()
        check_scalars(metrics)
        self._put(("log_metrics", (dict(metrics), step)))

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        check_open(self, self._closed)
        self._surface()
        check_hparams(params)
        self._put(("log_hyperparams", (params,)))

    def flush(self) -> None:
        if self._closed:
            return
        marker = _Flush()
        self._put(marker)
        while not marker.done.wait(timeout=0.5):
            if not self._thread.is_alive():
                break
        self._surface()

    def close(self) -> None:
        # Written so that a `close()` interrupted (Ctrl-C) can be completed by calling it again
        # (the exit handler does): nothing queued is lost.
        self._closed = True
        if not self._close_queued:
            self._put(_CLOSE)
            self._close_queued = True
        self._thread.join()
        _open_loggers.discard(self)
        self._surface()

    @property
    def run_id(self) -> str | None:
        return self.logger.run_id

    def __repr__(self) -> str:
        return f"AsyncLogger({self.logger!r})"


# Loggers still open at interpreter exit are closed then, so nothing queued is lost. (The
# background threads are daemons: an unclosed logger never keeps the interpreter alive.)
_open_loggers: "weakref.WeakSet[AsyncLogger]" = weakref.WeakSet()


@atexit.register
def _close_open_loggers() -> None:
    for logger in list(_open_loggers):
        try:
            logger.close()
        except Exception:
            traceback.print_exc()
