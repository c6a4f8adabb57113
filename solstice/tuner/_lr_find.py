"""`lr_find`: Lightning's learning-rate range test, on a private copy of the run."""

import logging
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from .._experiment import Experiment
from ..datamodules import DataModule
from ..trainer import Trainer
from ._lr_finder import MODES, LRFinder, divergence, smooth, sweep_rates
from ._sweep import LRSweep, SweepRecorder, check_sweepable

log = logging.getLogger("solstice")

#: The Trainer settings the sweep takes from the Trainer (or dict) it is given. It sets the
#: others itself: `max_steps=num_training`, no validation, callbacks, loggers or progress bar,
#: and no `detect_anomaly` (the sweep runs the loss into divergence on purpose).
SWEEP_SETTINGS = (
    "devices",
    "mesh",
    "seed",
    "steps_per_execution",
    "prefetch",
    "sharding_rules",
    "limit_train_batches",
    "compilation_cache",
)

#: How often (in steps, rounded up to a multiple of `steps_per_execution`) the sweep reads
#: its losses to stop once they diverge.
CHECK_EVERY = 10


def _settings(trainer_or_settings: Any) -> dict[str, Any]:
    """The `SWEEP_SETTINGS` of a Trainer, or a dict of some of them, checked."""
    if isinstance(trainer_or_settings, Trainer):
        t = trainer_or_settings
        return {
            "devices": t.devices,
            "mesh": t.mesh,
            "seed": t.seed,
            "steps_per_execution": t.steps_per_execution,
            "prefetch": t.prefetch,
            "sharding_rules": t.sharding_rules,
            "limit_train_batches": t.limit_train_batches,
            "compilation_cache": t.compilation_cache_dir or False,
        }
    if not isinstance(trainer_or_settings, Mapping):
        raise TypeError(
            "`lr_find(trainer_or_settings, ...)` takes a `solstice.Trainer` (its settings are "
            "copied; it is not run) or a dict of Trainer keyword arguments, got "
            f"`{type(trainer_or_settings).__name__}`."
        )
    unknown = sorted(set(trainer_or_settings) - set(SWEEP_SETTINGS))
    if unknown:
        raise ValueError(
            f"`lr_find` got Trainer settings it does not take: {unknown}. It sets "
            "`max_steps` (to `num_training`), validation, callbacks and loggers itself; pass "
            f"only some of {list(SWEEP_SETTINGS)}."
        )
    return dict(trainer_or_settings)


def _check(min_lr: float, max_lr: float, num_training: int, mode: str, **rest: Any) -> None:
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"`lr_find({name}={value!r})` must be a number > 0.")
    if not min_lr < max_lr or not math.isfinite(max_lr):
        raise ValueError(
            f"`lr_find(min_lr={min_lr}, max_lr={max_lr})`: the sweep goes from `min_lr` up "
            "to a finite `max_lr`, so `min_lr < max_lr` is needed."
        )
    if isinstance(num_training, bool) or not isinstance(num_training, int) or num_training < 2:
        raise ValueError(f"`lr_find(num_training={num_training!r})` must be an int >= 2.")
    if mode not in MODES:
        raise ValueError(f"`lr_find(mode={mode!r})` must be one of {list(MODES)}.")
    threshold, beta = rest["early_stop_threshold"], rest["beta"]
    if threshold is not None and not (isinstance(threshold, (int, float)) and threshold > 1):
        raise ValueError(
            f"`lr_find(early_stop_threshold={threshold!r})` must be a number > 1 (stop once "
            "the smoothed loss is that many times the best one) or None (never stop early)."
        )
    if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
        raise ValueError(f"`lr_find(beta={beta!r})`: the smoothing factor must be in [0, 1).")


def lr_find(
    trainer_or_settings: "Trainer | Mapping[str, Any]",
    experiment: Experiment,
    datamodule: DataModule,
    *,
    min_lr: float = 1e-8,
    max_lr: float = 1.0,
    num_training: int = 100,
    mode: str = "exponential",
    early_stop_threshold: float | None = 4.0,
    monitor: str = "loss",
    beta: float = 0.98,
) -> LRFinder:
    """Lightning's learning-rate range test: train a copy of `experiment` for `num_training`
    steps with the learning rate rising from `min_lr` to `max_lr`, and record the loss.

    The sweep runs in a private `Trainer` built from the settings of `trainer_or_settings`
    (see `SWEEP_SETTINGS`): `experiment` is left untouched (the sweep trains a copy of its
    arrays) and a given Trainer is not run, so both are ready for the real `fit`. Nothing
    is logged or saved; `experiment`'s hooks and the Trainer's callbacks do not run.

    The rate is set inside the compiled step, before every `train_step`, through
    `Optimizer.with_learning_rate`: exactly, for any optimizer state (Adam's moments and
    all), for an `OptaxOptimizer` whose transformation is wrapped in
    `optax.inject_hyperparams` with a constant rate. Another optimizer raises `TypeError`
    before anything runs, saying so.

    **Arguments:**

    - `trainer_or_settings`: a `solstice.Trainer` (its devices, mesh, seed, `steps_per_execution`,
      `limit_train_batches`, ... are copied) or a dict of those Trainer keyword arguments.
    - `experiment`, `datamodule`: as for `Trainer.fit`.
    - `min_lr`, `max_lr`: the rate of the first and of the last step.
    - `num_training`: the number of steps (points of the curve).
    - `mode`: `"exponential"` (rates evenly spaced on a log scale) or `"linear"`.
    - `early_stop_threshold`: stop once the smoothed loss exceeds this many times the best
      so far, or is not finite (checked every 10 steps; the curve ends at the first such
      step); `None`: run all `num_training` steps.
    - `monitor`: the training metric (a key of the metrics' `compute()`) taken as the loss.
    - `beta`: the smoothing factor of the loss curve (Lightning's 0.98).

    **Returns:** an `LRFinder` with the curve, `suggestion()` and `plot()`.

    **Example:**

    ```python
    adam = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    experiment = solstice.ClassificationExperiment(model, solstice.OptaxOptimizer(adam, model))
    trainer = solstice.Trainer(max_epochs=10)
    finder = solstice.tuner.lr_find(trainer, experiment, Digits(batch_size=64))
    lr = finder.suggestion()
    ```
    """
    _check(min_lr, max_lr, num_training, mode, early_stop_threshold=early_stop_threshold, beta=beta)
    settings = _settings(trainer_or_settings)
    check_sweepable(experiment)
    fused = int(settings.get("steps_per_execution", 1))
    recorder = SweepRecorder(monitor, num_training, early_stop_threshold, beta)
    private = Trainer(
        **settings,
        max_steps=num_training,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=fused * max(1, -(-CHECK_EVERY // fused)),
        callbacks=[recorder],
        enable_progress_bar=False,
    )
    rates = np.asarray(sweep_rates(min_lr, max_lr, num_training, mode), np.float32)
    sweep = LRSweep(experiment, jnp.asarray(rates), jnp.zeros((), jnp.int32))
    with private:
        private.fit(sweep, datamodule)
    raw = recorder.raw_losses
    smoothed = smooth(raw, beta)
    stop = divergence(smoothed, early_stop_threshold)
    count = len(raw) if stop is None else stop + 1
    if stop is not None:
        log.info("lr_find: the loss diverged at step %d of %d; stopped.", count, num_training)
    return LRFinder(
        lrs=rates[:count].astype(np.float64).tolist(),
        losses=smoothed[:count].tolist(),
        raw_losses=raw[:count].tolist(),
        mode=mode,
        min_lr=float(min_lr),
        max_lr=float(max_lr),
        num_training=num_training,
        early_stopped=stop is not None,
    )
