"""`TensorBoardLogger`: scalars and hyperparameters as TensorBoard event files."""

import os
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from ._closed import check_open
from ._convert import to_floats
from ._hparams import flatten_hparams
from ._logger import Logger

_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w.]")


def _tag(name: str) -> str:
    """The TensorBoard tag of a metric name: as tensorboardX's `scalar()` makes it (invalid
    characters replaced by `_`, no leading `/`)."""
    return _INVALID_TAG_CHARACTERS.sub("_", name).lstrip("/")


class TensorBoardLogger(Logger):
    """Writes scalars and hyperparameters to a TensorBoard event file, with tensorboardX.

    Every metric is a scalar at its step (the `epoch` key too, so TensorBoard can plot
    against it); each `log_metrics` call writes one event holding all of its scalars. Hyperparameters go to TensorBoard's HParams dashboard (nested mappings
    flattened to `outer/inner`; values other than numbers, bools and strings are stored as
    strings), which lists every scalar of the run as a metric. View with
    `tensorboard --logdir <log_dir>`.

    Events are written on the calling thread (wrap the logger in `AsyncLogger` to take that
    off the training thread; the Trainer does) and reach the disk every `flush_secs` seconds,
    at `flush()` and at `close()`: after `flush()` returns, TensorBoard sees everything
    logged before it.

    To resume a run, point a new logger at the same `log_dir` (its `run_id`), with
    `purge_step=<resumed step>` so that TensorBoard hides what the old run wrote after its
    last checkpoint.

    Needs `tensorboardX` (`pip install 'solstice[tensorboard]'`).

    **Arguments:**

    - `log_dir`: the directory of this run's event files (created at the first write).
    - `flush_secs`: how often buffered events are written to disk while logging.
    - `purge_step`: if given, TensorBoard discards events from earlier files in `log_dir`
      whose step is at least this one.

    **Example:**

    ```python
    logger = TensorBoardLogger("runs/exp1")
    logger.log_hyperparams({"lr": 1e-3, "model": {"width": 128}})
    logger.log_metrics({"train/loss": 0.25, "epoch": 0}, step=10)
    logger.close()
    ```
    """

    def __init__(
        self, log_dir: str | os.PathLike, *, flush_secs: float = 10.0, purge_step: int | None = None
    ):
        try:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog
            from tensorboardX.proto.summary_pb2 import Summary
        except ImportError as error:
            raise ImportError(
                "TensorBoardLogger needs tensorboardX, which is not installed. Install it "
                "with `pip install 'solstice[tensorboard]'`."
            ) from error
        if flush_secs < 0:
            raise ValueError(
                f"`flush_secs` must be >= 0 (seconds between writes to disk), got {flush_secs}."
            )
        self.log_dir = os.fspath(log_dir)
        self.flush_secs = flush_secs
        self.purge_step = purge_step
        self._EventsWriter = EventsWriter
        self._SessionLog = SessionLog
        self._Event = Event
        self._Summary = Summary
        self._events: Any = None  # the event file, created by the first write
        self._templates: dict[tuple[str, ...], tuple[Any, list[Any]]] = {}
        self._last_flush = time.monotonic()
        self._closed = False

    def _writer(self) -> Any:
        """The event file, created at the first write, not at construction: a logger built
        on every process of a multi-process run (where only process 0 writes) leaves nothing
        behind on the others."""
        if self._events is None:
            os.makedirs(self.log_dir, exist_ok=True)
            # A unique suffix: two writers started in the same second never share a file.
            suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
            self._events = self._EventsWriter(os.path.join(self.log_dir, "events"), suffix)
            if self.purge_step is not None:
                start = self._SessionLog(status=self._SessionLog.START)
                self._events.write_event(
                    self._Event(step=int(self.purge_step), wall_time=time.time(), session_log=start)
                )
        return self._events

    def _write(self, summary: Any, step: int) -> None:
        self._writer().write_event(self._Event(summary=summary, step=step, wall_time=time.time()))

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_secs:
            self.flush()

    def _template(self, keys: tuple[str, ...]) -> tuple[Any, list[Any]]:
        """An event whose summary has one scalar per key (values set by the caller), and its
        values; kept per set of keys, as filling one in is much cheaper than building it."""
        template = self._templates.get(keys)
        if template is None:
            Value = self._Summary.Value
            tags = [_tag(key) for key in keys]
            event = self._Event(
                summary=self._Summary(value=[Value(tag=tag, simple_value=0.0) for tag in tags])
            )
            template = event, list(event.summary.value)
            if len(self._templates) >= 64:  # metric names keep changing: do not pile up
                self._templates.clear()
            self._templates[keys] = template
        return template

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        check_open(self, self._closed)
        values = to_floats(metrics)
        if values:
            # One event per call, its summary holding every value (TensorBoard reads each
            # value as its own series), rather than one event (and record) per metric.
            event, fields = self._template(tuple(values))
            for field, value in zip(fields, values.values()):
                field.simple_value = value
            event.step = int(step)
            event.wall_time = time.time()
            self._writer().write_event(event)
        self._maybe_flush()

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        check_open(self, self._closed)
        from tensorboardX.summary import hparams

        # Only the session-start summary: without an "experiment" summary TensorBoard's
        # HParams dashboard takes every scalar tag of the run as a metric.
        _, session_start, _ = hparams(flatten_hparams(params), {})
        self._write(session_start, 0)
        self._maybe_flush()

    def flush(self) -> None:
        if not self._closed:
            if self._events is not None:
                self._events.flush()
            self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._events is not None:
                self._events.close()

    @property
    def run_id(self) -> str:
        """The log directory."""
        return self.log_dir

    def __repr__(self) -> str:
        return f"TensorBoardLogger({self.log_dir!r})"
