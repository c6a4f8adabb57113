"""SIGINT and SIGTERM during fit: stop at a step boundary, save, flush, end like the signal."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import blobs_datamodule, make_mlp_experiment, params_of

import solstice
from solstice.callbacks import Callback, ModelCheckpoint
from solstice.trainer._signals import SignalWatch

WORKER = Path(__file__).with_name("resume_worker.py")


class _SendAt(Callback):
    def __init__(self, step, signum, times=1):
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
        if trainer.global_step == self.step:
            for _ in range(self.times):
                signal.raise_signal(self.signum)


def _trainer(tmp_path, *callbacks):
    return solstice.Trainer(
        max_epochs=50,
        log_every_n_steps=2,
        devices=1,
        enable_progress_bar=False,
        callbacks=[*callbacks, ModelCheckpoint(tmp_path / "ckpts", every_n_epochs=None)],
        loggers=[solstice.CSVLogger(tmp_path / "logs")],
    )


def _exp():
    return make_mlp_experiment(in_size=8, num_classes=4)


def _metadata(path) -> dict:
    return json.loads((Path(path) / "solstice.json").read_text())


def _logged_steps(tmp_path) -> list[int]:
    with open(tmp_path / "logs" / "metrics.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_flushes_and_ends_like_the_signal(tmp_path, signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer = _trainer(tmp_path, _SendAt(5, signum))
    expected = KeyboardInterrupt if signum == signal.SIGINT else SystemExit
    with pytest.raises(expected) as info:
        trainer.fit(_exp(), blobs_datamodule())
    if signum == signal.SIGTERM:
        assert info.value.code == 128 + signal.SIGTERM
    assert trainer.global_step == 6  # the step in flight finished, no further one started
    ckpt = trainer.checkpoint_callbacks[0]
    assert Path(ckpt.last_model_path).name == "epoch=0-step=6"
    document = _metadata(ckpt.last_model_path)
    assert document["checkpoint"]["reason"] == "interrupt"
    assert document["progress"] == {
        "epoch": 0,
        "global_step": 6,
        "batch_idx": 6,
        "validation_runs": 0,
        "epoch_logged": False,
        "validation_pending": False,
    }
    assert _logged_steps(tmp_path)[-1] == 6  # the loggers were flushed
    assert {s: signal.getsignal(s) for s in before} == before
    trainer.close()

    # the interrupted run resumes from there
    resumed = solstice.Trainer(
        max_steps=8,
        devices=1,
        enable_progress_bar=False,
        loggers=[solstice.CSVLogger(tmp_path / "logs")],
    )
    resumed.fit(_exp(), blobs_datamodule(), ckpt_path=ckpt.last_model_path)
    assert resumed.global_step == 8
    resumed.close()
    assert _logged_steps(tmp_path)[-1] == 8  # the same log continues


def test_second_signal_acts_at_once_and_custom_handlers_are_chained(tmp_path):
    trainer = _trainer(tmp_path, _SendAt(3, signal.SIGINT, times=2))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(_exp(), blobs_datamodule())
    assert trainer.global_step == 3 and not trainer.checkpoint_callbacks[0].last_model_path
    trainer.close()

    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        trainer = _trainer(tmp_path / "b", _SendAt(3, signal.SIGTERM))
        trainer.fit(_exp(), blobs_datamodule())  # the user's handler returns: fit just stops
        assert calls == [signal.SIGTERM] and trainer.should_stop
        assert Path(trainer.checkpoint_callbacks[0].last_model_path).name == "epoch=0-step=4"
        assert (
            signal.getsignal(signal.SIGTERM) is not None
            and signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
        )
        trainer.close()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_handlers_only_in_the_main_thread():
    seen = []

    def run():
        with SignalWatch() as watch:
            seen.append(watch.active)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [False]
    with SignalWatch() as watch:
        assert watch.active and signal.getsignal(signal.SIGTERM) == watch._handle
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _start_worker(tmp_path, *args):
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path / "ckpts"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_a_training_process(tmp_path, signum):
    proc = _start_worker(
        tmp_path,
        "--max-epochs",
        "1000",
        "--every",
        "0",
        "--announce-step",
        "5",
        "--csv",
        str(tmp_path / "logs"),
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "STEP 5", (
            line,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if signum == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, err
    else:
        assert "KEYBOARDINTERRUPT handlers-restored=True" in out, err
        assert proc.returncode != 0
    saved = [p for p in (tmp_path / "ckpts").iterdir() if (p / "solstice.json").exists()]
    assert len(saved) == 1, err
    document = _metadata(saved[0])
    assert document["checkpoint"]["reason"] == "interrupt"
    step = document["progress"]["global_step"]
    assert step >= 5
    # flushed: every row up to the saved step (logs every 3 steps and at epoch ends, 8 steps).
    # A stop right after an epoch's last step comes before that epoch's closing row, whose
    # accumulators the checkpoint holds (a resume publishes it); a stop during that epoch's
    # validation comes after it (the epoch stays open, so the checkpoint is the same).
    before_closing_row = max(
        s for s in range(1, step + 1) if s % 3 == 0 or (s % 8 == 0 and s < step)
    )
    allowed = {before_closing_row, step} if step % 8 == 0 else {before_closing_row}
    assert _logged_steps(tmp_path)[-1] in allowed
    solstice.checkpointing.verify(saved[0])


class _SendDuringValidation(Callback):
    """SIGTERM at the first validation batch; records the validation batches started."""

    def __init__(self):
        self.started = []

    def on_validation_batch_start(self, trainer, experiment, batch, batch_idx):
        self.started.append(batch_idx)
        if batch_idx == 0:
            signal.raise_signal(signal.SIGTERM)


def test_signal_during_validation_stops_it_and_the_resume_reruns_it(tmp_path):
    def trainer(*callbacks, max_epochs=1):
        return solstice.Trainer(
            max_epochs=max_epochs,
            devices=1,
            enable_progress_bar=False,
            loggers=[],
            callbacks=[*callbacks, ModelCheckpoint(tmp_path / "ckpts", every_n_epochs=None)],
        )

    reference = trainer()
    expected = reference.fit(_exp(), blobs_datamodule())

    sender = _SendDuringValidation()
    interrupted = trainer(sender, max_epochs=2)
    with pytest.raises(SystemExit) as info:
        interrupted.fit(_exp(), blobs_datamodule())
    assert info.value.code == 128 + signal.SIGTERM
    assert sender.started == [0]  # 3 validation batches: stopped before the second one
    ckpt = interrupted.checkpoint_callbacks[0].last_model_path
    document = _metadata(ckpt)
    assert document["checkpoint"]["reason"] == "interrupt"
    assert document["progress"] == {
        "epoch": 0,
        "global_step": 8,
        "batch_idx": 8,
        "validation_runs": 0,
        "epoch_logged": True,  # published before validation: a resume does not again
        "validation_pending": False,  # (an epoch-end validation: the open epoch says so)
    }

    resumed = trainer()
    result = resumed.fit(_exp(), blobs_datamodule(), ckpt_path=ckpt)
    assert resumed.progress.validation_runs == 1 and resumed.current_epoch == 1
    for name in ("val/loss", "val/accuracy"):
        assert resumed.callback_metrics[name] == reference.callback_metrics[name], name
    # every record once: the epoch's training metrics were published before the signal
    resumed.close()
    reference.close()
    assert resumed.history.steps == reference.history.steps
    assert resumed.history.metrics == reference.history.metrics
    for a, b in zip(params_of(expected), params_of(result)):
        assert (a == b).all()
