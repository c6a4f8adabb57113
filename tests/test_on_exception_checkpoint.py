"""`OnExceptionCheckpoint`: an exception in a hook, the data or a step leaves a checkpoint a
resume continues from bit for bit, or a warning saying why none could be written."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import blobs_datamodule, make_mlp_experiment

import solstice
from solstice.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from solstice.checkpointing._format import verify


def _kwargs(**kw):
    base = dict(max_epochs=2, log_every_n_steps=3, devices=1, enable_progress_bar=False)
    return {**base, **kw}


def _arrays(experiment):
    leaves = jax.tree.leaves(eqx.filter(experiment, eqx.is_array))
    return [
        np.asarray(
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        )
        for x in leaves
    ]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b), strict=True))


def _fail_once(hook, step):
    """A callback raising in `hook` at global step `step` (after that step), once."""

    def fail(self, trainer, *args):
        if self.armed and trainer.global_step == step:
            self.armed = False
            raise RuntimeError(f"boom at step {step}")

    return type("FailOnce", (Callback,), {"armed": True, hook: fail})()


class _FailAtBatchEnd(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"boom at step {self.step}")


_REFERENCES = {}


def _reference(**kw):
    """The uninterrupted run (one per settings in this module)."""
    key = tuple(sorted(kw.items()))
    if key not in _REFERENCES:
        trainer = solstice.Trainer(**_kwargs(**kw))
        fitted = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
        _REFERENCES[key] = fitted, trainer
    return _REFERENCES[key]


def _interval_losses(trainer):
    history = trainer.history
    return dict(zip(history.steps["train/loss"], history.metrics["train/loss"], strict=True))


def _fail_then_resume(tmp_path, failing, **kw):
    saver = OnExceptionCheckpoint(tmp_path)
    trainer = solstice.Trainer(**_kwargs(callbacks=[failing, saver], **kw))
    template = make_mlp_experiment(in_size=8, num_classes=4)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(template, blobs_datamodule())
    failed_at = trainer.global_step
    verify(saver.path)  # committed and whole
    resumed_trainer = solstice.Trainer(**_kwargs(callbacks=[OnExceptionCheckpoint(tmp_path)], **kw))
    resumed = resumed_trainer.fit(template, blobs_datamodule(), ckpt_path=saver.path)
    return failed_at, resumed, resumed_trainer


@pytest.mark.parametrize(
    ("step", "kw"),
    [
        (6, {}),  # a step that closes a log interval, before it is published
        (6, dict(steps_per_execution=2, log_every_n_steps=2)),  # fused: its last step's hook
    ],
)
def test_an_error_in_a_batch_hook_resumes_bit_for_bit(tmp_path, step, kw):
    reference, ref_trainer = _reference(**kw)
    failed_at, resumed, trainer = _fail_then_resume(tmp_path, _FailAtBatchEnd(step), **kw)
    assert failed_at == step
    assert trainer.global_step == ref_trainer.global_step == 16
    assert _same(resumed, reference)
    for name in ("train/loss_epoch", "val/loss", "val/accuracy"):
        assert trainer.history.metrics[name] == ref_trainer.history.metrics[name], name
    logged, expected = _interval_losses(trainer), _interval_losses(ref_trainer)
    if step % kw.get("log_every_n_steps", 3) == 0:  # that interval was closed, not logged
        del expected[step]
    assert logged == expected


def test_an_error_in_validation_resumes_bit_for_bit(tmp_path):
    # at the end of epoch 0's batches: the resume runs its validation again
    reference, ref_trainer = _reference()
    failing = _fail_once("on_validation_start", 8)
    failed_at, resumed, trainer = _fail_then_resume(tmp_path, failing)
    assert failed_at == 8
    assert _same(resumed, reference)
    assert trainer.history.metrics["val/loss"] == ref_trainer.history.metrics["val/loss"]
    assert (
        trainer.history.metrics["train/loss_epoch"]
        == ref_trainer.history.metrics["train/loss_epoch"]
    )


_BAD_BATCH = {"armed": False}


class _CheckedExperiment(solstice.ClassificationExperiment):
    def validate_batch(self, batch):
        if _BAD_BATCH["armed"] and float(np.asarray(batch["image"]).sum()) == _BAD_BATCH["sum"]:
            _BAD_BATCH["armed"] = False
            raise RuntimeError("boom: a bad batch")


def test_an_error_in_the_data_resumes_bit_for_bit(tmp_path):
    reference, _ = _reference()
    epoch1 = blobs_datamodule()
    epoch1.setup("fit")
    epoch1.set_epoch(1)
    fifth = list(epoch1.train_dataloader())[4]  # epoch 1's batch 4: global step 13
    _BAD_BATCH.update(armed=True, sum=float(np.asarray(fifth["image"]).sum()))
    base = make_mlp_experiment(in_size=8, num_classes=4)
    template = _CheckedExperiment(base.model, base.optimizer, num_classes=4, key=jax.random.key(1))
    template = eqx.tree_at(lambda e: e.key, template, base.key)
    saver = OnExceptionCheckpoint(tmp_path, filename="crash")
    trainer = solstice.Trainer(**_kwargs(callbacks=[saver]))
    with pytest.raises(RuntimeError, match="bad batch"):
        trainer.fit(template, blobs_datamodule())
    assert saver.path == tmp_path.absolute() / "crash"
    assert 8 <= trainer.global_step <= 12  # the feeder checks ahead of the step
    resumed = solstice.Trainer(**_kwargs()).fit(template, blobs_datamodule(), ckpt_path=saver.path)
    assert _same(resumed, reference)


class _Counting(solstice.Experiment):
    """One weight and a step count; `mode` "error" fails inside the compiled step at step 4
    (after its arrays were donated), "nan" turns the weight into NaN from step 3 on, "trace"
    fails while the step is traced."""

    weight: jax.Array
    step: jax.Array
    mode: str = eqx.field(static=True)

    def train_step(self, batch):
        step = self.step + 1
        weight = self.weight - 0.01 * jnp.mean(batch["image"])
        if self.mode == "nan":
            weight = jnp.where(step >= 3, jnp.nan, weight)
        elif self.mode == "trace":
            raise ValueError("boom: a bug in train_step")
        else:
            weight = eqx.error_if(weight, step == 4, "boom inside the step")
        new = _Counting(weight, step, self.mode)
        return new, solstice.ClassificationMetrics.empty(4)

    def eval_step(self, batch):
        return solstice.ClassificationMetrics.empty(4)


def _fail(tmp_path, experiment, callbacks=(), match="boom", **kw):
    saver = OnExceptionCheckpoint(tmp_path)
    trainer = solstice.Trainer(**_kwargs(callbacks=[*callbacks, saver], **kw))
    with pytest.warns(RuntimeWarning) as warned, pytest.raises(Exception, match=match):
        trainer.fit(experiment, blobs_datamodule())
    assert not saver.path.exists()
    return " ".join(str(w.message) for w in warned)


def test_no_checkpoint_after_an_error_inside_a_step(tmp_path):
    experiment = _Counting(jnp.float32(1.0), jnp.int32(0), "error")
    message = _fail(tmp_path, experiment)
    assert "donated" in message and "no longer exist" in message
    assert experiment.weight.is_deleted() is False  # the caller's experiment is untouched


def test_an_error_while_tracing_the_step_saves_the_state_before_it(tmp_path):
    saver = OnExceptionCheckpoint(tmp_path)
    trainer = solstice.Trainer(**_kwargs(callbacks=[saver]))
    with pytest.raises(ValueError, match="a bug in train_step"):
        trainer.fit(_Counting(jnp.float32(1.0), jnp.int32(0), "trace"), blobs_datamodule())
    assert verify(saver.path)["progress"]["global_step"] == 0


def test_no_checkpoint_of_a_nonfinite_state(tmp_path):
    experiment = _Counting(jnp.float32(1.0), jnp.int32(0), "nan")
    message = _fail(tmp_path, experiment, [_FailAtBatchEnd(4)])
    assert "NaN or inf" in message


def test_no_checkpoint_between_a_fused_call_and_its_bookkeeping(tmp_path):
    template = make_mlp_experiment(in_size=8, num_classes=4)
    message = _fail(
        tmp_path, template, [_FailAtBatchEnd(5)], steps_per_execution=2, log_every_n_steps=2
    )
    assert "the device has taken 6 steps, the run's record says 5" in message


def test_a_later_exception_replaces_the_checkpoint(tmp_path):
    # a ModelCheckpoint alongside keeps its own checkpoints; `ckpt_path="last"` sees both
    saver, checkpoints = OnExceptionCheckpoint(tmp_path), ModelCheckpoint(tmp_path)
    for step in (3, 13):
        trainer = solstice.Trainer(**_kwargs(callbacks=[_FailAtBatchEnd(step), checkpoints, saver]))
        with pytest.raises(RuntimeError, match="boom"):
            trainer.fit(
                make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule(), ckpt_path="last"
            )
        assert verify(saver.path)["progress"]["global_step"] == step
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["epoch=0-step=8", "history.jsonl", "on_exception"], names


def test_no_checkpoint_before_the_first_step_of_a_mid_epoch_resume(tmp_path):
    # the checkpoint it resumed from is that state: it stays as it was
    saver = OnExceptionCheckpoint(tmp_path)
    template = make_mlp_experiment(in_size=8, num_classes=4)
    trainer = solstice.Trainer(**_kwargs(callbacks=[_FailAtBatchEnd(5), saver]))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(template, blobs_datamodule())
    written = verify(saver.path)["created_unix_ns"]
    failing = _fail_once("on_train_epoch_start", 5)
    trainer = solstice.Trainer(**_kwargs(callbacks=[failing, OnExceptionCheckpoint(tmp_path)]))
    with pytest.warns(RuntimeWarning, match="took no step since") as warned:
        with pytest.raises(RuntimeError, match="boom"):
            trainer.fit(template, blobs_datamodule(), ckpt_path=saver.path)
    assert str(saver.path) in str(warned[0].message)
    assert verify(saver.path)["created_unix_ns"] == written


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="plain name"):
        OnExceptionCheckpoint(tmp_path, filename="a/b")
    with pytest.raises(ValueError, match="remote storage"):
        OnExceptionCheckpoint("s3://bucket/run")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        OnExceptionCheckpoint(tmp_path / "file")
    with pytest.raises(TypeError, match="must be a path"):
        OnExceptionCheckpoint(3)
