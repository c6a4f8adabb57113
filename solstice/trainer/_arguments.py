"""Validation of the Trainer's arguments: every mistake is a `ValueError`/`TypeError` that says
what was given, what is expected and how to fix it."""

from collections.abc import Sequence
from typing import Any

import jax

from .._checks import check_int
from ..callbacks import Callback, ProgressBar
from ..checkpointing._saver import Saver
from ..loggers import Logger
from ._loop_controls import check_overfit, check_val_check_interval, parse_max_time
from ._precision import policy_for

Limit = int | float | None
LIMITS = ("train", "val", "test", "predict")


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
    check_int(name, value, allow_none=True)


def check_arguments(**arguments: Any) -> dict[str, Any]:
    """Check the Trainer's loop settings (its keyword arguments); apply `fast_dev_run` and
    `overfit_batches`.

    **Returns:** `{"max_epochs": ..., "max_steps": ..., "limits": (train, val, test,
    predict), "hparams": ..., "loop": (val_check_interval, max_time,
    check_val_every_n_epoch, min_epochs, min_steps, overfit_batches)}` as they apply. (When
    to stop is checked by `fit`, the only method that needs it: see `check_stopping`.)"""
    a = arguments
    check_int("max_epochs", a["max_epochs"], allow_none=True)
    check_int("max_steps", a["max_steps"], allow_none=True)
    max_epochs, max_steps = a["max_epochs"], a["max_steps"]
    limits = tuple(a[f"limit_{stage}_batches"] for stage in LIMITS)
    overfit = check_overfit(a["overfit_batches"], *limits[:2])
    if overfit:  # the same batches every epoch, validated on
        limits = (overfit, overfit, *limits[2:])
    if a["fast_dev_run"] is not False:
        check_int("fast_dev_run", int(a["fast_dev_run"]), minimum=1)
        n = int(a["fast_dev_run"])
        max_epochs, max_steps, limits = 1, None, (n, n, n, n)
    for name in ("min_epochs", "min_steps"):
        check_int(name, a[name], allow_none=True)
    interval = check_val_check_interval(
        a["val_check_interval"], a["check_val_every_n_epoch"], a["steps_per_execution"]
    )
    every_n_epochs, max_time = a["check_val_every_n_epoch"], parse_max_time(a["max_time"])
    if a["fast_dev_run"] is not False:  # one batch of each stage, validated (as Lightning)
        interval, every_n_epochs = None, 1
    loop = (interval, max_time, every_n_epochs, a["min_epochs"], a["min_steps"])
    if a["num_sanity_val_steps"] != -1:
        check_int("num_sanity_val_steps (or -1 for the whole split)", a["num_sanity_val_steps"])
    for name in ("log_every_n_steps", "steps_per_execution", "prefetch", "accumulate_grad_batches"):
        check_int(name, a[name], minimum=1)
    for stage, value in zip(LIMITS, limits):
        check_limit(f"limit_{stage}_batches", value)
    _check_step_settings(a)
    log_every, fused = a["log_every_n_steps"], a["steps_per_execution"]
    hparams = {"max_epochs": max_epochs, "max_steps": max_steps, "seed": a["seed"]}
    hparams.update(log_every_n_steps=log_every, steps_per_execution=fused)
    hparams.update(accumulate_grad_batches=a["accumulate_grad_batches"])
    return {
        "max_epochs": max_epochs,
        "max_steps": max_steps,
        "limits": limits,
        "hparams": hparams,
        "loop": (*loop, overfit),
    }


def _check_step_settings(a: dict[str, Any]) -> None:
    """The compiled step's settings, together: precision, microbatches, fused steps."""
    if policy_for(a["precision"]).scaling is not None and a["accumulate_grad_batches"] > 1:
        raise ValueError(
            f'`precision="{a["precision"]}"` with `accumulate_grad_batches='
            f"{a['accumulate_grad_batches']}`: dynamic loss scaling does not yet run across "
            'microbatches. Use `precision="bf16-mixed"` (no loss scaling; it composes with '
            "microbatching), or one batch per optimizer step."
        )
    if not isinstance(a["detect_anomaly"], bool):
        raise TypeError(f"`detect_anomaly` must be True or False, got {a['detect_anomaly']!r}.")
    log_every, fused = a["log_every_n_steps"], a["steps_per_execution"]
    if log_every % fused:
        multiple = fused * max(1, log_every // fused)
        raise ValueError(
            f"`log_every_n_steps={log_every}` is not a multiple of `steps_per_execution="
            f"{fused}`: metrics can only be published between fused calls. Use a multiple, "
            f"e.g. `log_every_n_steps={multiple}`."
        )


def check_objects(
    callbacks: Sequence[Any] | None, loggers: Sequence[Any] | None, progress_bar: bool
) -> tuple[list[Callback], list[Logger]]:
    """`callbacks` must hold `Callback`s and `loggers` `Logger`s; return them as lists, the
    callbacks with a `ProgressBar` added (if `progress_bar` and none is there; one per run:
    process 0's) and the savers last (as in Lightning), so that a checkpoint holds every
    other callback's latest state."""
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
    if progress_bar and jax.process_index() == 0:
        if not any(isinstance(cb, ProgressBar) for cb in callbacks):
            callbacks.append(ProgressBar())
    savers = [cb for cb in callbacks if isinstance(cb, Saver)]
    return [cb for cb in callbacks if not isinstance(cb, Saver)] + savers, loggers


def check_stopping(max_epochs: int | None, max_steps: int | None) -> None:
    """`fit` needs a way to stop."""
    if max_epochs is None and max_steps is None:
        raise ValueError(
            "Neither `max_epochs` nor `max_steps` was given, so training would never "
            "stop. Pass `max_epochs=...` and/or `max_steps=...` to `Trainer(...)` (only "
            "`fit` needs them; `validate`, `test` and `predict` do not)."
        )
