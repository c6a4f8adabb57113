"""The training loop never reads a device value back except at log intervals and epoch ends.

On CPU, `jax.transfer_guard` does not see device-to-host reads, so we count them: every
read of an array's host value goes through `ArrayImpl._value` (`float()`, `np.asarray`,
`jax.device_get`, `.item()`, ...). Reads on the logging thread are allowed (that is where
loggers convert values); reads on the training thread are counted per step.
"""

import threading

import pytest
from helpers import blobs_datamodule, make_mlp_experiment

import solstice
from solstice.callbacks import Callback


class _ReadCounter:
    def __init__(self):
        self.main_thread_reads = 0
        self.enabled = False

    def install(self, monkeypatch):
        from jax._src.array import ArrayImpl

        original = ArrayImpl._value

        def counted(array):
            if self.enabled and threading.current_thread() is threading.main_thread():
                self.main_thread_reads += 1
            return original.fget(array)

        monkeypatch.setattr(ArrayImpl, "_value", property(counted))


class _PerStepReads(Callback):
    """Records, per training step, the reads on the training thread since the previous step."""

    def __init__(self, counter):
        self.counter = counter
        self.reads_per_step = []
        self._last = 0

    def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
        self.counter.enabled = True
        self.reads_per_step.append(self.counter.main_thread_reads - self._last)
        self._last = self.counter.main_thread_reads

    def on_train_epoch_end(self, trainer, experiment):
        self.counter.enabled = False  # epoch end may sync (callback_metrics)
        self._last = self.counter.main_thread_reads


@pytest.mark.parametrize("log_every", [1, 5])
def test_no_device_reads_on_training_thread(monkeypatch, tmp_path, log_every):
    counter = _ReadCounter()
    counter.install(monkeypatch)
    probe = _PerStepReads(counter)
    trainer = solstice.Trainer(
        max_epochs=2,
        log_every_n_steps=log_every,
        callbacks=[probe],
        loggers=[solstice.CSVLogger(tmp_path), solstice.PythonLogger()],
        enable_progress_bar=True,  # the bar must not read from the device either
        devices=1,
    )
    trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
    trainer.close()
    assert len(probe.reads_per_step) == 16
    assert sum(probe.reads_per_step) == 0, probe.reads_per_step
    # ... and the loggers did receive every interval (converted on their own thread)
    assert len(trainer.history.metrics["train/loss"]) == 16 // log_every + (16 % log_every > 0) * 2


def test_counter_detects_a_sync(monkeypatch):
    """The probe itself works: a callback calling float() per step is caught."""
    counter = _ReadCounter()
    counter.install(monkeypatch)
    probe = _PerStepReads(counter)

    class Syncing(Callback):
        def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
            float(metrics.compute()["loss"])

    trainer = solstice.Trainer(
        max_epochs=1, callbacks=[probe, Syncing()], enable_progress_bar=False, devices=1
    )
    trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
    assert sum(probe.reads_per_step) >= 7
