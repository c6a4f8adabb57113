"""What `ModelCheckpoint` and `EarlyStopping` share: one monitored metric and a mode."""

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._view import TrainerView

MODES = ("min", "max")


def check_mode(mode: str, owner: str) -> None:
    if mode not in MODES:
        raise ValueError(f"`{owner}(mode={mode!r})`: `mode` must be 'min' or 'max'.")


def better(a: float, b: float, mode: str) -> bool:
    """Whether `a` is strictly better than `b` under `mode`."""
    return a < b if mode == "min" else a > b


def worst(mode: str) -> float:
    return math.inf if mode == "min" else -math.inf


class Monitor:
    """Reads one metric from `trainer.callback_metrics` (host floats, updated at epoch ends
    and after validation).

    A `val/...` metric is fresh once after each validation (read at the epoch end, or
    right after a validation of `val_check_interval`); any other metric (e.g.
    `train/loss_epoch`) at every epoch end. A metric that should be fresh but is absent, or
    was never seen by the end of training, raises `ValueError` listing the metrics that do
    exist.
    """

    def __init__(self, key: str, owner: str):
        if not isinstance(key, str) or not key:
            raise TypeError(f"`{owner}(monitor=...)` must be a metric name, got {key!r}.")
        self.key = key
        self.owner = owner
        self.seen = False
        self.epoch_ends = 0
        self._validated = False  # a validation ran since the last `read`

    def start(self) -> None:
        """Called at the start of training."""
        self.seen = False
        self.epoch_ends = 0
        self._validated = False

    def note_validation(self, trainer: "TrainerView") -> None:
        self._validated = True

    def read(self, trainer: "TrainerView") -> float | None:
        """At an epoch end or after a validation: the metric if it was computed since the
        last read (a `val/*` metric: a validation ran), else `None`."""
        self.epoch_ends += 1
        if self.key.startswith("val/"):
            if not self._validated:
                return None
            self._validated = False
        if self.key not in trainer.callback_metrics:
            raise self.missing(trainer)
        self.seen = True
        return float(trainer.callback_metrics[self.key])

    def current(self, trainer: "TrainerView") -> float | None:
        """The latest value, however old, or `None` if there is none yet."""
        value = trainer.callback_metrics.get(self.key)
        return None if value is None else float(value)

    def check_seen(self, trainer: "TrainerView") -> None:
        """At the end of training: raise if epochs ended but the metric never appeared."""
        if self.epoch_ends and not self.seen:
            raise self.missing(trainer)

    def missing(self, trainer: "TrainerView") -> ValueError:
        available = ", ".join(f"`{k}`" for k in sorted(trainer.callback_metrics)) or "none"
        return ValueError(
            f"`{self.owner}` monitors `{self.key}`, but the Trainer never produced a metric of "
            f"that name. Metrics it produced: {available}. Pass one of them as `monitor=`: "
            "validation metrics are `val/<name>` (they need a validation split and appear in "
            "epochs that validate), training metrics averaged over an epoch are "
            "`train/<name>_epoch`."
        )
