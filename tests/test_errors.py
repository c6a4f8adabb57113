"""Bad input raises a built-in exception naming the value, what was expected and the fix."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import blobs, blobs_datamodule, make_mlp_experiment

import solstice
from solstice.datamodules import ArrayDataModule, DataModule


def _trainer(**kw):
    kw.setdefault("max_epochs", 1)
    kw.setdefault("enable_progress_bar", False)
    kw.setdefault("devices", 1)
    return solstice.Trainer(**kw)


def _exp(num_classes=4, out=None):
    return make_mlp_experiment(in_size=8, num_classes=num_classes) if out is None else out


class _MeanLoss(solstice.Metrics):
    total: jax.Array

    def merge(self, other):
        return _MeanLoss(self.total + other.total)

    def compute(self):
        return {"loss": self.total}


class _BadReturn(solstice.Experiment):
    w: jax.Array
    returns: str = eqx.field(static=True)

    def train_step(self, batch):
        m = _MeanLoss(jnp.sum(batch["image"]) * self.w)
        if self.returns == "metrics-only":
            return m
        if self.returns == "swapped":
            return m, self
        return self, {"loss": m.total}

    def eval_step(self, batch):
        return _MeanLoss(jnp.zeros(()))


@pytest.mark.parametrize(
    "returns, match",
    [
        ("metrics-only", r"must return a tuple `\(experiment, metrics\)`"),
        ("swapped", r"first element is a `_MeanLoss`"),
        ("dict", r"second element is a `dict`"),
    ],
)
def test_train_step_must_return_experiment_and_metrics(returns, match):
    with pytest.raises(TypeError, match=match):
        _trainer().fit(_BadReturn(jnp.ones(()), returns), blobs_datamodule())


def test_batch_leaves_disagree_on_batch_size():
    with pytest.raises(
        ValueError, match=r"disagree on the batch size.*'image'.*: 10.*'label'.*: 9"
    ):
        ArrayDataModule(train={"image": np.zeros((10, 8)), "label": np.zeros(9)}, batch_size=2)

    class Ragged(DataModule):
        def train_dataloader(self):
            yield {"image": np.zeros((8, 8), np.float32), "label": np.zeros(6, np.int32)}

    with pytest.raises(ValueError, match="disagree on the batch size"):
        _trainer().fit(_exp(), Ragged())


def test_batch_not_divisible_by_devices():
    with pytest.raises(
        ValueError, match=r"batch size 30 is not divisible by the number of devices 4"
    ):
        _trainer(devices=4).fit(_exp(), blobs_datamodule(batch_size=30))


def test_labels_out_of_range():
    data = blobs(64)
    data["label"][5] = 7
    dm = ArrayDataModule(train=data, batch_size=64)
    with pytest.raises(ValueError, match=r"label 7, outside \[0, 4\).*num_classes"):
        _trainer().fit(_exp(), dm)
    data["label"][5] = -1
    with pytest.raises(ValueError, match=r"label -1, .*cannot be negative"):
        _trainer().fit(_exp(), ArrayDataModule(train=data, batch_size=64))
    for dtype in (np.int8, np.int64, np.uint8):  # every integer width, signed or not
        labels = data["label"].astype(dtype)
        labels[5] = 4
        with pytest.raises(ValueError, match=r"label 4, outside \[0, 4\)"):
            _exp().validate_batch({"image": data["image"], "label": labels})
        labels[5] = 3
        _exp().validate_batch({"image": data["image"], "label": labels})


def test_logits_with_wrong_number_of_classes():
    key = jax.random.key(0)
    model = eqx.nn.MLP(8, 3, 16, 1, key=key)  # 3 outputs, 4 classes
    exp = solstice.ClassificationExperiment(
        model, solstice.OptaxOptimizer(optax.sgd(0.1), model), num_classes=4
    )
    with pytest.raises(ValueError, match=r"logits of shape \(3,\).*num_classes=4"):
        _trainer().fit(exp, blobs_datamodule())


def test_empty_training_split():
    empty = {"image": np.zeros((0, 8), np.float32), "label": np.zeros((0,), np.int32)}
    with pytest.raises(ValueError, match="train` split has 0 examples"):
        _trainer().fit(_exp(), ArrayDataModule(train=empty, batch_size=8))

    class Nothing(DataModule):
        def train_dataloader(self):
            return iter(())

    with pytest.raises(ValueError, match="yielded no batches"):
        _trainer().fit(_exp(), Nothing())


def test_stopping_conditions():
    trainer = solstice.Trainer()  # enough for validate/test/predict; `fit` needs a stop
    with pytest.raises(ValueError, match="Neither `max_epochs` nor `max_steps`"):
        trainer.fit(_exp(), blobs_datamodule())
    with pytest.raises(ValueError, match=r"`max_epochs` must be an int >= 0, got -1"):
        solstice.Trainer(max_epochs=-1)
    with pytest.raises(ValueError, match=r"`max_steps` must be an int >= 0, got -5"):
        solstice.Trainer(max_steps=-5)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="not a multiple of `steps_per_execution=3`"):
        solstice.Trainer(max_epochs=1, log_every_n_steps=10, steps_per_execution=3)
    with pytest.raises(ValueError, match=r"limit_val_batches=1.5"):
        solstice.Trainer(max_epochs=1, limit_val_batches=1.5)
    with pytest.raises(TypeError, match="`callbacks` must hold"):
        solstice.Trainer(max_epochs=1, callbacks=[object()])
    with pytest.raises(ValueError, match=r"`devices=99`"):
        solstice.Trainer(max_epochs=1, devices=99)
    with pytest.raises(TypeError, match="Expected a `solstice.Experiment`"):
        _trainer().fit(object(), blobs_datamodule())
    with pytest.raises(TypeError, match="Wrap arrays in `ArrayDataModule"):
        _trainer().fit(_exp(), {"image": np.zeros(3)})
    with pytest.raises(ValueError, match="has keys.*looks for"):
        _trainer().fit(
            _exp(),
            ArrayDataModule(
                train={"x": np.zeros((8, 8), np.float32), "y": np.zeros(8, np.int32)}, batch_size=8
            ),
        )
    with pytest.raises(ValueError, match="nothing to test"):
        _trainer().test(_exp(), ArrayDataModule(train=blobs(8), batch_size=8))
    with pytest.raises(TypeError, match="must be a `solstice.Optimizer`"):
        solstice.ClassificationExperiment(
            eqx.nn.Linear(2, 2, key=jax.random.key(0)), optax.sgd(0.1), 2
        )


# ---------------------------------------------------------------------- clear errors (issue 13)
class _VectorMetrics(solstice.Metrics):
    per_class: jax.Array

    def merge(self, other):
        return _VectorMetrics(self.per_class + other.per_class)

    def compute(self):
        return {"per_class": self.per_class}  # a vector: loggers take numbers


class _VectorEval(solstice.ClassificationExperiment):
    def eval_step(self, batch):
        return _VectorMetrics(jnp.zeros(4))


def test_a_non_scalar_metric_names_the_metric_and_its_shape():
    base = _exp()
    exp = _VectorEval(base.model, base.optimizer, 4, key=base.key)
    with pytest.raises(ValueError, match=r"metric `per_class` has shape \(4,\).*jnp\.mean"):
        _trainer().validate(exp, blobs_datamodule())


def test_non_numeric_input_arrays_name_the_leaf_and_dtype():
    data = blobs(64)
    with pytest.raises(TypeError, match=r"`train\['name'\]` has dtype <U3 \(strings\)"):
        ArrayDataModule(train={**data, "name": np.array(["abc"] * 64)}, batch_size=16)

    class Objects(DataModule):
        def train_dataloader(self):
            yield {**blobs(16), "meta": np.array([{"id": i} for i in range(16)], dtype=object)}

    with pytest.raises(TypeError, match=r"`batch\['meta'\]` has dtype object \(Python objects\)"):
        _trainer().fit(_exp(), Objects())


def test_a_feature_size_the_model_rejects_names_the_batch_leaves():
    data = blobs(64, dim=7)  # the model takes 8 features
    dm = ArrayDataModule(train=data, batch_size=16)
    with pytest.raises(Exception) as info:
        _trainer().fit(_exp(), dm)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "ClassificationExperiment.train_step" in notes
    assert "`batch['image']`: float32[16, 7]" in notes and "`batch['label']`: int32[16]" in notes


def test_detect_anomaly_stops_at_the_first_non_finite_input():
    data = blobs(64)
    data["image"][37, 2] = np.nan  # row 37: batch 2 (of 16 rows, in order), global step 3
    dm = ArrayDataModule(train=data, batch_size=16, shuffle=False)
    trainer = _trainer(detect_anomaly=True, max_epochs=2)
    with pytest.raises(FloatingPointError, match=r"input of training step 3 .*`batch\['image'\]`"):
        trainer.fit(_exp(), dm)
    assert trainer.global_step == 2  # the steps before it, and no more
    # without it, the NaN goes through silently (the default: no per-step check)
    quiet = _trainer(max_epochs=1)
    quiet.fit(_exp(), dm)
    assert quiet.global_step == 4


def test_detect_anomaly_names_a_non_finite_loss_from_finite_inputs():
    model = make_mlp_experiment(in_size=8, num_classes=4).model
    exploding = solstice.ClassificationExperiment(
        model, solstice.OptaxOptimizer(optax.sgd(1e30), model), num_classes=4
    )
    trainer = _trainer(detect_anomaly=True, steps_per_execution=2, log_every_n_steps=2)
    with pytest.raises(FloatingPointError, match=r"metrics \(the loss\) of training step \d+"):
        trainer.fit(exploding, blobs_datamodule())
