"""Device-resident data is gathered inside the compiled train step (no feeder, no per-step
upload) and trains exactly like host mode, fused or not, and resumes exactly."""

import numpy as np
import pytest
from helpers import blobs, make_mlp_experiment, params_of

import solstice
from solstice.datamodules import ArrayDataModule
from solstice.trainer import _train_input


def _dm(on_device):
    return ArrayDataModule(
        train=blobs(200), val=blobs(40, seed=1), batch_size=32, on_device=on_device, seed=4
    )


def _fit(on_device, **kw):
    kw.setdefault("max_epochs", 2)
    trainer = solstice.Trainer(enable_progress_bar=False, devices="auto", **kw)
    exp = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), _dm(on_device))
    trainer.flush_logs()
    return trainer, exp


def _forbid_training_feeder(monkeypatch):
    real = _train_input.Feeder

    def guarded(batches, prepare, placement, **kw):
        assert prepare.evaluation, "device-resident training data must not go through a Feeder"
        return real(batches, prepare, placement, **kw)

    monkeypatch.setattr(_train_input, "Feeder", guarded)


@pytest.mark.parametrize("fused", [1, 3])
def test_gather_in_step_matches_host_mode(monkeypatch, fused):
    kw = dict(steps_per_execution=fused, log_every_n_steps=3 * fused)
    host_trainer, host_exp = _fit(False, **kw)
    _forbid_training_feeder(monkeypatch)
    device_trainer, device_exp = _fit(True, **kw)
    for a, b in zip(params_of(host_exp), params_of(device_exp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert device_trainer.history.metrics == host_trainer.history.metrics
    assert device_trainer.global_step == host_trainer.global_step == 2 * (200 // 32)


def test_gather_in_step_resumes_exactly_mid_epoch(monkeypatch, tmp_path):
    _forbid_training_feeder(monkeypatch)
    straight_trainer, straight = _fit(True, log_every_n_steps=2)

    def trainer(**kw):
        ckpt = solstice.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=9)
        kw.setdefault("max_epochs", 2)
        return solstice.Trainer(
            enable_progress_bar=False, log_every_n_steps=2, callbacks=[ckpt], **kw
        )

    trainer(max_steps=9).fit(make_mlp_experiment(in_size=8, num_classes=4), _dm(True))
    resumed_trainer = trainer()
    resumed = resumed_trainer.fit(
        make_mlp_experiment(in_size=8, num_classes=4), _dm(True), ckpt_path="last"
    )
    resumed_trainer.flush_logs()
    assert resumed_trainer.global_step == straight_trainer.global_step == 12
    for a, b in zip(params_of(straight), params_of(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed_trainer.callback_metrics == straight_trainer.callback_metrics


def test_device_data_on_other_devices_falls_back_to_the_feeder():
    # the datamodule's mesh spans every device while the Trainer uses one: batches are moved
    trainer = solstice.Trainer(max_epochs=1, enable_progress_bar=False, devices=1)
    with pytest.warns(RuntimeWarning, match="other devices than the Trainer's") as caught:
        exp = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), _dm(True))
    assert len([w for w in caught if "other devices" in str(w.message)]) == 1  # once
    assert len(params_of(exp)[0].sharding.device_set) == 1
