"""The Learning-Not-to-Learn and vmap-ensemble examples: smoke runs through `main`, and the
pieces they are built from (gradient reversal, the Flax network's training, the vmapped step
and its metrics)."""

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import solstice

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lnl():
    return _load("adversarial_colour_mnist")


@pytest.fixture(scope="module")
def ensemble():
    return _load("vmap_ensemble")


# --------------------------------------------------------------------------- LNL
def test_lnl_smoke_main_reports_both_modes(lnl):
    metrics = lnl.main(["--smoke"])
    for mode in ("baseline", "lnl"):
        prefix = f"{mode}/sigma2=0.02/"
        for key in (
            "test/accuracy",
            "test/loss",
            "test/colour_accuracy",
            "test/colour_loss",
            "test/follows_colour",
            "test/neg_entropy",
            "val/accuracy",
            "val/colour_accuracy",
            "test/accuracy_std",
        ):
            assert prefix + key in metrics, sorted(metrics)
            assert math.isfinite(metrics[prefix + key]), (prefix + key, metrics[prefix + key])
        for key in ("test/accuracy", "test/colour_accuracy", "test/follows_colour"):
            assert 0.0 <= metrics[prefix + key] <= 1.0
        # Entropy of 8 bins lies in [0, log 8]; the metric is its negative.
        assert -math.log(8) - 1e-4 <= metrics[prefix + "test/neg_entropy"] <= 0.0
        # The Flax colour predictor is part of training in both modes: its parameters moved.
        assert metrics[prefix + "colour_param_change"] > 1e-4


def test_gradient_reversal(lnl):
    x = jnp.arange(3.0)
    assert jnp.array_equal(lnl.reverse_gradient(x, 2.5), x)
    grad = jax.grad(lambda x: jnp.sum(lnl.reverse_gradient(x, 2.5) ** 2))(x)
    np.testing.assert_allclose(grad, -2.5 * 2 * x)


def test_lnl_step_trains_flax_params_and_reverses_features_gradient(lnl):
    batch = {
        "image": jr.uniform(jr.key(1), (8, 3, 8, 8)),
        "label": jnp.arange(8, dtype=jnp.int32),
        "colour": jnp.arange(8, dtype=jnp.int32),
    }

    # The smoke run's sizes and seed, so that initialisation reuses its compiled kernels.
    lnl_exp = lnl.make_experiment(0, adversarial=True, lam=0.0)
    base_exp = lnl.make_experiment(0, adversarial=False)

    @eqx.filter_jit
    def steps(lnl_exp, base_exp):
        return lnl_exp.train_step(batch), base_exp.train_step(batch)[0]

    (new_lnl, metrics), new_base = steps(lnl_exp, base_exp)
    assert set(metrics.compute()) >= {"accuracy", "colour_accuracy", "follows_colour"}
    # `h` is a Flax NNX module held as (GraphDef, State); its State is updated by the step.
    assert isinstance(lnl_exp.colour_predictor, lnl.ColourPredictor)
    before, after = jax.tree.leaves(lnl_exp.colour_params), jax.tree.leaves(new_lnl.colour_params)
    assert len(before) == 4
    assert all(not jnp.allclose(a, b) for a, b in zip(before, after))
    # Same start, same `h` update (h sees the features either way) ...
    for a, b in zip(
        jax.tree.leaves(new_lnl.colour_params), jax.tree.leaves(new_base.colour_params)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # ... and the same classifier update (it never sees the adversary), but `f` differs.
    for a, b in zip(jax.tree.leaves(new_lnl.classifier), jax.tree.leaves(new_base.classifier)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not jnp.allclose(new_lnl.features.conv.weight, new_base.features.conv.weight)


# --------------------------------------------------------------------------- ensemble
def test_ensemble_smoke_main_reports_every_member(ensemble):
    metrics = ensemble.main(["--smoke", "--members", "3"])
    for stage in ("val", "test"):
        for key in ("accuracy", "loss", "f1_macro", "population/mean/accuracy"):
            assert f"{stage}/{key}" in metrics, sorted(metrics)
        for i in range(3):
            for key in ("accuracy", "loss"):
                value = metrics[f"{stage}/member_{i}/{key}"]
                assert math.isfinite(value), (stage, i, key, value)
            assert f"{stage}/member_{i}/f1_macro" not in metrics  # `member_metrics` only
        assert f"{stage}/member_3/accuracy" not in metrics
    accuracies = [metrics[f"test/member_{i}/accuracy"] for i in range(3)]
    assert len(set(accuracies)) > 1, accuracies  # different initialisations, different models
    np.testing.assert_allclose(
        metrics["test/population/mean/accuracy"], np.mean(accuracies), rtol=1e-5
    )


def _digits_batch(n: int = 32):
    images = jr.uniform(jr.key(2), (n, 1, 8, 8))
    return {"image": images, "label": jnp.arange(n, dtype=jnp.int32) % 10}


def test_ensemble_step_equals_training_each_member_alone(ensemble):
    args = argparse.Namespace(lr=3e-3, width=64, seed=0, bootstrap=False)
    population = ensemble.make_ensemble(3, args)
    members = [ensemble.make_experiment(i) for i in range(3)]
    assert not jnp.allclose(
        members[0].model.layers[1].layers[0].weight, members[1].model.layers[1].layers[0].weight
    )
    batch = _digits_batch()
    step = eqx.filter_jit(lambda e: e.train_step(batch)[0])
    new = step(population)
    for i, member in enumerate(members):
        expected = jax.tree.leaves(eqx.filter(step(member), eqx.is_array))
        got = jax.tree.leaves(eqx.filter(new.member(i), eqx.is_array))
        for a, b in zip(got, expected, strict=True):
            if jnp.issubdtype(a.dtype, jnp.floating):
                # AdamW's first step is lr * sign(grad) where a gradient is ~0, so float
                # rounding can move a weight by up to a few 1e-6 (lr = 3e-3); another
                # member's update would differ by ~lr.
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5)


def test_ensemble_metrics_merge_equals_whole_batch(ensemble):
    logits = jr.normal(jr.key(3), (20, 3, 10))
    probs = jax.nn.softmax(logits)
    labels = jnp.arange(20, dtype=jnp.int32) % 10
    mask = jnp.arange(20) < 17

    def own(member_logits, labels, mask):
        return solstice.ClassificationMetrics(
            logits=member_logits,
            labels=labels,
            loss=optax.softmax_cross_entropy_with_integer_labels(member_logits, labels),
            mask=mask,
            num_classes=10,
        )

    def metrics(rows):
        members = eqx.filter_vmap(own, in_axes=(1, None, None))(
            logits[rows], labels[rows], mask[rows]
        )
        population = solstice.PopulationMetrics(members, keys=ensemble.MEMBER_KEYS)
        return ensemble.EnsembleMetrics(population, probs[rows], labels[rows], mask[rows])

    @jax.jit
    def computed():
        first, second = metrics(slice(0, 10)), metrics(slice(10, 20))
        singles = [own(logits[:, i], labels, mask).compute() for i in range(3)]
        return metrics(slice(None)).compute(), first.merge(second).compute(), singles

    a, b, singles = computed()
    assert set(a) == set(b)
    assert {f"member_{i}/accuracy" for i in range(3)} <= set(a)
    for key in a:
        assert jnp.ndim(a[key]) == 0, key
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    # Member i's numbers are exactly those of ClassificationMetrics on its own logits.
    for i in range(3):
        np.testing.assert_allclose(a[f"member_{i}/accuracy"], singles[i]["accuracy"], rtol=1e-6)
        np.testing.assert_allclose(a[f"member_{i}/loss"], singles[i]["loss"], rtol=1e-5)
    # The ensemble averages probabilities.
    expected = np.mean((np.argmax(np.mean(probs, axis=1), -1) == np.asarray(labels))[:17])
    np.testing.assert_allclose(a["accuracy"], expected, rtol=1e-6)
