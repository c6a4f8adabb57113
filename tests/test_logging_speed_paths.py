"""The fast paths of logging every step: `PackedMetrics` end to end, the background thread's
batches, one TensorBoard event per call, buffered CSV rows, a progress bar that redraws only
when due. What each path writes must not change; these tests check that, and that the slow
operations (device reads, per-key indexing, per-call wake-ups) are not done."""

import struct
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import packed_like_trainer

from solstice.callbacks._progress_bar import ProgressBar
from solstice.loggers import (
    AsyncLogger,
    CSVLogger,
    FanoutLogger,
    History,
    Logger,
    PythonLogger,
    TensorBoardLogger,
    to_floats,
)
from solstice.loggers._convert import check_scalars, many_to_floats
from solstice.loggers._packed import PackedMetrics

NAMES = ("accuracy", "f1", "loss")


def _packed(base: float, epoch: int = 0, **rest) -> PackedMetrics:
    """Like the Trainer's: packed inside a compiled function, prefixed, `epoch` added."""
    metrics = {name: jnp.float32(base + i) for i, name in enumerate(NAMES)}
    metrics.update(rest)
    return packed_like_trainer(metrics, epoch=epoch)


def _expected(base: float, epoch: int = 0) -> dict[str, float]:
    out = {f"train/{name}": base + i for i, name in enumerate(NAMES)}
    out["epoch"] = float(epoch)
    return out


@pytest.fixture
def no_indexing(monkeypatch):
    """Fail if anything indexes a `PackedMetrics` (a device dispatch per key)."""

    def forbidden(self, key):
        raise AssertionError(f"PackedMetrics[{key!r}] was read: a dispatch per key")

    monkeypatch.setattr(PackedMetrics, "__getitem__", forbidden)


class Recording(Logger):
    def __init__(self, gate: threading.Event | None = None):
        self.rows: list[tuple[int, dict]] = []
        self.gate = gate

    def log_metrics(self, metrics, step):
        if self.gate is not None:
            self.gate.wait()
        self.rows.append((step, dict(metrics)))


# ----------------------------------------------------------------------------- conversion


def test_packed_metrics_convert_without_indexing(no_indexing):
    packed = _packed(0.5, epoch=2)
    check_scalars(packed)
    assert to_floats(packed) == _expected(0.5, epoch=2)
    assert list(to_floats(packed)) == list(packed)  # the mapping's order
    both = many_to_floats([packed, {"val/loss": jnp.float32(3.0), "epoch": 2}, {"x": 1.5}])
    assert both == [_expected(0.5, 2), {"val/loss": 3.0, "epoch": 2.0}, {"x": 1.5}]
    assert all(type(v) is float for values in both for v in values.values())


def test_packed_metrics_integer_rest_converted_too(no_indexing):
    packed = _packed(1.0, count=jnp.asarray(7, jnp.int32))  # ints stay out of the vector
    values = to_floats(packed)
    assert values["train/count"] == 7.0 and values["train/loss"] == 3.0


def test_packed_metrics_rest_is_still_checked(no_indexing):
    bad = _packed(0.0).with_items(image=np.ones(3))
    with pytest.raises(ValueError, match="'image' has shape \\(3,\\)"):
        check_scalars(bad)
    logger = AsyncLogger(History())
    with pytest.raises(ValueError, match="'image'"):
        logger.log_metrics(bad, 1)
    with pytest.raises(TypeError, match="'note'"):
        logger.log_metrics(_packed(0.0).with_items(note="text"), 1)
    logger.close()


def test_plain_floats_pass_through_as_new_dicts():
    values = {"a": 1.0, "b": 2.5}
    out = to_floats(values)
    assert out == values and out is not values
    assert to_floats({"a": 1, "b": True, "c": np.float32(0.5)}) == {"a": 1.0, "b": 1.0, "c": 0.5}
    with pytest.raises(TypeError, match="Metric names must be strings"):
        to_floats({1: 1.0})


# ----------------------------------------------------------------------------- every logger


@pytest.mark.parametrize("kind", ["history", "csv", "tensorboard", "python", "fanout", "async"])
def test_every_logger_takes_packed_metrics(kind, tmp_path, no_indexing):
    history = History()
    if kind == "history":
        logger = history
    elif kind == "csv":
        logger = CSVLogger(tmp_path)
    elif kind == "tensorboard":
        logger = TensorBoardLogger(tmp_path)
    elif kind == "python":
        logger = PythonLogger()
    elif kind == "fanout":
        logger = FanoutLogger([history, CSVLogger(tmp_path)])
    else:
        logger = AsyncLogger(FanoutLogger([history, TensorBoardLogger(tmp_path)]))
    for step in range(5):
        logger.log_metrics(_packed(float(step), epoch=step // 2), step)
    logger.close()
    if kind in ("history", "fanout", "async"):
        assert history.metrics["train/loss"] == [2.0, 3.0, 4.0, 5.0, 6.0]
        assert history.epochs["train/loss"] == [0, 0, 1, 1, 2]
    if kind == "csv":
        text = (tmp_path / "metrics.csv").read_text().splitlines()
        assert text[0] == "step,epoch,train/accuracy,train/f1,train/loss"
        assert text[1:] == [f"{s},{s // 2},{s},{s + 1},{s + 2}" for s in range(5)]


def test_async_queues_packed_metrics_without_reading_the_device(monkeypatch, no_indexing):
    from jax._src.array import ArrayImpl

    reads: list[int] = []
    original = ArrayImpl._value

    def counted(array):
        reads.append(threading.get_ident())
        return original.fget(array)

    monkeypatch.setattr(ArrayImpl, "_value", property(counted))
    inner = Recording()
    logger = AsyncLogger(inner)
    items = [_packed(float(i)) for i in range(20)]
    for i, packed in enumerate(items):
        logger.log_metrics(packed, i)
    assert threading.get_ident() not in reads  # nothing read on the caller's thread
    logger.close()
    assert [row for _, row in inner.rows] == [_expected(float(i)) for i in range(20)]


# ----------------------------------------------------------------------------- AsyncLogger


def test_async_takes_waiting_calls_in_one_batch(monkeypatch):
    gets: list[int] = []
    device_get = jax.device_get

    def counting(x):
        gets.append(len(x))
        return device_get(x)

    monkeypatch.setattr(jax, "device_get", counting)
    gate = threading.Event()
    inner = Recording(gate)
    logger = AsyncLogger(inner)
    logger.log_metrics({"x": 0.0}, 0)  # the background thread now waits in the gate
    time.sleep(0.05)
    arrays = [jnp.float32(i) for i in range(1, 41)]
    for i, x in enumerate(arrays, 1):
        logger.log_metrics({"x": x, "epoch": 0}, i)
    gate.set()
    logger.flush()
    assert [step for step, _ in inner.rows] == list(range(41))  # in order
    assert [row["x"] for _, row in inner.rows] == [float(i) for i in range(41)]
    assert len(gets) <= 3 and sum(gets) == 40  # one copy for (nearly) all of them
    logger.close()


def test_async_conversion_error_names_its_call_and_spares_the_batch():
    class Bad(float):
        def __float__(self):
            raise ValueError("cannot convert")

    gate = threading.Event()
    inner = Recording(gate)
    logger = AsyncLogger(inner)
    logger.log_metrics({"x": 0.0}, 0)
    time.sleep(0.05)
    logger.log_metrics({"x": jnp.float32(1.0)}, 1)
    logger.log_metrics({"x": Bad(2.0)}, 2)  # a real number, until converted
    logger.log_metrics({"x": jnp.float32(3.0)}, 3)
    gate.set()
    with pytest.raises(RuntimeError, match="`log_metrics`: ValueError: cannot convert"):
        logger.flush()
    assert [step for step, _ in inner.rows] == [0, 1, 3]
    logger.close()


def test_async_flush_and_close_do_not_wait_for_max_delay():
    inner = Recording()
    logger = AsyncLogger(inner, max_delay=30.0)
    start = time.monotonic()
    for i in range(3):
        logger.log_metrics({"x": float(i)}, i)
        logger.flush()
        assert len(inner.rows) == i + 1
    logger.log_metrics({"x": 9.0}, 9)
    logger.close()
    assert time.monotonic() - start < 10
    assert [step for step, _ in inner.rows] == [0, 1, 2, 9]


def test_async_max_delay_zero_and_a_half_full_queue_end_the_rest():
    inner = Recording()
    logger = AsyncLogger(inner, max_delay=0)
    for i in range(50):
        logger.log_metrics({"x": float(i)}, i)
    logger.close()
    assert [step for step, _ in inner.rows] == list(range(50))

    inner = Recording()
    logger = AsyncLogger(inner, max_queue_size=8, max_delay=30.0)
    start = time.monotonic()
    for i in range(100):  # never waits 30 s for room: half a queue wakes the thread
        logger.log_metrics({"x": float(i)}, i)
    assert time.monotonic() - start < 10
    logger.close()
    assert [step for step, _ in inner.rows] == list(range(100))


@pytest.mark.parametrize(
    "bad, error",
    [(-1.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError)]
    + [("0.1", TypeError), (True, TypeError)],
)
def test_async_checks_max_delay(bad, error):
    with pytest.raises(error, match="max_delay"):
        AsyncLogger(History(), max_delay=bad)


# ----------------------------------------------------------------------------- TensorBoard


def _tb_records(log_dir) -> list:
    from tensorboardX.proto.event_pb2 import Event

    [path] = list(log_dir.glob("events.out.tfevents.*"))
    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        events.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
        pos += 12 + length + 4
    return [event for event in events if event.HasField("summary")]


def test_tensorboard_writes_one_event_per_call(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics(_packed(0.0), 1)
    logger.log_metrics({"val/loss": 0.5, "val/f1": 0.25, "epoch": 0}, 1)  # other keys
    logger.log_metrics(_packed(1.0, epoch=1), 2)  # the first keys again
    logger.log_metrics({"odd name!": 1.0}, 3)  # cleaned into a valid tag
    logger.close()
    events = _tb_records(tmp_path)
    assert [(e.step, len(e.summary.value)) for e in events] == [(1, 4), (1, 3), (2, 4), (3, 1)]
    assert events[2].summary.value[2].tag == "train/loss"
    assert events[2].summary.value[2].simple_value == 3.0

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    assert scalars["train/loss"] == [(1, 2.0), (2, 3.0)]
    assert scalars["val/f1"] == [(1, 0.25)]
    assert scalars["epoch"] == [(1, 0.0), (1, 0.0), (2, 1.0)]
    assert scalars["odd_name_"] == [(3, 1.0)]


# ----------------------------------------------------------------------------- CSV


def test_csv_rows_are_buffered_until_flush_and_formatted(tmp_path):
    logger = CSVLogger(tmp_path)
    path = tmp_path / "metrics.csv"
    logger.log_metrics({"a": 1.0, "b": 0.1, "epoch": 0}, 1)
    logger.log_metrics({"a": float("nan"), "b": float("inf"), "epoch": 0}, 2)
    logger.log_metrics({"b": -2.0, "epoch": 1}, 3)
    assert path.read_text().count("\n") <= 2  # rows may still be in memory
    logger.flush()
    assert path.read_text().splitlines() == [
        "step,epoch,a,b",
        "1,0,1,0.1",
        "2,0,nan,inf",
        "3,1,,-2",
    ]
    logger.close()


# ----------------------------------------------------------------------------- progress bar


class _Progress:
    stage = "train"
    batch_idx = 0


class _Trainer:
    def __init__(self, total):
        self.num_training_batches = total
        self.current_epoch = 0
        self.progress = _Progress()
        self.history = History()
        self.flushes = 0
        trainer = self

        class _Logging:
            def flush(self, timeout=None):
                trainer.flushes += 1

            def flush_history(self):
                trainer.flushes += 1

        self._logging = _Logging()

    def flush_logs(self, *, loggers=True):
        self._logging.flush_history()


def test_progress_bar_redraws_only_when_due(monkeypatch, capsys):
    trainer = _Trainer(total=1000)
    bar = ProgressBar()
    bar.on_train_epoch_start(trainer, None)
    calls = {"set_postfix": 0, "update": 0}
    tqdm_bar = bar._bar
    for name in calls:
        original = getattr(tqdm_bar, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(tqdm_bar, name, counted)
    start = time.monotonic()
    for step in range(1, 1001):  # as fast as possible: a few ms in all
        trainer.history.log_metrics({"train/loss": 1.0 / step, "train/f1": 0.5, "epoch": 0}, step)
        trainer.progress.batch_idx = step
        bar.on_log(trainer, None, {}, step)
    due = 1 + (time.monotonic() - start) / tqdm_bar.mininterval  # redraws tqdm would make
    assert 1 <= calls["update"] <= due + 1 and calls["set_postfix"] == calls["update"]
    trainer.history.log_metrics({"val/accuracy": 0.75, "epoch": 0}, 1000)
    bar.on_train_epoch_end(trainer, None)
    assert trainer.flushes == 1 and bar._bar is None
    assert tqdm_bar.n == 1000
    err = capsys.readouterr().err
    assert "train/loss=0.001" in err and "val/accuracy=0.75" in err
    assert "train/f1" not in err  # not one of the wanted metrics


def test_progress_bar_keeps_up_with_slow_intervals(monkeypatch):
    trainer = _Trainer(total=10)
    bar = ProgressBar()
    bar.on_train_epoch_start(trainer, None)
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    for step in range(1, 6):
        clock[0] += 1.0  # one log interval per second: every one is shown
        trainer.history.log_metrics({"train/loss": float(step), "epoch": 0}, step)
        trainer.progress.batch_idx = step
        bar.on_log(trainer, None, {}, step)
        assert bar._bar.n == step and bar._shown["train/loss"] == f"{step:.4g}"
    bar.on_exception(trainer, None, RuntimeError())
    assert bar._bar is None
