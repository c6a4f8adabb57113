"""Exact resume: `check_resume` at many points, other device counts, hook order."""

import equinox as eqx
import jax
import numpy as np
import pytest
from helpers import blobs_datamodule, make_mlp_experiment

import solstice
from solstice.callbacks import Callback, ModelCheckpoint, TerminateOnNaN
from solstice.datamodules import DataModule


def _exp():
    return make_mlp_experiment(seed=0, in_size=8, num_classes=4)


def _kwargs(**kw):
    return {**dict(max_epochs=3, log_every_n_steps=3, devices=1, enable_progress_bar=False), **kw}


@pytest.mark.parametrize(
    ("interrupt_at", "kwargs"),
    [
        (5, {}),  # mid-epoch, mid log interval: accumulators carry over
        (8, {}),  # the last batch of epoch 0, before its validation and epoch-end hooks
        (9, {}),  # just after an epoch boundary
        (6, dict(steps_per_execution=3, log_every_n_steps=6)),  # fused steps
        (13, dict(check_val_every_n_epoch=2, max_steps=21)),  # ends mid-epoch on max_steps
    ],
)
def test_interrupted_run_resumes_bit_for_bit(interrupt_at, kwargs):
    report = solstice.check_resume(
        _exp, blobs_datamodule, _kwargs(**kwargs), interrupt_at=interrupt_at
    )
    assert report, str(report)
    assert report.total_steps == kwargs.get("max_steps", 24)


def test_resume_with_nonfinite_guard_and_callbacks():
    def kwargs():
        return _kwargs(callbacks=[TerminateOnNaN()])

    report = solstice.check_resume(_exp, blobs_datamodule, kwargs, interrupt_at=10)
    assert report, str(report)


class _Unresumable(DataModule):
    """Draws every epoch's batches from one generator, so its order depends on the epochs
    drawn before in the same process, not on (seed, epoch): not resumable."""

    def __init__(self):
        self.rng = np.random.default_rng(0)
        self.data = blobs_datamodule().splits["train"]

    def train_dataloader(self):
        for _ in range(8):
            idx = self.rng.integers(0, 256, size=32)
            yield {k: v[idx] for k, v in self.data.items()}


def test_check_resume_reports_differences():
    report = solstice.check_resume(_exp, _Unresumable, _kwargs(max_epochs=2), interrupt_at=10)
    assert not report
    text = str(report)
    assert "FAILED" in text and "experiment `.model.layers[1].layers[0].weight`" in text
    assert "logged metric `train/loss`" in text
    with pytest.raises(ValueError, match="choose a step from 1 to 15"):
        solstice.check_resume(_exp, blobs_datamodule, _kwargs(max_epochs=2), interrupt_at=16)
    with pytest.raises(ValueError, match="multiple of `steps_per_execution=2`"):
        solstice.check_resume(
            _exp, blobs_datamodule, _kwargs(steps_per_execution=2), interrupt_at=3
        )
    with pytest.raises(ValueError, match="function"):
        solstice.check_resume(
            _exp, blobs_datamodule, _kwargs(callbacks=[TerminateOnNaN()]), interrupt_at=3
        )


class _Record(Callback):
    def __init__(self):
        self.calls = []
        self.labels = []

    def on_train_start(self, trainer, experiment):
        self.calls.append(("train_start", trainer.global_step))

    def on_train_epoch_start(self, trainer, experiment):
        self.calls.append(("epoch_start", trainer.current_epoch, trainer.progress.batch_idx))

    def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
        self.calls.append(("batch", batch_idx))
        self.labels.append(np.asarray(batch["label"]))

    def on_validation_end(self, trainer, experiment):
        self.calls.append(("validation_end", trainer.current_epoch))

    def on_train_epoch_end(self, trainer, experiment):
        self.calls.append(("epoch_end", trainer.current_epoch))


def test_resume_on_two_devices_from_a_one_device_checkpoint(tmp_path):
    assert len(jax.devices()) >= 2
    straight = _Record()
    ref = solstice.Trainer(**_kwargs(callbacks=[straight]))
    expected = ref.fit(_exp(), blobs_datamodule())

    ckpt = ModelCheckpoint(tmp_path, every_n_train_steps=11, every_n_epochs=None)
    solstice.Trainer(**_kwargs(max_steps=11, callbacks=[ckpt])).fit(_exp(), blobs_datamodule())
    assert ckpt.last_model_path.endswith("epoch=1-step=11")

    resumed = _Record()
    trainer = solstice.Trainer(**{**_kwargs(callbacks=[resumed]), "devices": 2})
    with pytest.warns(RuntimeWarning, match="`devices` 1 in the checkpoint, 2 now .*allclose"):
        got = trainer.fit(_exp(), blobs_datamodule(), ckpt_path=ckpt.last_model_path)
    leaf = jax.tree.leaves(eqx.filter(got.model, eqx.is_array))[0]
    assert len(leaf.sharding.device_set) == 2
    # the same global batches, in the same order, continue from batch 3 of epoch 1
    assert resumed.calls[:3] == [("train_start", 11), ("epoch_start", 1, 3), ("batch", 3)]
    assert straight.calls[straight.calls.index(("epoch_start", 1, 0)) + 4] == ("batch", 3)
    for a, b in zip(straight.labels[11:], resumed.labels, strict=True):
        np.testing.assert_array_equal(a, b)
    # the same numbers, up to the order of floating-point sums over two devices
    for a, b in zip(
        jax.tree.leaves(eqx.filter(expected, eqx.is_array)),
        jax.tree.leaves(eqx.filter(got, eqx.is_array)),
    ):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert trainer.global_step == ref.global_step == 24
    assert trainer.callback_metrics["val/accuracy"] == pytest.approx(
        ref.callback_metrics["val/accuracy"]
    )


def test_resume_hook_order_and_last_with_no_checkpoint_yet(tmp_path):
    # "last" with an empty directory starts from scratch (so a job can always pass it)
    record = _Record()
    ckpt = ModelCheckpoint(tmp_path, every_n_train_steps=4)
    solstice.Trainer(**_kwargs(max_epochs=1, callbacks=[record, ckpt])).fit(
        _exp(), blobs_datamodule(), ckpt_path="last"
    )
    assert record.calls[0] == ("train_start", 0)
    # resuming at the end of an epoch's batches: no batch, then validation and epoch end
    again = _Record()
    trainer = solstice.Trainer(
        **_kwargs(max_epochs=2, callbacks=[again, ModelCheckpoint(tmp_path, every_n_train_steps=4)])
    )
    trainer.fit(_exp(), blobs_datamodule(), ckpt_path="last")
    # (the step-triggered save at step 8 is the newest: the epoch-end save of the same state
    # is skipped), then the next epoch
    assert again.calls[:6] == [
        ("train_start", 8),
        ("epoch_start", 0, 8),
        ("validation_end", 0),
        ("epoch_end", 0),
        ("epoch_start", 1, 0),
        ("batch", 0),
    ]
    with pytest.raises(ValueError, match="has none"):
        solstice.Trainer(**_kwargs()).fit(_exp(), blobs_datamodule(), ckpt_path="last")
    with pytest.raises(ValueError, match="`monitor=` metric"):
        solstice.Trainer(**_kwargs(callbacks=[ModelCheckpoint(tmp_path)])).fit(
            _exp(), blobs_datamodule(), ckpt_path="best"
        )
