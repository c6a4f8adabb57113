"""A user's own Experiment and Metrics get the right numbers: any pytree batch, every
evaluation sample counted exactly once without a mask, and mistakes caught before they can
turn into a plausible wrong number."""

import dataclasses
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    STRUCTURES,
    Regression,
    SquaredError,
    blobs_datamodule,
    make_mlp_experiment,
    mse_by_hand,
    params_of,
    regression,
    regression_split,
)

import solstice
from solstice.callbacks import Callback, EarlyStopping, ModelCheckpoint
from solstice.datamodules import ArrayDataModule, DataModule, TorchDataModule


def _datamodule(structure, n_val, batch_size=8, **kw):
    make = STRUCTURES[structure][0]
    return ArrayDataModule(
        train=make(*regression_split(64, 0)),
        val=make(*regression_split(n_val, 1)),
        test=make(*regression_split(n_val, 2)),
        predict=make(*regression_split(n_val, 3)),
        batch_size=batch_size,
        **kw,
    )


def _trainer(**kw):
    kw.setdefault("enable_progress_bar", False)
    return solstice.Trainer(**kw)


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("on_device", [False, True])
def test_any_pytree_batch_gives_exact_metrics_and_predictions(structure, on_device):
    # 21 validation rows in batches of 8: the last batch has 5 rows, which do not split
    # over the 4 devices either.
    dm = _datamodule(structure, n_val=21, on_device=on_device)
    trainer = _trainer(max_epochs=2)
    fitted = trainer.fit(regression(structure), dm)
    for split, stage, method in (("val", "val", trainer.validate), ("test", "test", trainer.test)):
        x, y = regression_split(21, 1 if split == "val" else 2)
        got = method(fitted, dm)[f"{stage}/mse"]
        assert got == pytest.approx(mse_by_hand(fitted, x, y), rel=1e-5)
    out = trainer.predict(fitted, dm)
    assert set(out) == {"prediction", "input"}
    x, _ = regression_split(21, 3)
    np.testing.assert_array_equal(out["input"], x)  # exactly the real samples, in order
    np.testing.assert_allclose(
        out["prediction"], np.asarray(jax.vmap(fitted.model)(x)[:, 0]), rtol=1e-6
    )


@pytest.mark.parametrize("n_val", [24, 21, 5, 1])
@pytest.mark.parametrize("devices", [1, 4])
def test_evaluation_counts_every_sample_once_without_a_mask(n_val, devices):
    dm = _datamodule("tuple", n_val=n_val)
    trainer = _trainer(max_epochs=1, devices=devices)
    fitted = trainer.fit(regression(), dm)
    x, y = regression_split(n_val, 1)
    assert trainer.callback_metrics["val/mse"] == pytest.approx(mse_by_hand(fitted, x, y), rel=1e-5)
    # The short last batch has a step of its own, compiled once per stage: not a retrace
    # (warnings are errors in this suite), and not compiled again by the next validation.
    trainer.validate(fitted, dm)
    short = n_val % 8 != 0 or n_val < 8
    assert trainer.trace_log.count("validation_last_batch") == (1 if short else 0)


def test_an_experiment_that_honours_the_mask_keeps_one_compiled_step():
    dm = blobs_datamodule(n_train=64, n_val=21, batch_size=8)
    trainer = _trainer(max_epochs=1)
    fitted = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), dm)
    metrics = trainer.validate(fitted, dm)
    assert trainer.trace_log.count("eval") == 1
    assert trainer.trace_log.count("validation_last_batch") == 0
    probs = trainer.predict(fitted, dm)
    assert probs.shape == (21, 4)
    labels = dm.splits["val"]["label"]
    logits = jax.vmap(fitted.model)(jnp.asarray(dm.splits["val"]["image"]))
    accuracy = float(np.mean(np.asarray(logits).argmax(-1) == labels))
    assert metrics["val/accuracy"] == pytest.approx(accuracy)


def test_user_datamodule_of_generators_with_tuple_batches():
    class Generated(DataModule):
        def train_dataloader(self):
            x, y = regression_split(32, self.epoch)
            for i in range(0, 32, 8):
                yield x[i : i + 8], y[i : i + 8]

        def val_dataloader(self):
            x, y = regression_split(19, 1)
            for i in range(0, 19, 8):  # 8, 8, 3: no declared batch size, no len
                yield x[i : i + 8], y[i : i + 8]

    trainer = _trainer(max_epochs=2)
    fitted = trainer.fit(regression(), Generated())
    x, y = regression_split(19, 1)
    assert trainer.callback_metrics["val/mse"] == pytest.approx(mse_by_hand(fitted, x, y), rel=1e-5)


def test_a_short_batch_in_the_middle_of_evaluation_is_an_error():
    class Ragged(DataModule):
        def train_dataloader(self):
            x, y = regression_split(16, 0)
            yield x[:8], y[:8]

        def val_dataloader(self):
            x, y = regression_split(20, 1)
            yield x[:8], y[:8]
            yield x[8:12], y[8:12]
            yield x[12:20], y[12:20]

    with pytest.raises(ValueError, match="only the last batch of an evaluation split may be"):
        _trainer(max_epochs=1).fit(regression(), Ragged())


def test_torch_adapter_keeps_tuple_batches():
    torch = pytest.importorskip("torch")
    from torch.utils.data import TensorDataset

    def dataset(n, seed):
        x, y = regression_split(n, seed)
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    dm = TorchDataModule(
        train=dataset(64, 0), val=dataset(21, 1), batch_size=8, keys=None, shuffle=False
    )
    trainer = _trainer(max_epochs=1)
    fitted = trainer.fit(regression(), dm)
    x, y = regression_split(21, 1)
    assert trainer.callback_metrics["val/mse"] == pytest.approx(mse_by_hand(fitted, x, y), rel=1e-5)


# ---------------------------------------------------------------------- metrics are arrays
class PythonCount(solstice.Metrics):
    total: jax.Array
    count: int  # the mistake: a Python number is not traced

    def merge(self, other):
        return PythonCount(self.total + other.total, self.count + other.count)

    def compute(self):
        return {"mse": self.total / self.count}


class CountsInPython(Regression):
    def eval_step(self, batch):
        errors = self._errors(self.model, batch)
        return PythonCount(jnp.sum(errors**2), errors.shape[0])


def test_a_metrics_field_that_is_not_an_array_is_an_error_at_the_first_step():
    model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    experiment = CountsInPython(model, solstice.OptaxOptimizer(optax.sgd(0.1), model), "tuple")
    trainer = _trainer(max_epochs=3)
    with pytest.raises(TypeError, match=r"`PythonCount\.count` is a `int`.*jnp\.asarray"):
        trainer.fit(experiment, _datamodule("tuple", n_val=21))
    assert trainer.global_step == 0  # caught by the sanity check, before training


# ---------------------------------------------------------------------- silent no-ops
class NeverTrains(Regression):
    def train_step(self, batch):
        return self, SquaredError(self._errors(self.model, batch))


def test_train_step_returning_its_input_warns_with_the_fix():
    model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    experiment = NeverTrains(model, solstice.OptaxOptimizer(optax.sgd(0.1), model), "tuple")
    with pytest.warns(UserWarning, match=r"train_step` returned an experiment whose arrays"):
        _trainer(max_epochs=1).fit(experiment, _datamodule("tuple", n_val=16))


def test_evaluation_after_fit_uses_the_fitted_experiment_and_warns_about_the_input():
    dm = _datamodule("tuple", n_val=21)
    trainer = _trainer(max_epochs=2)
    initial = regression()
    fitted = trainer.fit(initial, dm)
    assert trainer.test() == trainer.test(fitted, dm)  # no arguments: the fitted one
    with pytest.warns(UserWarning, match="the experiment that was passed to `fit`, which is"):
        untrained = trainer.test(initial, dm)
    assert untrained["test/mse"] > trainer.test()["test/mse"]
    out = trainer.predict()
    assert out["prediction"].shape == (21,)


def test_evaluation_from_a_checkpoint(tmp_path):
    dm = _datamodule("tuple", n_val=21)
    checkpoint = ModelCheckpoint(tmp_path, monitor="val/mse", mode="min", save_top_k=1)
    trainer = _trainer(max_epochs=3, callbacks=[checkpoint])
    fitted = trainer.fit(regression(lr=0.02), dm)
    best = solstice.load(checkpoint.best_model_path, like=fitted)
    x, y = regression_split(21, 1)
    assert trainer.validate(ckpt_path="best")["val/mse"] == pytest.approx(
        mse_by_hand(best, x, y), rel=1e-5
    )
    assert trainer.validate(ckpt_path="last")["val/mse"] == pytest.approx(
        mse_by_hand(fitted, x, y), rel=1e-5
    )
    fresh = _trainer(callbacks=[ModelCheckpoint(tmp_path, monitor="val/mse")])  # no fit
    got = fresh.test(regression(seed=5), dm, ckpt_path=checkpoint.best_model_path)
    assert got["test/mse"] == pytest.approx(mse_by_hand(best, *regression_split(21, 2)), rel=1e-5)


def test_a_second_fit_on_the_same_trainer_raises_instead_of_training_nothing():
    dm = _datamodule("tuple", n_val=16)
    trainer = _trainer(max_epochs=1)
    trainer.fit(regression(), dm)
    with pytest.raises(RuntimeError, match="already run `fit`.*create a new `Trainer`"):
        trainer.fit(regression(), dm)


def test_validate_test_predict_need_no_max_epochs():
    dm = _datamodule("tuple", n_val=21)
    trainer = solstice.Trainer(enable_progress_bar=False)
    experiment = regression()
    x, y = regression_split(21, 2)
    assert trainer.test(experiment, dm)["test/mse"] == pytest.approx(
        mse_by_hand(experiment, x, y), rel=1e-5
    )
    with pytest.raises(ValueError, match="Neither `max_epochs` nor `max_steps`"):
        trainer.fit(experiment, dm)


# ---------------------------------------------------------------------- before the first step
class _CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
        self.steps += 1


@pytest.mark.parametrize(
    "callback, match",
    [
        (EarlyStopping("val/mse"), "never validates"),
        (ModelCheckpoint("unused", monitor="val/mse"), "never validates"),
        (EarlyStopping("val/loss"), r"`val/loss`.*can monitor: `val/mse`"),
        (EarlyStopping("train/mse"), "train/mse_epoch"),
    ],
)
def test_a_monitored_metric_no_stage_produces_fails_before_training(callback, match):
    counter = _CountSteps()
    with_val = not match.startswith("never")
    dm = _datamodule("tuple", n_val=16)
    if not with_val:
        dm.splits["val"] = None
    trainer = _trainer(max_epochs=3, callbacks=[counter, callback])
    with pytest.raises(ValueError, match=match):
        trainer.fit(regression(), dm)
    assert counter.steps == 0


class FailingEval(Regression):
    def eval_step(self, batch):
        raise ValueError("bug in eval_step")


def test_sanity_check_surfaces_eval_errors_before_training():
    counter = _CountSteps()
    model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    experiment = FailingEval(model, solstice.OptaxOptimizer(optax.sgd(0.1), model), "tuple")
    trainer = _trainer(max_epochs=3, callbacks=[counter])
    with pytest.raises(ValueError, match="bug in eval_step"):
        trainer.fit(experiment, _datamodule("tuple", n_val=21))
    assert counter.steps == 0


def test_sanity_check_changes_nothing():
    results = []
    for sanity in (0, 2, -1):
        dm = _datamodule("tuple", n_val=21)
        trainer = _trainer(max_epochs=2, num_sanity_val_steps=sanity)
        fitted = trainer.fit(regression(), dm)
        results.append((params_of(fitted), dict(trainer.history.metrics)))
    for params, history in results[1:]:
        for a, b in zip(results[0][0], params, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert history == results[0][1]  # nothing logged by the sanity check


# ---------------------------------------------------------------------- hooks replace it
class Annealed(Regression):
    """Halves a static (Python float) coefficient in a per-batch hook."""

    scale: float = eqx.field(static=True, default=1.0)

    def _errors(self, model, batch):
        x, y = self._xy(batch)
        return self.scale * (jax.vmap(model)(x)[:, 0] - y)

    def on_train_batch_start(self, trainer, batch, batch_idx):
        if batch_idx == 3:
            return dataclasses.replace(self, scale=0.5)
        return None


def test_a_per_batch_hook_may_change_a_static_field():
    model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    experiment = Annealed(model, solstice.OptaxOptimizer(optax.sgd(0.05), model), "tuple")
    trainer = _trainer(max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = trainer.fit(experiment, _datamodule("tuple", n_val=16))
    assert fitted.scale == 0.5
    assert trainer.global_step == 8
    messages = [w for w in caught if "non-array part changed" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    warning = messages[0]
    assert "`Annealed.scale`: 1.0 -> 0.5" in str(warning.message)
    assert warning.filename == __file__  # points at the hook, in the user's code
    assert not [w for w in caught if "traced again" in str(w.message)]
