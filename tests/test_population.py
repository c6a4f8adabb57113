"""`solstice.Population`: members trained as one vmapped program equal their single runs;
per-member metrics, stopping, best checkpoints, bootstrap data, resume and structure errors."""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import blobs_datamodule

import solstice
from solstice._config import hyperparameters
from solstice.callbacks import (
    Callback,
    NormMonitor,
    PopulationCheckpoint,
    PopulationEarlyStopping,
)

SIZE = 3


def _mlp(index: int, width: int = 16):
    return eqx.nn.MLP(8, 4, width, 1, key=jax.random.key(index))


def _member(index: int, transformation=None, width: int = 16):
    """Member `index`: its own initialisation and dropout key; Adam built afresh each time
    (equal transformations are one structure)."""
    mlp = _mlp(index, width)
    tx = optax.adam(1e-2) if transformation is None else transformation
    return solstice.ClassificationExperiment(
        mlp, solstice.OptaxOptimizer(tx, mlp), num_classes=4, key=jax.random.key(100 + index)
    )


def _kwargs(**kw):
    return {**dict(max_epochs=2, log_every_n_steps=4, enable_progress_bar=False, seed=0), **kw}


def _arrays(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def _assert_trees_close(a, b, **tol):
    for x, y in zip(_arrays(a), _arrays(b), strict=True):
        if jnp.issubdtype(x.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def _assert_trees_equal(a, b):
    for x, y in zip(_arrays(a), _arrays(b), strict=True):
        if jnp.issubdtype(x.dtype, jnp.floating):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ one shared fitted run
@pytest.fixture(scope="module")
def fitted():
    """A 3-member population fitted for 2 epochs on 4 devices, 2 steps per execution, and
    a single run of member 2 with the same settings."""
    population = solstice.Population([_member(i) for i in range(SIZE)])
    trainer = solstice.Trainer(**_kwargs(steps_per_execution=2))
    trained = trainer.fit(population, blobs_datamodule())
    single = solstice.Trainer(**_kwargs(steps_per_execution=2))
    singles = {2: (single.fit(_member(2), blobs_datamodule()), single.callback_metrics)}
    predictions = trainer.predict(trained, blobs_datamodule())
    return trained, dict(trainer.callback_metrics), singles, predictions


def test_member_of_a_population_equals_its_single_run(fitted):
    trained, metrics, singles, _ = fitted
    assert isinstance(trained, solstice.Population) and trained.size == SIZE
    for i, (single, single_metrics) in singles.items():
        member = trained.member(i)
        assert type(member) is solstice.ClassificationExperiment
        _assert_trees_close(member, single, rtol=1e-5, atol=1e-6)
        for key in ("loss", "accuracy", "f1_macro"):
            np.testing.assert_allclose(
                metrics[f"val/member_{i}/{key}"], single_metrics[f"val/{key}"], rtol=1e-5
            )
        np.testing.assert_allclose(
            metrics[f"train/member_{i}/loss_epoch"], single_metrics["train/loss_epoch"], rtol=1e-5
        )
    # the members differ, and the summaries are over all of them
    losses = [metrics[f"val/member_{i}/loss"] for i in range(SIZE)]
    assert len(set(losses)) == SIZE
    np.testing.assert_allclose(metrics["val/population/mean/loss"], np.mean(losses), rtol=1e-6)
    np.testing.assert_allclose(metrics["val/population/min/loss"], min(losses), rtol=1e-6)
    np.testing.assert_allclose(metrics["val/population/max/loss"], max(losses), rtol=1e-6)
    assert "val/loss" not in metrics and f"val/member_{SIZE}/loss" not in metrics


def test_predictions_keep_the_batch_axis_first(fitted):
    trained, _, singles, predictions = fitted
    probs = np.asarray(predictions)
    assert probs.shape == (70, SIZE, 4)
    x = blobs_datamodule().splits["predict"]["image"]
    single = eqx.filter_jit(lambda e, x: e.predict_step({"image": x}))(singles[2][0], x)
    np.testing.assert_allclose(probs[:, 2], np.asarray(single), rtol=1e-5, atol=1e-6)


def test_population_metrics_equal_each_members_own():
    logits = jax.random.normal(jax.random.key(3), (SIZE, 20, 4))
    labels = jnp.arange(20, dtype=jnp.int32) % 4

    def one(member_logits, labels=labels):
        return solstice.ClassificationMetrics(
            logits=member_logits,
            labels=labels,
            loss=optax.softmax_cross_entropy_with_integer_labels(member_logits, labels),
            num_classes=4,
        )

    @jax.jit
    def computed(logits):
        halves = [
            solstice.PopulationMetrics(
                eqx.filter_vmap(lambda x, y: one(x, y), in_axes=(0, None))(part, y),
                keys=("accuracy",),
            )
            for part, y in ((logits[:, :10], labels[:10]), (logits[:, 10:], labels[10:]))
        ]
        whole = solstice.PopulationMetrics(eqx.filter_vmap(one)(logits), keys=("accuracy",))
        return halves[0].merge(halves[1]).compute(), whole.compute()

    merged, whole = computed(logits)
    assert set(merged) == set(whole)
    for i in range(SIZE):
        own = one(logits[i]).compute()
        np.testing.assert_allclose(merged[f"member_{i}/accuracy"], own["accuracy"], rtol=1e-6)
        assert f"member_{i}/loss" not in merged  # only the chosen per-member keys
    own_losses = [one(logits[i]).compute()["loss"] for i in range(SIZE)]
    np.testing.assert_allclose(merged["population/mean/loss"], np.mean(own_losses), rtol=1e-5)
    np.testing.assert_allclose(merged["population/max/loss"], np.max(own_losses), rtol=1e-5)


# ------------------------------------------------------------------ build with learning rates
RATES = [0.02, 0.1, 0.5]
SGD = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)


def _sweep_member(index, lr):
    mlp = _mlp(index)
    optimizer = solstice.OptaxOptimizer(SGD, mlp).with_learning_rate(lr)
    return solstice.ClassificationExperiment(
        mlp, optimizer, num_classes=4, key=jax.random.key(index)
    )


def _batches(count=3, rows=16):
    data = blobs_datamodule().splits["train"]
    return [
        {k: jnp.asarray(v[i * rows : (i + 1) * rows]) for k, v in data.items()}
        for i in range(count)
    ]


def test_build_with_learning_rates_equals_each_rate_alone():
    population = solstice.Population.build(_sweep_member, lr=RATES)
    assert population.size == 3 and population.hparams == {"lr": RATES}
    # the logged hyperparameters (LoggingCallback) show them
    assert hyperparameters(population)["population.lr"] == "[0.02, 0.1, 0.5]"
    assert population.member_hparams(1) == {"lr": 0.1}
    step = eqx.filter_jit(lambda e, b: e.train_step(b)[0])
    for batch in _batches():
        population = step(population, batch)
    for i, lr in enumerate(RATES):
        alone = _sweep_member(i, lr)
        for batch in _batches():
            alone = step(alone, batch)
        member = population.member(i)
        np.testing.assert_allclose(member.optimizer.current_learning_rate(), lr, rtol=1e-6)
        _assert_trees_close(member, alone, rtol=1e-5, atol=1e-6)


def test_stopped_member_keeps_its_arrays_exactly_and_bootstrap_differs_per_member():
    # three copies of one member: with bootstrap data, each trains on its own resample
    copies = [_member(0) for _ in range(SIZE)]
    population = solstice.Population(copies, data="bootstrap", seed=1)
    population = population.with_active(jnp.array([True, False, True]))
    step = eqx.filter_jit(lambda e, b: e.train_step(b))
    new, metrics = step(population, _batches(1, rows=32)[0])
    _assert_trees_equal(new.member(1), population.member(1))  # stopped: bit-identical
    for i in (0, 2):
        moved = [
            not np.array_equal(a, b) for a, b in zip(_arrays(new.member(i)), _arrays(copies[i]))
        ]
        assert any(moved)
    a, c = _arrays(new.member(0)), _arrays(new.member(2))
    assert any(not np.allclose(x, y) for x, y in zip(a, c))  # different resamples
    values = metrics.compute()
    assert values["member_0/loss"] != values["member_2/loss"]
    # the draws come from keys carried in the population, advanced every step
    assert not np.array_equal(jax.random.key_data(new.keys), jax.random.key_data(population.keys))


def test_bootstrap_population_with_early_stopping_resumes_bit_for_bit():
    # member 0 (learning rate 0) stops at the check of epoch 1, after the interruption at
    # step 10: only a restored stopping state (its best score) stops it there again (else
    # the population's `active` flags differ at the end)
    def make():
        return solstice.Population.build(_sweep_member, lr=[0.0, 0.05], data="bootstrap")

    stoppers = []

    def kwargs():
        stoppers.append(PopulationEarlyStopping("val/loss", patience=1))
        return _kwargs(max_epochs=2, devices=1, log_every_n_steps=3, callbacks=[stoppers[-1]])

    report = solstice.check_resume(make, blobs_datamodule, kwargs, interrupt_at=10)
    assert report, str(report)
    assert stoppers[0].stopped_epochs[0] == 1 and stoppers[2].stopped_epochs[0] == 1


# ------------------------------------------------------------------ per-member callbacks
class _Record(Callback):
    """Every member's arrays (on the host) at the end of every epoch."""

    def __init__(self):
        self.epochs = []

    def on_train_epoch_end(self, trainer, experiment):
        self.epochs.append([jax.device_get(_arrays(experiment.member(i))) for i in range(SIZE)])


def _raw(x):
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def _equal(a, b):
    """Whether two lists of arrays (PRNG keys included) are equal bit for bit."""
    return all(np.array_equal(_raw(x), _raw(y)) for x, y in zip(a, b, strict=True))


def test_early_stopping_and_best_checkpoints_per_member(tmp_path):
    # member 0 never moves its parameters (learning rate 0: constant val loss), so it stops
    # after `patience` checks; its optimizer state and key would still change if trained
    population = solstice.Population.build(_sweep_member, lr=[0.0, 0.05, 0.05])
    stopping = PopulationEarlyStopping("val/loss", patience=1)
    checkpoint = PopulationCheckpoint(tmp_path, monitor="val/accuracy", mode="max")
    record = _Record()
    trainer = solstice.Trainer(**_kwargs(max_epochs=3, callbacks=[stopping, checkpoint, record]))
    trained = trainer.fit(population, blobs_datamodule())
    assert stopping.stopped_epochs[0] == 1 and stopping.wait_counts[0] == 1
    final = [jax.device_get(_arrays(trained.member(i))) for i in range(SIZE)]
    assert _equal(final[0], record.epochs[1][0])  # kept exactly after its stop
    assert not _equal(record.epochs[1][0], record.epochs[0][0])  # state moved before it
    assert not bool(trained.active[0])
    assert stopping.stopped_epochs[1:].count(None) >= 1  # some trained on after member 0
    for i in (1, 2):
        if stopping.stopped_epochs[i] is None:
            assert bool(trained.active[i]) and not _equal(final[i], record.epochs[1][i])
    # each member's best checkpoint holds that member at its best epoch
    trainer.flush_logs(loggers=False)
    for i in range(SIZE):
        accuracies = trainer.history.metrics[f"val/member_{i}/accuracy"]
        best = checkpoint.best_epochs[i]
        assert checkpoint.best_scores[i] == pytest.approx(max(accuracies))
        assert accuracies.index(max(accuracies)) == best
        loaded = solstice.load(checkpoint.best_paths[i], like=_sweep_member(i, 0.1))
        assert _equal(jax.device_get(_arrays(loaded)), record.epochs[best][i])
        assert len(list((tmp_path / f"member_{i}").iterdir())) == 1  # older bests removed


# ------------------------------------------------------------------ errors
def test_members_of_different_structures_are_refused():
    with pytest.raises(
        ValueError, match=r"member 1 differs.*step_size.*-0\.001 in member 0, -0\.01 here"
    ):
        solstice.Population([_member(0, optax.adam(1e-3)), _member(1, optax.adam(1e-2))])
    with pytest.raises(ValueError, match=r"member 2 differs.*shape \(16, 8\).*\(32, 8\)"):
        solstice.Population([_member(0), _member(1), _member(2, width=32)])
    with pytest.raises(ValueError, match="one value per member"):
        solstice.Population.build(_sweep_member, n=2, lr=RATES)
    with pytest.raises(TypeError, match="one value per member"):
        solstice.Population.build(_sweep_member, lr=0.1)
    with pytest.raises(ValueError, match="'shared'.*'bootstrap'"):
        solstice.Population([_member(0)], data="bagging")
    with pytest.raises(TypeError, match="list of experiments"):
        solstice.Population(_member(0))
    with pytest.raises(IndexError, match="out of range"):
        solstice.Population([_member(0)]).member(1)


def test_options_that_wrap_the_optimizer_are_refused_before_training():
    population = solstice.Population([_member(i) for i in range(2)])
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        solstice.Trainer(**_kwargs(accumulate_grad_batches=2, devices=1)).fit(
            population, blobs_datamodule()
        )
    with pytest.raises(ValueError, match="does not support them"):
        solstice.Trainer(**_kwargs(callbacks=[NormMonitor()], devices=1)).fit(
            population, blobs_datamodule()
        )
    with pytest.raises(ValueError, match="lr_find"):
        sweep = solstice.Population.build(_sweep_member, lr=RATES)
        solstice.tuner.lr_find(solstice.Trainer(**_kwargs(devices=1)), sweep, blobs_datamodule())


def test_a_model_checkpoint_of_a_population_loads_back(fitted, tmp_path):
    trained = fitted[0]
    path = solstice.save(tmp_path / "pop", trained)
    like = solstice.Population([_member(i) for i in range(SIZE)])
    _assert_trees_equal(solstice.load(path, like=like), trained)
    member = solstice.save(tmp_path / "member", trained.member(1))
    _assert_trees_equal(solstice.load(member, like=_member(1)), trained.member(1))


def test_best_checkpoints_refuse_what_they_cannot_write(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"not to remote storage.*ModelCheckpoint\('s3://b/run'"):
        PopulationCheckpoint("s3://b/run")
    with pytest.raises(ValueError, match="one slash after `s3:`"):
        PopulationCheckpoint(Path("s3://b/run"))  # what pathlib makes of a URL
    checkpoint = PopulationCheckpoint(tmp_path)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="this run has 2 processes.*ModelCheckpoint"):
        checkpoint.on_fit_start(None, solstice.Population([_member(0)]))
