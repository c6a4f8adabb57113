"""EarlyStopping: Lightning's rules on metric sequences, state across a resume, restore_best."""

import math
import types

import equinox as eqx
import jax
import numpy as np
import pytest
from helpers import blobs_datamodule, make_mlp_experiment

import solstice
from solstice.callbacks import Callback, EarlyStopping, ModelCheckpoint


class _FakeTrainer(types.SimpleNamespace):
    """What EarlyStopping reads of a Trainer, and its `stop` request."""

    def __init__(self, callback_metrics=None, current_epoch=0):
        super().__init__(
            callback_metrics=dict(callback_metrics or {}),
            current_epoch=current_epoch,
            global_step=current_epoch,
            should_stop=False,
            stopped=None,
            fitting=True,
            val_check_interval=None,
        )

    def stop(self, reason, *, by):
        self.should_stop, self.stopped = True, (by, reason)


def _feed(es: EarlyStopping, values, validated=None):
    """Run `es` over one value per epoch; return the epoch it stopped at (or None)."""
    trainer = _FakeTrainer()
    es.on_train_start(trainer, None)
    for epoch, value in enumerate(values):
        trainer.current_epoch = epoch
        if validated is None or epoch in validated:
            trainer.callback_metrics[es.monitor] = value
            es.on_validation_end(trainer, None)
        es.on_train_epoch_end(trainer, None)
        if trainer.should_stop:
            return epoch
    return None


@pytest.mark.parametrize(
    ("kwargs", "values", "stop"),
    [
        # patience counts checks without improvement after the best
        (dict(mode="min", patience=3), [6, 5, 5, 5, 5, 5], 4),
        (dict(mode="min", patience=3), [6, 5, 5, 4.9, 5, 5], None),
        (dict(mode="max", patience=1), [0.1, 0.2, 0.2], 2),
        (dict(mode="min", patience=0), [3, 2, 2], 2),
        # min_delta: an improvement must beat the best by more than min_delta
        (dict(mode="max", patience=2, min_delta=0.1), [0.5, 0.55, 0.58, 0.7], 2),
        (dict(mode="max", patience=2, min_delta=0.1), [0.5, 0.61, 0.65, 0.72], None),
        (dict(mode="min", patience=2, min_delta=0.5), [10, 9.6, 9.0, 8.8, 8.7], 4),
        # thresholds stop at once
        (dict(mode="min", stopping_threshold=0.3), [1.0, 0.5, 0.29, 0.1], 2),
        (dict(mode="max", stopping_threshold=0.9), [0.5, 0.95], 1),
        (dict(mode="min", divergence_threshold=5.0), [1.0, 2.0, 6.0], 2),
        (dict(mode="max", divergence_threshold=0.1), [0.5, 0.05], 1),
        # non-finite values stop unless check_finite=False
        (dict(mode="min"), [1.0, math.nan], 1),
        (dict(mode="min", patience=2, check_finite=False), [1.0, math.nan, math.inf, 0.5], 2),
    ],
)
def test_stopping_sequences(kwargs, values, stop):
    es = EarlyStopping("val/loss", **kwargs)
    assert _feed(es, values) == stop
    if stop is not None:
        assert es.stopped_epoch == stop and es.stop_reason


def test_validation_metrics_are_checked_only_when_fresh():
    # validation every other epoch: the stale value in between is not a check
    es = EarlyStopping("val/loss", patience=2)
    assert _feed(es, [5, 5, 5, 5, 5, 5, 5], validated={0, 2, 4, 6}) == 4
    # training epoch metrics are checked every epoch, validation or not
    es = EarlyStopping("train/loss_epoch", patience=2)
    trainer = _FakeTrainer()
    es.on_train_start(trainer, None)
    for epoch in range(3):
        trainer.current_epoch = epoch
        trainer.callback_metrics["train/loss_epoch"] = 5.0
        es.on_train_epoch_end(trainer, None)
    assert trainer.should_stop and es.stopped_epoch == 2


def test_state_survives_a_round_trip():
    es = EarlyStopping("val/loss", patience=3)
    assert _feed(es, [6, 5, 5, 5]) is None
    state = es.state_dict()
    assert state == {"wait_count": 2, "best_score": 5.0, "best_epoch": 1, "stopped_epoch": 0}
    fresh = EarlyStopping("val/loss", patience=3)
    fresh.load_state_dict(state)
    trainer = _FakeTrainer({"val/loss": 5.0}, current_epoch=4)
    fresh.on_validation_end(trainer, None)
    fresh.on_train_epoch_end(trainer, None)
    assert trainer.should_stop and fresh.stopped_epoch == 4


def test_bad_arguments_and_missing_metric():
    with pytest.raises(ValueError, match="'min' or 'max'"):
        EarlyStopping("val/loss", mode="best")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping("val/loss", patience=-1)
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStopping("val/loss", min_delta=-0.1)
    es = EarlyStopping("val/los")
    trainer = _FakeTrainer({"val/loss": 1.0, "val/accuracy": 0.5})
    es.on_train_start(trainer, None)
    es.on_validation_end(trainer, None)
    with pytest.raises(ValueError, match=r"`val/los`(.|\n)*`val/accuracy`, `val/loss`"):
        es.on_train_epoch_end(trainer, None)
    # a validation metric that never appears (no validation ran) is reported at the end
    es = EarlyStopping("val/loss")
    trainer.callback_metrics = {"train/loss_epoch": 1.0}
    es.on_train_start(trainer, None)
    es.on_train_epoch_end(trainer, None)
    with pytest.raises(ValueError, match="`train/loss_epoch`"):
        es.on_train_end(trainer, None)


class _Scores(Callback):
    """Publishes `val/score` from a fixed sequence at each validation."""

    def __init__(self, values):
        self.values = values

    def provided_metrics(self):
        return ("val/score",)

    def on_validation_end(self, trainer, experiment):
        trainer.log_metrics({"val/score": self.values[trainer.current_epoch]})


SCORES = [5.0, 4.0, 4.5, 4.2, 4.1, 3.0, 2.0, 1.0]


def _kwargs(restore_best=False, extra=()):
    return dict(
        max_epochs=8,
        log_every_n_steps=4,
        devices=1,
        enable_progress_bar=False,
        callbacks=[
            _Scores(SCORES),
            EarlyStopping("val/score", patience=3, restore_best=restore_best),
            *extra,
        ],
    )


def test_real_fit_stops_and_resumes_with_its_state():
    trainer = solstice.Trainer(**_kwargs())
    trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
    assert trainer.current_epoch == 5 and trainer.global_step == 40  # stopped after epoch 4
    # interrupted inside epoch 2 (wait count 1) and resumed: stops at the same step
    report = solstice.check_resume(
        lambda: make_mlp_experiment(in_size=8, num_classes=4),
        blobs_datamodule,
        _kwargs,
        interrupt_at=20,
    )
    assert report, report


def test_restore_best(tmp_path):
    ckpt = ModelCheckpoint(tmp_path, save_top_k=-1)
    trainer = solstice.Trainer(**_kwargs(restore_best=True, extra=[ckpt]))
    best = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
    epoch1 = solstice.load(
        tmp_path / "epoch=1-step=16", like=make_mlp_experiment(in_size=8, num_classes=4)
    )
    for a, b in zip(
        jax.tree.leaves(eqx.filter(best.model, eqx.is_array)),
        jax.tree.leaves(eqx.filter(epoch1.model, eqx.is_array)),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert trainer.experiment is best
