"""A resume continues the run that stopped, or says why it cannot: a stopped run stays
stopped, other settings are named, and every damaged checkpoint is reported."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import blobs_datamodule, make_mlp_experiment, params_of

import solstice
from solstice.callbacks import ModelCheckpoint
from solstice.checkpointing import CheckpointError
from solstice.datamodules import ArrayDataModule

WORKER = Path(__file__).with_name("stop_worker.py")


def _run_worker(ckpt_dir, max_epochs, *extra):
    out = subprocess.run(
        [sys.executable, str(WORKER), str(ckpt_dir), str(max_epochs), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=WORKER.parent,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_run_early_stopping_ended_stays_stopped_when_started_again(tmp_path):
    first = _run_worker(tmp_path, 6)
    assert first["stopped"]["by"] == "EarlyStopping" and first["stopped"]["epoch"] == 2
    assert first["global_step"] == 24  # 3 epochs of 8 steps, then the stop

    again = _run_worker(tmp_path, 6)  # a preemptible job's restart: `ckpt_path="last"`
    assert again["global_step"] == first["global_step"] and again["params"] == first["params"]
    assert any("stopped by EarlyStopping at epoch 2" in w for w in again["warnings"])

    # the user asks for more: a larger max_epochs, or continue_stopped=True, trains on
    raised = _run_worker(tmp_path, 7)
    assert raised["global_step"] > first["global_step"]


def test_continue_stopped_trains_on(tmp_path):
    first = _run_worker(tmp_path, 6)
    resumed = _run_worker(tmp_path, 6, "continue")
    assert resumed["global_step"] > first["global_step"]


def test_a_completed_run_says_there_is_nothing_to_train(tmp_path):
    ckpt = ModelCheckpoint(tmp_path)
    trainer = solstice.Trainer(max_epochs=2, enable_progress_bar=False, callbacks=[ckpt])
    done = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
    again = solstice.Trainer(
        max_epochs=2, enable_progress_bar=False, callbacks=[ModelCheckpoint(tmp_path)]
    )
    with pytest.warns(UserWarning, match="limits .* are reached, so `fit` returns"):
        same = again.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule(), "last")
    assert again.global_step == trainer.global_step
    for a, b in zip(params_of(done), params_of(same), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------- settings
def _checkpointed(tmp_path, **kw):
    """A run of 11 steps (mid-epoch: 8 per epoch) that saves at step 11."""
    ckpt = ModelCheckpoint(tmp_path, every_n_train_steps=11, every_n_epochs=None)
    kw = {"enable_progress_bar": False, "max_steps": 11, **kw}
    solstice.Trainer(callbacks=[ckpt], **kw).fit(
        make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule()
    )
    return ckpt.last_model_path


def _resume(path, datamodule=None, **kw):
    kw = {"enable_progress_bar": False, "max_steps": 13, **kw}
    trainer = solstice.Trainer(**kw)
    trainer.fit(
        make_mlp_experiment(in_size=8, num_classes=4),
        datamodule or blobs_datamodule(),
        ckpt_path=path,
    )
    return trainer


def test_another_batch_size_mid_epoch_is_refused(tmp_path):
    path = _checkpointed(tmp_path)
    with pytest.raises(
        ValueError, match="mid-epoch with a global batch size of 32; this run's is 16"
    ):
        _resume(path, blobs_datamodule(batch_size=16))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"seed": 1}, r"`seed` 0 in the checkpoint, 1 now: the seed keys"),
        ({"steps_per_execution": 2, "log_every_n_steps": 2}, r"`steps_per_execution` 1 .*, 2 now"),
        ({"devices": 2}, r"`devices` 4 in the checkpoint, 2 now"),
    ],
)
def test_other_settings_are_named_with_what_they_mean(tmp_path, change, match):
    path = _checkpointed(tmp_path)
    with pytest.warns(RuntimeWarning, match=match):
        _resume(path, **change)


def test_another_datamodule_is_named(tmp_path):
    path = _checkpointed(tmp_path)

    class Other(ArrayDataModule):
        pass

    data = blobs_datamodule()
    other = Other(train=data.splits["train"], val=data.splits["val"], batch_size=32)
    with pytest.warns(RuntimeWarning, match=r"`datamodule` ArrayDataModule .*, .*Other now"):
        _resume(path, other)


def test_the_same_settings_say_nothing(tmp_path, recwarn):
    path = _checkpointed(tmp_path)
    _resume(path)
    assert not [w for w in recwarn if "other settings" in str(w.message)]


# ---------------------------------------------------------------------- damage
def _two_checkpoints(tmp_path):
    ckpt = ModelCheckpoint(tmp_path, save_top_k=-1)
    trainer = solstice.Trainer(max_epochs=2, enable_progress_bar=False, callbacks=[ckpt])
    trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
    return sorted(p for p in tmp_path.iterdir() if p.is_dir())


def _empty(path):
    shutil.rmtree(path)
    path.mkdir()


def _metadata_is_a_directory(path):
    (path / "solstice.json").unlink()
    (path / "solstice.json").mkdir()


def _no_experiment_arrays(path):
    shutil.rmtree(path / "experiment")


def _no_orbax_metadata(path):
    (path / "_CHECKPOINT_METADATA").unlink()


def _truncated_array(path):
    arrays = (p for p in (path / "experiment").rglob("*") if p.is_file())
    biggest = max(arrays, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:-7])


DAMAGE = {
    "empty": (_empty, "checkpoint directory is empty"),
    "metadata dir": (_metadata_is_a_directory, "cannot be read as a file"),
    "no arrays": (_no_experiment_arrays, "is missing"),
    "no orbax metadata": (_no_orbax_metadata, "lacks Orbax's `_CHECKPOINT_METADATA`"),
    "truncated": (_truncated_array, "truncated or corrupted|SHA-256"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_reported_and_skipped(tmp_path, damage):
    first, newest = _two_checkpoints(tmp_path)
    damage_fn, match = DAMAGE[damage]
    damage_fn(newest)
    trainer = solstice.Trainer(
        max_epochs=2, enable_progress_bar=False, callbacks=[ModelCheckpoint(tmp_path)]
    )
    with pytest.warns(RuntimeWarning, match=rf"Skipping checkpoint `.*{newest.name}`: .*({match})"):
        trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule(), "last")
    assert trainer.global_step == 16  # resumed from the first (end of epoch 0), trained on
    assert newest.exists()  # left on disk untouched


@pytest.mark.parametrize("damage", ["empty", "metadata dir"])
def test_no_valid_checkpoint_left_raises_instead_of_starting_over(tmp_path, damage):
    for path in _two_checkpoints(tmp_path):
        DAMAGE[damage][0](path)
    trainer = solstice.Trainer(
        max_epochs=2, enable_progress_bar=False, callbacks=[ModelCheckpoint(tmp_path)]
    )
    with pytest.warns(RuntimeWarning, match="Skipping checkpoint"):
        with pytest.raises(CheckpointError, match="None of the 2 checkpoint"):
            trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule(), "last")
    assert trainer.global_step == 0


@pytest.mark.parametrize("state", ["absent", "empty"])
def test_an_empty_or_absent_directory_starts_afresh(tmp_path, state):
    dirpath = tmp_path / "ckpts"
    if state == "empty":
        os.makedirs(dirpath)
    trainer = solstice.Trainer(
        max_epochs=1, enable_progress_bar=False, callbacks=[ModelCheckpoint(dirpath)]
    )
    trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule(), "last")
    assert trainer.global_step == 8


def test_a_checkpoint_taken_before_the_first_step_of_a_resume_keeps_the_epochs_metrics(
    tmp_path,
):
    """Resumed mid-epoch, then stopped before any step (a signal at `on_train_start`): a new
    saver's checkpoint still holds the epoch's metric accumulators as they were restored,
    so a run resumed from it logs the uninterrupted run's epoch metrics (the epoch's loss was
    computed over the rest of the epoch only: 1.93 instead of 2.20)."""
    import signal

    from solstice.callbacks import Callback

    def experiment():
        return make_mlp_experiment(in_size=8, num_classes=4)

    settings = dict(max_epochs=2, enable_progress_bar=False, log_every_n_steps=4, devices=1)

    class SignalAtStep(Callback):
        def __init__(self, step):
            self.step = step

        def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
            if trainer.global_step == self.step:
                signal.raise_signal(signal.SIGINT)

    class SignalAtStart(Callback):
        def on_train_start(self, trainer, experiment):
            signal.raise_signal(signal.SIGINT)

    reference = solstice.Trainer(**settings)
    reference.fit(experiment(), blobs_datamodule())
    reference.flush_logs()
    first, second = tmp_path / "first", tmp_path / "second"
    stopped = solstice.Trainer(
        **settings, callbacks=[ModelCheckpoint(first, every_n_epochs=None), SignalAtStep(2)]
    )
    with pytest.raises(KeyboardInterrupt):
        stopped.fit(experiment(), blobs_datamodule())
    assert stopped.global_step == 3  # mid-epoch (8 batches an epoch)
    resumed = solstice.Trainer(
        **settings, callbacks=[ModelCheckpoint(first), ModelCheckpoint(second), SignalAtStart()]
    )
    with pytest.raises(KeyboardInterrupt):
        resumed.fit(experiment(), blobs_datamodule(), ckpt_path=first / "epoch=0-step=3")
    assert [p.name for p in second.iterdir() if p.is_dir()] == ["epoch=0-step=3"]
    final = solstice.Trainer(**settings, callbacks=[ModelCheckpoint(second)])
    final.fit(experiment(), blobs_datamodule(), ckpt_path="last")
    final.flush_logs()
    assert final.history.metrics == reference.history.metrics
