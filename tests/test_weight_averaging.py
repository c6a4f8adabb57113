"""Weight averaging: the EMA and SWA averages equal those computed by hand over the weights
of every step; validation, test and the trained result use them; a resume restores them
exactly."""

import json
import signal
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import mse_by_hand, regression, regression_split

import solstice
from solstice.callbacks import (
    Callback,
    EMAWeightAveraging,
    ModelCheckpoint,
    StochasticWeightAveraging,
    WeightAveraging,
)
from solstice.datamodules import ArrayDataModule

STEPS_PER_EPOCH = 4  # 64 samples, batches of 16


class RecordWeights(Callback):
    """The model's weights after every training step, and validation's `val/mse`."""

    def __init__(self):
        self.weights: list[list[np.ndarray]] = []
        self.val_mse: list[float] = []

    def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
        self.weights.append([np.asarray(x) for x in _params(experiment)])

    def on_validation_end(self, trainer, experiment):
        if trainer.progress.stage == "validation" and trainer.global_step > 0:
            self.val_mse.append(trainer.callback_metrics["val/mse"])


def _params(experiment):
    return jax.tree.leaves(eqx.filter(experiment.model, eqx.is_array))


def _data():
    x, y = regression_split(64, 0)
    xv, yv = regression_split(40, 1)
    xt, yt = regression_split(40, 2)
    dm = ArrayDataModule(
        train=(x, y), val=(xv, yv), test=(xt, yt), predict=(xt, yt), batch_size=16, seed=0
    )
    return dm, (xv, yv), (xt, yt)


def _trainer(*callbacks, max_epochs=3, **kw):
    return solstice.Trainer(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        log_every_n_steps=2,
        **kw,
    )


def _ema_by_hand(weights, decay, updates):
    """Lightning's EMA over the weights after the steps whose zero-based index is in
    `updates`: the weights at the first update, then `d * avg + (1 - d) * w`."""
    average = None
    for i in updates:
        w = weights[i]
        if average is None:
            average = [x.copy() for x in w]
        else:
            d = np.float32(decay)
            average = [a * d + x * np.float32(1 - decay) for a, x in zip(average, w)]
    return average


def _with_params(experiment, params):
    where = lambda e: (e.model.weight, e.model.bias)  # noqa: E731 (`_params`' order)
    return eqx.tree_at(where, experiment, tuple(jnp.asarray(p) for p in params))


def _close(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- EMA
@pytest.mark.parametrize(
    "every,start",
    [(1, None), (2, 3)],
    ids=["every step", "every 2nd from step 3"],
)
def test_ema_equals_the_ema_by_hand_and_fit_returns_it(every, start):
    record = RecordWeights()
    ema = EMAWeightAveraging(0.8, update_every_n_steps=every, update_starting_at_step=start)
    dm, (xv, yv), _ = _data()
    trainer = _trainer(record, ema)
    trained = trainer.fit(regression(), dm)

    steps = len(record.weights)
    assert steps == 3 * STEPS_PER_EPOCH
    updates = [i for i in range(steps) if i % every == 0 and i >= (start or 0)]
    by_hand = _ema_by_hand(record.weights, 0.8, updates)
    assert int(trainer.in_step_value(ema)["count"]) == len(updates)
    _close(_params(trained), by_hand)  # `fit` returns the average (`use_average_at_end`)
    _close(_params(ema.averaged_experiment(trainer)), by_hand)
    assert not np.allclose(by_hand[0], record.weights[-1][0])  # it is not the last weights
    # the optimizer's state is not averaged: it is the training one
    assert trained.optimizer is not None
    # validation after each epoch evaluated the average of that moment
    for epoch, mse in enumerate(record.val_mse):
        end = (epoch + 1) * STEPS_PER_EPOCH
        upto = [i for i in updates if i < end]
        # (before its first update, the training weights)
        weights = _ema_by_hand(record.weights, 0.8, upto) if upto else record.weights[end - 1]
        averaged = _with_params(trained, weights)
        assert mse == pytest.approx(mse_by_hand(averaged, xv, yv), rel=1e-5)


def test_fused_steps_update_the_average_at_every_step():
    averages = []
    for k in (1, 2):
        ema = EMAWeightAveraging(0.8, update_every_n_steps=3)
        trainer = _trainer(ema, steps_per_execution=k)
        trainer.fit(regression(), _data()[0])
        averages.append(trainer.in_step_value(ema))
    assert int(averages[1]["count"]) == 4  # steps 0, 3, 6, 9 of 12
    _close(jax.tree.leaves(averages[0]), jax.tree.leaves(averages[1]))


def test_training_is_unchanged_by_averaging():
    """The average is a by-product: the training weights are those of a run without it."""
    with_ema, without = RecordWeights(), RecordWeights()
    _trainer(with_ema, EMAWeightAveraging(0.5)).fit(regression(), _data()[0])
    _trainer(without).fit(regression(), _data()[0])
    for a, b in zip(with_ema.weights, without.weights, strict=True):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_swapping_off_evaluates_and_returns_the_training_weights():
    record = RecordWeights()
    ema = EMAWeightAveraging(0.8, swap_for_evaluation=False, use_average_at_end=False)
    dm, (xv, yv), (xt, yt) = _data()
    trainer = _trainer(record, ema)
    trained = trainer.fit(regression(), dm)

    _close(_params(trained), record.weights[-1])  # the training weights
    for epoch, mse in enumerate(record.val_mse):
        at_end = _with_params(trained, record.weights[(epoch + 1) * STEPS_PER_EPOCH - 1])
        assert mse == pytest.approx(mse_by_hand(at_end, xv, yv), rel=1e-5)
    assert trainer.test()["test/mse"] == pytest.approx(mse_by_hand(trained, xt, yt), rel=1e-5)
    # the average is still there for the asking
    by_hand = _ema_by_hand(record.weights, 0.8, range(len(record.weights)))
    _close(_params(ema.averaged_experiment(trainer)), by_hand)


def test_test_after_fit_uses_the_average_of_the_returned_experiment_only():
    record = RecordWeights()
    ema = EMAWeightAveraging(0.8, use_average_at_end=False)
    dm, _, (xt, yt) = _data()
    trainer = _trainer(record, ema)
    trained = trainer.fit(regression(), dm)
    by_hand = _with_params(trained, _ema_by_hand(record.weights, 0.8, range(12)))
    expected = mse_by_hand(by_hand, xt, yt)
    assert trainer.test()["test/mse"] == pytest.approx(expected, rel=1e-5)
    assert trainer.test(trained)["test/mse"] == pytest.approx(expected, rel=1e-5)
    predicted = trainer.predict()["prediction"]
    by_hand_predictions = np.asarray(jax.vmap(by_hand.model)(jnp.asarray(xt))[:, 0])
    np.testing.assert_allclose(predicted, by_hand_predictions, rtol=1e-5, atol=1e-6)
    assert trainer.trace_log.count("eval") == 1  # the averaged arrays compile nothing new
    # another experiment has no average of this fit: it is evaluated as it is
    other = regression(seed=3)
    assert trainer.test(other)["test/mse"] == pytest.approx(mse_by_hand(other, xt, yt), rel=1e-5)
    with pytest.raises(ValueError, match="has no average"):
        ema.averaged_experiment(trainer)


def test_checkpoints_hold_the_average_and_test_best_evaluates_it(tmp_path):
    record = RecordWeights()
    ema = EMAWeightAveraging(0.8, use_average_at_end=False)
    ckpt = ModelCheckpoint(tmp_path, monitor="val/mse", mode="min", save_top_k=1)
    dm, _, (xt, yt) = _data()
    trainer = _trainer(record, ema, ckpt, max_epochs=4)
    trained = trainer.fit(regression(), dm)

    best = Path(ckpt.best_model_path)
    step = json.loads((best / "solstice.json").read_text())["progress"]["global_step"]
    # the checkpoint's experiment holds the training weights of its step ...
    loaded = solstice.load(best, like=trained)
    _close(_params(loaded), record.weights[step - 1])
    # ... and `test(ckpt_path="best")` evaluates its average
    averaged = _with_params(trained, _ema_by_hand(record.weights, 0.8, range(step)))
    result = trainer.test(ckpt_path="best")["test/mse"]
    assert result == pytest.approx(mse_by_hand(averaged, xt, yt), rel=1e-5)
    _close(_params(ema.averaged_experiment(trainer)), _params(averaged))


# ---------------------------------------------------------------------- resume
class _TermAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
        if trainer.global_step == self.step:
            signal.raise_signal(signal.SIGTERM)


@pytest.mark.parametrize(
    "make",
    [lambda: EMAWeightAveraging(0.7), lambda: StochasticWeightAveraging(1)],
    ids=["ema", "swa"],
)
def test_a_resume_after_sigterm_mid_epoch_continues_the_average_exactly(tmp_path, make):
    def run(*extra, ckpt_path=None):
        averaging = make()
        ckpt = ModelCheckpoint(tmp_path / "ckpts", every_n_epochs=None)
        trainer = _trainer(averaging, ckpt, *extra)
        trained = trainer.fit(regression(), _data()[0], ckpt_path=ckpt_path)
        return trained, trainer.in_step_value(averaging)

    averaging = make()
    trainer = _trainer(averaging)
    straight, straight_state = (
        trainer.fit(regression(), _data()[0]),
        trainer.in_step_value(averaging),
    )

    with pytest.raises(SystemExit):
        run(_TermAt(6))  # mid-epoch 1 (4 steps per epoch)
    (saved,) = [p for p in (tmp_path / "ckpts").iterdir() if p.is_dir()]
    assert json.loads((saved / "solstice.json").read_text())["progress"]["batch_idx"] > 0
    resumed, resumed_state = run(ckpt_path="last")
    assert int(resumed_state["count"]) == int(straight_state["count"]) > 0
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(straight_state), jax.tree.leaves(resumed_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_device_reads_per_step(monkeypatch):
    from helpers import blobs_datamodule, make_mlp_experiment
    from test_no_sync import _PerStepReads, _ReadCounter

    counter = _ReadCounter()
    counter.install(monkeypatch)
    probe = _PerStepReads(counter)
    callbacks = [probe, EMAWeightAveraging(0.9), StochasticWeightAveraging(1)]
    trainer = _trainer(*callbacks, max_epochs=2, devices=1)
    trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
    assert len(probe.reads_per_step) == 16
    assert sum(probe.reads_per_step) == 0, probe.reads_per_step


# ---------------------------------------------------------------------- SWA
@pytest.mark.parametrize("start,epoch", [(1, 1), (0.5, 2)])
def test_swa_is_the_mean_from_the_start_epoch(start, epoch):
    record = RecordWeights()
    swa = StochasticWeightAveraging(start)
    dm, (xv, yv), _ = _data()
    trainer = _trainer(record, swa, max_epochs=4)
    trained = trainer.fit(regression(), dm)

    first = epoch * STEPS_PER_EPOCH
    assert swa.swa_start_step == first
    hand = [np.mean(np.stack(ws), axis=0) for ws in zip(*record.weights[first:])]
    _close(_params(trained), hand)
    assert int(trainer.in_step_value(swa)["count"]) == 4 * STEPS_PER_EPOCH - first
    # before the start epoch validation used the training weights; from it, the mean
    for e, mse in enumerate(record.val_mse):
        end = (e + 1) * STEPS_PER_EPOCH
        if end <= first:
            weights = record.weights[end - 1]
        else:
            weights = [np.mean(np.stack(ws), axis=0) for ws in zip(*record.weights[first:end])]
        assert mse == pytest.approx(mse_by_hand(_with_params(trained, weights), xv, yv), rel=1e-5)


# ---------------------------------------------------------------------- what is averaged
def test_where_selects_the_part_to_average():
    record = RecordWeights()
    ema = EMAWeightAveraging(0.5, where=lambda e: e.model.weight)
    trained = _trainer(record, ema).fit(regression(), _data()[0])
    weight, bias = _params(trained)
    hand = _ema_by_hand(record.weights, 0.5, range(12))
    _close([weight], [hand[0]])
    _close([bias], [record.weights[-1][1]])  # not averaged: the training bias


def test_a_bfloat16_model_gets_a_float32_average():
    ema = WeightAveraging()
    state = ema.in_step().init(regression())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["average"]))
    model = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else x, regression().model
    )
    exp = eqx.tree_at(lambda e: e.model, regression(), model)
    state = ema.in_step().init(exp)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["average"]))
    swapped = ema.swap_in(exp, {**state, "count": jnp.int32(1)})
    assert all(x.dtype == jnp.bfloat16 for x in _params(swapped))


def test_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="decay"):
        EMAWeightAveraging(1.5)
    with pytest.raises(ValueError, match="update_every_n_steps"):
        EMAWeightAveraging(update_every_n_steps=0)
    with pytest.raises(ValueError, match="swa_epoch_start"):
        StochasticWeightAveraging(1.5)
    with pytest.raises(TypeError, match="where"):
        EMAWeightAveraging(where="model")
    with pytest.raises(ValueError, match="nothing to average"):
        EMAWeightAveraging(where=lambda e: e.optimizer).in_step().init(regression())
    with pytest.raises(ValueError, match="max_epochs"):
        solstice.Trainer(
            max_epochs=3, callbacks=[StochasticWeightAveraging(3)], enable_progress_bar=False
        ).fit(regression(), _data()[0])


def test_an_evaluation_experiment_of_another_structure_is_refused():
    class Wrong(Callback):
        def evaluation_experiment(self, trainer, experiment):
            return eqx.tree_at(lambda e: e.model.weight, experiment, jnp.zeros((2, 3)))

    trainer = _trainer(Wrong())
    with pytest.raises(ValueError, match="Wrong.evaluation_experiment"):
        trainer.validate(regression(), _data()[0])
