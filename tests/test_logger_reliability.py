"""Loggers never hang or end a run, checkpoints hold no metric history, and the logs resume as
exactly as the weights (issue 13)."""

import csv
import errno
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import pytest
from helpers import blobs_datamodule, make_mlp_experiment
from logger_worker import history_lists, make_experiment, make_loggers, trainer_kwargs

import solstice
from solstice._classification_metrics import ClassificationMetrics
from solstice.callbacks import LoggingCallback, ModelCheckpoint
from solstice.checkpointing._find import find_last
from solstice.loggers import CSVLogger, FanoutLogger, History, Logger, TensorBoardLogger
from solstice.loggers._worker import LoggerWorker

WORKER = Path(__file__).with_name("logger_worker.py")
EPOCHS = 4  # of the killed run: 32 steps, 40 records


# ----------------------------------------------------------------------------- helpers


class Recording(Logger):
    """Keeps every record; `gate` (if given) holds each `log_metrics` until it is set."""

    def __init__(self, gate: threading.Event | None = None):
        self.rows: list[tuple[int, dict]] = []
        self.gate = gate
        self.entered = threading.Event()

    def log_metrics(self, metrics, step):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        self.rows.append((step, dict(metrics)))

    def __repr__(self):
        return "Recording()"


class Raising(Logger):
    """Raises `error` (an exception instance) from `method`."""

    def __init__(self, name: str, method: str, error: BaseException):
        self.name, self.method, self.error = name, method, error

    def _maybe_raise(self, method):
        if method == self.method:
            raise self.error

    def log_metrics(self, metrics, step):
        self._maybe_raise("log_metrics")

    def log_hyperparams(self, params):
        self._maybe_raise("log_hyperparams")

    def flush(self):
        self._maybe_raise("flush")

    def close(self):
        self._maybe_raise("close")

    @property
    def run_id(self):
        self._maybe_raise("run_id")
        return None

    def __repr__(self):
        return f"Raising({self.name})"


class OddRunId(Logger):
    def __init__(self, run_id):
        self._run_id = run_id

    def log_metrics(self, metrics, step):
        pass

    @property
    def run_id(self):
        return self._run_id

    def __repr__(self):
        return f"OddRunId({self._run_id!r})"


def _csv_text(log_dir) -> str:
    return (Path(log_dir) / "metrics.csv").read_text()


def _csv_rows(log_dir) -> list[list[str]]:
    with open(Path(log_dir) / "metrics.csv", newline="") as f:
        return list(csv.reader(f))


def _tb_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {
        tag: [(event.step, event.value) for event in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }


def _records(history: History) -> list:
    return [[step, metrics] for step, metrics in history.iter_records()]


def _fit(tmp_path, loggers, max_epochs=1, **checkpoint):
    checkpoint = {"every_n_train_steps": 3, "every_n_epochs": None, **checkpoint}
    trainer = solstice.Trainer(
        **trainer_kwargs(max_epochs),
        callbacks=[ModelCheckpoint(tmp_path / "ckpts", **checkpoint)],
        loggers=loggers,
    )
    trainer.fit(make_experiment(), blobs_datamodule())
    return trainer


# ----------------------------------------------------------------------------- nothing hangs


def _worker(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ),
    )


def test_a_hung_logger_holds_up_neither_fit_nor_sigterm(tmp_path):
    """A logger whose `log_metrics` never returns: `fit` (checkpointing every step) still ends,
    and so does a run sent SIGTERM, as the signal would have ended it."""
    finished = _worker(tmp_path / "a", "--hung", "--max-epochs", "1", "--flush-timeout", "0.5")
    try:
        out = finished.communicate(timeout=120)[0]
    finally:
        if finished.poll() is None:  # it hangs: the test fails, leaving nothing behind
            finished.kill()
    assert finished.returncode == 0 and "DONE" in out, out
    assert "HungLogger() has been stuck in `log_metrics`" in out and "disabled" in out
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    header, *rows = _csv_rows(tmp_path / "a" / "csv")  # the other loggers have every record
    loss = header.index("train/loss")
    assert [int(row[0]) for row in rows if row[loss]] == history["steps"]["train/loss"]
    assert find_last(tmp_path / "a" / "ckpts")[1]["progress"]["global_step"] == 8

    stopped = _worker(
        tmp_path / "b",
        "--hung",
        "--max-epochs",
        "50",
        "--announce-step",
        "5",
        "--flush-timeout",
        "0.5",
    )
    try:
        for line in stopped.stdout:
            if line.startswith("STEP 5"):
                stopped.send_signal(signal.SIGTERM)
                break
        out = stopped.communicate(timeout=120)[0]
    finally:
        if stopped.poll() is None:
            stopped.kill()
    assert stopped.returncode == 128 + signal.SIGTERM, out
    _, document = find_last(tmp_path / "b" / "ckpts")
    assert document["progress"]["global_step"] >= 5  # saved as it stopped


def test_a_slow_logger_falls_behind_and_drops_its_oldest_records():
    gate = threading.Event()
    slow = Recording(gate)
    callback = LoggingCallback([slow], max_queue_size=3)
    callback.on_log(None, None, {"x": 0.0}, 0)
    callback.flush_history()
    assert slow.entered.wait(30)  # `slow` is now held in its first call
    with pytest.warns(RuntimeWarning, match=r"Recording\(\) cannot keep up") as record:
        for i in range(1, 10):
            callback.on_log(None, None, {"x": jnp.asarray(float(i))}, i)
        callback.flush_history()  # waits for the History only, never for `slow`
        assert callback.history.num_records == 10
        gate.set()
        callback.flush(timeout=60)
    assert "(6 in all)" in str(record[-1].message)
    assert [step for step, _ in slow.rows] == [0, 7, 8, 9]  # the newest kept
    assert callback.history.metrics["x"] == [float(i) for i in range(10)]
    callback.close()


def test_flush_disables_a_logger_stuck_in_one_call_and_never_waits_for_it_again(tmp_path):
    gate = threading.Event()
    stuck, good = Recording(gate), Recording()
    callback = LoggingCallback([stuck, good])
    callback.on_log(None, None, {"x": 1.0}, 1)
    callback.flush_history()
    assert stuck.entered.wait(30)
    with pytest.warns(RuntimeWarning, match=r"Recording\(\) has been stuck in `log_metrics`"):
        callback.flush(timeout=0.05)
    callback.on_log(None, None, {"x": 2.0}, 2)
    callback.flush(timeout=0.05)  # nothing to report: the stuck logger is no longer waited for
    callback.close(timeout=0.05)
    gate.set()
    assert good.rows == [(1, {"x": 1.0}), (2, {"x": 2.0})]


def test_a_late_logger_is_named_with_what_waits_for_it():
    gate = threading.Event()
    worker = LoggerWorker(Recording(gate), max_queue_size=10, records_source=lambda a, b: [])
    worker.put_record({"x": 1.0}, 1)
    worker.put_record({"x": 2.0}, 2)
    request = worker.request("flush")
    assert worker.wait(request, time.monotonic(), stuck_after=float("inf")) == "late"
    worker.note_late("`flush`", 2.5)
    [note] = worker.take_notes()
    assert note.startswith("Logger Recording() did not finish `flush` within 2.5 s")
    gate.set()
    assert worker.wait(request, time.monotonic() + 60, stuck_after=float("inf")) == "done"


# ----------------------------------------------------------------------------- nothing kills


def test_no_logger_failure_ends_fit_and_the_others_get_everything(tmp_path):
    bad = [
        OddRunId(pathlib.Path("/runs/a")),  # a path: stored as its string
        OddRunId(42),  # not a string: reported, not stored
        Raising("run_id", "run_id", RuntimeError("no run yet")),
        Raising("exit", "log_metrics", SystemExit(3)),
        Raising("ctrl-c", "log_metrics", KeyboardInterrupt()),
        Raising("generator", "log_metrics", GeneratorExit()),
        Raising("hparams", "log_hyperparams", OSError("disk full")),
        Raising("flush", "flush", ValueError("bad")),
        Raising("close", "close", RuntimeError("gone")),
    ]
    loggers = [*bad, CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")]
    with pytest.warns(RuntimeWarning) as record:
        trainer = _fit(tmp_path, loggers, max_epochs=2)
        trainer.close()
    messages = "\n".join(str(w.message) for w in record)
    for name, error in [
        ("exit", "SystemExit: 3"),
        ("ctrl-c", "KeyboardInterrupt"),
        ("generator", "GeneratorExit"),
        ("hparams", "OSError: disk full"),
        ("flush", "ValueError: bad"),
        ("close", "RuntimeError: gone"),
    ]:
        assert f"Logger Raising({name}) raised {error}" in messages, name
    assert "Raising(run_id) raised RuntimeError: no run yet" in messages
    assert "when asked for its `run_id`" in messages
    assert "OddRunId(42) has `run_id` 42 of type int" in messages
    records = _records(trainer.history)
    assert len(records) == 2 * 10
    rows = _csv_rows(tmp_path / "csv")[1:]
    assert [int(row[0]) for row in rows] == [step for step, _ in records]
    assert _tb_scalars(tmp_path / "tb")["train/loss"] == [
        (step, pytest.approx(m["train/loss"])) for step, m in records if "train/loss" in m
    ]
    _, document = find_last(tmp_path / "ckpts")
    run_ids = document["callbacks"]["LoggingCallback"]["run_ids"]
    assert run_ids[:3] == ["/runs/a", None, None]
    assert run_ids[-2:] == [str(tmp_path / "csv"), str(tmp_path / "tb")]


def test_ctrl_c_raised_on_the_main_thread_still_propagates_through_a_fanout():
    fanout = FanoutLogger([Raising("ctrl-c", "log_metrics", KeyboardInterrupt()), Recording()])
    with pytest.raises(KeyboardInterrupt):
        fanout.log_metrics({"x": 1.0}, 0)


# ----------------------------------------------------------------------------- checkpoint size


def test_checkpoints_hold_no_metric_values_whatever_the_run_length(tmp_path):
    sizes = []
    for epochs in (1, 3):
        directory = tmp_path / f"run{epochs}"
        trainer = _fit(directory, [], max_epochs=epochs, every_n_train_steps=None, every_n_epochs=1)
        trainer.close()
        _, document = find_last(directory / "ckpts")
        history = document["history"]
        assert sorted(history) == ["hparams", "path", "records", "sha256"]
        assert history["records"] == 10 * epochs
        assert Path(history["path"]) == directory / "ckpts" / "history.jsonl"
        lines = Path(history["path"]).read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [[r["step"], r["metrics"]] for r in records] == _records(trainer.history)
        sizes.append(len(json.dumps(history)))
    assert sizes[0] == sizes[1]


def test_history_persists_and_reloads_exactly(tmp_path):
    history = History()
    history.log_metrics({"train/loss": 0.5, "epoch": 0}, 1)  # before `persist_to`: kept too
    history.persist_to(tmp_path / "h" / "history.jsonl")
    history.log_metrics({"train/loss": jnp.asarray(0.25), "val/acc": 0.75, "epoch": 0}, 2)
    history.log_metrics({"lr": float("nan")}, 2)
    history.log_hyperparams({"lr": 0.1})
    history.flush()
    state = json.loads(json.dumps(history.state_dict()))
    assert state["records"] == 3 and state["hparams"] == {"lr": 0.1} and "inline" not in state
    history.log_metrics({"train/loss": 0.125, "epoch": 1}, 3)  # after the "checkpoint"
    history.close()
    with open(tmp_path / "h" / "history.jsonl", "ab") as f:
        f.write(b'{"step":4,"metr')  # a line cut short by a crash

    restored = History()
    restored.load_state_dict(state)
    assert restored.metrics == {
        "train/loss": [0.5, 0.25],
        "val/acc": [0.75],
        "lr": [pytest.approx(float("nan"), nan_ok=True)],
    }
    assert restored.steps == {"train/loss": [1, 2], "val/acc": [2], "lr": [2]}
    assert restored.epochs == {"train/loss": [0, 0], "val/acc": [0], "lr": [None]}
    assert [step for step, _ in restored.iter_records()] == [1, 2, 2]
    restored.persist_to(tmp_path / "h" / "history.jsonl")
    restored.log_metrics({"train/loss": 0.0625, "epoch": 1}, 3)
    restored.close()
    lines = (tmp_path / "h" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 2, 3]  # cut back, then on
    assert json.loads(lines[-1])["metrics"] == {"train/loss": 0.0625, "epoch": 1.0}

    unpersisted = History()
    unpersisted.log_metrics({"x": 1.0}, 1)
    again = History()
    again.load_state_dict(json.loads(json.dumps(unpersisted.state_dict())))  # records inline
    assert again.metrics == {"x": [1.0]}

    elsewhere = History()  # another process writes the file: named, never written here
    elsewhere.persist_to(tmp_path / "other.jsonl", write=False)
    elsewhere.log_metrics({"x": 1.0}, 1)
    elsewhere.close()
    assert elsewhere.state_dict()["path"] == str(tmp_path / "other.jsonl")
    assert "inline" not in elsewhere.state_dict() and not (tmp_path / "other.jsonl").exists()


def test_history_file_problems_are_named(tmp_path):
    history = History()
    history.persist_to(tmp_path / "history.jsonl")
    for step in range(3):
        history.log_metrics({"x": float(step)}, step)
    history.close()
    state = history.state_dict()
    with pytest.raises(FileNotFoundError, match=r"history file `.*missing.jsonl` is missing"):
        History().load_state_dict({**state, "path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ValueError, match=r"holds 3 complete record\(s\), but .* counts 4"):
        History().load_state_dict({**state, "records": 4})
    other = History()  # a run started from scratch in the same directory
    other.persist_to(tmp_path / "history.jsonl")
    other.log_metrics({"x": 10.0}, 0)
    other.log_metrics({"x": 11.0}, 1)
    other.log_metrics({"x": 12.0}, 2)
    other.close()
    with pytest.raises(ValueError, match="rewritten by another run"):
        History().load_state_dict(state)


def test_history_survives_a_full_disk(tmp_path):
    history = History()
    history.persist_to(tmp_path / "history.jsonl")
    history.log_metrics({"x": 0.0}, 0)
    history.flush()

    class FullDisk:
        """The file object of a full disk: writes a few bytes, then fails."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:5])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    history._journal._file = FullDisk(history._journal._file)
    with pytest.warns(RuntimeWarning, match=r"History could not write .*No space left"):
        history.log_metrics({"x": 1.0}, 1)
    history.log_metrics({"x": 2.0}, 2)
    history.flush()  # space again: cut back to the last good record, the rest written again
    history.close()
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["metrics"]["x"] for line in lines] == [0.0, 1.0, 2.0]
    restored = History()
    restored.load_state_dict(history.state_dict())
    assert restored.metrics == {"x": [0.0, 1.0, 2.0]}


# ----------------------------------------------------------------------------- exact resume


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_logs(tmp_path):
    """Killed at random moments (checkpointing every step, so kills land mid-save and
    mid-write), restarted each time with `ckpt_path="last"`: the CSV table, the TensorBoard
    scalars and `trainer.history` end up equal to those of a run that never stopped."""
    rng = random.Random(13)
    reference_dir = tmp_path / "reference"
    reference = solstice.Trainer(**trainer_kwargs(EPOCHS), loggers=make_loggers(str(reference_dir)))
    reference.fit(make_experiment(), blobs_datamodule())
    reference.close()

    out = tmp_path / "killed"
    for i, target in enumerate(sorted(rng.sample(range(3, 8 * EPOCHS - 3), 2))):
        proc = _worker(out, "--max-epochs", str(EPOCHS), *(["--resume"] if i else []))
        try:
            deadline = time.monotonic() + 120
            while _newest_step(out / "ckpts") < target and proc.poll() is None:
                assert time.monotonic() < deadline, "the worker does not get to its step"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.05))
            proc.kill()
            output = proc.communicate(timeout=60)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL, f"ended before it was killed:\n{output}"
    proc = _worker(out, "--max-epochs", str(EPOCHS), "--resume")
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output

    assert _csv_text(out / "csv") == _csv_text(reference_dir / "csv")
    assert _tb_scalars(out / "tb") == _tb_scalars(reference_dir / "tb")
    assert json.loads((out / "history.json").read_text()) == history_lists(reference.history)


def _newest_step(dirpath: Path) -> int:
    steps = []
    for p in list(dirpath.iterdir()) if dirpath.is_dir() else []:
        try:
            if "step=" in p.name and (p / "solstice.json").exists():
                steps.append(int(p.name.split("step=")[1].split("-")[0]))
        except (OSError, IndexError, ValueError):
            continue
    return max(steps, default=-1)


def test_a_full_disk_then_resume_gives_a_consistent_csv(tmp_path, monkeypatch):
    reference = _fit(tmp_path / "reference", [CSVLogger(tmp_path / "reference" / "csv")], 2)
    reference.close()

    budget = {"chars": 1500}  # the disk fills up after this much, mid-row
    real_open = CSVLogger._open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            if len(text) > budget["chars"]:
                self.f.write(text[: budget["chars"]])
                self.f.flush()
                budget["chars"] = 0
                raise OSError(errno.ENOSPC, "No space left on device")
            budget["chars"] -= len(text)
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def open_on_a_small_disk(self):
        real_open(self)
        self._file = FullDisk(self._file)
        self._writerow = csv.writer(self._file).writerow

    monkeypatch.setattr(CSVLogger, "_open", open_on_a_small_disk)
    with pytest.warns(RuntimeWarning, match=r"CSVLogger.*No space left on device"):
        first = _fit(tmp_path, [CSVLogger(tmp_path / "csv")], 2, save_top_k=-1)
        first.close()
    monkeypatch.setattr(CSVLogger, "_open", real_open)
    text = _csv_text(tmp_path / "csv")
    assert not text.endswith("\n")  # the table ends mid-row

    # Resume from a checkpoint in the middle of the run, with a new logger on the same table.
    ckpt = sorted((tmp_path / "ckpts").glob("epoch=0-step=6*"))[0]
    resumed = solstice.Trainer(**trainer_kwargs(2), loggers=[CSVLogger(tmp_path / "csv")])
    resumed.fit(make_experiment(), blobs_datamodule(), ckpt_path=ckpt)
    resumed.close()
    assert _csv_text(tmp_path / "csv") == _csv_text(tmp_path / "reference" / "csv")
    assert _records(resumed.history) == _records(reference.history)


def test_csv_resume_at_keeps_the_rows_a_checkpoint_counts(tmp_path):
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"train/loss": 1.0, "epoch": 0}, 1)
    logger.log_metrics({"train/loss": 0.5, "epoch": 0}, 2)
    logger.log_metrics({"val/loss": 0.75, "epoch": 0}, 2)  # after the checkpoint: a new column
    logger.close()
    with open(tmp_path / "metrics.csv", "a", newline="") as f:
        f.write("3,1,0.2")  # cut short
    resumed = CSVLogger(tmp_path)
    assert resumed.resume_at(str(tmp_path), 2) == 2
    resumed.log_metrics({"train/loss": 0.25, "epoch": 1}, 3)
    resumed.close()
    assert _csv_rows(tmp_path) == [
        ["step", "epoch", "train/loss"],
        ["1", "0", "1"],
        ["2", "0", "0.5"],
        ["3", "1", "0.25"],
    ]
    assert CSVLogger(tmp_path).resume_at(str(tmp_path), 10) == 3  # fewer: the rest is replayed
    assert CSVLogger(tmp_path / "new").resume_at(None, 10) == 0


def test_csv_resume_at_stops_at_a_row_merged_into_a_cut_one(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "step,epoch,loss\r\n1,0,1\r\n2,0,0.53,0,0.25\r\n4,0,0.125\r\n"  # as older versions left it
    )
    logger = CSVLogger(tmp_path)
    assert logger.resume_at(str(tmp_path), 4) == 1
    logger.close()
    assert _csv_rows(tmp_path) == [["step", "epoch", "loss"], ["1", "0", "1"]]


def test_tensorboard_resume_at_keeps_exactly_the_records_a_checkpoint_counts(tmp_path):
    first = TensorBoardLogger(tmp_path)
    first.log_hyperparams({"lr": 0.1})
    for step in range(1, 6):
        first.log_metrics({"loss": float(step), "epoch": 0}, step)
        first.log_metrics({"val/loss": 10.0 * step}, step)  # two records at each step
    first.close()
    [first_file] = os.listdir(tmp_path)
    second = TensorBoardLogger(tmp_path, purge_step=3)  # a second file, with a purge marker
    second.log_metrics({"loss": 99.0}, 3)
    second.close()
    [second_file] = set(os.listdir(tmp_path)) - {first_file}
    with open(tmp_path / second_file, "ab") as f:
        f.write(b"\x07\x00\x00")  # a last event cut short

    resumed = TensorBoardLogger(tmp_path)
    assert resumed.resume_at(str(tmp_path), 5) == 5  # up to the train record of step 3
    resumed.log_metrics({"val/loss": 30.5}, 3)
    resumed.close()
    assert len(os.listdir(tmp_path)) == 1
    scalars = _tb_scalars(tmp_path)
    assert scalars["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert scalars["val/loss"] == [(1, 10.0), (2, 20.0), (3, 30.5)]
    assert TensorBoardLogger(tmp_path).resume_at(str(tmp_path), 100) == 6


def test_wandb_resume_at_rewinds_the_run_to_the_checkpoint(tmp_path):
    from test_loggers import _wandb_history, _wandb_kwargs

    from solstice.loggers import WandBLogger

    first = WandBLogger(**_wandb_kwargs(tmp_path))
    run_id = first.run_id  # known before the run starts
    for step in range(1, 6):
        first.log_metrics({"loss": float(step)}, step)
    first.close()
    first_dir = (tmp_path / "wandb" / "latest-run").resolve()
    second = WandBLogger(**_wandb_kwargs(tmp_path))
    assert second.resume_at(run_id, 3) == 3
    assert second.run.id == run_id and second.run.starting_step == 3
    second.log_metrics({"loss": 40.0}, 4)
    second.close()
    second_dir = (tmp_path / "wandb" / "latest-run").resolve()
    assert second_dir != first_dir
    rows = _wandb_history(second_dir)
    assert [(row["_step"], row["trainer/global_step"], row["loss"]) for row in rows] == [
        (3, 4, 40.0)
    ]


def test_a_logger_resumes_through_its_hook_and_gets_what_it_lacks_replayed():
    class Forgetful(Recording):
        """Lost everything after its first record."""

        def resume_at(self, run_id, records):
            self.resumed = (run_id, records)
            return 1

    history = History()  # as restored from a checkpoint that counts 3 records
    for step in range(3):
        history.log_metrics({"x": float(step), "epoch": 0}, step)
    forgetful, plain = Forgetful(), Recording()
    callback = LoggingCallback([forgetful, plain], history=history)
    callback.load_state_dict({"records": 3, "run_ids": ["run-a", None]})
    _ = callback.sink  # starts the loggers' threads (`on_fit_start` does, then this:)
    callback._start_resume()
    callback.on_log(None, None, {"x": 9.0}, 9)
    callback.flush(timeout=60)
    assert forgetful.resumed == ("run-a", 3)
    assert forgetful.rows == [
        (1, {"x": 1.0, "epoch": 0.0}),
        (2, {"x": 2.0, "epoch": 0.0}),
        (9, {"x": 9.0}),
    ]
    assert plain.rows == [(9, {"x": 9.0})]  # the default hook: holds what it had
    assert callback.state_dict()["records"] == 4
    callback.close()


def test_resume_at_must_return_a_count_it_holds():
    class Confused(Recording):
        def resume_at(self, run_id, records):
            return "all"

    worker = LoggerWorker(Confused(), max_queue_size=10, records_source=lambda a, b: [])
    worker.wait(worker.request("resume_at", None, 3), time.monotonic() + 60, float("inf"))
    [note] = worker.take_notes()
    assert "returned 'all'; it must return how many of those records" in note


# ----------------------------------------------------------------------------- clear errors


def test_a_vector_metric_is_named_with_its_shape(monkeypatch):
    compute = ClassificationMetrics.compute

    def with_a_vector(self):
        return {**compute(self), "per_class": jnp.zeros(4)}

    monkeypatch.setattr(ClassificationMetrics, "compute", with_a_vector)
    experiment, data = make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule()
    trainer = solstice.Trainer(max_epochs=1, devices=1, enable_progress_bar=False)
    # Named with its shape and the fix, wherever it is caught (tracing `compute()`, or the
    # logging path), never "only 0-dimensional arrays can be converted to Python scalars".
    message = r"(?s)per_class.{0,2} has shape \(4,\).*jnp\.mean"
    with pytest.raises(ValueError, match=message):
        trainer.validate(experiment, data)
    with pytest.raises(ValueError, match=message):
        trainer.fit(experiment, data)


def test_a_vector_logged_by_hand_is_named_with_its_shape():
    class LogsAVector(solstice.callbacks.Callback):
        def on_train_epoch_end(self, trainer, experiment):
            trainer.log_metrics({"weights/norms": jnp.ones((2, 3))})

    trainer = solstice.Trainer(
        max_epochs=1, devices=1, enable_progress_bar=False, callbacks=[LogsAVector()]
    )
    message = r"Metric 'weights/norms' has shape \(2, 3\).*`jnp.mean\(x\)`, or log each"
    with pytest.raises(ValueError, match=message):
        trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
