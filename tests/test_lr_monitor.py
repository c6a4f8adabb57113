"""`LearningRateMonitor`: one definition of the learning rate at a step, in every mode.

The value logged at global step s (after s steps) is the rate that the s-th step's update
applied: `schedule(s - 1)` in optax's 0-based update count. Every way of reading it (an
`optax.inject_hyperparams` state, an `SGDOptimizer` schedule, `schedule=`) and both
`logging_interval`s must log exactly that, so the tests compare with the schedule itself.
"""

import equinox as eqx
import numpy as np
import optax
import pytest
from helpers import blobs_datamodule, make_mlp_experiment

import solstice
from solstice.callbacks import LearningRateMonitor

# 1.0 for the first update, 0.99 for the second, ...: update number s (1-based) uses
# 1 - (s - 1) / 100, so step 5 logs 0.96 (`SCHEDULE(5)` = 0.95 is the rate of step 6).
SCHEDULE = optax.linear_schedule(1.0, 0.0, transition_steps=100)
SCALE = 1e-2  # the optimizers use SCALE * SCHEDULE, a rate a tiny MLP trains well with


def _scaled(count):
    return SCALE * SCHEDULE(count)


# How the optimizer is built, and the `schedule=` given to the monitor (if any).
PATHS = {
    "inject_hyperparams": (
        lambda m: solstice.OptaxOptimizer(
            optax.inject_hyperparams(optax.adam)(learning_rate=_scaled), m
        ),
        None,
    ),
    "sgd_optimizer": (
        lambda m: solstice.SGDOptimizer(eqx.filter(m, eqx.is_array), _scaled, momentum=0.9),
        None,
    ),
    "schedule_argument": (lambda m: solstice.OptaxOptimizer(optax.sgd(_scaled), m), _scaled),
}


def _fit(path: str, logging_interval: str = "step", **trainer_kw):
    """Fit 2 epochs of 8 steps; return the steps and values logged as `lr`."""
    make_optimizer, schedule = PATHS[path]
    base = make_mlp_experiment(in_size=8, num_classes=4)
    exp = solstice.ClassificationExperiment(base.model, make_optimizer(base.model), 4, key=base.key)
    monitor = LearningRateMonitor(logging_interval=logging_interval, schedule=schedule)
    trainer = solstice.Trainer(
        max_epochs=2,
        devices=1,
        enable_progress_bar=False,
        callbacks=[monitor],
        **{"log_every_n_steps": 5, **trainer_kw},
    )
    trainer.fit(exp, blobs_datamodule())
    return trainer.history.steps["lr"], trainer.history.metrics["lr"]


def _rates_of_updates(steps):
    """The rate the update of each (1-based) step applied, from the schedule itself."""
    return [SCALE * float(SCHEDULE(s - 1)) for s in steps]


# every 5 steps, plus the partial log intervals closed at the epoch ends (steps 8 and 16)
EXPECTED_STEPS = {"step": [5, 8, 10, 15, 16], "epoch": [8, 16]}


@pytest.mark.parametrize("logging_interval", ["step", "epoch"])
@pytest.mark.parametrize("path", list(PATHS))
def test_logged_rate_is_the_rate_of_that_steps_update(path, logging_interval):
    steps, lrs = _fit(path, logging_interval)
    assert steps == EXPECTED_STEPS[logging_interval]
    np.testing.assert_allclose(lrs, _rates_of_updates(steps), rtol=1e-6, err_msg=path)


def test_step_5_logs_0_96_from_the_optimizer_and_from_schedule():
    """Issue 12's finding: with 1.0 -> 0 over 100 steps, `schedule=` logged 0.95 at step 5
    (the rate of step 6) where the `inject_hyperparams` state gave 0.96."""
    at_step_5 = {}
    for path in ("inject_hyperparams", "schedule_argument"):
        steps, lrs = _fit(path)
        at_step_5[path] = lrs[steps.index(5)] / SCALE
    assert at_step_5 == {
        "inject_hyperparams": pytest.approx(0.96),
        "schedule_argument": pytest.approx(0.96),
    }


@pytest.mark.parametrize("path", list(PATHS))
def test_fused_steps_log_the_same_rates(path):
    # `steps_per_execution=4`: 4 updates per compiled call, and the next call donates the
    # optimizer state. An `inject_hyperparams` rate logged as the state's own buffer was
    # deleted before the logging thread read it ("Array has been deleted").
    steps, lrs = _fit(path, steps_per_execution=4, log_every_n_steps=4)
    assert steps == [4, 8, 12, 16]
    np.testing.assert_allclose(lrs, _rates_of_updates(steps), rtol=1e-6, err_msg=path)


def test_without_a_rate_explains_the_fix():
    base = make_mlp_experiment(in_size=8, num_classes=4)  # plain optax.adam: no rate to read
    with pytest.raises(ValueError, match="inject_hyperparams"):
        solstice.Trainer(
            max_epochs=1, devices=1, enable_progress_bar=False, callbacks=[LearningRateMonitor()]
        ).fit(base, blobs_datamodule())
    # ... unless the schedule is given
    trainer = solstice.Trainer(
        max_epochs=2,
        devices=1,
        enable_progress_bar=False,
        log_every_n_steps=8,
        callbacks=[LearningRateMonitor(schedule=lambda count: 1e-3)],
    )
    trainer.fit(base, blobs_datamodule())
    assert trainer.history.metrics["lr"] == pytest.approx([1e-3, 1e-3])


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match=r"logging_interval='steps'(.|\n)*'step'"):
        LearningRateMonitor(logging_interval="steps")
    with pytest.raises(TypeError, match="optax schedule"):
        LearningRateMonitor(schedule=1e-3)
