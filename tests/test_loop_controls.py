"""Lightning's loop controls through `Trainer.fit`: `val_check_interval` (int, float,
timedelta; within epochs or across them), `min_epochs`/`min_steps`, `max_time` and
`overfit_batches`, with EarlyStopping and ModelCheckpoint acting after each validation and an
exact resume from a signal that came during a validation within an epoch.

The data: 256 training samples in batches of 32 (8 steps an epoch), 70 validation samples in
batches of 32 (3 batches). Time is driven by a clock that advances one second per training
step, so nothing sleeps.
"""

import csv
import datetime
import json
import logging
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import blobs_datamodule, make_mlp_experiment, params_of

import solstice
from solstice.callbacks import Callback, EarlyStopping, ModelCheckpoint


def _exp():
    return make_mlp_experiment(in_size=8, num_classes=4)


def _trainer(*callbacks, **kwargs):
    kwargs.setdefault("max_epochs", 2)
    return solstice.Trainer(
        devices=1, enable_progress_bar=False, callbacks=list(callbacks), **kwargs
    )


class Validations(Callback):
    """The global step of every validation of the fit."""

    def __init__(self):
        self.steps = []

    def on_validation_end(self, trainer, experiment):
        self.steps.append(trainer.global_step)


class StepClock(Callback):
    """`trainer.clock`: one second per training step."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
        self.now += 1.0


class Scores(Callback):
    """A scripted `val/score`, one value per validation of the fit."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.given = 0

    def provided_metrics(self):
        return ("val/score",)

    def on_validation_end(self, trainer, experiment):
        trainer.log_metrics({"val/score": self.scores[self.given]})
        self.given += 1


def _fit_validations(**kwargs):
    seen = Validations()
    trainer = _trainer(seen, **kwargs)
    trainer.fit(_exp(), blobs_datamodule())
    trainer.flush_logs()
    assert trainer.progress.validation_runs == len(seen.steps)
    assert trainer.history.steps["val/loss"] == seen.steps  # each published at its step
    return seen.steps


# ---------------------------------------------------------------------- val_check_interval
@pytest.mark.parametrize(
    ("kwargs", "steps"),
    [
        ({"val_check_interval": 1.0}, [8, 16]),  # epoch ends, the default
        ({"val_check_interval": 3}, [3, 6, 11, 14]),  # batches within each epoch
        ({"val_check_interval": 0.3}, [2, 4, 6, 8, 10, 12, 14, 16]),  # int(8 * 0.3) = 2
        # every 5 steps counted across epoch boundaries, never at epoch ends
        ({"val_check_interval": 5, "check_val_every_n_epoch": None}, [5, 10, 15]),
        # only in the epochs check_val_every_n_epoch selects
        ({"val_check_interval": 4, "check_val_every_n_epoch": 2}, [12, 16]),
        # fused steps: an int interval is a multiple of them, so validation is exact
        (
            {"val_check_interval": 4, "check_val_every_n_epoch": None, "steps_per_execution": 2},
            [4, 8, 12, 16],
        ),
        # a fraction lands at the first call boundary at or after it: calls end at
        # steps 3, 6, 7, 8 | 9, 12, 15, 16 (fused calls align with multiples of 3)
        (
            {"val_check_interval": 0.5, "steps_per_execution": 3, "log_every_n_steps": 3},
            [6, 8, 12, 16],
        ),
    ],
)
def test_validation_steps_by_interval(kwargs, steps):
    assert _fit_validations(**kwargs) == steps


def test_timed_validation_follows_the_clock():
    clock, seen = StepClock(), Validations()
    trainer = _trainer(clock, seen, val_check_interval=datetime.timedelta(seconds=3))
    trainer.clock = clock
    trainer.fit(_exp(), blobs_datamodule())
    # 3 s since the fit started, then since the last validation ended
    assert seen.steps == [3, 6, 9, 12, 15]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_check_interval": 1.5}, "must be in (0, 1]"),
        ({"val_check_interval": 0}, "must be an int >= 1"),
        ({"val_check_interval": "1h"}, "must be an int"),
        ({"val_check_interval": 0.5, "check_val_every_n_epoch": None}, "fraction of an epoch"),
        ({"check_val_every_n_epoch": None}, "would never validate"),
        ({"val_check_interval": 3, "steps_per_execution": 2}, "not a multiple"),
        ({"val_check_interval": datetime.timedelta(0)}, "positive"),
        ({"min_epochs": -1}, "min_epochs"),
        ({"min_steps": 1.5}, "min_steps"),
        ({"max_time": "1:00:00"}, "DD:HH:MM:SS"),
        ({"max_time": {"hourz": 1}}, "hourz"),
        ({"max_time": 0}, "duration"),
        ({"max_time": "00:00:00:00"}, "positive"),
        ({"overfit_batches": 1.5}, "[0, 1]"),
        ({"overfit_batches": 2, "limit_train_batches": 4}, "overfit_batches=2"),
    ],
)
def test_bad_loop_controls_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError)) as info:
        _trainer(**kwargs)
    assert message in str(info.value)


def test_an_interval_longer_than_the_epoch_is_named():
    trainer = _trainer(val_check_interval=9)
    with pytest.raises(ValueError, match=r"at most the number of training batches .*\(8\)"):
        trainer.fit(_exp(), blobs_datamodule())


def test_fast_dev_run_validates_its_one_batch_whatever_the_interval():
    assert _fit_validations(fast_dev_run=True, val_check_interval=5) == [1]


def test_max_time_formats():
    for value in ("00:01:30:00", {"hours": 1, "minutes": 30}, datetime.timedelta(minutes=90)):
        assert _trainer(max_time=value).max_time == datetime.timedelta(hours=1, minutes=30)


# ---------------------------------------------------------------------- callbacks within epochs
def test_early_stopping_acts_after_a_validation_within_an_epoch():
    # patience 1: 5 (best), 4 (best), 4.5 (worse: stop) -> the third validation, at step 6
    stopper = EarlyStopping("val/score", patience=1)
    trainer = _trainer(Scores([5.0, 4.0, 4.5, 4.6]), stopper, val_check_interval=2)
    trainer.fit(_exp(), blobs_datamodule())
    assert trainer.global_step == 6 and trainer.current_epoch == 1  # the epoch's end ran
    assert trainer.stopped["by"] == "EarlyStopping" and trainer.stopped["global_step"] == 6
    assert stopper.best_score == 4.0 and stopper.wait_count == 1


def test_early_stopping_restores_the_best_of_several_checks_in_an_epoch():
    stopper = EarlyStopping("val/score", patience=5, restore_best=True)
    best = Snapshot(at_step=4)
    scores = Scores([5.0, 4.0, 4.5, 4.6])
    trainer = _trainer(scores, stopper, best, val_check_interval=2, max_epochs=1)
    result = trainer.fit(_exp(), blobs_datamodule())
    assert stopper.best_score == 4.0 and trainer.global_step == 8
    for a, b in zip(best.params, params_of(result), strict=True):
        assert (a == np.asarray(b)).all()


class Snapshot(Callback):
    """The parameters (host copies) as they are after the validation at `at_step`."""

    def __init__(self, at_step):
        self.at_step, self.params = at_step, None

    def on_validation_end(self, trainer, experiment):
        if trainer.global_step == self.at_step:
            self.params = [np.array(p) for p in params_of(experiment)]


def _metadata(path) -> dict:
    return json.loads((Path(path) / "solstice.json").read_text())


def test_top_k_checkpoints_are_written_right_after_each_validation(tmp_path):
    checkpoint = ModelCheckpoint(tmp_path, monitor="val/score", mode="min", save_top_k=2)
    scores = Scores([5.0, 4.0, 4.5, 3.0])
    trainer = _trainer(scores, checkpoint, val_check_interval=2, max_epochs=1)
    trainer.fit(_exp(), blobs_datamodule())
    kept = sorted(p.name for p in tmp_path.iterdir() if (p / "solstice.json").exists())
    # the best two (steps 8 and 4); the epoch end (step 8) adds no duplicate
    assert kept == ["epoch=0-step=4", "epoch=0-step=8"]
    document = _metadata(tmp_path / "epoch=0-step=4")
    assert document["checkpoint"]["reason"] == "validation"
    assert document["checkpoint"]["score"] == 4.0
    assert document["progress"]["global_step"] == 4
    assert document["progress"]["validation_runs"] == 2  # taken after that validation
    assert document["callback_metrics"]["val/score"] == 4.0
    assert Path(checkpoint.best_model_path).name == "epoch=0-step=8"
    assert checkpoint.best_model_score == 3.0


# ---------------------------------------------------------------------- exact resume
class SigtermInValidation(Callback):
    """SIGTERM at the first batch of the validation at global step `step`."""

    def __init__(self, step):
        self.step = step

    def on_validation_batch_start(self, trainer, experiment, batch, batch_idx):
        if trainer.global_step == self.step and batch_idx == 0:
            signal.raise_signal(signal.SIGTERM)


class SigtermBeforeValidation(Callback):
    """SIGTERM during step `step`, after which a validation is due."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
        if trainer.global_step == self.step:
            signal.raise_signal(signal.SIGTERM)


def test_sigterm_at_or_during_a_validation_within_an_epoch_resumes_bit_for_bit(tmp_path):
    def trainer(folder, *callbacks):
        return _trainer(
            *callbacks,
            EarlyStopping("val/loss", patience=100),
            ModelCheckpoint(tmp_path / folder, every_n_epochs=None),
            val_check_interval=3,
            log_every_n_steps=2,
        )

    reference = trainer("reference")
    expected = reference.fit(_exp(), blobs_datamodule())
    reference.flush_logs()
    for name, sender in [
        ("during", SigtermInValidation(step=11)),  # the validation stops before its 2nd batch
        ("before", SigtermBeforeValidation(step=11)),  # the boundary saves before validating
    ]:
        interrupted = trainer(name, sender)
        with pytest.raises(SystemExit) as info:
            interrupted.fit(_exp(), blobs_datamodule())
        assert info.value.code == 128 + signal.SIGTERM
        path = interrupted.checkpoint_callbacks[0].last_model_path
        progress = _metadata(path)["progress"]
        assert progress["global_step"] == 11 and progress["batch_idx"] == 3
        assert progress["validation_pending"] and progress["validation_runs"] == 2

        resumed = trainer(name)
        result = resumed.fit(_exp(), blobs_datamodule(), ckpt_path=path)
        resumed.flush_logs()
        assert resumed.progress.state_dict() == reference.progress.state_dict(), name
        assert resumed.callback_metrics == reference.callback_metrics, name
        assert resumed.history.steps == reference.history.steps, name
        assert resumed.history.metrics == reference.history.metrics, name
        stoppers = [
            [cb.state_dict() for cb in t.callbacks if isinstance(cb, EarlyStopping)]
            for t in (reference, resumed)
        ]
        assert stoppers[0] == stoppers[1], name
        for a, b in zip(params_of(expected), params_of(result), strict=True):
            assert (np.asarray(a) == np.asarray(b)).all(), name


# ---------------------------------------------------------------------- min_epochs / min_steps
@pytest.mark.parametrize(
    ("kwargs", "global_step"),
    [
        ({}, 24),  # the stop at the end of epoch 2
        ({"min_epochs": 4}, 32),  # deferred to the end of epoch 3
        ({"min_steps": 28}, 28),  # deferred to step 28, within epoch 3
    ],
)
def test_min_epochs_and_min_steps_defer_early_stopping(caplog, kwargs, global_step):
    # one score per validation (epoch ends): patience 1 stops at epoch 2
    stopper = EarlyStopping("val/score", patience=1)
    trainer = _trainer(Scores([5.0, 4.0, 4.5, 4.6, 4.7]), stopper, max_epochs=10, **kwargs)
    with caplog.at_level(logging.INFO, logger="solstice"):
        trainer.fit(_exp(), blobs_datamodule())
    assert trainer.global_step == global_step
    assert trainer.stopped["by"] == "EarlyStopping" and trainer.stopped["epoch"] == 2
    deferred = [r for r in caplog.records if "has not been met" in r.getMessage()]
    assert len(deferred) == (1 if kwargs else 0)


class StopEveryStep(Callback):
    def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
        trainer.should_stop = True


@pytest.mark.parametrize(
    ("min_epochs", "min_steps", "global_step"), [(3, None, 24), (None, 12, 12)]
)
def test_should_stop_before_min_epochs_or_min_steps_waits(
    caplog, min_epochs, min_steps, global_step
):
    # Lightning: test_trainer_min_steps_and_min_epochs_not_reached (should_stop every step)
    trainer = _trainer(StopEveryStep(), max_epochs=10, min_epochs=min_epochs, min_steps=min_steps)
    with caplog.at_level(logging.INFO, logger="solstice"):
        trainer.fit(_exp(), blobs_datamodule())
    assert trainer.global_step == global_step
    message = (
        f"Trainer was signaled to stop but the required `min_epochs={min_epochs}` or "
        f"`min_steps={min_steps}` has not been met"
    )
    assert sum(message in r.getMessage() for r in caplog.records) == 1


def test_val_check_interval_checkpoint_files(tmp_path):
    # Lightning: test_val_check_interval_checkpoint_files (0.2 of 10 batches: every 2 steps)
    checkpoint = ModelCheckpoint(tmp_path, monitor="val/step", mode="max", save_top_k=-1)

    class StepAsMetric(Callback):
        def provided_metrics(self):
            return ("val/step",)

        def on_validation_end(self, trainer, experiment):
            trainer.log_metrics({"val/step": float(trainer.global_step)})

    trainer = _trainer(
        StepAsMetric(), checkpoint, val_check_interval=0.2, max_epochs=1, limit_train_batches=10
    )
    trainer.fit(_exp(), blobs_datamodule(n_train=320))
    files = {p.name for p in tmp_path.iterdir() if p.is_dir()}
    assert files == {f"epoch=0-step={s}" for s in [2, 4, 6, 8, 10]}


# ---------------------------------------------------------------------- max_time
def _csv_steps(folder) -> list[int]:
    with open(folder / "metrics.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def test_max_time_stops_saves_and_a_resume_continues(tmp_path):
    reference = _trainer(log_every_n_steps=2, loggers=[solstice.CSVLogger(tmp_path / "ref")])
    expected = reference.fit(_exp(), blobs_datamodule())
    reference.close()

    clock = StepClock()
    checkpoint = ModelCheckpoint(tmp_path / "ckpts", every_n_epochs=None)
    logs = tmp_path / "logs"
    timed = _trainer(
        clock,
        checkpoint,
        max_time="00:00:00:05",
        log_every_n_steps=2,
        loggers=[solstice.CSVLogger(logs)],
    )
    timed.clock = clock
    timed.fit(_exp(), blobs_datamodule())  # returns normally
    timed.close()
    assert timed.global_step == 5
    assert timed.stopped["by"] == "max_time" and timed.stopped["final"] is False
    document = _metadata(checkpoint.last_model_path)
    assert document["checkpoint"]["reason"] == "interrupt"
    assert document["progress"]["global_step"] == 5
    assert _csv_steps(logs)[-1] == 4  # flushed; the open interval is the checkpoint's

    again = ModelCheckpoint(tmp_path / "ckpts", every_n_epochs=None)
    resumed = _trainer(again, log_every_n_steps=2, loggers=[solstice.CSVLogger(logs)])
    result = resumed.fit(_exp(), blobs_datamodule(), ckpt_path="last")
    resumed.flush_logs()
    resumed.close()
    assert resumed.global_step == 16 and resumed.stopped is None
    assert resumed.history.metrics == reference.history.metrics
    assert _csv_steps(logs) == _csv_steps(tmp_path / "ref")  # the same log, continued
    for a, b in zip(params_of(expected), params_of(result)):
        assert (np.asarray(a) == np.asarray(b)).all()


# ---------------------------------------------------------------------- overfit_batches
class Batches(Callback):
    """The labels of every training batch (by epoch) and validation batch."""

    def __init__(self):
        self.train, self.val = {}, []

    def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
        self.train.setdefault(trainer.current_epoch, []).append(np.asarray(batch["image"]))

    def on_validation_batch_start(self, trainer, experiment, batch, batch_idx):
        self.val.append(np.asarray(batch["image"]))


def test_overfit_batches_trains_and_validates_on_the_same_batches():
    seen, count = Batches(), 3
    trainer = _trainer(seen, max_epochs=3, overfit_batches=count)
    trainer.fit(_exp(), blobs_datamodule())
    first = seen.train[0]
    assert len(first) == count and trainer.global_step == 3 * count
    for epoch in (1, 2):
        assert all((a == b).all() for a, b in zip(first, seen.train[epoch], strict=True))
    assert len(seen.val) == 3 * count  # one validation per epoch, on those batches
    for i, batch in enumerate(seen.val):
        assert (batch == first[i % count]).all()
    # ... which are batches of the training split, not of the validation split
    train = blobs_datamodule().splits["train"]["image"]
    rows = {row.tobytes() for row in train}
    assert all(row.tobytes() in rows for batch in first for row in batch)


def test_the_step_boundaries_of_loop_controls_never_read_the_device(monkeypatch):
    from test_no_sync import _PerStepReads, _ReadCounter

    counter = _ReadCounter()
    counter.install(monkeypatch)
    probe = _PerStepReads(counter)
    trainer = _trainer(
        probe,
        val_check_interval=datetime.timedelta(hours=1),  # the clocks are read at every step
        max_time={"hours": 1},
        min_steps=4,
    )
    trainer.fit(_exp(), blobs_datamodule())
    assert len(probe.reads_per_step) == 16
    assert sum(probe.reads_per_step) == 0, probe.reads_per_step
