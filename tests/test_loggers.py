"""Loggers: one contract battery over every logger, then what each backend writes."""

import csv
import json
import logging
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import packed_like_trainer

from solstice.loggers import (
    AsyncLogger,
    CSVLogger,
    FanoutLogger,
    History,
    Logger,
    PythonLogger,
    TensorBoardLogger,
    WandBLogger,
    to_floats,
)
from solstice.loggers._hparams import flatten_hparams, jsonable_hparams
from solstice.loggers._packed import PackedMetrics

# ----------------------------------------------------------------------------- helpers


class RecordingLogger(Logger):
    """Keeps every call; optionally slow; records which thread it ran on."""

    def __init__(self, delay: float = 0.0):
        self.rows: list[tuple[int, dict]] = []
        self.hparams: list[dict] = []
        self.calls: list[str] = []
        self.threads: set[int] = set()
        self.delay = delay
        self.closed = False

    def log_metrics(self, metrics, step):
        if self.closed:
            raise RuntimeError(f"{self!r} was closed")
        self.threads.add(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        self.rows.append((step, dict(metrics)))
        self.calls.append("log_metrics")

    def log_hyperparams(self, params):
        self.hparams.append(dict(params))
        self.calls.append("log_hyperparams")

    def flush(self):
        self.calls.append("flush")

    def close(self):
        self.calls.append("close")
        self.closed = True

    def __repr__(self):
        return "RecordingLogger()"


class BrokenLogger(Logger):
    """Raises `OSError('disk full')` from `fail_in`; counts the calls it gets."""

    def __init__(self, fail_in: str = "log_metrics"):
        self.fail_in = fail_in
        self.calls: list[str] = []

    def _call(self, method):
        self.calls.append(method)
        if method == self.fail_in:
            raise OSError("disk full")

    def log_metrics(self, metrics, step):
        self._call("log_metrics")

    def log_hyperparams(self, params):
        self._call("log_hyperparams")

    def flush(self):
        self._call("flush")

    def close(self):
        self._call("close")

    def __repr__(self):
        return "BrokenLogger()"


def _wandb_settings():
    import wandb

    return wandb.Settings(
        console="off",
        x_disable_stats=True,
        x_disable_machine_info=True,
        disable_git=True,
        disable_code=True,
        disable_job_creation=True,
        silent=True,
    )


def _wandb_kwargs(tmp_path):
    return dict(
        mode="offline", dir=str(tmp_path), project="solstice-tests", settings=_wandb_settings()
    )


def _wandb_records(run_dir: Path, timeout: float = 20.0):
    """Parse a `.wandb` file (W&B's LevelDB-style log of protobuf `Record`s).

    W&B's service process finishes writing the file shortly after `run.finish()` returns
    (`finish` sends it a fire-and-forget "finish" message), so wait for the final `exit`
    record."""
    deadline = time.monotonic() + timeout
    while True:
        records = _parse_wandb_file(next(run_dir.glob("run-*.wandb")))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"no exit record in {run_dir} after {timeout} s"
        time.sleep(0.02)


def _parse_wandb_file(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, payload, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # padding, or still being written
            break
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def _wandb_history(run_dir: Path) -> list[dict]:
    rows = []
    for record in _wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def _wandb_config(run_dir: Path) -> dict:
    config = {}
    for record in _wandb_records(run_dir):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config


def _tb_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {
        tag: [(event.step, event.value) for event in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }


def _csv_rows(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _as_series(rows: list[tuple[int, dict]]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in rows:
        for key, value in metrics.items():
            series.setdefault(key, []).append((step, value))
    return series


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def solstice_log():
    """Capture what is logged to the `"solstice"` logging.Logger at INFO."""
    handler = _ListHandler()
    log = logging.getLogger("solstice")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler
    log.removeHandler(handler)
    log.setLevel(old_level)


# ----------------------------------------------------------------------------- the battery

KINDS = ["python", "tensorboard", "wandb", "csv", "history", "async", "fanout", "async-fanout"]


class Harness:
    """A logger of one kind, and a way to read back the metrics it recorded as
    `{name: [(step, value), ...]}`."""

    def __init__(self, kind, tmp_path, handler):
        self.kind, self.tmp_path, self.handler = kind, tmp_path, handler
        self.history = History()
        self.flush_visible = kind != "wandb"  # W&B writes through its own service process
        if kind == "python":
            self.logger = PythonLogger()
        elif kind == "tensorboard":
            self.logger = TensorBoardLogger(tmp_path / "tb")
        elif kind == "wandb":
            self.logger = WandBLogger(**_wandb_kwargs(tmp_path))
        elif kind == "csv":
            self.logger = CSVLogger(tmp_path / "csv")
        elif kind == "history":
            self.logger = self.history
        elif kind == "async":
            self.logger = AsyncLogger(self.history, max_queue_size=4)
        elif kind == "fanout":
            self.logger = FanoutLogger([self.history, CSVLogger(tmp_path / "csv")])
        elif kind == "async-fanout":
            self.logger = AsyncLogger(FanoutLogger([self.history, CSVLogger(tmp_path / "csv")]))

    def read(self) -> dict[str, list[tuple[int, float]]]:
        if self.kind == "python":
            rows = []
            for message in self.handler.messages:
                if message.startswith("step "):
                    head, _, body = message.partition(": ")
                    pairs = (item.split("=") for item in body.split())
                    rows.append((int(head[5:]), {k: float(v) for k, v in pairs}))
            return _as_series(rows)
        if self.kind == "tensorboard":
            return _tb_scalars(self.tmp_path / "tb")
        if self.kind == "wandb":
            [run_dir] = (self.tmp_path / "wandb").glob("offline-run-*")
            rows = [
                (row.pop("trainer/global_step"), {k: v for k, v in row.items() if k[0] != "_"})
                for row in _wandb_history(run_dir)
            ]
            return _as_series(rows)
        if self.kind == "csv":
            _, rows = _csv_rows(self.tmp_path / "csv" / "metrics.csv")
            return _as_series(
                [
                    (int(row.pop("step")), {k: float(v) for k, v in row.items() if v != ""})
                    for row in rows
                ]
            )
        series = {
            name: list(zip(self.history.steps[name], self.history.metrics[name]))
            for name in self.history.metrics
        }
        epochs = [
            (step, epoch)
            for name in self.history.metrics
            for step, epoch in zip(self.history.steps[name], self.history.epochs[name])
        ]
        series["epoch"] = [(s, float(e)) for s, e in sorted(set(epochs)) if e is not None]
        return series


@pytest.fixture(params=KINDS)
def harness(request, tmp_path, solstice_log):
    h = Harness(request.param, tmp_path, solstice_log)
    yield h
    h.logger.close()


LOGGED = [
    ({"train/loss": jnp.asarray(2.0), "train/accuracy": np.float32(0.25), "epoch": 0}, 1),
    ({"train/loss": jnp.asarray(1.0, jnp.bfloat16), "train/accuracy": 0.5, "epoch": 0}, 2),
    ({"val/loss": 1.5, "val/accuracy": jnp.asarray(0.75), "epoch": 0}, 2),
    ({"train/loss": 0.5, "train/accuracy": jnp.asarray(1.0), "epoch": 1}, 3),
]
EXPECTED = {
    "train/loss": [(1, 2.0), (2, 1.0), (3, 0.5)],
    "train/accuracy": [(1, 0.25), (2, 0.5), (3, 1.0)],
    "val/loss": [(2, 1.5)],
    "val/accuracy": [(2, 0.75)],
}


def _log_all(logger):
    logger.log_hyperparams({"lr": 1e-3, "model": {"width": 32, "act": "relu"}, "seeds": [1, 2]})
    for metrics, step in LOGGED:
        logger.log_metrics(metrics, step)


def test_writes_every_value(harness):
    _log_all(harness.logger)
    harness.logger.close()
    got = harness.read()
    for name, expected in EXPECTED.items():
        assert got[name] == expected, name
    assert {step for step, _ in got["epoch"]} == {1, 2, 3}


def _packed(metrics: dict) -> PackedMetrics:
    """What the Trainer publishes: the floating scalars in one device vector, then `epoch`."""
    metrics = dict(metrics)
    epoch = metrics.pop("epoch")
    inner = {k.removeprefix("train/"): jnp.asarray(v) for k, v in metrics.items()}
    return packed_like_trainer(inner, epoch=epoch)


def test_writes_every_value_from_packed_metrics(harness):
    for metrics, step in LOGGED:
        packed = metrics["epoch"] is not None and "train/loss" in metrics
        harness.logger.log_metrics(_packed(metrics) if packed else metrics, step)
    harness.logger.close()
    got = harness.read()
    for name, expected in EXPECTED.items():
        assert got[name] == expected, name
    assert {step for step, _ in got["epoch"]} == {1, 2, 3}


def test_flush_makes_values_visible(harness):
    _log_all(harness.logger)
    harness.logger.flush()
    if harness.flush_visible:
        assert harness.read()["train/loss"] == EXPECTED["train/loss"]
    harness.logger.log_metrics({"train/loss": 0.25}, 4)
    harness.logger.close()
    assert harness.read()["train/loss"][-1] == (4, 0.25)


def test_double_close_and_flush_after_close_are_safe(harness):
    harness.logger.log_metrics({"train/loss": 1.0}, 0)
    harness.logger.close()
    harness.logger.close()
    harness.logger.flush()
    assert harness.read()["train/loss"] == [(0, 1.0)]


def test_logging_after_close_raises(harness):
    harness.logger.close()
    name = type(harness.logger).__name__
    with pytest.raises(RuntimeError, match=rf"{name}.*it was closed"):
        harness.logger.log_metrics({"train/loss": 1.0}, 0)
    with pytest.raises(RuntimeError, match="it was closed"):
        harness.logger.log_hyperparams({"lr": 0.1})


def test_non_scalar_metric_raises_naming_key_and_shape(harness):
    with pytest.raises(ValueError, match=r"'train/loss' has shape \(3,\)"):
        harness.logger.log_metrics({"train/loss": jnp.zeros(3)}, 0)
    with pytest.raises(TypeError, match="'name' is 'abc'"):
        harness.logger.log_metrics({"name": "abc"}, 0)
    with pytest.raises(TypeError, match="Hyperparameters must be a mapping.*got list"):
        harness.logger.log_hyperparams(["lr", 0.1])


@pytest.mark.parametrize("fail_in", ["log_metrics", "log_hyperparams", "flush", "close"])
@pytest.mark.parametrize("wrap", ["fanout", "async-fanout"])
def test_failing_backend_warns_on_main_thread_and_others_continue(tmp_path, fail_in, wrap):
    broken, good = BrokenLogger(fail_in), RecordingLogger()
    tb = TensorBoardLogger(tmp_path / "tb")
    logger = FanoutLogger([broken, good, tb])
    if wrap == "async-fanout":
        logger = AsyncLogger(logger)
    with pytest.warns(RuntimeWarning) as record:
        logger.log_hyperparams({"lr": 0.1})
        logger.log_metrics({"train/loss": jnp.asarray(1.0)}, 1)
        logger.flush()
        logger.log_metrics({"train/loss": jnp.asarray(0.5)}, 2)
        logger.close()
    [warning] = record.list
    message = str(warning.message)
    assert "BrokenLogger()" in message and "OSError: disk full" in message
    assert f"`{fail_in}`" in message and "disabled" in message
    # Issued from the main thread's call stack, pointing at the call in this test.
    assert warning.filename == __file__
    # Disabled: no calls after the failing one (but still closed, best effort).
    assert broken.calls.count(fail_in) == 1
    index = broken.calls.index(fail_in)
    assert broken.calls[index + 1 :] in ([], ["close"])
    # The others got everything.
    assert good.rows == [(1, {"train/loss": 1.0}), (2, {"train/loss": 0.5})]
    assert good.calls[-1] == "close"
    assert _tb_scalars(tmp_path / "tb")["train/loss"] == [(1, 1.0), (2, 0.5)]


def test_nothing_is_lost_at_close(tmp_path):
    slow, csv_logger = RecordingLogger(delay=0.0002), CSVLogger(tmp_path)
    logger = AsyncLogger(FanoutLogger([slow, csv_logger]), max_queue_size=16)
    for i in range(1000):
        logger.log_metrics({"x": jnp.asarray(i, jnp.float32), "epoch": i // 100}, i)
    logger.close()
    assert slow.rows == [(i, {"x": float(i), "epoch": float(i // 100)}) for i in range(1000)]
    _, rows = _csv_rows(tmp_path / "metrics.csv")
    assert [(int(r["step"]), float(r["x"]), int(r["epoch"])) for r in rows] == [
        (i, float(i), i // 100) for i in range(1000)
    ]


# ----------------------------------------------------------------------------- AsyncLogger


def test_async_converts_on_the_background_thread(monkeypatch):
    copies: list[int] = []
    device_get = jax.device_get

    def recording_device_get(x):
        copies.append(threading.get_ident())
        return device_get(x)

    monkeypatch.setattr(jax, "device_get", recording_device_get)
    inner = RecordingLogger()
    logger = AsyncLogger(inner)
    logger.log_metrics({"loss": jnp.asarray(0.5), "epoch": 0}, 7)
    logger.flush()
    assert copies and threading.get_ident() not in copies
    assert inner.threads and threading.get_ident() not in inner.threads
    assert inner.rows == [(7, {"loss": 0.5, "epoch": 0.0})]
    assert all(type(v) is float for v in inner.rows[0][1].values())
    logger.close()


def test_async_flush_waits_for_everything_and_flushes_inner():
    inner = RecordingLogger(delay=0.001)
    logger = AsyncLogger(inner)
    for i in range(20):
        logger.log_metrics({"x": i}, i)
    logger.flush()
    assert len(inner.rows) == 20 and inner.calls[-1] == "flush"
    logger.close()
    assert inner.calls[-1] == "close" and inner.closed


def test_async_blocks_when_full_and_never_drops():
    release = threading.Event()

    class Blocking(RecordingLogger):
        def log_metrics(self, metrics, step):
            release.wait()
            super().log_metrics(metrics, step)

    inner = Blocking()
    logger = AsyncLogger(inner, max_queue_size=2)
    for i in range(3):  # one on the worker, two in the queue
        logger.log_metrics({"x": i}, i)
    producer = threading.Thread(target=logger.log_metrics, args=({"x": 3}, 3))
    producer.start()
    producer.join(timeout=0.2)
    assert producer.is_alive()  # blocked: the queue is full
    release.set()
    producer.join()
    logger.close()
    assert [step for step, _ in inner.rows] == [0, 1, 2, 3]


def test_async_reraises_background_error_on_main_thread():
    broken = BrokenLogger("log_metrics")
    logger = AsyncLogger(broken)
    logger.log_metrics({"x": 1.0}, 0)
    with pytest.raises(RuntimeError, match=r"BrokenLogger\(\) raised.*`log_metrics`") as info:
        logger.flush()
    assert isinstance(info.value.__cause__, OSError)
    logger.flush()  # reported once
    logger.close()
    assert broken.calls == ["log_metrics", "flush", "flush", "close"]


def test_async_error_reported_at_close_after_everything_is_written():
    broken = BrokenLogger("close")
    logger = AsyncLogger(broken)
    logger.log_metrics({"x": 1.0}, 0)
    with pytest.raises(RuntimeError, match=r"`close`: OSError: disk full"):
        logger.close()
    logger.close()  # idempotent, nothing more to report
    assert broken.calls == ["log_metrics", "close"]


def test_async_error_at_next_log_call():
    logger = AsyncLogger(BrokenLogger("log_hyperparams"))
    logger.log_hyperparams({"lr": 0.1})
    deadline = time.monotonic() + 5
    while not logger._errors and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(RuntimeError, match="`log_hyperparams`"):
        logger.log_metrics({"x": 1.0}, 0)
    logger.close()


@pytest.mark.parametrize(
    "kwargs, error",
    [({"max_queue_size": 0}, ValueError), ({"max_queue_size": 1.5}, TypeError)],
)
def test_async_checks_arguments(kwargs, error):
    with pytest.raises(error, match="max_queue_size"):
        AsyncLogger(RecordingLogger(), **kwargs)
    with pytest.raises(TypeError, match="AsyncLogger wraps a `solstice.Logger`"):
        AsyncLogger(print)


def test_async_run_id_is_the_inner_loggers(tmp_path):
    logger = AsyncLogger(CSVLogger(tmp_path))
    assert logger.run_id == str(tmp_path)
    logger.close()


def test_async_close_interrupted_by_ctrl_c_can_be_completed():
    inner = RecordingLogger(delay=0.001)
    logger = AsyncLogger(inner)
    for i in range(50):
        logger.log_metrics({"x": i}, i)
    join = logger._thread.join

    def interrupted_join(*args):
        logger._thread.join = join
        raise KeyboardInterrupt

    logger._thread.join = interrupted_join
    with pytest.raises(KeyboardInterrupt):
        logger.close()
    logger.close()  # what the Trainer's handler (or the exit handler) does next
    assert [step for step, _ in inner.rows] == list(range(50)) and inner.closed


def test_async_logger_left_open_is_closed_at_exit(tmp_path):
    code = f"""
from solstice.loggers import AsyncLogger, CSVLogger
logger = AsyncLogger(CSVLogger({str(tmp_path)!r}))
for i in range(500):
    logger.log_metrics({{"x": float(i)}}, i)
"""  # no close(): the interpreter's exit must still write everything
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    _, rows = _csv_rows(tmp_path / "metrics.csv")
    assert [int(row["step"]) for row in rows] == list(range(500))


# ----------------------------------------------------------------------------- FanoutLogger


def test_fanout_checks_its_loggers():
    logger = RecordingLogger()
    with pytest.raises(ValueError, match="same logger twice"):
        FanoutLogger([logger, logger])
    with pytest.raises(TypeError, match="got 'csv'"):
        FanoutLogger([logger, "csv"])


def test_fanout_records_failures_and_keeps_the_rest():
    broken, good = BrokenLogger(), RecordingLogger()
    logger = FanoutLogger([broken, good])
    with pytest.warns(RuntimeWarning, match=r"BrokenLogger\(\) raised OSError: disk full"):
        logger.log_metrics({"x": 1.0}, 0)
    logger.log_metrics({"x": 2.0}, 1)
    assert logger.enabled == (good,)
    assert logger.loggers == (broken, good)
    [failure] = logger.failures
    assert failure.logger is broken and failure.method == "log_metrics"
    assert isinstance(failure.error, OSError)
    logger.close()
    assert [step for step, _ in good.rows] == [0, 1]


# ----------------------------------------------------------------------------- conversion


def test_to_floats_accepts_every_scalar_kind():
    values = to_floats(
        {
            "int": 3,
            "bool": True,
            "np": np.float32(0.5),
            "np0d": np.asarray(2, np.int32),
            "jax": jnp.asarray(0.25),
            "bf16": jnp.asarray(1.5, jnp.bfloat16),
            "jaxint": jnp.asarray(4, jnp.int32),
        }
    )
    assert values == {
        "int": 3.0,
        "bool": 1.0,
        "np": 0.5,
        "np0d": 2.0,
        "jax": 0.25,
        "bf16": 1.5,
        "jaxint": 4.0,
    }
    assert all(type(v) is float for v in values.values())


@pytest.mark.parametrize(
    "metrics, error, match",
    [
        ({"loss": jnp.zeros((2, 3))}, ValueError, r"'loss' has shape \(2, 3\)"),
        ({"loss": np.zeros(1)}, ValueError, r"'loss' has shape \(1,\)"),
        ({"z": jnp.asarray(1j)}, TypeError, "'z' has dtype complex64"),
        ({"s": None}, TypeError, "'s' is None of type NoneType"),
        ({3: 1.0}, TypeError, "Metric names must be strings, got 3"),
        ([("a", 1.0)], TypeError, "must be a mapping"),
    ],
)
def test_to_floats_rejects_non_scalars(metrics, error, match):
    with pytest.raises(error, match=match):
        to_floats(metrics)


def test_hparams_flatten_and_jsonable():
    params = {
        "lr": jnp.asarray(0.5),
        "model": {"width": np.int64(32), "act": "relu", "dropout": None},
        "layers": (1, 2),
        "nesterov": True,
    }
    assert flatten_hparams(params) == {
        "lr": 0.5,
        "model/width": 32,
        "model/act": "relu",
        "model/dropout": "None",
        "layers": "(1, 2)",
        "nesterov": True,
    }
    nested = jsonable_hparams(params)
    assert json.loads(json.dumps(nested)) == nested
    assert nested["model"] == {"width": 32, "act": "relu", "dropout": "None"}
    assert nested["layers"] == [1, 2]
    with pytest.raises(TypeError, match="must be a mapping"):
        flatten_hparams([1, 2])


# ----------------------------------------------------------------------------- backends


def test_python_logger_writes_compact_lines(solstice_log):
    logger = PythonLogger()
    logger.log_hyperparams({"lr": 0.001, "model": {"width": 32}})
    logger.log_metrics({"train/loss": jnp.asarray(0.123456), "epoch": 1}, 120)
    logger.close()
    assert solstice_log.messages == [
        "hyperparameters: lr=0.001 model/width=32",
        "step 120: epoch=1 train/loss=0.1235",
    ]
    assert "solstice" in repr(logger) and "INFO" in repr(logger)


def test_python_logger_uses_its_level_and_name(caplog):
    logger = PythonLogger(level=logging.DEBUG, name="solstice.test")
    logger.log_metrics({"x": 1.0}, 0)  # DEBUG is not enabled: nothing emitted
    with pytest.raises(ValueError, match="'x' has shape"):
        logger.log_metrics({"x": jnp.zeros(2)}, 0)
    with caplog.at_level(logging.DEBUG, logger="solstice.test"):
        logger.log_metrics({"x": 1.0}, 0)
    [record] = caplog.records
    assert record.name == "solstice.test" and record.levelno == logging.DEBUG
    with pytest.raises(TypeError, match="`level` must be a logging level"):
        PythonLogger(level="info")


def test_tensorboard_scalars_and_hparams_read_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    logger = TensorBoardLogger(tmp_path)
    assert logger.run_id == str(tmp_path)
    _log_all(logger)
    logger.close()

    scalars = _tb_scalars(tmp_path)
    for name, expected in EXPECTED.items():
        assert scalars[name] == expected
    assert scalars["epoch"] == [(1, 0.0), (2, 0.0), (2, 0.0), (3, 1.0)]

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = data.session_start_info.hparams
    assert hparams["lr"].number_value == pytest.approx(1e-3)
    assert hparams["model/width"].number_value == 32
    assert hparams["model/act"].string_value == "relu"
    assert hparams["seeds"].string_value == "[1, 2]"


def test_tensorboard_purge_step_hides_what_a_resumed_run_rewrites(tmp_path):
    first = TensorBoardLogger(tmp_path)
    for step in range(1, 6):
        first.log_metrics({"loss": float(step)}, step)
    first.close()
    time.sleep(1.01)  # event files are ordered by the second they were created in
    second = TensorBoardLogger(tmp_path, purge_step=4)
    second.log_metrics({"loss": 40.0}, 4)
    second.close()
    assert _tb_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    with pytest.raises(ValueError, match="`flush_secs` must be >= 0"):
        TensorBoardLogger(tmp_path, flush_secs=-1)


def test_csv_header_grows_without_losing_rows(tmp_path):
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"train/loss": 1.0, "epoch": 0}, 1)
    logger.log_metrics({"train/loss": jnp.asarray(0.5), "epoch": 0}, 2)
    logger.flush()
    header, _ = _csv_rows(tmp_path / "metrics.csv")
    assert header == ["step", "epoch", "train/loss"]
    logger.log_metrics({"val/loss": 0.75, "val/acc": 0.5, "epoch": 0}, 2)
    logger.log_metrics({"train/loss": 0.25, "epoch": 1}, 3)
    logger.log_metrics({"test/loss": 0.125}, 3)  # no epoch: empty cell
    logger.log_hyperparams({"lr": 0.1, "model": {"width": 8}, "act": jax.nn.relu})
    logger.close()

    header, rows = _csv_rows(tmp_path / "metrics.csv")
    assert header == ["step", "epoch", "train/loss", "val/loss", "val/acc", "test/loss"]
    assert rows == [
        {"step": "1", "epoch": "0", "train/loss": "1", "val/loss": "", "val/acc": "", "test/loss": ""},
        {"step": "2", "epoch": "0", "train/loss": "0.5", "val/loss": "", "val/acc": "", "test/loss": ""},
        {"step": "2", "epoch": "0", "train/loss": "", "val/loss": "0.75", "val/acc": "0.5", "test/loss": ""},
        {"step": "3", "epoch": "1", "train/loss": "0.25", "val/loss": "", "val/acc": "", "test/loss": ""},
        {"step": "3", "epoch": "", "train/loss": "", "val/loss": "", "val/acc": "", "test/loss": "0.125"},
    ]  # fmt: skip
    hparams = json.loads((tmp_path / "hparams.json").read_text())
    assert hparams["lr"] == 0.1 and hparams["model"] == {"width": 8}
    assert isinstance(hparams["act"], str)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hparams.json", "metrics.csv"]


def test_csv_resumed_run_appends(tmp_path):
    first = CSVLogger(tmp_path)
    first.log_metrics({"loss": 1.0, "epoch": 0}, 1)
    first.log_hyperparams({"lr": 0.1})
    first.close()
    second = CSVLogger(tmp_path)
    second.log_metrics({"loss": 0.5, "acc": 0.9, "epoch": 1}, 2)
    second.log_hyperparams({"batch_size": 4})
    second.close()
    header, rows = _csv_rows(tmp_path / "metrics.csv")
    assert header == ["step", "epoch", "loss", "acc"]
    assert [(r["step"], r["loss"], r["acc"]) for r in rows] == [("1", "1", ""), ("2", "0.5", "0.9")]
    assert json.loads((tmp_path / "hparams.json").read_text()) == {"lr": 0.1, "batch_size": 4}


def test_csv_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        CSVLogger(tmp_path, filename="sub/metrics.csv")
    logger = CSVLogger(tmp_path, filename="m.csv")
    with pytest.raises(ValueError, match="metric named 'step'"):
        logger.log_metrics({"step": 3}, 3)
    logger.close()
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="does not start with 'step,epoch'"):
        CSVLogger(tmp_path, filename="other.csv")


def test_wandb_offline_run_holds_history_and_config(tmp_path):
    logger = WandBLogger(**_wandb_kwargs(tmp_path))
    _log_all(logger)
    run_id = logger.run_id
    logger.close()
    logger.close()
    assert logger.run_id == run_id

    [run_dir] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}*")
    rows = _wandb_history(run_dir)
    assert [row["trainer/global_step"] for row in rows] == [1, 2, 2, 3]
    assert [row.get("train/loss") for row in rows] == [2.0, 1.0, None, 0.5]
    assert rows[2]["val/accuracy"] == 0.75 and rows[3]["epoch"] == 1
    config = _wandb_config(run_dir)
    assert config == {"lr": 1e-3, "model": {"width": 32, "act": "relu"}, "seeds": [1, 2]}


def test_wandb_resume_continues_the_same_run(tmp_path):
    first = WandBLogger(**_wandb_kwargs(tmp_path))
    first.log_metrics({"loss": 1.0}, 1)
    run_id = first.run_id
    first.close()

    second = WandBLogger(**_wandb_kwargs(tmp_path)).resume_from(run_id)
    assert second.run_id == run_id  # known before the run starts
    second.log_metrics({"loss": 0.5}, 2)
    assert second.run.id == run_id
    second.resume_from(run_id)  # same id: fine
    with pytest.raises(RuntimeError, match="already started run"):
        second.resume_from("another")
    second.close()
    run_dirs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(run_dirs) >= 1
    steps = [row["trainer/global_step"] for d in run_dirs for row in _wandb_history(d)]
    assert sorted(steps) == [1, 2]


def test_wandb_closed_before_starting_starts_nothing(tmp_path):
    logger = WandBLogger(**_wandb_kwargs(tmp_path))
    logger.close()
    assert logger.run_id is None
    assert not (tmp_path / "wandb").exists()
    with pytest.raises(TypeError, match="non-empty string"):
        WandBLogger(mode="offline").resume_from("")


# ----------------------------------------------------------------------------- History


def test_history_layout_records_and_state_dict():
    history = History()
    history.log_hyperparams({"lr": 0.1})
    history.log_metrics({"train/loss": 0.9, "epoch": 0}, 10)
    history.log_metrics({"train/loss": jnp.asarray(0.5), "val/loss": 0.75, "epoch": 1}, 20)
    history.log_metrics({"lr": 0.01}, 20)
    assert history.metrics == {"train/loss": [0.9, 0.5], "val/loss": [0.75], "lr": [0.01]}
    assert history.steps == {"train/loss": [10, 20], "val/loss": [20], "lr": [20]}
    assert history.epochs == {"train/loss": [0, 1], "val/loss": [1], "lr": [None]}
    assert history.hparams == {"lr": 0.1}
    records = [
        (10, {"train/loss": 0.9, "epoch": 0.0}),
        (20, {"train/loss": 0.5, "val/loss": 0.75, "epoch": 1.0}),
        (20, {"lr": 0.01}),
    ]
    assert list(history.iter_records()) == records and history.num_records == 3
    assert list(history.iter_records(1, 2)) == records[1:2]

    # Not persisted to a file: the state holds the records (in order, whatever sorts keys).
    state = json.loads(json.dumps(history.state_dict(), sort_keys=True))
    assert state["records"] == 3 and state["path"] is None
    restored = History()
    restored.load_state_dict(state)
    assert list(restored.iter_records()) == records
    assert restored.state_dict() == history.state_dict()
    with pytest.raises(ValueError, match=r"missing \['path', 'records'\]"):
        restored.load_state_dict({"hparams": {}})

    # A state written by an older Solstice (the lists themselves) is still accepted.
    legacy = History()
    legacy.load_state_dict(
        {
            "metrics": history.metrics,
            "steps": history.steps,
            "epochs": history.epochs,
            "hparams": history.hparams,
        }
    )
    assert list(legacy.iter_records()) == records
    assert legacy.metrics == history.metrics and legacy.epochs == history.epochs


def test_history_plot_writes_a_png(tmp_path):
    history = History()
    for step in range(1, 41):
        history.log_metrics({"train/loss": 1 / step, "train/acc": 1 - 1 / step}, step)
        if step % 10 == 0:
            history.log_metrics({"val/loss": 2 / step, "val/acc": 1 - 2 / step}, step)
    history.log_metrics({"lr": 0.1}, 40)
    path = history.plot(tmp_path / "curves.png")
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    history.plot(tmp_path / "loss.png", names=["train/loss", "val/loss"])
    assert (tmp_path / "loss.png").stat().st_size > 0
    with pytest.raises(ValueError, match=r"no metric\(s\) \['nope'\]"):
        history.plot(tmp_path / "x.png", names=["nope"])


def test_history_plot_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="History is empty"):
        History().plot(tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    history = History()
    history.log_metrics({"x": 1.0}, 0)
    with pytest.raises(ImportError, match=r"pip install 'solstice\[plot\]'"):
        history.plot(tmp_path / "x.png")


# ----------------------------------------------------------------------------- import cost


def test_import_solstice_imports_no_heavy_optional_dependency():
    code = (
        "import sys, solstice, solstice.loggers; "
        "print(sorted(m for m in ('tensorboardX', 'wandb', 'matplotlib', 'torch', "
        "'tensorboard', 'mlflow') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_file_loggers_touch_the_disk_only_when_they_write(tmp_path, kind):
    """A logger built but never written to (another process's copy) leaves nothing behind;
    the first write creates its directory."""
    log_dir = tmp_path / "run" / "logs"
    make = CSVLogger if kind == "csv" else TensorBoardLogger
    idle = make(log_dir)
    idle.flush()
    idle.close()
    assert not (tmp_path / "run").exists()
    used = make(log_dir)
    used.log_metrics({"loss": 0.5}, 1)
    used.close()
    assert any(log_dir.iterdir())
    if kind == "csv":
        assert _csv_rows(log_dir / "metrics.csv")[1] == [{"step": "1", "epoch": "", "loss": "0.5"}]
    else:
        assert _tb_scalars(log_dir)["loss"] == [(1, 0.5)]
