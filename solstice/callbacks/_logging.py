"""`LoggingCallback`: sends published metrics to the History and the loggers, off the training
thread, and never waits for a logger without a deadline."""

import atexit
import math
import time
import traceback
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from .._config import hyperparameters
from ..loggers import AsyncLogger, History, Logger
from ..loggers._logger import check_loggers
from ..loggers._media import check_histograms, check_images
from ..loggers._worker import LoggerWorker
from ._callback import Callback


class _Tee(Logger):
    """Runs on the History's background thread (inside an `AsyncLogger`, which converts the
    values to floats): records each call in the History, then queues it for every logger's
    own thread (which never blocks)."""

    def __init__(self, history: History, workers: Sequence[LoggerWorker]):
        self.history = history
        self.workers = workers

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self.history.log_metrics(metrics, step)
        for worker in self.workers:
            worker.put_record(metrics, step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self.history.log_hyperparams(params)
        for worker in self.workers:
            worker.request("log_hyperparams", params)

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        for worker in self.workers:  # (not records: the History does not hold them)
            worker.put_media("log_images", images, step)

    def log_histograms(self, values: Mapping[str, Any], step: int) -> None:
        for worker in self.workers:
            worker.put_media("log_histograms", values, step)

    def flush(self) -> None:
        self.history.flush()

    def close(self) -> None:
        self.history.close()

    def __repr__(self) -> str:
        return repr(self.history)


class _HistorySink(AsyncLogger):
    """The History's background thread. Its errors come from converting values (a failed
    device computation) or from Solstice itself, never from a user's logger."""

    _hint_fanout = False


def _check_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a number of seconds, got {value!r}.")
    if not 0 <= value < math.inf:
        raise ValueError(f"`{name}` must be a finite number of seconds >= 0, got {value!r}.")
    return float(value)


class LoggingCallback(Callback):
    """Sends every published record to `trainer.history` and to the loggers.

    The Trainer adds one automatically, for its `loggers=` and `trainer.history`. On the
    training thread `on_log` only queues the values (still on the device); one background
    thread converts them to floats, records them in the `History` (the source of truth of
    every record, kept in memory and in `history.jsonl` beside the checkpoints), then hands
    them to each logger, which runs on a thread of its own. So:

    - A slow logger falls behind; when `max_queue_size` records wait for it, its oldest
      waiting records are dropped (a `RuntimeWarning` names it and counts them), never
      slowing training.
    - A logger that raises anything (`SystemExit` and `KeyboardInterrupt` included), in any
      method, is disabled with a `RuntimeWarning` naming it; the others go on.
    - `flush_history()` (each checkpoint calls it) waits for the History alone, never for a
      logger; `flush(timeout)` and `close(timeout)` wait at most `timeout` seconds for the
      loggers, then warn naming each one that is behind. A logger found stuck in one call
      for longer than the timeout is disabled, and never waited for again.

    The checkpointed state is the number of records published and each logger's `run_id`.
    When a run resumes from a checkpoint, each logger is asked to continue its run right
    after those records (`Logger.resume_at`), and any it lacks are replayed to it from the
    History first, so every log holds each record exactly once, as if the run had never
    stopped. At fit start the experiment's static configuration and the Trainer's settings
    are logged as hyperparameters. With several processes only process 0 writes to the
    loggers and the history file; every process keeps its in-memory `History`.

    **Arguments:**

    - `loggers`: the loggers to send to (each at most once).
    - `history`: the `History` to record in. Default: a `History` found in `loggers` (the last
      one), else a new one.
    - `max_queue_size`: how many records may wait for one logger before the oldest is dropped.
    - `flush_timeout`: the default `timeout` of `flush` and `close`, in seconds.

    **Example:**

    ```python
    # The Trainer makes its own; by hand it works the same way:
    logging = LoggingCallback([solstice.CSVLogger("logs")], flush_timeout=5)
    logging.on_log(None, None, {"train/loss": jnp.asarray(0.5), "epoch": 0}, 10)
    logging.flush_history()  # `logging.history` holds the record (and its file, if persisted)
    logging.close()          # waits at most 5 s for the CSV logger, then reports it
    ```
    """

    _reads_experiment = False  # its hooks take the experiment from the trainer if needed
    flush_timeout: float = 10.0

    def __init__(
        self,
        loggers: Sequence[Logger],
        *,
        history: History | None = None,
        max_queue_size: int = 10_000,
        flush_timeout: float | None = None,
    ):
        loggers = check_loggers(loggers, "LoggingCallback")
        if history is None:
            found = [logger for logger in loggers if isinstance(logger, History)]
            history = found[-1] if found else History()
        if isinstance(max_queue_size, bool) or not isinstance(max_queue_size, int):
            raise TypeError(f"`max_queue_size` must be an int, got {max_queue_size!r}.")
        if max_queue_size < 1:
            raise ValueError(
                f"`max_queue_size` must be at least 1, got {max_queue_size}. It bounds how many "
                "records wait for a slow logger; 10000 is a good default."
            )
        self.history = history
        self.loggers = [logger for logger in loggers if logger is not history]
        self.max_queue_size = max_queue_size
        if flush_timeout is not None:
            self.flush_timeout = _check_seconds("flush_timeout", flush_timeout)
        self._sink: AsyncLogger | None = None
        self._workers: list[LoggerWorker] = []
        self._published = 0  # records published (on_log calls), counted on the main thread
        self._resume: tuple[int | None, list[Any]] | None = None

    # ------------------------------------------------------------------ plumbing
    @property
    def sink(self) -> Logger:
        """The `AsyncLogger` that feeds the History and the loggers (started on first use)."""
        if self._sink is None:
            loggers = self.loggers if jax.process_index() == 0 else []  # one writer: process 0
            self._workers = [
                LoggerWorker(
                    logger,
                    max_queue_size=self.max_queue_size,
                    records_source=self.history.iter_records,
                )
                for logger in loggers
            ]
            self._sink = _HistorySink(_Tee(self.history, self._workers))
            _open_callbacks.add(self)
        return self._sink

    def _surface(self) -> None:
        """Issue, as `RuntimeWarning`s, the problems the loggers' threads noted."""
        for worker in self._workers:
            if worker.notes:
                for note in worker.take_notes():
                    warnings.warn(note, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer, experiment) -> None:
        sink = self.sink
        if self._resume is not None:
            self._start_resume()
        self._surface()
        params = hyperparameters(trainer.experiment)  # `experiment` is None (see above)
        params.update({f"trainer.{k}": v for k, v in trainer.hparams.items()})
        sink.log_hyperparams(params)

    def on_log(self, trainer, experiment, metrics: dict[str, Any], step: int) -> None:
        self.sink.log_metrics(metrics, step)
        self._published += 1
        for worker in self._workers:
            if worker.notes:
                self._surface()
                break

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        """Send `images` to the loggers (`Logger.log_images`) the way `on_log` sends
        records: checked and copied on the device here, copied to the host on the History's
        thread, written on each logger's (dropped like records by one that falls behind).
        They are not records: the History does not hold them, a resume does not replay them."""
        if self._media_wanted():
            self.sink.log_images(images, step)
        else:
            check_images(images)

    def log_histograms(self, values: Mapping[str, Any], step: int) -> None:
        """Send a histogram of each array of `values` to the loggers, as `log_images`."""
        if self._media_wanted():
            self.sink.log_histograms(values, step)
        else:
            check_histograms(values)

    def _media_wanted(self) -> bool:
        """Whether a logger writes here (one is given, and this is process 0)."""
        return bool(self.loggers) and jax.process_index() == 0

    def after_save_checkpoint(self, path: str, info: Mapping[str, Any]) -> None:
        """Tell every logger that a checkpoint was committed at `path` (on its own thread:
        `Logger.after_save_checkpoint`)."""
        for worker in self._workers:
            worker.request("after_save_checkpoint", str(path), dict(info))

    # ------------------------------------------------------------------ waiting
    def flush_history(self) -> None:
        """Return once `trainer.history` holds every record published so far and its file is
        durable (the records a checkpoint counts are on disk). Never waits for a logger."""
        if self._sink is not None:
            self._sink.flush()

    def flush(self, timeout: float | None = None) -> None:
        """`flush_history()`, then flush every logger, waiting at most `timeout` seconds
        (default `flush_timeout`) for all of them together. A logger that is not done by
        then is reported with a `RuntimeWarning` (it goes on in the background); one that
        has been in a single call for longer than `timeout` is disabled as stuck."""
        timeout = self.flush_timeout if timeout is None else _check_seconds("timeout", timeout)
        self.flush_history()
        self._wait_for_loggers("flush", timeout)
        self._surface()

    def _wait_for_loggers(self, kind: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        requests = [(worker, worker.request(kind)) for worker in self._workers]
        for worker, request in requests:
            if request is not None:
                outcome = worker.wait(request, deadline, stuck_after=timeout)
                if outcome == "stuck":
                    worker.disable_stuck(f"waited for by `{kind}` with a timeout of {timeout:g} s")
                elif outcome == "late":
                    worker.note_late(f"`{kind}`", timeout)
            worker.note_dropped()

    def close(self, timeout: float | None = None) -> None:
        """Write everything queued and close the History and the loggers, waiting at most
        `timeout` seconds (default `flush_timeout`) for the loggers; one still busy then is
        reported and left to finish in the background."""
        if self._sink is None:
            return
        timeout = self.flush_timeout if timeout is None else _check_seconds("timeout", timeout)
        sink, self._sink = self._sink, None
        try:
            sink.close()
        finally:
            self._wait_for_loggers("close", timeout)
            _open_callbacks.discard(self)
            self._surface()
            self._workers = []

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        run_ids: list[str | None] = [None] * len(self.loggers)
        if self._workers:
            run_ids = [worker.run_id for worker in self._workers]
        return {"records": self._published, "run_ids": run_ids}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make each logger continue its run right after the records the checkpoint counts
        (done at fit start, once `trainer.history` is restored)."""
        run_ids = list(state.get("run_ids", []))
        if len(run_ids) != len(self.loggers):
            warnings.warn(
                f"The checkpoint was written with {len(run_ids)} logger(s), this Trainer has "
                f"{len(self.loggers)}; logger runs are not continued. Pass the same `loggers=` "
                "to continue them.",
                RuntimeWarning,
                stacklevel=2,
            )
            run_ids = [None] * len(self.loggers)
        records = state.get("records")
        self._resume = (None if records is None else int(records), run_ids)
        if records is not None:
            self._published = int(records)

    def _start_resume(self) -> None:
        assert self._resume is not None
        (records, run_ids), self._resume = self._resume, None
        if records is None:  # an older checkpoint: count what the history holds
            self._published = self.history.num_records
        elif self.history.num_records != records:
            warnings.warn(
                f"The checkpoint counts {records} published record(s) but `trainer.history` "
                f"holds {self.history.num_records}; the loggers resume after the record the "
                "checkpoint counts.",
                RuntimeWarning,
                stacklevel=3,
            )
        for worker, run_id in zip(self._workers, run_ids):
            worker.request("resume_at", run_id, records)


# Callbacks still open at interpreter exit are closed then (waiting a bounded time for each
# logger), so nothing queued is lost to a forgotten `trainer.close()`.
_open_callbacks: "weakref.WeakSet[LoggingCallback]" = weakref.WeakSet()


@atexit.register
def _close_open_callbacks() -> None:
    for callback in list(_open_callbacks):
        try:
            callback.close()
        except Exception:
            traceback.print_exc()
