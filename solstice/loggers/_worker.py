"""`LoggerWorker`: one logger on a thread of its own, which nobody ever waits for without a
deadline."""

import collections
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._failures import Reportable, deferred_failures
from ._logger import Logger


class _Request:
    """A queue item other than a record: run `kind` on the logger (`flush`, `close`,
    `log_hyperparams`, `resume_at`, `after_save_checkpoint`), then set `done`."""

    __slots__ = ("args", "done", "kind")

    def __init__(self, kind: str, *args: Any) -> None:
        self.kind = kind
        self.args = args
        self.done = threading.Event()


class _Media:
    """A queue item that may be dropped like a record, counted apart: `log_images` or
    `log_histograms` (`method`) with its host arrays."""

    __slots__ = ("method", "step", "values")

    def __init__(self, method: str, values: Mapping[str, Any], step: int) -> None:
        self.method, self.values, self.step = method, values, step


def _lost(count: int) -> str:
    return f" ({count} record(s) waiting for it are dropped)" if count else ""


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


class LoggerWorker:
    """Calls one logger on a daemon thread, in the order things were queued.

    Records wait in a bounded queue: when `max_queue_size` records wait, the oldest waiting
    record is dropped to make room (counted in `dropped`), so a slow logger falls behind
    instead of holding anything up. Anything the logger raises, in any method (`BaseException`
    included: on this thread a `KeyboardInterrupt` or `SystemExit` can only come from the
    logger itself), disables it: it receives no more calls but `close()` (best effort, as it
    may hold open files). A logger found stuck in one call (see `wait`) is disabled too, and
    its thread abandoned. Problems are collected as messages in `notes`, for the owner to
    issue as warnings on its own thread.

    `run_id` is read on this thread (after each request and the first record) and kept, so
    that the owner can read it without calling the logger.

    **Arguments:**

    - `logger`: the logger to run.
    - `max_queue_size`: how many records may wait before the oldest is dropped.
    - `records_source`: `(start, stop) -> iterable of (step, metrics)`, the records a
      resumed logger is missing (`History.iter_records`).
    """

    def __init__(
        self,
        logger: Logger,
        *,
        max_queue_size: int,
        records_source: Callable[[int, int], Iterable[tuple[int, dict[str, float]]]],
    ):
        self.logger = logger
        self.max_queue_size = max_queue_size
        self._records_source = records_source
        self._items: collections.deque[Any] = collections.deque()
        self._waiting = 0  # records and media (not requests) in `_items`
        self._cond = threading.Condition(threading.Lock())
        self.enabled = True
        self.dropped = 0  # records dropped from the full queue, in all
        self.dropped_media = 0  # image and histogram calls dropped from it
        self._dropped_noted = 0
        self.replayed = 0
        self.notes: list[str] = []  # problems to report, oldest first (see `take_notes`)
        self._notes_lock = threading.Lock()
        self._current: tuple[str, float] | None = None  # (method, monotonic start) of a call
        self._run_id: str | None = None
        self._run_id_problem: str | None = None
        self._first_record = True
        self._thread = threading.Thread(
            target=self._work, name=f"solstice-logger({type(logger).__name__})", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def put_record(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue a record (plain floats); drops the oldest waiting one if the queue is full."""
        with self._cond:
            if not self.enabled:
                return
            if self._waiting >= self.max_queue_size:
                self._drop_oldest()
            self._items.append((step, metrics))
            self._waiting += 1
            self._cond.notify()

    def _drop_oldest(self) -> None:
        items = self._items
        for i, item in enumerate(items):
            if type(item) is not _Request:
                del items[i]
                if type(item) is _Media:
                    self.dropped_media += 1
                else:
                    self.dropped += 1
                break
        self._waiting -= 1
        if self._dropped_noted == 0:  # at once the first time, then at each `note_dropped`
            self.note_dropped()

    def note_dropped(self) -> None:
        """Note the records dropped since the last note, if any."""
        total = self.dropped + self.dropped_media
        new = total - self._dropped_noted
        if not new:
            return
        self._dropped_noted = total
        media = (
            f"; {self.dropped_media} of them image or histogram calls, kept nowhere else"
            if self.dropped_media
            else ""
        )
        self._note(
            f"Logger {self.logger!r} cannot keep up: {self.max_queue_size} records were waiting "
            f"for it, so its oldest waiting records were dropped: {new} record(s) "
            f"({total} in all{media}). Records stay in `trainer.history`. Make the logger "
            "faster, or log less often (`log_every_n_steps`)."
        )

    def put_media(self, method: str, values: Mapping[str, Any], step: int) -> None:
        """Queue `log_images` or `log_histograms` (`method`) with host arrays; dropped like
        a record when the queue is full."""
        with self._cond:
            if not self.enabled:
                return
            if self._waiting >= self.max_queue_size:
                self._drop_oldest()
            self._items.append(_Media(method, values, step))
            self._waiting += 1
            self._cond.notify()

    def request(self, kind: str, *args: Any) -> _Request | None:
        """Queue a request; `None` if the logger cannot take one any more (disabled and
        busy, or stopped). A disabled logger's requests are done without calling it."""
        request = _Request(kind, *args)
        with self._cond:
            if not self._thread.is_alive() or (not self.enabled and self._current is not None):
                return None
            self._items.append(request)
            self._cond.notify()
        return request

    # ------------------------------------------------------------------ owner's thread
    @property
    def run_id(self) -> str | None:
        """The logger's `run_id`, as last read on the logger's thread (never calls it)."""
        return self._run_id

    @property
    def waiting(self) -> int:
        """Records queued and not handled yet."""
        return self._waiting

    def wait(self, request: _Request, deadline: float, stuck_after: float) -> str:
        """Wait until `request` is done (`"done"`), the logger has been in one call for
        `stuck_after` seconds (`"stuck"`), or `deadline` (`time.monotonic()`) has passed
        (`"late"`)."""
        while True:
            remaining = deadline - time.monotonic()
            if request.done.wait(min(max(remaining, 0.0), 0.05)):
                return "done"
            current = self._current
            if current is not None and time.monotonic() - current[1] >= stuck_after:
                return "stuck"
            if remaining <= 0:
                return "late"

    def disable_stuck(self, action: str) -> None:
        """Disable a logger found stuck in its current call (`action`: what was waiting)."""
        current = self._current
        with self._cond:
            if not self.enabled:
                return
            self.enabled = False
            lost = self._clear()
        method, since = current if current is not None else ("?", time.monotonic())
        self._note(
            f"Logger {self.logger!r} has been stuck in `{method}` for "
            f"{time.monotonic() - since:.1f} s ({action}): it is disabled and receives no more "
            f"calls{_lost(lost)}; training goes on without it. Its "
            "records stay in `trainer.history`."
        )

    def note_late(self, action: str, waited: float) -> None:
        """Report that `action` (e.g. a flush) did not finish within `waited` seconds."""
        self._note(
            f"Logger {self.logger!r} did not finish {action} within {waited:g} s: "
            f"{self._waiting} record(s) still wait for it. It goes on in the background (and "
            "is abandoned if the process exits first)."
        )

    def _note(self, message: str) -> None:
        with self._notes_lock:
            self.notes.append(message)

    def take_notes(self) -> list[str]:
        """The problems noted since the last call (and forget them)."""
        if not self.notes:
            return []
        with self._notes_lock:
            notes, self.notes = self.notes, []
        return notes

    # ------------------------------------------------------------------ the logger's thread
    def _work(self) -> None:
        # a logger's notices (e.g. "ignores images") are issued on the owner's thread
        with deferred_failures(self._defer):
            self._loop()

    def _defer(self, failure: Reportable) -> None:
        self._note(failure.message())

    def _loop(self) -> None:
        self._read_run_id()
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item = self._items.popleft()
                if type(item) is not _Request:
                    self._waiting -= 1
            if type(item) is _Media:
                if self.enabled:
                    self._call(
                        item.method, getattr(self.logger, item.method), item.values, item.step
                    )
                continue
            if type(item) is tuple:
                if self.enabled:
                    step, metrics = item
                    self._call("log_metrics", self.logger.log_metrics, dict(metrics), step)
                    if self._first_record:
                        self._first_record = False
                        self._read_run_id()
                continue
            try:
                if item.kind == "close":
                    if self.enabled:
                        self._call("close", self.logger.close)
                    else:  # disabled, best effort (it may hold open files); reported already
                        try:
                            self.logger.close()
                        except BaseException:  # noqa: B036 -- on this thread, it is the logger's
                            pass
                    return
                if self.enabled:
                    self._handle(item)
            finally:
                item.done.set()

    def _handle(self, request: _Request) -> None:
        if request.kind == "flush":
            self._call("flush", self.logger.flush)
        elif request.kind == "log_hyperparams":
            self._call("log_hyperparams", self.logger.log_hyperparams, *request.args)
        elif request.kind == "resume_at":
            self._resume(*request.args)
        elif request.kind == "after_save_checkpoint":
            self._call(request.kind, self.logger.after_save_checkpoint, *request.args)
        self._read_run_id()

    def _call(self, method: str, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        self._current = (method, time.monotonic())
        try:
            return True, fn(*args)
        except BaseException as error:  # noqa: B036 -- on this thread, all of it is the logger's
            self._fail(method, error)
            return False, None
        finally:
            self._current = None

    def _fail(self, method: str, error: BaseException) -> None:
        with self._cond:
            if not self.enabled:
                return
            self.enabled = False
            lost = self._clear()
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        self._note(
            f"Logger {self.logger!r} raised {detail}{_where(error)} in `{method}`. It has been "
            f"disabled and receives no more calls{_lost(lost)}; the other "
            "loggers keep logging and training goes on. Its records stay in "
            "`trainer.history`; fix the cause to get this logger back in the next run."
        )

    def _clear(self) -> int:
        """Drop the waiting records (under the lock); requests stay, to be marked done."""
        lost = self._waiting
        self._items = collections.deque(item for item in self._items if type(item) is _Request)
        self._waiting = 0
        return lost

    def _resume(self, run_id: str | None, records: int | None) -> None:
        if records is None:  # a checkpoint that did not count records (older Solstice)
            if run_id is not None:
                self._call("resume_from", self.logger.resume_from, run_id)
            return
        ok, held = self._call("resume_at", self.logger.resume_at, run_id, records)
        if not ok:
            return
        self._read_run_id()  # the run it continues (or starts), for checkpoints during the replay
        if held is None:
            held = records
        if isinstance(held, bool) or not isinstance(held, int) or not 0 <= held <= records:
            self._note(
                f"Logger {self.logger!r}: `resume_at(run_id, records={records})` returned "
                f"{held!r}; it must return how many of those records the logger holds, an int "
                f"from 0 to {records}. Nothing is replayed to it."
            )
            return
        for step, metrics in self._records_source(held, records):
            ok, _ = self._call("log_metrics", self.logger.log_metrics, metrics, step)
            if not ok:
                return
            self.replayed += 1

    def _read_run_id(self) -> None:
        self._current = ("run_id", time.monotonic())
        try:
            value = self.logger.run_id
        except BaseException as error:  # noqa: B036 -- on this thread, all of it is the logger's
            detail = "".join(traceback.format_exception_only(type(error), error)).strip()
            self._run_id_note(
                f"Logger {self.logger!r} raised {detail}{_where(error)} when asked for its "
                "`run_id`; checkpoints record no run for it, so a resumed run starts a new one. "
                "Make `run_id` return a string or None."
            )
            value = None
        finally:
            self._current = None
        if isinstance(value, os.PathLike):
            value = os.fsdecode(value)
        if value is not None and not isinstance(value, str):
            self._run_id_note(
                f"Logger {self.logger!r} has `run_id` {value!r} of type {type(value).__name__}, "
                "but checkpoints record a string or None; it is not recorded. Return "
                "`str(...)` of it."
            )
            value = None
        self._run_id = value

    def _run_id_note(self, message: str) -> None:
        if self._run_id_problem != message:  # once per distinct problem
            self._run_id_problem = message
            self._note(message)
