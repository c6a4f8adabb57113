"""Lightning's own tests of `EarlyStopping`, `check_val_every_n_epoch`, `ModelCheckpoint` and the
hook order of `fit`, ported to Solstice.

Each test names the test of Lightning-AI/pytorch-lightning it comes from (files under
`tests/tests_pytorch/`) and keeps its inputs and expected values. Where Solstice differs on
purpose, the difference is written down next to the line it changes. Differences common to
every test here:

- Lightning's model logs the monitored value itself (`self.log("val_loss",
  losses[self.current_epoch])` in `on_validation_epoch_end`). Here `Scripted.eval_step` returns
  the value of the epoch as a metric, so the Trainer computes and publishes it: Solstice's
  names are `"{stage}/{name}"` (`val/loss`), and a training metric is monitored through its
  epoch mean, `train/<name>_epoch`.
- The sanity check before training (`num_sanity_val_steps=2`, as Lightning's) calls no hook
  and logs nothing: Lightning calls `on_sanity_check_start/end` and the validation hooks
  around it.
- `EarlyStopping` checks at the end of every epoch in which its metric was computed, which is
  Lightning's `check_on_train_epoch_end` behaviour for training metrics and its validation-end
  check for validation metrics: there is no `check_on_train_epoch_end` argument.
- `ModelCheckpoint` writes a directory `epoch=E-step=S` per checkpoint (no `filename=`
  template), and the checkpoint kept by `save_last` is the most recent of them, not a
  separate `last.ckpt` copy. `save_last` defaults to True (Lightning: off), so the ports pass
  Lightning's value explicitly.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solstice
from solstice.callbacks import Callback, EarlyStopping, ModelCheckpoint
from solstice.datamodules import ArrayDataModule

STEPS_PER_EPOCH = 2
BATCH = 2


class Values(solstice.Metrics):
    """Named values, averaged over the samples of every batch merged (each sample of a batch
    carries the batch's value, so a split of one value averages to that value)."""

    totals: dict[str, jax.Array]
    count: jax.Array

    def __init__(self, values: dict[str, jax.Array], n: int):
        self.totals = {k: v * n for k, v in values.items()}
        self.count = jnp.asarray(n, jnp.float32)

    def merge(self, other: "Values") -> "Values":
        totals = {k: self.totals[k] + other.totals[k] for k in self.totals}
        return eqx.tree_at(lambda m: (m.totals, m.count), self, (totals, self.count + other.count))

    def compute(self) -> dict[str, jax.Array]:
        return {k: v / self.count for k, v in self.totals.items()}


class Scripted(solstice.Experiment):
    """Reports, in epoch e, the e-th value of each given sequence (the last one once a sequence
    runs out): `val` from `eval_step` (monitored as `val/<name>`), `train` from `train_step`
    (monitored as `train/<name>_epoch`). It counts its steps to know the epoch."""

    steps: jax.Array
    val: tuple[tuple[str, tuple[float, ...]], ...] = eqx.field(static=True)
    train: tuple[tuple[str, tuple[float, ...]], ...] = eqx.field(static=True)

    def __init__(self, val: dict | None = None, train: dict | None = None):
        self.steps = jnp.zeros((), jnp.int32)
        self.val = tuple((k, tuple(map(float, v))) for k, v in (val or {"loss": [0]}).items())
        self.train = tuple((k, tuple(map(float, v))) for k, v in (train or {"loss": [0]}).items())

    @staticmethod
    def _at(sequences, epoch):
        return {
            name: jnp.asarray(values, jnp.float32)[jnp.clip(epoch, 0, len(values) - 1)]
            for name, values in sequences
        }

    def train_step(self, batch):
        values = self._at(self.train, self.steps // STEPS_PER_EPOCH)
        new = eqx.tree_at(lambda e: e.steps, self, self.steps + 1)
        return new, Values(values, batch["x"].shape[0])

    def eval_step(self, batch):
        # validation follows the epoch's last step: the epoch is steps // STEPS_PER_EPOCH - 1
        values = self._at(self.val, self.steps // STEPS_PER_EPOCH - 1)
        return Values(values, batch["x"].shape[0])


def _data(validation: bool = True, train_batches: int = STEPS_PER_EPOCH) -> ArrayDataModule:
    return ArrayDataModule(
        train={"x": np.zeros((train_batches * BATCH, 1), np.float32)},
        val={"x": np.zeros((2 * BATCH, 1), np.float32)} if validation else None,
        batch_size=BATCH,
    )


def _fit(experiment, callbacks, validation=True, **kw):
    trainer = solstice.Trainer(
        devices=1, enable_progress_bar=False, callbacks=callbacks, **{"max_epochs": 10, **kw}
    )
    trainer.fit(experiment, _data(validation))
    return trainer


# ======================================================================= EarlyStopping
# from tests/tests_pytorch/callbacks/test_early_stopping.py


PATIENCE_CASES = [
    ([6, 5, 5, 5, 5, 5], 3, 4),
    ([6, 5, 4, 4, 3, 3], 1, 3),
    ([6, 5, 6, 5, 5, 5], 3, 4),
]


@pytest.mark.parametrize(("loss_values", "patience", "expected_stop_epoch"), PATIENCE_CASES)
def test_early_stopping_patience(loss_values, patience, expected_stop_epoch):
    # Lightning: test_early_stopping_patience (monitor "test_val_loss", max_epochs=10)
    es = EarlyStopping("val/loss", patience=patience)
    trainer = _fit(Scripted(val={"loss": loss_values}), [es])
    assert trainer.current_epoch - 1 == expected_stop_epoch
    assert es.stopped_epoch == expected_stop_epoch


@pytest.mark.parametrize("validation", [False, True], ids=["no_validation", "validation"])
@pytest.mark.parametrize(("loss_values", "patience", "expected_stop_epoch"), PATIENCE_CASES)
def test_early_stopping_patience_train(validation, loss_values, patience, expected_stop_epoch):
    # Lightning: test_early_stopping_patience_train (`validation_step_none` True/False,
    # monitor "train_loss" logged in on_train_epoch_end, check_on_train_epoch_end=True).
    # Difference: the metric is the epoch mean of the training steps' `loss`.
    es = EarlyStopping("train/loss_epoch", patience=patience)
    trainer = _fit(Scripted(train={"loss": loss_values}), [es], validation=validation)
    assert trainer.current_epoch - 1 == expected_stop_epoch


def test_early_stopping_no_val_step():
    # Lightning: test_early_stopping_no_val_step (train metric, no validation, min_delta=0.1,
    # patience=0; it asserts only `current_epoch < max_epochs - 1`). Difference: Lightning
    # trains a real classifier; here the loss falls by 0.05 an epoch, less than min_delta,
    # so the first epoch after the best is already no improvement (Lightning's rule:
    # improved iff `current < best - min_delta`).
    es = EarlyStopping("train/loss_epoch", min_delta=0.1, patience=0)
    trainer = _fit(Scripted(train={"loss": [1.0, 0.95, 0.9, 0.85]}), [es], validation=False)
    assert trainer.current_epoch < trainer.max_epochs - 1
    assert es.stopped_epoch == 1 and es.best_score == 1.0


@pytest.mark.parametrize(
    ("stopping_threshold", "divergence_threshold", "losses", "expected_epoch"),
    [
        (None, None, [8, 4, 2, 3, 4, 5, 8, 10], 5),
        (2.9, None, [9, 8, 7, 6, 5, 6, 4, 3, 2, 1], 8),
        (None, 15.9, [9, 4, 2, 16, 32, 64], 3),
    ],
)
def test_early_stopping_thresholds(
    stopping_threshold, divergence_threshold, losses, expected_epoch
):
    # Lightning: test_early_stopping_thresholds (monitor "abc", max_epochs=20)
    es = EarlyStopping(
        "val/abc", stopping_threshold=stopping_threshold, divergence_threshold=divergence_threshold
    )
    trainer = _fit(Scripted(val={"abc": losses}), [es], max_epochs=20)
    assert trainer.current_epoch - 1 == expected_epoch, "early_stopping failed"


@pytest.mark.parametrize("stop_value", [math.inf, math.nan], ids=["inf", "nan"])
def test_early_stopping_on_non_finite_monitor(stop_value):
    # Lightning: test_early_stopping_on_non_finite_monitor
    losses = [4, 3, stop_value, 2, 1]
    expected_stop_epoch = 2
    es = EarlyStopping("val/loss", check_finite=True)
    trainer = _fit(Scripted(val={"loss": losses}), [es])
    assert trainer.current_epoch - 1 == expected_stop_epoch
    assert es.stopped_epoch == expected_stop_epoch


@pytest.mark.parametrize(
    ("values", "kwargs", "reason", "expected_stop_epoch"),
    [
        # ModelWithHighLoss: patience exhausted
        ([10.0], dict(patience=2), "did not improve", 2),
        # ModelWithDecreasingLoss: stopping threshold
        ([5.0, 3.0, 1.0, 0.5, 0.1], dict(stopping_threshold=0.6), "Stopping threshold reached", 3),
        # ModelWithIncreasingLoss: divergence threshold. Difference: Solstice's message says
        # "Divergence threshold passed: `val/loss` = 10 is above 8.0" (Lightning: "reached").
        ([1.0, 2.0, 5.0, 10.0, 15.0], dict(divergence_threshold=8.0), "Divergence threshold", 3),
        # ModelWithNaNLoss: non-finite metric
        ([1.0, 0.5, math.nan], dict(check_finite=True), "is not finite", 2),
    ],
    ids=["patience", "stopping_threshold", "divergence_threshold", "non_finite"],
)
def test_early_stopping_reasons(values, kwargs, reason, expected_stop_epoch):
    # Lightning: test_early_stopping_reasons (max_epochs=10). Difference: Solstice has no
    # `EarlyStoppingReason` enum; `stop_reason` is the message, None while not stopped.
    es = EarlyStopping("val/loss", **kwargs)
    _fit(Scripted(val={"loss": values}), [es])
    assert es.stop_reason is not None and reason in es.stop_reason
    assert es.stopped_epoch == expected_stop_epoch > 0


def test_early_stopping_reasons_not_stopped():
    # Lightning: test_early_stopping_reasons, ModelWithImprovingLoss (patience=3, max_epochs=3)
    es = EarlyStopping("val/loss", patience=3)
    _fit(Scripted(val={"loss": [5.0, 4.0, 3.0, 2.0, 1.0]}), [es], max_epochs=3)
    assert es.stop_reason is None
    assert es.stopped_epoch == 0


@pytest.mark.parametrize("abc_first", [True, False], ids=["abc_first", "cba_first"])
def test_multiple_early_stopping_callbacks(abc_first):
    # Lightning: test_multiple_early_stopping_callbacks, the single-device cases (the
    # ddp_spawn ones are not ported). EarlyStoppingModel logs "abc" from
    # [8, 4, 2, 3, 4, 5, 8, 10] and "cba" = 0: the first callback to say stop wins.
    callbacks = [EarlyStopping("val/abc"), EarlyStopping("val/cba", patience=3)]
    if not abc_first:
        callbacks.reverse()
    experiment = Scripted(val={"abc": [8, 4, 2, 3, 4, 5, 8, 10], "cba": [0]})
    trainer = _fit(experiment, callbacks, max_epochs=20)
    assert trainer.current_epoch - 1 == 3, "Early Stopping Failed"


def test_check_on_train_epoch_end_smart_handling():
    # Lightning: test_check_on_train_epoch_end_smart_handling, case "check_val_every_n_epoch"
    # (check_val_every_n_epoch=2, max_epochs=5): a validation metric is checked only after the
    # epochs that validate. Lightning mocks the criteria to answer (no stop, stop); here the
    # value never improves and patience=1 does the same: no stop at the first check (epoch 1),
    # stop at the second (epoch 3). A check of the stale value at epoch 2 would stop there.
    es = EarlyStopping("val/foo", patience=1)
    trainer = _fit(Scripted(val={"foo": [1]}), [es], max_epochs=5, check_val_every_n_epoch=2)
    assert trainer.current_epoch == 2 * trainer.check_val_every_n_epoch


def test_early_stopping_mode_options():
    # Lightning: test_early_stopping_mode_options. Difference: ValueError, not
    # MisconfigurationException (Solstice raises built-in exception types only).
    with pytest.raises(ValueError, match=r"mode='unknown_option'(.|\n)*'min' or 'max'"):
        EarlyStopping("val/foo", mode="unknown_option")


# ======================================================================= check_val_every_n_epoch
# from tests/tests_pytorch/trainer/flags/test_check_val_every_n_epoch.py


class _ValidationBatches(Callback):
    """Counts validation runs (`on_validation_epoch_start`) and, per training epoch, the
    validation batches run (Lightning reads the progress bar's `total_val_batches`)."""

    def __init__(self):
        self.val_epoch_calls = 0
        self.val_batches = []
        self.validation_called_at_step = set()
        self._batches = 0

    def on_validation_epoch_start(self, trainer, experiment):
        self.val_epoch_calls += 1

    def on_validation_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
        self._batches += 1
        self.validation_called_at_step.add(trainer.global_step)

    def on_train_epoch_end(self, trainer, experiment):
        self.val_batches.append(self._batches)
        self._batches = 0


@pytest.mark.parametrize(
    ("max_epochs", "expected_val_loop_calls", "expected_val_batches"),
    [(1, 0, [0]), (4, 2, [0, 2, 0, 2]), (5, 2, [0, 2, 0, 2, 0])],
)
def test_check_val_every_n_epoch(max_epochs, expected_val_loop_calls, expected_val_batches):
    # Lightning: test_check_val_every_n_epoch (limit_val_batches=2, check_val_every_n_epoch=2)
    counter = _ValidationBatches()
    _fit(
        Scripted(),
        [counter],
        max_epochs=max_epochs,
        limit_val_batches=2,
        check_val_every_n_epoch=2,
    )
    assert counter.val_epoch_calls == expected_val_loop_calls
    assert counter.val_batches == expected_val_batches


def test_check_val_every_n_epoch_with_max_steps():
    # Lightning: test_check_val_every_n_epoch_with_max_steps (2 training batches an epoch)
    data_samples_train = STEPS_PER_EPOCH
    check_val_every_n_epoch = 3
    max_epochs = 4
    counter = _ValidationBatches()
    trainer = _fit(
        Scripted(),
        [counter],
        max_epochs=None,
        max_steps=data_samples_train * max_epochs,
        check_val_every_n_epoch=check_val_every_n_epoch,
    )
    assert trainer.current_epoch == max_epochs
    assert trainer.global_step == max_epochs * data_samples_train
    assert list(counter.validation_called_at_step) == [data_samples_train * check_val_every_n_epoch]


# ======================================================================= ModelCheckpoint
# from tests/tests_pytorch/checkpointing/test_model_checkpoint.py


def _saved(dirpath) -> list[int]:
    """The epochs of the checkpoints in `dirpath` (checking each is named for its step)."""
    if not dirpath.exists():
        return []
    epochs = []
    for path in (p for p in dirpath.iterdir() if p.is_dir()):  # (not history.jsonl)
        epoch, step = (int(part.split("=")[1]) for part in path.name.split("-"))
        assert step == STEPS_PER_EPOCH * (epoch + 1), path.name
        epochs.append(epoch)
    return sorted(epochs)


def _path(dirpath, epoch) -> str:
    return str(dirpath / f"epoch={epoch}-step={STEPS_PER_EPOCH * (epoch + 1)}")


class _Saves(Callback):
    """The checkpoints `checkpoint` decided to write, in order (Lightning counts the calls of
    a mocked `trainer.save_checkpoint`): its `last_model_path` after every epoch end."""

    def __init__(self, checkpoint: ModelCheckpoint):
        self.checkpoint = checkpoint
        self.paths = []

    def _look(self):
        path = self.checkpoint.last_model_path
        if path and (not self.paths or self.paths[-1] != path):
            self.paths.append(path)

    def on_train_epoch_start(self, trainer, experiment):
        self._look()  # ModelCheckpoint runs last at an epoch end: look at the next start

    def on_train_end(self, trainer, experiment):
        self._look()


@pytest.mark.parametrize(
    ("save_top_k", "save_last", "expected_files"),
    [
        pytest.param(-1, False, [0, 1, 2, 3, 4], id="CASE K=-1  (all)"),
        pytest.param(0, False, [], id="CASE K=0 (none)"),
        pytest.param(1, False, [4], id="CASE K=1 (2.5, epoch 4)"),
        pytest.param(2, False, [2, 4], id="CASE K=2 (2.5 epoch 4, 2.8 epoch 2)"),
        pytest.param(4, False, [1, 2, 3, 4], id="CASE K=4 (save all 4 base)"),
        pytest.param(3, False, [2, 3, 4], id="CASE K=3 (save the 2nd, 3rd, 4th model)"),
        # Difference: Lightning keeps {"epoch=4.ckpt", "last.ckpt"}; in Solstice the last
        # checkpoint is the most recent one, here also the best: one directory.
        pytest.param(1, True, [4], id="CASE K=1 (save the 4th model and the last model)"),
    ],
)
def test_model_checkpoint_options(tmp_path, save_top_k, save_last, expected_files):
    # Lightning: test_model_checkpoint_options (losses [10, 9, 2.8, 5, 2.5] at 5 validation
    # ends; the K=0 case comes from its older version). Difference: Lightning calls
    # `on_validation_end` by hand with a mocked save; this is a real fit of 5 epochs.
    losses = [10, 9, 2.8, 5, 2.5]
    checkpoint = ModelCheckpoint(
        tmp_path, monitor="val/checkpoint_on", save_top_k=save_top_k, save_last=save_last
    )
    _fit(Scripted(val={"checkpoint_on": losses}), [checkpoint], max_epochs=len(losses))
    assert _saved(tmp_path) == expected_files


def test_model_checkpoint_topk_zero(tmp_path):
    # Lightning: test_model_checkpoint_topk_zero (no monitor, save_top_k=0, save_last=True,
    # max_epochs=2). Difference: the only checkpoint is the last epoch's directory, not
    # `last.ckpt`.
    checkpoint = ModelCheckpoint(tmp_path, save_top_k=0, save_last=True)
    _fit(Scripted(), [checkpoint], max_epochs=2)
    # these should not be set if monitor is None
    assert checkpoint.monitor is None
    assert checkpoint.best_model_path == ""
    assert checkpoint.best_model_score is None
    assert checkpoint.best_k_models == {}
    assert checkpoint.kth_best_model_path == ""
    # check that only the last ckpt was created
    assert _saved(tmp_path) == [1]
    assert checkpoint.last_model_path == _path(tmp_path, 1)


def test_model_checkpoint_topk_all(tmp_path):
    # Lightning: test_model_checkpoint_topk_all (monitor="epoch", mode="max", save_top_k=-1,
    # 3 epochs). Difference: the trainer's epoch is not a monitorable metric in Solstice;
    # the experiment reports it as `val/epoch`.
    epochs = 3
    checkpoint = ModelCheckpoint(
        tmp_path, monitor="val/epoch", mode="max", save_top_k=-1, save_last=False
    )
    _fit(Scripted(val={"epoch": range(epochs)}), [checkpoint], max_epochs=epochs)
    assert checkpoint.monitor == "val/epoch"
    assert checkpoint.best_model_path == _path(tmp_path, 2)
    assert checkpoint.best_model_score == epochs - 1
    assert len(_saved(tmp_path)) == len(checkpoint.best_k_models) == epochs
    assert set(checkpoint.best_k_models) == {_path(tmp_path, i) for i in range(epochs)}
    assert checkpoint.kth_best_model_path == _path(tmp_path, 0)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_checkpointing_with_nan_as_first(tmp_path, mode):
    # Lightning: test_checkpointing_with_nan_as_first (save_top_k=1): NaN ranks worst, so every
    # later value is better and is saved; the last is the best.
    monitor = [float("nan")]
    monitor += [5, 7, 8] if mode == "max" else [8, 7, 5]
    checkpoint = ModelCheckpoint(
        tmp_path, monitor="val/abc", mode=mode, save_top_k=1, save_last=False
    )
    saves = _Saves(checkpoint)
    _fit(Scripted(val={"abc": monitor}), [saves, checkpoint], max_epochs=len(monitor))
    # check that last one is also the best one
    assert len(saves.paths) == len(monitor)
    assert (
        mode == "min"
        and checkpoint.best_model_score == 5
        or mode == "max"
        and checkpoint.best_model_score == 8
    )


@pytest.mark.parametrize("mode", ["min", "max"])
def test_current_score_when_nan(tmp_path, mode):
    # Lightning: test_current_score_when_nan (max_epochs=1, save_top_k=1). Difference: there
    # is no `current_score` attribute; the score a checkpoint was ranked with is its entry in
    # `best_k_models`.
    checkpoint = ModelCheckpoint(
        tmp_path, monitor="val/foo", mode=mode, save_top_k=1, save_last=False
    )
    _fit(Scripted(val={"foo": [math.nan]}), [checkpoint], max_epochs=1)
    expected = float("inf" if mode == "min" else "-inf")
    assert checkpoint.best_model_score == expected
    assert checkpoint.best_k_models == {_path(tmp_path, 0): expected}


@pytest.mark.parametrize("every_n_epochs", list(range(4)))
def test_model_checkpoint_every_n_epochs(tmp_path, every_n_epochs):
    # Lightning: test_model_checkpoint_every_n_epochs (5 epochs, save_top_k=-1, no monitor)
    epochs = 5
    checkpoint = ModelCheckpoint(
        tmp_path, save_top_k=-1, save_last=False, every_n_epochs=every_n_epochs
    )
    _fit(Scripted(), [checkpoint], max_epochs=epochs)
    expected = (
        [e for e in range(epochs) if not (e + 1) % every_n_epochs] if every_n_epochs > 0 else []
    )
    assert _saved(tmp_path) == expected


def test_model_checkpoint_save_last_none_monitor(tmp_path):
    # Lightning: test_model_checkpoint_save_last_none_monitor (monitor=None, save_top_k=-1,
    # save_last=True, 2 epochs). Differences: no separate `last.ckpt` (the last checkpoint is
    # epoch 1's); and without a monitor Solstice ranks by recency, so `best_k_models` lists
    # the kept checkpoints with score None (Lightning leaves it empty).
    epochs = 2
    checkpoint = ModelCheckpoint(tmp_path, monitor=None, save_top_k=-1, save_last=True)
    _fit(Scripted(), [checkpoint], max_epochs=epochs)
    assert checkpoint.monitor is None
    assert checkpoint.best_model_path == _path(tmp_path, 1)
    assert checkpoint.last_model_path == _path(tmp_path, 1)
    assert checkpoint.best_model_score is None
    assert checkpoint.best_k_models == {_path(tmp_path, e): None for e in range(epochs)}
    assert checkpoint.kth_best_model_path == ""
    assert _saved(tmp_path) == [0, 1]


def test_ckpt_every_n_train_steps(tmp_path):
    # Lightning: test_ckpt_every_n_train_steps (every_n_train_steps=16, every_n_epochs=0,
    # save_top_k=-1, save_last=False, 2 epochs of 64 steps): a checkpoint every 16 steps.
    every_n_train_steps, max_epochs, epoch_length = 16, 2, 64
    checkpoint = ModelCheckpoint(
        tmp_path,
        every_n_epochs=0,
        every_n_train_steps=every_n_train_steps,
        save_top_k=-1,
        save_last=False,
    )
    trainer = solstice.Trainer(
        max_epochs=max_epochs, devices=1, enable_progress_bar=False, callbacks=[checkpoint]
    )
    trainer.fit(Scripted(), _data(validation=False, train_batches=epoch_length))
    steps = sorted(int(p.name.split("step=")[1]) for p in tmp_path.iterdir() if p.is_dir())
    assert steps == list(
        range(every_n_train_steps, max_epochs * epoch_length + 1, every_n_train_steps)
    )


def test_check_val_every_n_epochs_top_k_integration(tmp_path):
    # Lightning: test_check_val_every_n_epochs_top_k_integration (monitor="epoch",
    # save_top_k=-1, max_epochs=5, check_val_every_n_epoch=2): only the validated epochs 1
    # and 3 are ranked and kept. Difference: `save_last=False` (Lightning's default), since
    # Solstice's `save_last` would also keep the most recent state (epoch 4) for resuming.
    checkpoint = ModelCheckpoint(
        tmp_path, monitor="val/epoch", mode="max", save_top_k=-1, save_last=False
    )
    _fit(
        Scripted(val={"epoch": range(5)}),
        [checkpoint],
        max_epochs=5,
        check_val_every_n_epoch=2,
    )
    assert _saved(tmp_path) == [1, 3]
    assert checkpoint.best_k_models == {_path(tmp_path, 1): 1.0, _path(tmp_path, 3): 3.0}


def test_model_checkpoint_argument_checks(tmp_path):
    # Lightning: test_invalid_top_k, test_none_monitor_top_k, test_invalid_every_n_epochs,
    # test_invalid_every_n_train_steps, test_model_checkpoint_mode_options. Difference:
    # ValueError, not MisconfigurationException.
    with pytest.raises(ValueError, match=r">= -1"):
        ModelCheckpoint(tmp_path, save_top_k=-3)
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(save_top_k=3, monitor=None\)"):
        ModelCheckpoint(tmp_path, save_top_k=3)
    for k in (-1, 0, 1):  # these should not fail
        ModelCheckpoint(tmp_path, save_top_k=k)
    with pytest.raises(ValueError, match=r"every_n_epochs(.|\n)*>= 0"):
        ModelCheckpoint(tmp_path, every_n_epochs=-3)
    with pytest.raises(ValueError, match=r"every_n_train_steps(.|\n)*>= 0"):
        ModelCheckpoint(tmp_path, every_n_train_steps=-3)
    for n in (0, 1, 2):  # these should not fail
        ModelCheckpoint(tmp_path, every_n_epochs=n)
        ModelCheckpoint(tmp_path, every_n_train_steps=n)
    with pytest.raises(ValueError, match=r"mode='unknown_option'(.|\n)*'min' or 'max'"):
        ModelCheckpoint(tmp_path, mode="unknown_option")


# ======================================================================= hook order of fit
# from tests/tests_pytorch/models/test_hooks.py: test_trainer_model_hook_system_fit


def _lightning_fit_hooks(train_batches: int, val_batches: int) -> list[str]:
    """Lightning's expected list for `devices=1`, automatic optimization, without an
    `on_validation_model_train` override: hook names only, `[i]` for a batch index."""

    def eval_epoch():
        out = ["Callback.on_validation_epoch_start", "on_validation_epoch_start"]
        for i in range(val_batches):
            out += [
                "on_before_batch_transfer",
                "transfer_batch_to_device",
                "on_after_batch_transfer",
                f"Callback.on_validation_batch_start[{i}]",
                f"on_validation_batch_start[{i}]",
                "forward",
                "validation_step",
                f"Callback.on_validation_batch_end[{i}]",
                f"on_validation_batch_end[{i}]",
            ]
        return out + ["Callback.on_validation_epoch_end", "on_validation_epoch_end"]

    def validation():
        return [
            "train",
            "on_validation_model_eval",
            "Callback.on_validation_start",
            "on_validation_start",
            *eval_epoch(),
            "Callback.on_validation_end",
            "on_validation_end",
        ]

    train = []
    for i in range(train_batches):
        train += [
            "on_before_batch_transfer",
            "transfer_batch_to_device",
            "on_after_batch_transfer",
            f"Callback.on_train_batch_start[{i}]",
            f"on_train_batch_start[{i}]",
            "forward",
            "training_step",
            "Callback.on_before_zero_grad",
            "on_before_zero_grad",
            "optimizer_zero_grad",
            "Callback.on_before_backward",
            "on_before_backward",
            "backward",
            "Callback.on_after_backward",
            "on_after_backward",
            "Callback.on_before_optimizer_step",
            "on_before_optimizer_step",
            "clip_gradients",
            "configure_gradient_clipping",
            "optimizer_step",
            *(["lr_scheduler_step"] if i == train_batches - 1 else []),
            f"Callback.on_train_batch_end[{i}]",
            f"on_train_batch_end[{i}]",
        ]
    return [
        "configure_callbacks",
        "prepare_data",
        "Callback.setup",
        "setup",
        "configure_model",
        "configure_optimizers",
        "Callback.on_fit_start",
        "on_fit_start",
        "zero_grad",
        "Callback.on_sanity_check_start",
        "val_dataloader",
        *validation(),
        "Callback.on_sanity_check_end",
        "train_dataloader",
        "Callback.on_train_start",
        "on_train_start",
        "Callback.on_train_epoch_start",
        "on_train_epoch_start",
        *train,
        "zero_grad",
        "on_validation_model_zero_grad",
        *validation(),
        "Callback.on_train_epoch_end",
        "on_train_epoch_end",
        # `ModelCheckpoint.save_checkpoint` is called here
        "Callback.state_dict",
        "Callback.on_save_checkpoint",
        "on_save_checkpoint",
        "Callback.on_train_end",
        "on_train_end",
        "Callback.on_fit_end",
        "on_fit_end",
        "Callback.teardown",
        "teardown",
    ]


# The hooks of Lightning's list that Solstice has, under the same names (Solstice's `on_log`
# and `on_exception` have no Lightning counterpart and are not recorded).
SHARED_HOOKS = [
    f"on_{name}_{edge}"
    for name in (
        "fit",
        "train",
        "train_epoch",
        "train_batch",
        "validation",
        "validation_epoch",
        "validation_batch",
    )
    for edge in ("start", "end")
]


def _as_solstice(lightning: list[str]) -> list[str]:
    """Lightning's expected calls, with Solstice's deliberate differences applied."""
    # 1. The sanity check calls no hooks (Lightning: `on_sanity_check_*` and validation
    #    hooks around its batches).
    start = lightning.index("Callback.on_sanity_check_start")
    end = lightning.index("Callback.on_sanity_check_end")
    calls = lightning[:start] + lightning[end + 1 :]
    # 2. Only the hooks Solstice has. The others do not exist by design: a training step is
    #    one compiled function (no forward/backward/zero_grad/optimizer-step/clipping hooks
    #    inside it, and no train/eval mode switch), data comes from the DataModule (no
    #    dataloader or batch-transfer hooks), there is no setup/teardown/configure_* stage,
    #    and a checkpoint holds each callback's `state_dict()` (no `on_save_checkpoint`).
    #    Lightning's default ModelCheckpoint becomes an explicit one in the Solstice run.
    kept = {*SHARED_HOOKS, *(f"Callback.{h}" for h in SHARED_HOOKS), "Callback.state_dict"}
    calls = [c for c in calls if c.split("[")[0] in kept]
    # 3. Within a hook, Solstice calls the experiment first and then the callbacks (Lightning:
    #    callbacks first), so that callbacks see the experiment an experiment hook returns.
    out = []
    for call in calls:
        if out and out[-1] == f"Callback.{call}":
            out.insert(len(out) - 1, call)
        else:
            out.append(call)
    return out


CALLS: list[str] = []


def _tag(name, args):
    return f"{name}[{args[-1]}]" if "_batch_" in name else name


def _record_callback(name):
    def hook(self, trainer, experiment, *args):
        CALLS.append("Callback." + _tag(name, args))

    return hook


def _record_experiment(name):
    def hook(self, trainer, *args):
        CALLS.append(_tag(name, args))

    return hook


class _HookedCallback(Callback):
    def state_dict(self):
        CALLS.append("Callback.state_dict")
        return {"foo": True}


class _HookedExperiment(Scripted):
    pass


for _name in SHARED_HOOKS:
    setattr(_HookedCallback, _name, _record_callback(_name))
    setattr(_HookedExperiment, _name, _record_experiment(_name))


def test_trainer_model_hook_system_fit(tmp_path):
    # Lightning: test_trainer_model_hook_system_fit (max_epochs=1, limit_train_batches=2,
    # limit_val_batches=2, devices=1, automatic optimization)
    train_batches, val_batches = 2, 2
    CALLS.clear()
    trainer = solstice.Trainer(
        max_epochs=1,
        limit_train_batches=train_batches,
        limit_val_batches=val_batches,
        enable_progress_bar=False,
        devices=1,
        callbacks=[_HookedCallback(), ModelCheckpoint(tmp_path)],
    )
    data = ArrayDataModule(
        train={"x": np.zeros((8 * BATCH, 1), np.float32)},
        val={"x": np.zeros((8 * BATCH, 1), np.float32)},
        batch_size=BATCH,
    )
    trainer.fit(_HookedExperiment(), data)
    assert CALLS == _as_solstice(_lightning_fit_hooks(train_batches, val_batches))
