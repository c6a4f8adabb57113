"""The `Logger` abstraction: somewhere to send dictionaries of scalars."""

import abc
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from ._failures import Notice, report_failure

_ignored_lock = threading.Lock()
_ignored: "weakref.WeakKeyDictionary[Logger, set[str]]" = weakref.WeakKeyDictionary()
_ignored_types: set[tuple[type, str]] = set()  # loggers that cannot be weakly referenced


def _first_time(logger: "Logger", method: str) -> bool:
    """Whether `logger` ignores a `method` call for the first time."""
    with _ignored_lock:
        try:
            seen = _ignored.setdefault(logger, set())
        except TypeError:  # unhashable, or no weak references: once per class instead
            key = (type(logger), method)
            first = key not in _ignored_types
            _ignored_types.add(key)
            return first
        first = method not in seen
        seen.add(method)
        return first


class Logger(abc.ABC):
    """Receives dictionaries of scalar metrics (and hyperparameters) and records them.

    `log_metrics` is the one method to implement. Values may be Python numbers, numpy
    scalars or 0-d JAX arrays; a logger converts them with `float(...)` itself. Wrap any logger
    in `solstice.loggers.AsyncLogger` to move that conversion (a device-to-host copy) and the
    I/O off the training thread.

    The Trainer runs each logger it is given on a thread of its own and hands it plain
    `float`s; a logger that raises (anything, `SystemExit` included), hangs or cannot keep
    up never stops or stalls training (see `solstice.callbacks.LoggingCallback`). To resume
    its log exactly after a restart, a logger overrides `resume_at`.

    **Example:**

    ```python
    class PrintLogger(solstice.Logger):
        def log_metrics(self, metrics, step):
            print(step, {k: float(v) for k, v in metrics.items()})
    ```
    """

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record `metrics` (name -> scalar) at training step `step`."""

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Record the run's hyperparameters (a flat or nested mapping). Default: ignore."""

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        """Record `images` (name -> image array) at training step `step`.

        An image is `(height, width)` or `(height, width, channels)` with 1, 3 or 4
        channels, of dtype `uint8` (0 to 255), `bool` or floating (0.0 to 1.0);
        `solstice.loggers.to_host_images` turns them into `uint8` host arrays
        `(height, width, channels)` (through the Trainer, a logger receives them so already).
        `TensorBoardLogger`, `WandBLogger` and `MLFlowLogger` record them. Default: ignore
        them, with a one-time `RuntimeWarning` saying so.
        """
        self._ignore("log_images", "images")

    def log_histograms(self, values: Mapping[str, Any], step: int) -> None:
        """Record a histogram of each array of `values` (name -> array of any shape) at
        training step `step`; `solstice.loggers.histogram` draws one (from the finite
        values, in 64 bins). `TensorBoardLogger`, `WandBLogger` and `MLFlowLogger` record
        them. Default: ignore them, with a one-time `RuntimeWarning` saying so.
        """
        self._ignore("log_histograms", "histograms")

    def after_save_checkpoint(self, path: str, info: Mapping[str, Any]) -> None:
        """A checkpoint was committed at `path` (Lightning's hook of the same name).

        `info` says why: `name`, `reason` (`"epoch"`, `"step"`, `"time"`, `"interrupt"`),
        `monitor` and its `score` (or `None`). Called on the logger's thread, after the
        checkpoint is complete on disk; it may be deleted later by `ModelCheckpoint`'s
        retention. `MLFlowLogger` records the path (and can copy the checkpoint as an
        artifact). Default: nothing to do.
        """

    def _ignore(self, method: str, what: str) -> None:
        if _first_time(self, method):
            report_failure(
                Notice(
                    f"{self!r} does not record {what}: its `{method}` calls are ignored. "
                    "TensorBoardLogger, WandBLogger and MLFlowLogger record them."
                )
            )

    def flush(self) -> None:
        """Make everything logged so far durable/visible. Default: nothing to do."""

    def close(self) -> None:
        """Flush and release resources. Must be safe to call more than once."""
        self.flush()

    def resume_from(self, run_id: str) -> "Logger":
        """Continue the run `run_id` (saved in a checkpoint) instead of starting a new one.

        Called by the default `resume_at`. Default: nothing to continue (file loggers append
        to their directory anyway). Returns `self`.
        """
        return self

    def resume_at(self, run_id: str | None, records: int) -> int:
        """Continue the run `run_id` where a checkpoint left it: after its first `records`
        records (`log_metrics` calls).

        Called by the Trainer when it resumes from a checkpoint, before anything else reaches
        this logger, on the logger's own thread. The run that wrote the checkpoint may have
        gone on logging after it (those records are published again by the resumed run), or
        may have lost some (rows still buffered when the process was killed). Keep at most
        the first `records` records (drop the ones after them) and return how many you hold:
        the Trainer replays the missing ones, `records[held:records]` from its `History`,
        through `log_metrics` before any new record. So the log ends up holding every record
        exactly once, as if the run had never stopped.

        **Arguments:**

        - `run_id`: what `run_id` returned when the checkpoint was taken (`None` if nothing).
        - `records`: how many records had been published when the checkpoint was taken.

        **Returns:** how many of those records this logger holds (`0` to `records`).

        Default: calls `resume_from(run_id)` (unless `run_id` is `None`) and returns
        `records`: a logger that cannot look back at what it wrote is taken to hold everything
        (it may then show the records written after the checkpoint twice). `CSVLogger`,
        `TensorBoardLogger` and `WandBLogger` override it to be exact.
        """
        if run_id is not None:
            self.resume_from(run_id)
        return records

    @property
    def run_id(self) -> str | None:
        """An identifier of the run this logger writes to, saved in checkpoints so a resumed
        run continues it (W&B run id, log directory, ...): a `str` (an `os.PathLike` is
        stored as its path) or `None`. Default: `None`."""
        return None


def check_loggers(loggers: Iterable[Any], owner: str) -> list["Logger"]:
    """`loggers` as a list, each a `Logger` given once (`owner` names who takes them)."""
    loggers = list(loggers)
    for logger in loggers:
        if not isinstance(logger, Logger):
            raise TypeError(
                f"{owner} takes `solstice.Logger` instances, got {logger!r} of type "
                f"{type(logger).__name__}. Subclass `solstice.Logger` and implement "
                "`log_metrics`."
            )
    if len({id(logger) for logger in loggers}) != len(loggers):
        raise ValueError(
            f"{owner} got the same logger twice in {loggers!r}; every record would be "
            "written twice. Pass each logger once."
        )
    return loggers
