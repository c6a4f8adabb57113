"""How a failing backend is reported: a `RuntimeWarning` on the main thread.

A logger that catches a backend's exception (`FanoutLogger`) calls `report_failure`. On an
ordinary thread that warns at once. On the background thread of an `AsyncLogger` the warning
would be raised where nobody sees it, so the failure is handed to that `AsyncLogger`
instead, which issues the warning on the main thread at its next call (`log_metrics`,
`log_hyperparams`, `flush` or `close`).
"""

import contextlib
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:  # (`Logger` reports through this module)
    from ._logger import Logger


class Reportable(Protocol):
    """Something to report with a warning: a `LoggerFailure` or a `Notice`."""

    def message(self) -> str: ...

    def warn(self, stacklevel: int = 2) -> None: ...


class LoggerFailure(NamedTuple):
    """A backend `logger` raised `error` while handling `method`."""

    logger: "Logger"
    error: BaseException
    method: str

    def message(self) -> str:
        where = ""
        frames = traceback.extract_tb(self.error.__traceback__)
        if frames:
            where = f" (at {frames[-1].filename}:{frames[-1].lineno})"
        return (
            f"Logger {self.logger!r} raised {type(self.error).__name__}: {self.error}{where} "
            f"in `{self.method}`. It has been disabled and receives no more calls; the other "
            "loggers keep logging and training goes on. Fix the cause to get this backend "
            "back in the next run."
        )

    def warn(self, stacklevel: int = 2) -> None:
        warnings.warn(self.message(), RuntimeWarning, stacklevel=stacklevel + 1)


class Notice(NamedTuple):
    """A problem that does not disable anything (e.g. a history file that could not be
    written yet), reported the same way as a `LoggerFailure`."""

    text: str

    def message(self) -> str:
        return self.text

    def warn(self, stacklevel: int = 2) -> None:
        warnings.warn(self.text, RuntimeWarning, stacklevel=stacklevel + 1)


_local = threading.local()


def report_failure(failure: Reportable) -> None:
    """Warn about `failure` now, or hand it to the `AsyncLogger` running this thread."""
    sink: Callable[[Reportable], None] | None = getattr(_local, "sink", None)
    if sink is None:
        # Points at the caller of the reporting logger's method (e.g. `FanoutLogger.log_metrics`).
        failure.warn(stacklevel=4)
    else:
        sink(failure)


@contextlib.contextmanager
def deferred_failures(sink: Callable[[Reportable], None]) -> Iterator[None]:
    """Within this context (on this thread only), `report_failure` calls `sink` instead of
    warning."""
    previous = getattr(_local, "sink", None)
    _local.sink = sink
    try:
        yield
    finally:
        _local.sink = previous
