"""`solstice.tuner.lr_find`: the learning-rate range test, on a private copy of the run."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import blobs_datamodule

import solstice
from solstice.datamodules import Digits
from solstice.tuner import LRFinder, lr_find


def _mlp_experiment(transformation, in_size=64, num_classes=10):
    mlp = eqx.nn.MLP(in_size, num_classes, 32, 1, key=jax.random.key(0))
    model = eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), mlp])
    optimizer = solstice.OptaxOptimizer(transformation, model)
    return solstice.ClassificationExperiment(model, optimizer, num_classes=num_classes)


def _injected_adam():
    return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)


def _host(experiment):
    def copy(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x)

    return [copy(x) for x in jax.tree.leaves(eqx.filter(experiment, eqx.is_array))]


def test_lr_find_on_digits(tmp_path):
    experiment = _mlp_experiment(_injected_adam())
    before = _host(experiment)
    trainer = solstice.Trainer(max_epochs=5, devices=1, enable_progress_bar=False)
    finder = lr_find(trainer, experiment, Digits(batch_size=64), early_stop_threshold=None)
    # the curve: one point per step, the rates from min_lr to max_lr, smoothed as Lightning
    assert len(finder.lrs) == len(finder.losses) == len(finder.raw_losses) == 100
    assert not finder.early_stopped
    assert finder.lrs[0] == pytest.approx(1e-8) and finder.lrs[-1] == pytest.approx(1.0)
    assert finder.lrs[50] == pytest.approx(1e-8 * 1e8 ** (50 / 99), rel=1e-6)
    raw, smoothed = finder.raw_losses, finder.losses
    assert smoothed[0] == pytest.approx(raw[0])
    assert smoothed[1] == pytest.approx((0.98 * 0.02 * raw[0] + 0.02 * raw[1]) / (1 - 0.98**2))
    assert finder.results == {"lr": finder.lrs, "loss": finder.losses}
    # a sensible rate for Adam on an MLP: where the loss falls fastest, before it blows up
    suggestion = finder.suggestion()
    assert 1e-3 <= suggestion <= 0.3, suggestion
    assert min(smoothed[:10]) > 2.0 > min(smoothed)  # it did learn in the sweep
    # the experiment given is bit-identical, the Trainer given was not run
    assert all(np.array_equal(a, b) for a, b in zip(before, _host(experiment), strict=True))
    assert trainer.global_step == 0 and trainer.history.num_records == 0
    # the plot, with the suggestion marked
    import matplotlib

    matplotlib.use("Agg")
    path = tmp_path / "lr_find.png"
    finder.plot(suggest=True).savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@eqx.filter_jit
def _train_step(experiment, batch):
    return experiment.train_step(batch)


def test_each_step_uses_its_rate_exactly():
    # the sweep's losses are those of a loop that sets each step's rate by hand
    experiment = _mlp_experiment(_injected_adam(), in_size=8, num_classes=4)
    datamodule = blobs_datamodule(shuffle=False)
    finder = lr_find(
        {"devices": 1},
        experiment,
        datamodule,
        min_lr=1e-3,
        max_lr=1.0,
        num_training=12,
        mode="linear",
        early_stop_threshold=None,
    )
    datamodule.setup("fit")
    datamodule.set_epoch(0)
    by_hand, exp = [], experiment
    for rate, batch in zip(finder.lrs[:4], datamodule.train_dataloader()):
        optimizer = exp.optimizer.with_learning_rate(jnp.float32(rate))
        exp, metrics = _train_step(eqx.tree_at(lambda e: e.optimizer, exp, optimizer), batch)
        by_hand.append(float(metrics.compute()["loss"]))
    assert np.allclose(finder.raw_losses[:4], by_hand, rtol=1e-5), (finder.raw_losses, by_hand)
    assert finder.lrs == pytest.approx(list(np.linspace(1e-3, 1.0, 12)), rel=1e-6)


def test_the_sweep_stops_when_the_loss_diverges():
    experiment = _mlp_experiment(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), 8, 4)
    finder = lr_find(
        {"devices": 1}, experiment, blobs_datamodule(), min_lr=1e-3, max_lr=1e6, num_training=60
    )
    assert finder.early_stopped and 2 <= len(finder.losses) < 60
    *before, last = finder.losses
    assert not np.isfinite(last) or last > 4.0 * min(before)
    assert all(np.isfinite(before)) and all(
        before[i] <= 4.0 * min(before[:i]) for i in range(1, len(before))
    )


def test_a_loss_that_is_not_finite_stops_the_sweep():
    experiment = _mlp_experiment(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), 8, 4)
    # (the Trainer's `detect_anomaly` is not copied: the sweep diverges on purpose)
    trainer = solstice.Trainer(devices=1, detect_anomaly=True, enable_progress_bar=False)
    finder = lr_find(
        trainer,
        experiment,
        blobs_datamodule(),
        min_lr=1e-3,
        max_lr=1e30,
        num_training=60,
        early_stop_threshold=float("inf"),  # stop on NaN/inf only
    )
    *before, last = finder.losses
    assert finder.early_stopped and not np.isfinite(last) and np.all(np.isfinite(before))


def test_suggestion_needs_two_points():
    losses = [1.0, 0.9, 0.3, 2.0]  # slopes along log(lr): -0.1, -0.35, +0.55, +1.7 (/ ln 10)
    finder = LRFinder([1e-3, 1e-2, 1e-1, 1.0], losses, losses, "exponential", 1e-3, 1.0, 4, False)
    with pytest.warns(RuntimeWarning, match="a gradient needs 2"):
        assert finder.suggestion() is None
    assert finder.suggestion(skip_begin=0, skip_end=0) == pytest.approx(1e-2)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: solstice.OptaxOptimizer(optax.adam(1e-3), m), "inject_hyperparams"),
        (
            lambda m: solstice.OptaxOptimizer(
                optax.inject_hyperparams(optax.adam)(learning_rate=optax.linear_schedule(0, 1, 5)),
                m,
            ),
            "schedule",
        ),
        (lambda m: solstice.SGDOptimizer(m, 0.1), "SGDOptimizer"),
    ],
)
def test_optimizers_without_a_settable_rate_are_refused(make, match):
    model = eqx.nn.Linear(8, 4, key=jax.random.key(0))
    experiment = solstice.ClassificationExperiment(model, make(model), num_classes=4)
    with pytest.raises(TypeError, match=match) as error:
        lr_find({"devices": 1}, experiment, blobs_datamodule())
    assert "optimizer `optimizer`" in str(error.value)


def test_arguments_are_checked():
    experiment = _mlp_experiment(_injected_adam(), 8, 4)
    with pytest.raises(ValueError, match="max_steps"):
        lr_find({"max_steps": 5}, experiment, blobs_datamodule())
    with pytest.raises(ValueError, match="min_lr < max_lr"):
        lr_find({}, experiment, blobs_datamodule(), min_lr=1.0, max_lr=0.1)
    with pytest.raises(ValueError, match="mode"):
        lr_find({}, experiment, blobs_datamodule(), mode="cosine")
    with pytest.raises(ValueError, match="they compute"):
        lr_find({"devices": 1}, experiment, blobs_datamodule(), monitor="mse", num_training=3)
