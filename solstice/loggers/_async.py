"""`AsyncLogger`: run any logger on a background thread, so logging never stalls training."""

import atexit
import collections
import threading
import traceback
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

from ._closed import check_open
from ._convert import check_scalars, many_to_floats, to_floats
from ._failures import Reportable, deferred_failures
from ._fanout import FanoutLogger
from ._hparams import check_hparams
from ._logger import Logger
from ._media import check_histograms, check_images, copy_arrays, to_host_arrays, to_host_images
from ._packed import PackedMetrics

_CLOSE = object()


class _Flush:
    """A queue item: flush the inner logger, then wake the waiting caller."""

    def __init__(self) -> None:
        self.done = threading.Event()


class AsyncLogger(Logger):
    """Runs another logger on one background thread.

    Calls are queued in order and handled on the background thread, so the inner logger sees
    exactly the calls made here, in the same order, and need not be thread-safe (images,
    histograms and checkpoints too: `log_images`, `log_histograms`, `after_save_checkpoint`;
    their arrays are copied on the device here and to the host there). Metric
    values may be 0-d JAX arrays still on the device (or a `PackedMetrics`): they are copied
    to the host on the background thread, never on the caller's, so logging does not make
    the training thread wait for the device. Only their shapes and dtypes are checked on the
    caller's thread (this needs no copy).

    The background thread takes every waiting call at once (copying the device values of
    several calls together), then rests up to `max_delay` seconds while calls accumulate:
    it wakes up a few times a second rather than at every call, which keeps its cost low
    when logging every step. `flush()` and `close()` never wait for that rest.

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
    is safe to call more than once; with a `timeout` it gives up waiting after that long. A
    logger that was never closed is closed when the interpreter exits (waiting at most 30 s,
    so that a stuck inner logger never keeps the process alive).

    **Arguments:**

    - `logger`: the logger to run in the background.
    - `max_queue_size`: how many calls may wait before the caller blocks.
    - `max_delay`: the longest the background thread rests between batches of calls, in
      seconds (so, how stale the inner logger may be until `flush()`); `0` handles every
      call as soon as possible.

    **Example:**

    ```python
    logger = AsyncLogger(FanoutLogger([TensorBoardLogger("runs/exp1"), CSVLogger("runs/exp1")]))
    logger.log_metrics({"train/loss": loss, "epoch": 0}, step=10)  # `loss` may be on the device
    logger.close()  # everything written
    ```
    """

    _hint_fanout = True  # an error's message suggests a `FanoutLogger`

    def __init__(self, logger: Logger, *, max_queue_size: int = 1024, max_delay: float = 0.05):
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
        if not isinstance(max_delay, int | float) or isinstance(max_delay, bool):
            raise TypeError(f"`max_delay` must be a number of seconds, got {max_delay!r}.")
        if not 0 <= max_delay < float("inf"):
            raise ValueError(
                f"`max_delay` must be a finite number of seconds >= 0, got {max_delay!r}; "
                "0.05 is a good default."
            )
        self.logger = logger
        self.max_queue_size = max_queue_size
        self.max_delay = float(max_delay)
        # A deque and two conditions on one lock (as in `queue.Queue`), so that the background
        # thread can take every waiting call at once.
        self._items: collections.deque[Any] = collections.deque()
        self._waiting = 0  # calls queued and not started yet (taken or not): what is bounded
        self._mutex = threading.Lock()
        self._not_empty = threading.Condition(self._mutex)
        self._not_full = threading.Condition(self._mutex)
        self._idle = False  # the background thread waits for a call: the next one wakes it
        self._resting = False  # it rests (`max_delay`): only urgent calls wake it
        self._urgent = False  # a flush/close (or a half-full queue) ends the rest
        self._lock = threading.Lock()
        self._errors: list[tuple[str, BaseException]] = []
        self._failures: list[Reportable] = []
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
                with self._mutex:
                    while not self._items:
                        self._idle = True
                        self._not_empty.wait()
                        self._idle = False
                    batch = list(self._items)
                    self._items.clear()
                if self._handle(batch):
                    return
                if self.max_delay:
                    self._rest()

    def _rest(self) -> None:
        """Let calls accumulate for up to `max_delay` seconds, unless one is urgent."""
        with self._mutex:
            if self._urgent or self._waiting * 2 >= self.max_queue_size:
                self._urgent = False
                return
            self._resting = True
            self._not_empty.wait(self.max_delay)
            self._resting = False
            self._urgent = False

    def _handle(self, batch: list[Any]) -> bool:
        """Handle queued calls in order; returns whether the logger was closed."""
        floats = self._convert(batch)
        for i, item in enumerate(batch):
            with self._mutex:  # this call is no longer waiting
                self._waiting -= 1
                if self._waiting * 2 <= self.max_queue_size:  # room: wake blocked callers
                    self._not_full.notify_all()
            if item is _CLOSE:
                self._run("close", self.logger.close)
                return True
            elif isinstance(item, _Flush):
                self._run("flush", self.logger.flush)
                item.done.set()
            elif item[0] == "log_metrics":
                _, metrics, step = item
                values = None if floats is None else floats[i]
                if values is None:  # converted alone, so that an error names this call
                    self._run("log_metrics", self._log_one, metrics, step)
                else:
                    self._run("log_metrics", self.logger.log_metrics, values, step)
            elif item[0] == "log_hyperparams":
                _, params = item
                self._run("log_hyperparams", self.logger.log_hyperparams, params)
            else:  # images, histograms, a checkpoint
                method, values, arg = item
                self._run(method, self._forward, method, values, arg)
        return False

    def _forward(self, method: str, values: Any, arg: Any) -> None:
        """Hand images or histograms (copied to the host here) or a checkpoint on."""
        if method == "log_images":
            values = to_host_images(values)
        elif method == "log_histograms":
            values = to_host_arrays(values)
        getattr(self.logger, method)(values, arg)

    @staticmethod
    def _convert(batch: list[Any]) -> list[Any] | None:
        """The float values of every `log_metrics` call of `batch` (at its index), with one
        device-to-host copy for all their plain device arrays; `None` if one fails."""
        indices = [
            i for i, item in enumerate(batch) if type(item) is tuple and item[0] == "log_metrics"
        ]
        if len(indices) < 2:
            return None
        try:
            # Steps finish in order: wait once for the newest values, rather than in turn for
            # each of the values still being computed (a wake-up each).
            newest = batch[indices[-1]][1]
            if isinstance(newest, PackedMetrics) and newest.vector is not None:
                newest.vector.block_until_ready()
            converted = many_to_floats([batch[i][1] for i in indices])
        except Exception:
            return None
        floats: list[Any] = [None] * len(batch)
        for i, values in zip(indices, converted):
            floats[i] = values
        return floats

    def _log_one(self, metrics: Mapping[str, Any], step: int) -> None:
        self.logger.log_metrics(to_floats(metrics), step)

    def _run(self, method: str, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as error:  # noqa: B036 -- everything goes to the caller's thread
            with self._lock:
                self._errors.append((method, error))

    def _defer_failure(self, failure: Reportable) -> None:
        with self._lock:
            self._failures.append(failure)

    # ---- caller's thread
    def _surface(self) -> None:
        """Issue deferred warnings, then raise the first background error (if any)."""
        if not (self._failures or self._errors):  # the common case, without the lock
            return
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
                if isinstance(self.logger, FanoutLogger) or not self._hint_fanout
                else " Wrap loggers in a `FanoutLogger` to disable a failing one with a warning "
                "instead."
            )
            raise RuntimeError(
                f"{self.logger!r} raised on the background thread of AsyncLogger in "
                f"`{method}`: {detail}{more}.{hint}"
            ) from error

    def _put(self, item: Any, urgent: bool = False) -> None:
        with self._mutex:
            while self._waiting >= self.max_queue_size:
                if not self._thread.is_alive():
                    raise RuntimeError(
                        f"The background thread of {self!r} has stopped; nothing more can be "
                        "logged. Create a new logger."
                    )
                self._not_full.wait(timeout=0.5)
            self._items.append(item)
            self._waiting += 1
            if urgent or self._waiting * 2 >= self.max_queue_size:
                self._urgent = True
                if self._idle or self._resting:
                    self._not_empty.notify()
            elif self._idle:  # a busy thread will find the call; a resting one may rest on
                self._not_empty.notify()

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        # On the training thread at every log interval: kept short.
        if self._closed:
            check_open(self, self._closed)
        if self._failures or self._errors:
            self._surface()
        check_scalars(metrics)  # shapes and dtypes only (a `PackedMetrics`: not its vector)
        if type(metrics) is not PackedMetrics:  # (immutable: queued as it is)
            metrics = dict(metrics)  # the caller may change its dict afterwards
        self._put(("log_metrics", metrics, step))

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        check_open(self, self._closed)
        self._surface()
        check_hparams(params)
        self._put(("log_hyperparams", params))

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        """Queue `images`: checked here (shapes and dtypes), copied (on the device, for JAX
        arrays), converted to host `uint8` arrays on the background thread."""
        self._queue_media("log_images", check_images(images), step)

    def log_histograms(self, values: Mapping[str, Any], step: int) -> None:
        """Queue `values`: checked and copied here, copied to the host on the background
        thread."""
        self._queue_media("log_histograms", check_histograms(values), step)

    def _queue_media(self, method: str, values: dict[str, Any], step: int) -> None:
        check_open(self, self._closed)
        self._surface()
        self._put((method, copy_arrays(values), int(step)))

    def after_save_checkpoint(self, path: str, info: Mapping[str, Any]) -> None:
        check_open(self, self._closed)
        self._surface()
        self._put(("after_save_checkpoint", str(path), dict(info)))

    def flush(self) -> None:
        if self._closed:
            return
        marker = _Flush()
        self._put(marker, urgent=True)
        while not marker.done.wait(timeout=0.5):
            if not self._thread.is_alive():
                break
        self._surface()

    def close(self, timeout: float | None = None) -> None:
        """Write everything queued, close the inner logger and stop the thread.

        With a `timeout` (seconds), give up waiting after that long (the inner logger is
        stuck or slow) with a `RuntimeWarning` saying how many calls were not handled; the
        background thread is left to finish on its own (it never keeps the interpreter
        alive). Without one, wait as long as it takes.
        """
        # Written so that a `close()` interrupted (Ctrl-C) can be completed by calling it again
        # (the exit handler does): nothing queued is lost.
        self._closed = True
        if not self._close_queued:
            self._put(_CLOSE, urgent=True)
            self._close_queued = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            warnings.warn(
                f"{self!r} did not finish within {timeout} s: {self._waiting} queued call(s) "
                "were not handled yet (the inner logger is stuck or slow). They are still "
                "being handled in the background, and are lost if the process exits first.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
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


_EXIT_TIMEOUT = 30.0  # seconds the exit handler waits for each logger still open


@atexit.register
def _close_open_loggers() -> None:
    for logger in list(_open_loggers):
        try:
            logger.close(timeout=_EXIT_TIMEOUT)  # a stuck logger never keeps the process alive
        except Exception:
            traceback.print_exc()
