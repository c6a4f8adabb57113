"""`TensorBoardLogger`: scalars and hyperparameters as TensorBoard event files."""

import os
import re
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

from ._closed import check_open
from ._convert import to_floats
from ._hparams import flatten_hparams
from ._logger import Logger
from ._media import encode_png, histogram, to_host_arrays, to_host_images
from ._mirror import mirror_of
from ._tfrecord import RecordFile, read_records

_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w.]")
_HPARAMS_TAG = "_hparams_/"
_SCRATCH = ".solstice-tb-"  # names of files a resume rewrites through (no "tfevents" in them:
# TensorBoard reads every file whose name holds "tfevents")


def _is_event_file(name: str) -> bool:
    return "tfevents" in name and not name.startswith(_SCRATCH)


def _is_record(event: Any) -> bool:
    """Whether `event` was written by `log_metrics` (one per call): a summary of scalars only
    (not hyperparameters, images or histograms)."""
    return event.HasField("summary") and all(
        value.WhichOneof("value") == "simple_value" for value in event.summary.value
    )


def _tag(name: str) -> str:
    """The TensorBoard tag of a metric name: as tensorboardX's `scalar()` makes it (invalid
    characters replaced by `_`, no leading `/`)."""
    return _INVALID_TAG_CHARACTERS.sub("_", name).lstrip("/")


class TensorBoardLogger(Logger):
    """Writes scalars and hyperparameters to a TensorBoard event file, with tensorboardX.

    Every metric is a scalar at its step (the `epoch` key too, so TensorBoard can plot
    against it); each `log_metrics` call writes one event holding all of its scalars.
    `log_images` writes PNGs (Images dashboard), `log_histograms` histograms (Histograms and
    Distributions dashboards), one event per call. Hyperparameters go to TensorBoard's HParams dashboard (nested mappings
    flattened to `outer/inner`; values other than numbers, bools and strings are stored as
    strings), which lists every scalar of the run as a metric. View with
    `tensorboard --logdir <log_dir>`.

    Events are written on the calling thread (wrap the logger in `AsyncLogger` to take that
    off the training thread; the Trainer runs it on a thread of its own) and reach the disk
    every `flush_secs` seconds, at `flush()` and at `close()`: after `flush()` returns,
    TensorBoard sees everything logged before it.

    When the Trainer resumes a run from a checkpoint, `resume_at` brings `log_dir` back to
    exactly the events that checkpoint counts (see there): TensorBoard then shows each record
    once, as if the run had never stopped. By hand, a new logger pointed at the same `log_dir`
    with `purge_step=<resumed step>` makes TensorBoard hide what the old run wrote from that
    step on (a cruder cut: it is by step, and several records can share a step).

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
        # a URL: written to a local copy, uploaded at every flush (see `Mirror`)
        self._mirror = mirror_of(log_dir, "TensorBoardLogger(log_dir=...)")
        self.log_dir: str = self._mirror.local
        self.flush_secs = flush_secs
        self.purge_step = purge_step
        self._SessionLog = SessionLog
        self._Event = Event
        self._Summary = Summary
        self._events: RecordFile | None = None  # the event file, created by the first write
        self._resumed_file: str | None = None  # the file `resume_at` left, to append to
        self._templates: dict[tuple[str, ...], tuple[Any, list[Any]]] = {}
        self._last_flush = time.monotonic()
        self._closed = False

    def _new_file_name(self) -> str:
        # tensorboardX's pattern, with a unique suffix: two files started in the same second
        # never share a name.
        return (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        )

    def _writer(self) -> RecordFile:
        """The event file, created at the first write, not at construction: a logger built
        on every process of a multi-process run (where only process 0 writes) leaves nothing
        behind on the others."""
        if self._events is None:
            if self._resumed_file is not None:
                self._events = RecordFile(self._resumed_file, append=True)
                return self._events
            os.makedirs(self.log_dir, exist_ok=True)
            self._events = RecordFile(os.path.join(self.log_dir, self._new_file_name()))
            self._events.write(self._file_version())
            if self.purge_step is not None:
                start = self._SessionLog(status=self._SessionLog.START)
                event = self._Event(step=int(self.purge_step), wall_time=time.time())
                event.session_log.CopyFrom(start)
                self._events.write(event.SerializeToString())
        return self._events

    def _file_version(self) -> bytes:
        return self._Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()

    def _write(self, summary: Any, step: int) -> None:
        event = self._Event(summary=summary, step=step, wall_time=time.time())
        self._writer().write(event.SerializeToString())

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
            event.summary.SetInParent()  # present even with no values
            template = event, list(event.summary.value)
            if len(self._templates) >= 64:  # metric names keep changing: do not pile up
                self._templates.clear()
            self._templates[keys] = template
        return template

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        check_open(self, self._closed)
        values = to_floats(metrics)
        # One event per call (even an empty one, so that events count records), its summary
        # holding every value (TensorBoard reads each value as its own series), rather than
        # one event per metric.
        event, fields = self._template(tuple(values))
        for field, value in zip(fields, values.values()):
            field.simple_value = value
        event.step = int(step)
        event.wall_time = time.time()
        self._writer().write(event.SerializeToString())
        self._maybe_flush()

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        """Write each image as a PNG in TensorBoard's Images dashboard (one event per call)."""
        check_open(self, self._closed)
        Image = self._Summary.Image
        values = []
        for name, pixels in to_host_images(images).items():
            height, width, channels = pixels.shape
            image = Image(
                height=height,
                width=width,
                colorspace=channels,
                encoded_image_string=encode_png(pixels),
            )
            values.append(self._Summary.Value(tag=_tag(name), image=image))
        self._write(self._Summary(value=values), int(step))
        self._maybe_flush()

    def log_histograms(self, values: Mapping[str, Any], step: int) -> None:
        """Write a histogram of each array in TensorBoard's Histograms and Distributions
        dashboards (`solstice.loggers.histogram`: 64 equal bins over the finite values)."""
        check_open(self, self._closed)
        from tensorboardX.proto.summary_pb2 import HistogramProto

        summaries = []
        for name, array in to_host_arrays(values).items():
            h = histogram(array)
            proto = HistogramProto(
                min=h.min,
                max=h.max,
                num=h.num,
                sum=h.sum,
                sum_squares=h.sum_squares,
                bucket_limit=h.edges[1:].tolist(),
                bucket=h.counts.tolist(),
            )
            summaries.append(self._Summary.Value(tag=_tag(name), histo=proto))
        self._write(self._Summary(value=summaries), int(step))
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
                self._mirror.push()
            self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._events is not None:
                self._events.close()
            self._mirror.push()

    def resume_at(self, run_id: str | None, records: int) -> int:
        """Bring `log_dir` back to its first `records` records (one event per `log_metrics`
        call), for a run resuming from a checkpoint that counts that many; returns how many
        it holds.

        The event files of `log_dir` are read in the order they were written. Events after
        the first `records` records (written after the checkpoint, which the resumed run
        writes again), a last event cut short by a crash, and `purge_step` markers are
        dropped: the events kept are rewritten into one file (atomically: a temporary file,
        hidden from TensorBoard until complete), which this logger then appends to. Nothing
        is rewritten when `log_dir` holds one clean file with no more than `records` records.
        If it holds fewer (still buffered when the process was killed), it returns that
        number: the Trainer replays the others.
        """
        check_open(self, self._closed)
        if self._events is not None:
            self._events.close()
            self._events = None
        self._resumed_file = None
        if not os.path.isdir(self.log_dir):
            return 0
        for name in os.listdir(self.log_dir):  # left by a resume that was itself interrupted
            if name.startswith(_SCRATCH):
                os.remove(os.path.join(self.log_dir, name))
        files = []
        for name in os.listdir(self.log_dir):
            if _is_event_file(name):
                events, clean = read_records(os.path.join(self.log_dir, name))
                first = self._Event.FromString(events[0]).wall_time if events else 0.0
                files.append((first, name, events, clean))
        files.sort(key=lambda f: f[:2])
        kept: list[bytes] = []
        count = 0
        exact = len(files) == 1  # nothing to rewrite (so far)
        stop = False
        for _, _, events, clean in files:
            exact = exact and clean
            for data in events:
                event = self._Event.FromString(data)
                if event.HasField("file_version"):
                    continue
                if event.HasField("session_log"):
                    exact = False
                    continue
                if _is_record(event):
                    if count == records:  # the first record after the checkpoint
                        exact, stop = False, True
                        break
                    count += 1
                kept.append(data)
            if stop:
                break
        if not files:
            return 0
        if exact:
            self._resumed_file = os.path.join(self.log_dir, files[0][1])
            return count
        tmp = os.path.join(self.log_dir, f"{_SCRATCH}rewrite")
        rewritten = RecordFile(tmp)
        try:
            rewritten.write(self._file_version())
            for data in kept:
                rewritten.write(data)
        finally:
            rewritten.close()
        # The old files leave TensorBoard's sight before the new one enters it: a crash in
        # between shows fewer records (replayed at the next resume), never records twice.
        for i, (_, name, _, _) in enumerate(files):
            os.replace(
                os.path.join(self.log_dir, name), os.path.join(self.log_dir, f"{_SCRATCH}old{i}")
            )
        final = os.path.join(self.log_dir, self._new_file_name())
        os.replace(tmp, final)
        for i in range(len(files)):
            os.remove(os.path.join(self.log_dir, f"{_SCRATCH}old{i}"))
        self._resumed_file = final
        return count

    @property
    def run_id(self) -> str:
        """The log directory (its URL on remote storage)."""
        return self._mirror.location

    def __repr__(self) -> str:
        return f"TensorBoardLogger({self._mirror.location!r})"
