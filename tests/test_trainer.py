"""The Trainer end to end: fit/validate/test/predict, determinism, devices, no retracing."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import blobs, blobs_datamodule, make_mlp_experiment, params_of

import solstice


def _trainer(**kw):
    kw.setdefault("enable_progress_bar", False)
    kw.setdefault("devices", 1)
    return solstice.Trainer(**kw)


def _exp(seed=0):
    return make_mlp_experiment(seed=seed, in_size=8, num_classes=4)


def test_fit_validate_test_predict():
    dm = blobs_datamodule()
    trainer = _trainer(max_epochs=4, log_every_n_steps=4)
    exp = trainer.fit(_exp(), dm)
    assert isinstance(exp, solstice.ClassificationExperiment)
    assert trainer.global_step == 4 * (256 // 32)
    assert trainer.current_epoch == 4
    assert trainer.callback_metrics["val/accuracy"] > 0.9
    assert "train/loss_epoch" in trainer.callback_metrics

    val = trainer.validate(exp, dm)
    test = trainer.test(exp, dm)
    assert set(test) >= {f"test/{m}" for m in ("accuracy", "f1_macro", "loss", "balanced_accuracy")}
    assert val["val/accuracy"] == pytest.approx(trainer.callback_metrics["val/accuracy"])

    # test accuracy equals a hand computation over every test sample exactly once
    data = dm.splits["test"]
    logits = jax.vmap(exp.model)(jnp.asarray(data["image"]))
    expected = float(np.mean(np.argmax(np.asarray(logits), -1) == data["label"]))
    assert test["test/accuracy"] == pytest.approx(expected, abs=1e-6)

    probs = trainer.predict(exp, dm)
    assert probs.shape == (70, 4)
    manual = jax.nn.softmax(jax.vmap(exp.model)(jnp.asarray(dm.splits["predict"]["image"])), -1)
    np.testing.assert_allclose(probs, manual, rtol=1e-5, atol=1e-6)


def test_input_experiment_is_not_consumed():
    exp = _exp()
    before = [np.asarray(p).copy() for p in params_of(exp)]
    trainer = _trainer(max_epochs=1)
    trained = trainer.fit(exp, blobs_datamodule())
    for b, p, t in zip(before, params_of(exp), params_of(trained)):
        np.testing.assert_array_equal(b, np.asarray(p))  # donation never touched the input
        assert not np.array_equal(b, np.asarray(t))


def test_same_seed_same_result():
    results = []
    for _ in range(2):
        trainer = _trainer(max_epochs=2)
        results.append(params_of(trainer.fit(_exp(), blobs_datamodule())))
    for a, b in zip(*results):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_several_devices_match_one():
    assert len(jax.devices()) >= 4
    out = {}
    for n in (1, 4):
        trainer = _trainer(max_epochs=2, devices=n)
        exp = trainer.fit(_exp(), blobs_datamodule(batch_size=32, eval_batch_size=16))
        out[n] = (params_of(exp), trainer.callback_metrics["val/accuracy"])
        leaf = params_of(exp)[0]
        assert len(leaf.sharding.device_set) == n
    for a, b in zip(out[1][0], out[4][0]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert out[1][1] == pytest.approx(out[4][1])


def test_no_retrace_after_first_step():
    trainer = _trainer(max_epochs=3, log_every_n_steps=3)
    # 70 validation samples with batches of 32: the last batch is padded and masked
    trainer.fit(_exp(), blobs_datamodule(eval_batch_size=32))
    trainer.test(trainer.experiment, blobs_datamodule(eval_batch_size=32))
    assert trainer.trace_log.count("train") == 1
    assert trainer.trace_log.count("eval") == 1


def test_max_steps_stops_mid_epoch():
    trainer = _trainer(max_epochs=None, max_steps=11)
    trainer.fit(_exp(), blobs_datamodule())
    assert trainer.global_step == 11
    assert trainer.current_epoch == 2  # 8 steps per epoch: the second epoch ended early


def test_limits_and_fast_dev_run():
    trainer = _trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(_exp(), blobs_datamodule())
    assert trainer.global_step == 6

    trainer = _trainer(max_epochs=5, limit_train_batches=0.5)
    trainer.fit(_exp(), blobs_datamodule())
    assert trainer.global_step == 5 * 4

    trainer = _trainer(fast_dev_run=True, loggers=[solstice.PythonLogger()])
    trainer.fit(_exp(), blobs_datamodule())
    assert trainer.global_step == 1 and trainer.loggers == []


def test_check_val_every_n_epoch():
    trainer = _trainer(max_epochs=4, check_val_every_n_epoch=2)
    trainer.fit(_exp(), blobs_datamodule())
    assert trainer.progress.validation_runs == 2


def test_tuple_batches_and_custom_iterables():
    data = blobs(96)

    class TupleData(solstice.datamodules.DataModule):
        def train_dataloader(self):
            for i in range(0, 96, 32):
                yield data["image"][i : i + 32], data["label"][i : i + 32]

        def val_dataloader(self):
            return self.train_dataloader()

    trainer = _trainer(max_epochs=2)
    trainer.fit(_exp(), TupleData())
    assert trainer.global_step == 6
    assert "val/accuracy" in trainer.callback_metrics


def test_experiment_hook_can_replace_experiment():
    class Annealed(solstice.ClassificationExperiment):
        def on_train_epoch_start(self, trainer):
            # keep arrays as arrays: replacing an array value never recompiles
            return eqx.tree_at(lambda e: e.key, self, jax.random.key(trainer.current_epoch))

    base = _exp()
    exp = Annealed(base.model, base.optimizer, 4, key=base.key)
    trainer = _trainer(max_epochs=3)
    trainer.fit(exp, blobs_datamodule())
    assert trainer.trace_log.count("train") == 1


def test_input_experiment_survives_multi_device_fit():
    exp = _exp()
    trainer = _trainer(max_epochs=1, devices=4)
    trainer.fit(exp, blobs_datamodule())
    leaves = jax.tree.leaves(eqx.filter(exp, eqx.is_array))
    assert not any(leaf.is_deleted() for leaf in leaves)
    # the same initial experiment can be fitted again (by a new Trainer: one fit each)
    _trainer(max_epochs=1, devices=4).fit(exp, blobs_datamodule())


def test_new_experiment_structure_is_not_reported_as_a_retrace():
    import optax

    trainer = _trainer(max_epochs=1)
    trainer.fit(_exp(), blobs_datamodule())
    other = _exp()
    other = eqx.tree_at(
        lambda e: e.optimizer, other, solstice.OptaxOptimizer(optax.adam(1e-3), other.model)
    )  # a new optax closure: unequal static part, a new compiled function
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.test(other, blobs_datamodule())
