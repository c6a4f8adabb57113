"""Lightning's loop controls: when a fit validates (`val_check_interval`), when it must
stop (`max_time`), whether a stop may take effect yet (`min_epochs`, `min_steps`), and which
batches it sees (`overfit_batches`).

Every decision here is a function of the run's position, except the two clocks
(`val_check_interval` as a `timedelta`, `max_time`), which each process reads alone and the
fit loop agrees on between processes (`clock_views`, see `Agreement`).
"""

import datetime
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._checks import check_int, check_seconds
from .._periodic import Every

if TYPE_CHECKING:
    from .._progress import Progress
    from ._run import Run

log = logging.getLogger("solstice")

Interval = int | float | datetime.timedelta | None


# ---------------------------------------------------------------------- argument checks
def parse_max_time(value: Any) -> datetime.timedelta | None:
    """`max_time` as a `timedelta`: from one, a dict of `timedelta` keywords
    (`{"hours": 2}`) or Lightning's `"DD:HH:MM:SS"` string."""
    if value is None:
        return None
    how = (
        "Pass a `datetime.timedelta`, a dict of its keywords (`{'hours': 2}`) or a "
        "'DD:HH:MM:SS' string (e.g. '00:12:00:00' for 12 hours)."
    )
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"`max_time={value!r}` is not in the 'DD:HH:MM:SS' format. {how}")
        days, hours, minutes, seconds = (int(p) for p in parts)
        value = datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    elif isinstance(value, dict):
        try:
            value = datetime.timedelta(**value)
        except TypeError as error:
            raise ValueError(f"`max_time={value!r}`: {error}. {how}") from None
    if not isinstance(value, datetime.timedelta):
        raise TypeError(f"`max_time` must be a duration, got {value!r}. {how}")
    if value.total_seconds() <= 0:
        raise ValueError(f"`max_time={value!r}` must be a positive duration. {how}")
    return value


def check_val_check_interval(value: Any, every_n_epochs: Any, fused: int) -> Interval:
    """`val_check_interval` as it applies (`1.0`, Lightning's default, is `None`: validation
    at epoch ends), after checking it fits `check_val_every_n_epoch` and
    `steps_per_execution`."""
    if every_n_epochs is not None:
        check_int(
            "check_val_every_n_epoch (or None: validate by steps only)", every_n_epochs, minimum=1
        )
    if value is None or isinstance(value, datetime.timedelta):
        check_seconds("val_check_interval", value)
        if value is None and every_n_epochs is None:
            raise ValueError(
                "`check_val_every_n_epoch=None` validates by `val_check_interval` only, but "
                "none was given, so the fit would never validate. Pass `val_check_interval="
                "N` (every N training steps across epochs), or `limit_val_batches=0` for no "
                "validation."
            )
        return value
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"`val_check_interval={value}`: a float is a fraction of the training epoch "
                "and must be in (0, 1]; pass an int for every N training steps."
            )
        if every_n_epochs is None:
            raise ValueError(
                f"`val_check_interval={value}` is a fraction of an epoch, but "
                "`check_val_every_n_epoch=None` counts steps across epochs. Pass an int "
                "(every N training steps), or a `check_val_every_n_epoch`."
            )
        return None if value == 1.0 else value
    check_int("val_check_interval", value, minimum=1)
    if value % fused:
        raise ValueError(
            f"`val_check_interval={value}` is not a multiple of `steps_per_execution="
            f"{fused}`: validation can only run between fused calls. Use a multiple, e.g. "
            f"`val_check_interval={fused * max(1, value // fused)}`."
        )
    return value


def check_overfit(value: Any, limit_train: Any, limit_val: Any) -> int | float:
    """`overfit_batches`: `0` (off), an int number of batches or a fraction in (0, 1]."""
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"`overfit_batches={value}`: a float is a fraction of the training batches "
                "and must be in [0, 1]; pass an int for a number of batches."
            )
    else:
        check_int("overfit_batches", value)
    if value and (limit_train is not None or limit_val is not None):
        raise ValueError(
            f"`overfit_batches={value}` sets the training and validation batches itself; "
            "drop `limit_train_batches`/`limit_val_batches`, or `overfit_batches`."
        )
    return value


# ---------------------------------------------------------------------- the decisions
class LoopControls:
    """A fit's loop controls, read from the Trainer's settings (see `Trainer`).

    **Arguments:**

    - `trainer`: the Trainer (its `val_check_interval`, `check_val_every_n_epoch`,
      `min_epochs`, `min_steps`, `max_time`, `overfit_batches` and `clock`).
    """

    def __init__(self, trainer: Any):
        self.interval: Interval = trainer.val_check_interval
        self.every_n_epochs: int | None = trainer.check_val_every_n_epoch
        self.epochs = Every(steps=self.every_n_epochs)
        self.min_epochs: int | None = trainer.min_epochs
        self.min_steps: int | None = trainer.min_steps
        self.overfit = bool(trainer.overfit_batches)
        clock: Callable[[], float] = trainer.clock
        seconds = self.interval if isinstance(self.interval, datetime.timedelta) else None
        self.val_clock = Every(seconds=seconds, clock=clock)
        self.max_time: datetime.timedelta | None = trainer.max_time
        self.deadline = Every(seconds=self.max_time, clock=clock)
        self.val_batches: int | None = None  # the float interval, in batches of this epoch
        self._said_deferred = False
        #: whether validation follows `val_check_interval` (not only epoch ends)
        self.within_epochs = self.interval is not None
        #: whether a clock is read at step boundaries; whether they have anything to decide
        self.timed = seconds is not None or self.max_time is not None
        self.active = self.within_epochs or self.timed

    def start(self, step: int) -> None:
        """At the start of training: the clocks start now."""
        self.val_clock.start(step)
        self.deadline.start(step)

    def data_epoch(self, epoch: int) -> int:
        """The epoch the DataModule is told (`overfit_batches`: always the first, so every
        epoch sees the same batches in the same order)."""
        return 0 if self.overfit else epoch

    def epoch_start(self, count: int | None) -> None:
        """With the epoch's number of batches known: the float interval in batches, and the
        check that an int interval counted within epochs fits in one."""
        interval = self.interval
        if isinstance(interval, float):
            if count is None:
                raise ValueError(
                    f"`val_check_interval={interval}` is a fraction of the epoch, but the "
                    "training dataloader's length is unknown. Pass an int number of steps."
                )
            self.val_batches = max(1, int(count * interval))
        elif isinstance(interval, int) and self.every_n_epochs is not None:
            if count is not None and interval > count:
                raise ValueError(
                    f"`val_check_interval={interval}` must be at most the number of training "
                    f"batches of an epoch ({count}): it counts batches within each epoch. To "
                    "count steps across epochs, pass `check_val_every_n_epoch=None`; for no "
                    "validation, `limit_val_batches=0`."
                )

    def clock_views(self) -> list[bool]:
        """This process's view of the clocks: `[validation due, max_time passed]`."""
        if not self.timed:
            return [False, False]
        return [self.val_clock.time_due(), self.deadline.time_due()]

    def validation_due(self, progress: "Progress", n: int, time_due: bool) -> bool:
        """Whether to validate after a training call of `n` steps that ended at `progress`
        (`time_due`: the validation clock, as agreed)."""
        interval = self.interval
        if interval is None:
            return False
        if self.every_n_epochs is not None and (progress.epoch + 1) % self.every_n_epochs:
            return False
        if isinstance(interval, datetime.timedelta):
            return time_due
        if isinstance(interval, float):
            every, stop = self.val_batches, progress.batch_idx
        elif self.every_n_epochs is None:
            every, stop = interval, progress.global_step
        else:
            every, stop = interval, progress.batch_idx
        return every is not None and stop // every > (stop - n) // every

    def validated(self, step: int) -> None:
        """A validation of the fit completed at `step`: the validation clock restarts."""
        self.val_clock.fired(step)

    def validates_at_epoch_end(self, epoch: int) -> bool:
        """Whether the end of (0-based) `epoch` validates (no `val_check_interval`)."""
        return not self.within_epochs and self.epochs.crossed(epoch, epoch + 1)

    # ------------------------------------------------------------------ stopping
    def min_reached(self, progress: "Progress") -> bool:
        """Whether `min_epochs` and `min_steps` are done."""
        return (self.min_epochs is None or progress.epoch >= self.min_epochs) and (
            self.min_steps is None or progress.global_step >= self.min_steps
        )

    def stop_due(self, run: "Run") -> bool:
        """Whether the run's stop request takes effect now: an interruption (a signal,
        `max_time`) at once, any other once `min_epochs`/`min_steps` are reached (deferred
        until then, said once)."""
        if not run.should_stop:
            return False
        if run.interrupted or self.min_reached(run.progress):
            return True
        if not self._said_deferred:
            self._said_deferred = True
            p = run.progress
            log.info(
                "Trainer was signaled to stop but the required `min_epochs=%s` or `min_steps="
                "%s` has not been met (epoch %d, global step %d). Training will continue...",
                self.min_epochs,
                self.min_steps,
                p.epoch,
                p.global_step,
            )
        return False
