"""Images and histograms (issue 16, item 5): checked on the training thread, copied on the
device, converted on the logging thread, written by TensorBoard and W&B (MLflow: see
test_mlflow.py), ignored with one warning by the others; never fatal to a run."""

import io
import json
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import blobs_datamodule, make_mlp_experiment
from test_loggers import _wandb_kwargs, _wandb_records

import solstice
from solstice.callbacks import Callback, ModelCheckpoint
from solstice.loggers import (
    AsyncLogger,
    CSVLogger,
    FanoutLogger,
    Logger,
    TensorBoardLogger,
    WandBLogger,
    histogram,
    to_host_arrays,
    to_host_images,
)
from solstice.loggers._media import encode_png

PIL = pytest.importorskip("PIL.Image")

# A 2x3 RGB float image and what it becomes as uint8 (round(clip(x, 0, 1) * 255); NaN -> 0).
FLOAT_IMAGE = np.array(
    [[[0.0, 0.5, 1.0], [2.0, -1.0, 0.25], [np.nan, 0.1, 0.6]]] * 2, dtype=np.float32
)
FLOAT_AS_UINT8 = np.array([[[0, 128, 255], [255, 0, 64], [0, 26, 153]]] * 2, dtype=np.uint8)


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(PIL.open(io.BytesIO(data)))


# ----------------------------------------------------------------------------- conversions


def test_images_become_uint8_height_width_channels():
    gray = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    mask = np.array([[True, False], [False, True]])
    host = to_host_images(
        {"float": jnp.asarray(FLOAT_IMAGE), "gray": gray, "mask": mask, "rgba": np.zeros((2, 2, 4))}
    )
    np.testing.assert_array_equal(host["float"], FLOAT_AS_UINT8)
    np.testing.assert_array_equal(host["gray"], gray[:, :, None])
    np.testing.assert_array_equal(host["mask"][:, :, 0], [[255, 0], [0, 255]])
    assert host["rgba"].shape == (2, 2, 4) and host["rgba"].dtype == np.uint8


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_encoding_decodes_to_the_same_pixels(channels):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    decoded = _png_pixels(encode_png(pixels))
    np.testing.assert_array_equal(decoded.reshape(5, 7, channels), pixels)


def test_histogram_counts_the_finite_values_in_equal_bins():
    h = histogram(np.array([[0.0, 1.0], [1.0, 4.0]]), bins=4)
    np.testing.assert_array_equal(h.edges, [0.0, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(h.counts, [1, 2, 0, 1])  # [0,1) [1,2) [2,3) [3,4]
    assert (h.num, h.min, h.max, h.sum, h.sum_squares) == (4, 0.0, 4.0, 6.0, 18.0)
    with_nan = histogram(np.array([np.nan, np.inf, 2.0]), bins=2)
    assert (with_nan.num, with_nan.sum, list(with_nan.counts)) == (1, 2.0, [0, 1])
    empty = histogram(np.array([]))
    assert empty.num == 0 and empty.counts.sum() == 0


@pytest.mark.parametrize(
    "images, error, match",
    [
        ({"x": np.zeros((3, 8, 8))}, ValueError, r"channels-first.*jnp.moveaxis"),
        ({"x": np.zeros((4, 8, 8, 3))}, ValueError, r"\(4, 8, 8, 3\).*batch"),
        ({"x": np.zeros(8)}, ValueError, r"'x' has shape \(8,\)"),
        ({"x": np.zeros((8, 8), np.int32)}, TypeError, r"dtype int32.*astype\(jnp.uint8\)"),
        ({3: np.zeros((8, 8))}, TypeError, "names must be strings"),
        ([np.zeros((8, 8))], TypeError, "mapping of name -> array"),
    ],
)
def test_bad_images_are_named_with_the_fix(images, error, match):
    with pytest.raises(error, match=match):
        to_host_images(images)


def test_bad_histograms_are_named_with_the_fix():
    with pytest.raises(TypeError, match=r"'c' has dtype complex64"):
        to_host_arrays({"c": np.zeros(3, np.complex64)})


# ----------------------------------------------------------------------------- through fit


class LogMedia(Callback):
    """At each epoch's end: an image and histograms of the first layer's weights (kept
    here as host copies, read at that moment, to check what the loggers got)."""

    def __init__(self):
        self.weights: list[tuple[int, np.ndarray]] = []

    def on_train_epoch_end(self, trainer, experiment):
        weight = trainer.experiment.model.layers[1].layers[0].weight
        self.weights.append((trainer.global_step, np.asarray(weight)))
        trainer.log_images({"samples/float": jnp.asarray(FLOAT_IMAGE)})
        trainer.log_histograms({"weights/first": weight, "plain": np.arange(5.0)})


def _fit(loggers, epochs=2, callback=None, more=()):
    callback = callback or LogMedia()
    trainer = solstice.Trainer(
        max_epochs=epochs,
        log_every_n_steps=4,
        devices=1,
        enable_progress_bar=False,
        loggers=loggers,
        callbacks=[callback, *more],
    )
    trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule(n_train=64))
    trainer.close()
    return trainer, callback


def _accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_tensorboard_shows_the_images_and_histograms_of_a_fit(tmp_path):
    trainer, media = _fit([TensorBoardLogger(tmp_path / "tb")])
    acc = _accumulator(tmp_path / "tb")
    steps = [step for step, _ in media.weights]
    assert steps == [2, 4]
    images = acc.Images("samples/float")
    assert [event.step for event in images] == steps
    for event in images:
        assert (event.width, event.height) == (3, 2)
        np.testing.assert_array_equal(_png_pixels(event.encoded_image_string), FLOAT_AS_UINT8)
    histograms = acc.Histograms("weights/first")
    assert [event.step for event in histograms] == steps
    for event, (_, weight) in zip(histograms, media.weights):
        value = event.histogram_value
        counts, edges = np.histogram(weight.astype(np.float64).ravel(), bins=64)
        assert list(value.bucket) == counts.tolist()
        np.testing.assert_allclose(value.bucket_limit, edges[1:])
        assert value.num == weight.size
        assert value.min == pytest.approx(float(weight.min()))
        assert value.sum_squares == pytest.approx(float(np.sum(weight.astype(np.float64) ** 2)))
    # the weights changed between the epochs: each histogram is of its moment (copied
    # before the next step donated the buffers)
    assert not np.array_equal(media.weights[0][1], media.weights[1][1])
    plain = acc.Histograms("plain")[0].histogram_value
    assert (plain.num, plain.sum, plain.max) == (5, 10.0, 4.0)
    # images and histograms are not records: the scalars are exactly the history's
    assert len(acc.Scalars("train/loss")) == len(trainer.history.metrics["train/loss"])


def test_tensorboard_resume_counts_only_metric_events_as_records(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_hyperparams({"lr": 0.1})
    for step in range(1, 4):
        logger.log_images({"x": np.zeros((2, 2))}, step)
        logger.log_histograms({"h": np.arange(3.0)}, step)
        logger.log_metrics({"loss": float(step)}, step)
    logger.close()
    resumed = TensorBoardLogger(tmp_path)
    assert resumed.resume_at(str(tmp_path), 2) == 2
    resumed.close()
    acc = _accumulator(tmp_path)
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert [e.step for e in acc.Images("x")] == [1, 2, 3]  # the third came before record 3


def test_a_logger_without_media_warns_once_and_keeps_logging_metrics(tmp_path):
    with pytest.warns(RuntimeWarning) as caught:
        trainer, _ = _fit([CSVLogger(tmp_path / "csv")], epochs=3)
    messages = [str(w.message) for w in caught]
    assert sum("does not record images" in m for m in messages) == 1, messages
    assert sum("does not record histograms" in m for m in messages) == 1, messages
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert len(rows) - 1 == trainer.history.num_records


def test_direct_calls_warn_once_on_the_callers_thread():
    class Plain(Logger):
        def log_metrics(self, metrics, step):
            pass

    logger = Plain()
    with pytest.warns(RuntimeWarning, match=r"does not record images"):
        logger.log_images({"x": np.zeros((2, 2))}, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.log_images({"x": np.zeros((2, 2))}, 1)  # not again


class MediaRaises(Logger):
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append(step)

    def log_images(self, images, step):
        raise OSError("disk full")

    def __repr__(self):
        return "MediaRaises()"


def test_a_logger_failing_on_images_is_disabled_and_the_run_goes_on(tmp_path):
    with pytest.warns(
        RuntimeWarning, match=r"MediaRaises\(\) raised OSError: disk full.*log_images"
    ):
        trainer, _ = _fit([MediaRaises(), TensorBoardLogger(tmp_path / "tb")])
    acc = _accumulator(tmp_path / "tb")
    assert len(acc.Images("samples/float")) == 2  # the other logger got everything


def test_media_calls_copy_on_the_device_and_read_back_on_the_logging_thread(monkeypatch):
    """`trainer.log_images` does not read the device on the training thread."""
    reads = []
    real = jax.device_get

    def spy(tree):
        reads.append(threading.current_thread() is threading.main_thread())
        return real(tree)

    monkeypatch.setattr(jax, "device_get", spy)

    class Keep(Logger):
        def __init__(self):
            self.images, self.histograms = [], []

        def log_metrics(self, metrics, step):
            pass

        def log_images(self, images, step):
            self.images.append((step, images))

        def log_histograms(self, values, step):
            self.histograms.append((step, values))

    class Media(Callback):
        def on_train_batch_end(self, trainer, experiment, outputs, batch, batch_idx):
            if batch_idx == 0:
                reads.clear()
                trainer.log_images({"x": jnp.full((2, 2), 0.5)})
                trainer.log_histograms({"h": jnp.arange(4.0)})
                assert True not in reads  # nothing read on this thread

    keep = Keep()
    _fit([keep], epochs=1, callback=Media())
    assert False in reads  # read back on the logging thread
    [(step, images)] = keep.images
    assert step == 1 and images["x"].dtype == np.uint8 and images["x"][0, 0, 0] == 128
    [(_, values)] = keep.histograms
    assert isinstance(values["h"], np.ndarray) and values["h"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_bad_media_raise_on_the_callers_thread_even_without_loggers():
    class Bad(Callback):
        def on_train_start(self, trainer, experiment):
            trainer.log_images({"x": np.zeros((3, 8, 8))})

    with pytest.raises(ValueError, match="channels-first"):
        _fit([], epochs=1, callback=Bad())


def test_async_and_fanout_hand_media_on(tmp_path):
    logger = AsyncLogger(FanoutLogger([TensorBoardLogger(tmp_path), CSVLogger(tmp_path / "c")]))
    with pytest.warns(RuntimeWarning) as caught:
        logger.log_images({"x": jnp.ones((2, 2))}, 3)
        logger.log_histograms({"h": jnp.arange(3.0)}, 3)
        logger.close()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert all(m.startswith("CSVLogger(") for m in messages), messages
    assert any("does not record images" in m for m in messages), messages
    assert any("does not record histograms" in m for m in messages), messages
    acc = _accumulator(tmp_path)
    assert _png_pixels(acc.Images("x")[0].encoded_image_string).tolist() == [[255, 255]] * 2
    assert acc.Histograms("h")[0].histogram_value.num == 3


def test_wandb_rows_hold_images_and_histograms_without_extra_rows(tmp_path):
    logger = WandBLogger(**_wandb_kwargs(tmp_path))
    logger.log_images({"samples/a": FLOAT_IMAGE}, 1)
    logger.log_histograms({"weights": np.array([0.0, 1.0, 1.0, 4.0])}, 1)
    logger.log_metrics({"train/loss": 0.5}, 1)
    logger.log_metrics({"train/loss": 0.25}, 2)
    logger.close()
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    rows = []
    for record in _wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in record.history.item:
                *outer, last = [item.key] if item.key else list(item.nested_key)
                place = row
                for key in outer:
                    place = place.setdefault(key, {})
                place[last] = json.loads(item.value_json)
            rows.append(row)
    assert [row["_step"] for row in rows] == [0, 1]  # one row per record, as resume needs
    image = rows[0]["samples/a"]
    assert (image["_type"], image["width"], image["height"]) == ("image-file", 3, 2)
    stored = next(run_dir.rglob(image["path"].split("/")[-1]))
    np.testing.assert_array_equal(_png_pixels(stored.read_bytes()), FLOAT_AS_UINT8)
    hist = rows[0]["weights"]
    assert hist["_type"] == "histogram"
    expected = histogram(np.array([0.0, 1.0, 1.0, 4.0]))
    assert hist["values"] == expected.counts.tolist()
    np.testing.assert_allclose(hist["bins"], expected.edges)
    assert "weights" not in rows[1]
    assert (rows[0]["train/loss"], rows[0]["trainer/global_step"]) == (0.5, 1)


def test_loggers_are_told_of_each_committed_checkpoint(tmp_path):
    class Checkpoints(Logger):
        def __init__(self):
            self.saved = []

        def log_metrics(self, metrics, step):
            pass

        def after_save_checkpoint(self, path, info):
            self.saved.append((path, dict(info)))

    logger = Checkpoints()
    saver = ModelCheckpoint(tmp_path, monitor="val/loss", save_top_k=-1)
    with pytest.warns(RuntimeWarning, match="does not record"):
        _fit([logger], epochs=3, more=[saver])
    paths = [path for path, _ in logger.saved]
    assert paths == [str(tmp_path / f"epoch={e}-step={2 * (e + 1)}") for e in range(3)]
    assert all(
        info["reason"] == "epoch" and info["monitor"] == "val/loss" for _, info in logger.saved
    )
    assert logger.saved[-1][1]["score"] == saver.best_k_models[paths[-1]]


def test_a_slow_logger_drops_its_oldest_media_like_records():
    from solstice.callbacks import LoggingCallback

    gate = threading.Event()

    class Slow(Logger):
        def __init__(self):
            self.entered = threading.Event()
            self.images = []

        def log_metrics(self, metrics, step):
            self.entered.set()
            gate.wait()

        def log_images(self, images, step):
            self.images.append(step)

        def __repr__(self):
            return "Slow()"

    slow = Slow()
    callback = LoggingCallback([slow], max_queue_size=2)
    callback.on_log(None, None, {"x": 0.0}, 0)
    callback.flush_history()
    assert slow.entered.wait(30)  # held in its first call
    with pytest.warns(RuntimeWarning, match=r"Slow\(\) cannot keep up") as record:
        for step in range(1, 6):
            callback.log_images({"x": jnp.zeros((2, 2))}, step)
        callback.flush_history()  # never waits for `slow`
        gate.set()
        callback.flush(timeout=60)
    assert "(3 in all; 3 of them image or histogram calls" in str(record[-1].message)
    assert slow.images == [4, 5]  # the newest kept
    callback.close()
