"""One process of the multi-process test (run by `test_multiprocess.py`, not by pytest).

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS OUT_DIR

Joins the other processes with `jax.distributed.initialize` on 127.0.0.1 (gloo CPU
collectives), then runs the same script as every other process: fit, test and predict with
the Trainer's defaults (`devices="auto"`: every device of every process), each process feeding
its share of every global batch; then checkpoints into directories under OUT_DIR that all
processes share and resumes from them (`checkpoint_stage`). Writes `OUT_DIR/<process_id>.npz`
(parameters, predictions) and `OUT_DIR/<process_id>.json` (metrics, checkpoint bookkeeping,
and the error of any stage that failed).
"""

import datetime
import itertools
import json
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
from helpers import (
    blobs_datamodule,
    join_local_processes,
    make_mlp_experiment,
    regression,
    regression_split,
)

import solstice
from solstice.callbacks import ModelCheckpoint

# Shared with the single-process reference in test_multiprocess.py. Nothing here touches a
# device: the backend starts only after `jax.distributed.initialize`.
TRAINER_KW = dict(
    max_epochs=2,
    steps_per_execution=2,
    log_every_n_steps=2,
    enable_progress_bar=False,
    compilation_cache=False,
)


def experiment():
    return make_mlp_experiment(in_size=8, num_classes=4)


def datamodule():
    # 112 training samples in global batches of 16: 7 steps per epoch (fused 2 + a single
    # step); 70 evaluation samples in batches of 16: the last one padded and masked.
    return blobs_datamodule(n_train=112, n_val=70, batch_size=16)


def user_datamodule():
    # Tuple batches for a user's experiment whose eval_step knows nothing of padding: 70
    # evaluation samples in global batches of 16, the last one of 6 rows, all of them in
    # process 0's share (process 1's share of it is empty).
    return solstice.datamodules.ArrayDataModule(
        train=regression_split(112, 0),
        val=regression_split(70, 1),
        test=regression_split(70, 2),
        predict=regression_split(70, 3),
        batch_size=16,
    )


def user_stage(result: dict, arrays: dict) -> None:
    trainer = solstice.Trainer(**TRAINER_KW)
    exp = trainer.fit(regression(), user_datamodule())
    result["user"] = {
        "callback_metrics": dict(trainer.callback_metrics),
        "test": trainer.test(exp, user_datamodule()),
    }
    arrays["user_predict"] = np.asarray(trainer.predict(exp, user_datamodule())["prediction"])


class Replacing(solstice.ClassificationExperiment):
    """Replaces itself at every epoch start (new key): the Trainer must re-place it."""

    def on_train_epoch_start(self, trainer):
        return eqx.tree_at(lambda e: e.key, self, jax.random.key(trainer.current_epoch))


def replacing_experiment():
    base = experiment()
    return Replacing(base.model, base.optimizer, 4, key=base.key)


def checkpoint_callbacks(dirpath: str, latest: str | None = None) -> list[ModelCheckpoint]:
    # 7 steps per epoch: step saves land mid-epoch (steps 6, 10, 16, 20), epoch saves at 7,
    # 14, 21; the top 2 by val/loss plus the most recent are kept.
    callbacks = [
        ModelCheckpoint(
            dirpath, monitor="val/loss", save_top_k=2, every_n_epochs=1, every_n_train_steps=5
        )
    ]
    if latest is not None:  # a second one saving at the same moments, under the same names
        callbacks.append(ModelCheckpoint(latest))
    return callbacks


def checkpoint_stage(out_dir: str, result: dict, arrays: dict) -> None:
    """Fit 2 epochs with checkpoints in directories every process shares, resume to 3 epochs
    in a new Trainer with `ckpt_path="last"`, and fit 3 epochs uninterrupted (checkpointing
    to another directory: the same checkpoint names a second time in these processes), then
    resume that run from its mid-epoch checkpoint."""
    from solstice.checkpointing import _orbax

    writes = []  # `solstice.json` written by this process (Orbax calls back on process 0 only)
    write_metadata = _orbax.write_metadata
    _orbax.write_metadata = lambda d, m: (writes.append(Path(d).name), write_metadata(d, m))[1]
    shared, latest = os.path.join(out_dir, "ckpt"), os.path.join(out_dir, "ckpt_latest")
    info: dict = {"metadata_writes": writes}
    full = os.path.join(out_dir, "ckpt_full")
    runs = {
        "first": (2, checkpoint_callbacks(shared, latest), None),
        "resumed": (3, checkpoint_callbacks(shared, latest), "last"),
        "full": (3, checkpoint_callbacks(full), None),
        # mid-epoch, with the metric accumulators of the epoch (a step save the full run kept)
        "mid_epoch": (3, [], os.path.join(full, "epoch=2-step=16")),
    }
    for name, (max_epochs, callbacks, ckpt_path) in runs.items():
        trainer = solstice.Trainer(**{**TRAINER_KW, "max_epochs": max_epochs}, callbacks=callbacks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exp = trainer.fit(experiment(), datamodule(), ckpt_path=ckpt_path)
        info[name] = {
            "warnings": [str(w.message) for w in caught],
            "global_step": trainer.global_step,
            "history": trainer.history.metrics,
            "callback_metrics": dict(trainer.callback_metrics),
            "callbacks": [
                {
                    "last_model_path": cb.last_model_path,
                    "best_model_path": cb.best_model_path,
                    "best_k_models": cb.best_k_models,
                }
                for cb in callbacks
            ],
        }
        for i, p in enumerate(jax.tree.leaves(eqx.filter(exp.model, eqx.is_array))):
            arrays[f"{name}_param{i}"] = np.asarray(p.addressable_data(0))
    _orbax.write_metadata = write_metadata  # later stages are not counted
    result["checkpoint"] = info


class _SignalInProcessOne(solstice.callbacks.Callback):
    """SIGTERM to process 1 only, before the 4th batch of the first epoch."""

    def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
        if jax.process_index() == 1 and trainer.current_epoch == 0 and batch_idx == 3:
            signal.raise_signal(signal.SIGTERM)


def agreement_stage(out_dir: str, result: dict) -> None:
    """Decisions one process takes alone, acted on by all together: a SIGTERM that reaches
    process 1 only, and a timed checkpoint due on process 1's clock only (each would make
    that process save, a collective, where the other does not)."""
    from solstice.trainer import _agreement

    _agreement.AGREE_EVERY_SECONDS = 0.0  # an agreement point at every step boundary
    info: dict = {}
    signalled = os.path.join(out_dir, "ckpt_signal")
    trainer = solstice.Trainer(
        **TRAINER_KW, callbacks=[_SignalInProcessOne(), ModelCheckpoint(signalled)]
    )
    try:
        trainer.fit(experiment(), datamodule())
        info["signal_exit"] = None
    except SystemExit as exit:
        info["signal_exit"] = exit.code
    info["signal_step"] = trainer.global_step
    info["signal_last"] = trainer.checkpoint_callbacks[0].last_model_path

    clock = time.monotonic
    if jax.process_index() == 1:  # an hour passes on this clock between any two readings
        hours = itertools.count()

        def clock():
            return 3600.0 * next(hours)

    timed = ModelCheckpoint(
        os.path.join(out_dir, "ckpt_timed"), train_time_interval=3600, clock=clock
    )
    trainer = solstice.Trainer(**TRAINER_KW, callbacks=[timed])
    trainer.fit(experiment(), datamodule())
    info["timed_last"] = timed.last_model_path
    info["timed_saved_step"] = timed.state_dict().get("last_global_step_saved")
    result["agreement"] = info


class _HoursInProcessOne(solstice.callbacks.Callback):
    """`trainer.clock`: an hour per training step in process 1; real time in process 0."""

    def __init__(self):
        self.hours, self.validated = 0, []

    def __call__(self) -> float:
        return 3600.0 * self.hours if jax.process_index() == 1 else time.monotonic()

    def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
        self.hours += 1

    def on_validation_end(self, trainer, experiment):
        self.validated.append(trainer.global_step)


def loop_controls_stage(out_dir: str, result: dict) -> None:
    """A timed `val_check_interval` (2 hours) and `max_time` (5 hours) due on process 1's
    clock only: every process validates and stops at the same steps. Calls end at steps 2,
    4, 6: validations at 2 and 4, the stop at 6 (with the validation due there pending)."""
    from solstice.trainer import _agreement

    _agreement.AGREE_EVERY_SECONDS = 0.0  # an agreement point at every step boundary
    clock = _HoursInProcessOne()
    saver = ModelCheckpoint(os.path.join(out_dir, "ckpt_loop"), every_n_epochs=None)
    trainer = solstice.Trainer(
        **TRAINER_KW,
        callbacks=[clock, saver],
        val_check_interval=datetime.timedelta(hours=2),
        max_time={"hours": 5},
    )
    trainer.clock = clock
    trainer.fit(experiment(), datamodule())  # returns: max_time is not an error
    saver.wait()
    result["loop_controls"] = {
        "validated": clock.validated,
        "global_step": trainer.global_step,
        "stopped_by": (trainer.stopped or {}).get("by"),
        "last": saver.last_model_path,
    }


def main(process_id: int, num_processes: int, port: int, num_devices: int, out_dir: str) -> None:
    join_local_processes(process_id, num_processes, port, num_devices)
    result: dict = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "num_devices": len(jax.devices()),
        "errors": {},
    }
    arrays: dict[str, np.ndarray] = {}
    log_dir = os.path.join(out_dir, f"logs{process_id}")
    trainer = solstice.Trainer(**TRAINER_KW, loggers=[solstice.CSVLogger(log_dir)])
    exp = trainer.fit(experiment(), datamodule())
    params = jax.tree.leaves(eqx.filter(exp.model, eqx.is_array))
    for i, p in enumerate(params):
        arrays[f"param{i}"] = np.asarray(p.addressable_data(0))  # replicated: a local copy
    result["callback_metrics"] = dict(trainer.callback_metrics)
    result["test"] = trainer.test(exp, datamodule())
    trainer.close()

    def stage(name, fn):
        try:
            fn()
        except Exception:  # noqa: BLE001 - recorded for the test to report
            result["errors"][name] = traceback.format_exc(limit=-4)

    def predict():
        arrays["predict"] = np.asarray(trainer.predict(exp, datamodule()))

    def replace():
        other = solstice.Trainer(**TRAINER_KW)
        other.fit(replacing_experiment(), datamodule())

    stage("predict", predict)
    stage("user", lambda: user_stage(result, arrays))
    stage("replace", replace)
    stage("checkpoint", lambda: checkpoint_stage(out_dir, result, arrays))
    stage("agreement", lambda: agreement_stage(out_dir, result))
    stage("loop_controls", lambda: loop_controls_stage(out_dir, result))
    np.savez(os.path.join(out_dir, f"{process_id}.npz"), **arrays)
    with open(os.path.join(out_dir, f"{process_id}.json"), "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    pid, nproc, port, ndev = (int(a) for a in sys.argv[1:5])
    main(pid, nproc, port, ndev, sys.argv[5])
