"""The optimizer tap: an in-step reduction sees the gradients, parameters and updates that
`train_step` hands the experiment's optimizer, equal to those computed by hand."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import NoOptimizer, regression, regression_split

import solstice
from solstice.datamodules import ArrayDataModule


def _norm(tree):
    return float(optax.tree.norm(tree))


class LastCall(solstice.InStep):
    uses_optimizer_calls = True

    def init(self, experiment):
        return {k: jnp.zeros((), jnp.float32) for k in ("grad", "param", "update", "count")}

    def update(self, carry, data):
        (call,) = data.optimizer_calls
        return {
            "grad": optax.tree.norm(call.grads),
            "param": optax.tree.norm(call.params),
            "update": optax.tree.norm(call.updates),
            "count": carry["count"] + 1,
        }


class Watch(solstice.callbacks.Callback):
    def __init__(self):
        self.reduction = LastCall()

    def in_step(self):
        return self.reduction


def _fit(experiment, steps, callback):
    x, y = regression_split(64, 0)
    dm = ArrayDataModule(train=(x, y), batch_size=64, seed=0)
    trainer = solstice.Trainer(
        max_steps=steps, callbacks=[callback], enable_progress_bar=False, num_sanity_val_steps=0
    )
    return trainer, trainer.fit(experiment, dm), (x, y)


def test_tap_records_the_gradients_params_and_updates_of_the_step():
    watch = Watch()
    start = regression(lr=0.05)
    trainer, trained, (x, y) = _fit(start, 1, watch)

    def loss(model):
        return jnp.mean((jax.vmap(model)(jnp.asarray(x))[:, 0] - y) ** 2)

    grads = eqx.filter_grad(loss)(start.model)
    seen = jax.device_get(trainer.in_step_value(watch))
    assert seen["count"] == 1
    np.testing.assert_allclose(seen["grad"], _norm(grads), rtol=1e-5)
    np.testing.assert_allclose(
        seen["param"], _norm(eqx.filter(start.model, eqx.is_array)), rtol=1e-6
    )
    np.testing.assert_allclose(seen["update"], 0.05 * _norm(grads), rtol=1e-5)
    # The tap changes nothing: the trained weights are those of plain SGD.
    expected = jax.tree.map(lambda p, g: p - 0.05 * g, eqx.filter(start.model, eqx.is_array), grads)
    for a, b in zip(jax.tree.leaves(trained.model), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert type(trained.optimizer) is solstice.OptaxOptimizer


def test_an_experiment_without_an_optimizer_is_reported_before_training():
    with pytest.raises(ValueError, match="holds no `solstice.Optimizer`"):
        _fit(NoOptimizer(jnp.zeros(3)), 1, Watch())


class SkipsOptimizer(NoOptimizer):
    optimizer: solstice.Optimizer

    def train_step(self, batch):
        new, metrics = super().train_step(batch)
        return SkipsOptimizer(new.w, self.optimizer), metrics


def test_an_optimizer_the_step_never_calls_is_named():
    exp = SkipsOptimizer(jnp.zeros(3), solstice.OptaxOptimizer(optax.sgd(0.1), jnp.zeros(3)))
    with pytest.raises(ValueError, match="was not called in `train_step`"):
        _fit(exp, 1, Watch())


def test_a_tapped_optimizer_keeps_its_learning_rate_door():
    model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    inner = solstice.OptaxOptimizer(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), model)
    from solstice._optimizer_tap import Tap, tap, untap

    tapped = tap({"opt": inner})["opt"]
    changed = tapped.with_learning_rate(jnp.float32(0.5))
    assert isinstance(changed, Tap)
    np.testing.assert_allclose(changed.current_learning_rate(), 0.5)
    restored, taps = untap({"opt": changed}, 1)
    assert type(restored["opt"]) is solstice.OptaxOptimizer and len(taps) == 1
