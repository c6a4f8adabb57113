"""Validation of the Trainer's arguments: every mistake is a `ValueError`/`TypeError` that says
what was given, what is expected and how to fix it."""

from collections.abc import Sequence
from typing import Any

from ..callbacks._callback import Callback
from ..loggers import Logger

Limit = int | float | None


def check_count(name: str, value: Any, *, allow_none: bool = True, minimum: int = 0) -> None:
    """`value` must be an int >= `minimum` (or `None` when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def check_limit(name: str, value: Any) -> None:
    """A `limit_*_batches` value: an int count or a float fraction in (0, 1]."""
    if value is None:
        return
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"`{name}={value}`: a float limit is a fraction of the batches and must be in "
                "(0, 1]; pass an int for a number of batches."
            )
        return
    check_count(name, value)


def check_arguments(
    *,
    max_epochs: int | None,
    max_steps: int | None,
    fast_dev_run: bool | int,
    check_val_every_n_epoch: int,
    num_sanity_val_steps: int,
    log_every_n_steps: int,
    steps_per_execution: int,
    prefetch: int,
    limits: tuple[Limit, Limit, Limit, Limit],
) -> tuple[int | None, int | None, tuple[Limit, Limit, Limit, Limit]]:
    """Check the loop settings; apply `fast_dev_run`. (When to stop is checked by `fit`, the
    only method that needs it: see `check_stopping`.)

    **Returns:** `(max_epochs, max_steps, (train, val, test, predict limits))`.
    """
    check_count("max_epochs", max_epochs)
    check_count("max_steps", max_steps)
    if fast_dev_run is not False:
        check_count("fast_dev_run", int(fast_dev_run), minimum=1)
        n = int(fast_dev_run)
        max_epochs, max_steps, limits = 1, None, (n, n, n, n)
    check_count("check_val_every_n_epoch", check_val_every_n_epoch, minimum=1)
    if num_sanity_val_steps != -1:
        check_count("num_sanity_val_steps (or -1 for the whole split)", num_sanity_val_steps)
    check_count("log_every_n_steps", log_every_n_steps, minimum=1)
    check_count("steps_per_execution", steps_per_execution, minimum=1)
    check_count("prefetch", prefetch, minimum=1)
    for stage, value in zip(("train", "val", "test", "predict"), limits):
        check_limit(f"limit_{stage}_batches", value)
    if log_every_n_steps % steps_per_execution:
        multiple = steps_per_execution * max(1, log_every_n_steps // steps_per_execution)
        raise ValueError(
            f"`log_every_n_steps={log_every_n_steps}` is not a multiple of "
            f"`steps_per_execution={steps_per_execution}`: metrics can only be published "
            f"between fused calls. Use a multiple, e.g. `log_every_n_steps={multiple}`."
        )
    return max_epochs, max_steps, limits


def check_objects(
    callbacks: Sequence[Any] | None, loggers: Sequence[Any] | None
) -> tuple[list[Callback], list[Logger]]:
    """`callbacks` must hold `Callback`s and `loggers` `Logger`s; return them as lists."""
    callbacks = list(callbacks or [])
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(
                f"`callbacks` must hold `solstice.callbacks.Callback` objects, got "
                f"`{type(cb).__name__}`. Subclass `Callback` and override its hooks."
            )
    loggers = list(loggers or [])
    for lg in loggers:
        if not isinstance(lg, Logger):
            raise TypeError(
                f"`loggers` must hold `solstice.Logger` objects, got `{type(lg).__name__}`."
            )
    return callbacks, loggers


def check_stopping(max_epochs: int | None, max_steps: int | None) -> None:
    """`fit` needs a way to stop."""
    if max_epochs is None and max_steps is None:
        raise ValueError(
            "Neither `max_epochs` nor `max_steps` was given, so training would never "
            "stop. Pass `max_epochs=...` and/or `max_steps=...` to `Trainer(...)` (only "
            "`fit` needs them; `validate`, `test` and `predict` do not)."
        )
