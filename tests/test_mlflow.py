"""`MLFlowLogger` (issue 16, item 6) against a real local MLflow store (SQLite), read back
with `mlflow.MlflowClient`: metrics, params, images, histograms, checkpoints, exact resume."""

import io
import json
import uuid
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import blobs_datamodule, make_mlp_experiment

import solstice
from solstice.callbacks import Callback, ModelCheckpoint
from solstice.loggers import History, MLFlowLogger, histogram

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")
PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one takes seconds); each test uses an
    experiment of its own."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.MlflowClient(uri)  # creates the database (its schema) once, up front
    return {"tracking_uri": uri, "artifacts": root / "artifacts"}


@pytest.fixture
def make_logger(store):
    name = f"exp-{uuid.uuid4().hex[:8]}"

    def make(**kwargs):
        kwargs.setdefault("experiment_name", name)
        return MLFlowLogger(
            tracking_uri=store["tracking_uri"],
            artifact_location=str(store["artifacts"] / kwargs["experiment_name"]),
            flush_secs=0,
            **kwargs,
        )

    return make


@pytest.fixture
def client(store):
    return mlflow.MlflowClient(store["tracking_uri"])


def _series(client, run_id) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
    }


def _history_series(history: History) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in history.iter_records():
        for key, value in metrics.items():
            series.setdefault(key, []).append((step, value))
    return series


def _trainer(loggers, callbacks=(), epochs=2, **kwargs):
    return solstice.Trainer(
        max_epochs=epochs,
        log_every_n_steps=1,
        devices=1,
        enable_progress_bar=False,
        loggers=loggers,
        callbacks=list(callbacks),
        **kwargs,
    )


def _experiment():
    return make_mlp_experiment(in_size=8, num_classes=4)


def _data():
    return blobs_datamodule(n_train=96)  # 3 steps an epoch


# ----------------------------------------------------------------------------- the logger


def test_metrics_params_and_tags_read_back_with_the_client(make_logger, client):
    logger = make_logger(run_name="first", tags={"team": "vision"})
    assert logger.run_id is None  # nothing written yet: no run
    logger.log_hyperparams({"lr": 1e-3, "model": {"width": 32, "act": "relu"}, "seeds": [1, 2]})
    logger.log_metrics({"train/loss": jnp.asarray(2.0), "epoch": 0}, 1)
    logger.log_metrics({"train/loss": 1.0, "val/accuracy": np.float32(0.75), "epoch": 0}, 2)
    logger.log_metrics({"bad:name?": 3.0}, 3)
    logger.close()
    run = client.get_run(logger.run_id)
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert run.data.params == {
        "lr": "0.001",
        "model/width": "32",
        "model/act": "relu",
        "seeds": "[1, 2]",
    }
    assert run.data.tags["team"] == "vision"
    assert run.data.tags["solstice.records"] == "3"
    assert _series(client, logger.run_id) == {
        "train/loss": [(1, 2.0), (2, 1.0)],
        "epoch": [(1, 0.0), (2, 0.0)],
        "val/accuracy": [(2, 0.75)],
        "bad:name_": [(3, 3.0)],
    }
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == logger.experiment_name


def test_a_changed_param_is_kept_as_a_tag(make_logger, client):
    logger = make_logger()
    logger.log_hyperparams({"trainer.max_epochs": 2})
    logger.log_hyperparams({"trainer.max_epochs": 4, "new": 1})
    logger.close()
    run = client.get_run(logger.run_id)
    assert run.data.params == {"trainer.max_epochs": "2", "new": "1"}
    assert run.data.tags["updated/trainer.max_epochs"] == "4"


def test_metrics_wait_in_a_buffer_until_flush(make_logger, client):
    logger = make_logger()
    logger.flush_secs = 3600.0
    logger.log_hyperparams({"a": 1})
    logger.log_metrics({"x": 1.0}, 1)
    assert client.get_metric_history(logger.run_id, "x") == []
    logger.flush()
    assert [m.value for m in client.get_metric_history(logger.run_id, "x")] == [1.0]
    logger.close()


def test_records_alike_in_one_millisecond_are_all_kept(make_logger, client):
    """MLflow keeps one of several metrics equal in key, value, step and timestamp."""
    logger = make_logger()
    logger.flush_secs = 3600.0  # one batch
    for _ in range(3):
        logger.log_metrics({"epoch": 1.0}, 5)
    logger.close()
    assert _series(client, logger.run_id)["epoch"] == [(5, 1.0)] * 3


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="`log_model` must be False"):
        MLFlowLogger(log_model="best")
    with pytest.raises(ValueError, match="`experiment_name` must be a non-empty string"):
        MLFlowLogger(experiment_name="")
    with pytest.raises(ValueError, match="`flush_secs`"):
        MLFlowLogger(flush_secs=-1)


# ----------------------------------------------------------------------------- through fit


class LogMedia(Callback):
    def __init__(self):
        self.weights: list[np.ndarray] = []

    def on_train_epoch_end(self, trainer, experiment):
        weight = trainer.experiment.model.layers[1].layers[0].weight
        self.weights.append(np.asarray(weight))
        trainer.log_images({"samples/checker": jnp.asarray([[0.0, 1.0], [1.0, 0.0]])})
        trainer.log_histograms({"weights/first": weight})


@pytest.mark.parametrize("log_model, save_top_k", [(True, 1), ("all", -1)])
def test_fit_logs_metrics_media_and_checkpoints(
    make_logger, client, tmp_path, log_model, save_top_k
):
    logger = make_logger(log_model=log_model)
    media = LogMedia()
    checkpoint = ModelCheckpoint(tmp_path / "ckpts", save_top_k=save_top_k, save_last=False)
    trainer = _trainer([logger], [media, checkpoint])
    trainer.fit(_experiment(), _data())
    trainer.close()
    run_id = logger.run_id
    run = client.get_run(run_id)

    # every record, as `trainer.history` holds it
    assert _series(client, run_id) == _history_series(trainer.history)
    assert run.data.tags["solstice.records"] == str(trainer.history.num_records)
    assert run.data.params["trainer.max_epochs"] == "2"

    # images: MLflow's own, one per epoch, the pixels as logged
    pngs = sorted(
        f.path for f in client.list_artifacts(run_id, "images") if f.path.endswith(".png")
    )
    assert [p.split("+step+")[1].split("+")[0] for p in pngs] == ["3", "6"]
    for path in pngs:
        local = client.download_artifacts(run_id, path, str(tmp_path / "dl"))
        pixels = np.asarray(PIL.open(local))
        np.testing.assert_array_equal(pixels, [[0, 255], [255, 0]])

    # histograms: JSON artifacts, equal to the weights of their moment
    for step, weight in zip((3, 6), media.weights):
        local = client.download_artifacts(
            run_id, f"histograms/weights/first/{step:09d}.json", str(tmp_path / "dl")
        )
        data = json.loads(Path(local).read_text())
        expected = histogram(weight)
        assert data["counts"] == expected.counts.tolist()
        np.testing.assert_allclose(data["edges"], expected.edges)
        assert (data["num"], data["step"]) == (weight.size, step)
        assert data["sum"] == pytest.approx(float(weight.astype(np.float64).sum()))

    # checkpoints: the last path as a tag; copies of the checkpoint(s) as artifacts
    last = checkpoint.last_model_path
    assert run.data.tags["checkpoint/last"] == last
    copied = {f.path for f in client.list_artifacts(run_id, "checkpoints")}
    expected_names = {"checkpoints/epoch=1-step=6"}  # True: those kept at the end
    if log_model == "all":  # each one when committed (all kept here)
        expected_names.add("checkpoints/epoch=0-step=3")
    assert copied == expected_names
    local = client.download_artifacts(run_id, "checkpoints/epoch=1-step=6", str(tmp_path / "dl"))
    assert (Path(local) / "solstice.json").read_bytes() == (
        Path(last) / "solstice.json"
    ).read_bytes()


# ----------------------------------------------------------------------------- resume


def test_resume_at_continues_a_run_holding_at_most_the_checkpoints_records(make_logger, client):
    first = make_logger()
    for step in range(1, 4):
        first.log_metrics({"x": float(step)}, step)
    first.close()
    second = make_logger()
    assert second.resume_at(first.run_id, 5) == 3  # the Trainer replays records 3 and 4
    assert second.run_id == first.run_id
    second.log_metrics({"x": 4.0}, 4)
    second.close()
    assert _series(client, first.run_id)["x"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert client.get_run(first.run_id).data.tags["solstice.records"] == "4"


def test_resume_at_moves_to_a_new_run_when_the_old_one_holds_more(make_logger, client):
    first = make_logger(run_name="r")
    for step in range(1, 5):
        first.log_metrics({"x": float(step)}, step)
    first.close()
    second = make_logger()
    assert second.resume_at(first.run_id, 2) == 0  # every record is replayed to the new run
    new_id = second.run_id
    assert new_id != first.run_id
    second.log_metrics({"x": 1.0}, 1)
    second.close()
    old, new = client.get_run(first.run_id), client.get_run(new_id)
    assert old.data.tags["solstice.superseded_by"] == new_id
    assert new.data.tags["solstice.resumed_from"] == first.run_id
    assert new.info.run_name == "r" and new.info.experiment_id == old.info.experiment_id
    assert _series(client, first.run_id)["x"][-1] == (4, 4.0)  # left as it was


def test_resume_at_moves_to_a_new_run_when_the_last_send_may_be_partial(make_logger, client):
    first = make_logger()
    first.log_metrics({"x": 1.0}, 1)
    first.flush()
    first.experiment.set_tag(first.run_id, "solstice.records_pending", "2")  # died mid-send
    second = make_logger()
    assert second.resume_at(first.run_id, 5) == 0
    assert second.run_id != first.run_id
    second.close()


def test_resume_at_without_a_run_or_with_an_unknown_one_starts_anew(make_logger):
    logger = make_logger()
    assert logger.resume_at(None, 4) == 0 and logger.run_id is None
    with pytest.warns(RuntimeWarning, match="cannot continue MLflow run 'nope'"):
        assert logger.resume_at("nope", 4) == 0
    logger.log_metrics({"x": 1.0}, 1)
    assert logger.run_id not in (None, "nope")
    logger.close()


class WaitForLoggers(Callback):
    """Lets the loggers set up their runs before the first checkpoint (a checkpoint taken
    before then records no run id, and a resume from it starts a new MLflow run)."""

    def on_train_start(self, trainer, experiment):
        trainer.flush_logs()


def test_fit_resumed_from_an_earlier_checkpoint_gives_the_uninterrupted_run(
    make_logger, client, tmp_path
):
    """A run goes on past the checkpoint it is later resumed from (so its MLflow run holds
    records the resumed run writes again): the resumed run's MLflow run holds exactly the
    records of `trainer.history` (those of an uninterrupted run: see test_resume.py);
    resuming from the newest checkpoint continues the same MLflow run."""
    ckpts = tmp_path / "ckpts"
    first_logger = make_logger()
    saver = ModelCheckpoint(ckpts, every_n_train_steps=2, every_n_epochs=None, save_top_k=-1)
    first = _trainer([first_logger], [saver], epochs=2)
    first.fit(_experiment(), _data())
    first.close()

    # from the checkpoint of step 4: the first MLflow run holds records after it
    logger = make_logger()
    resumed = _trainer([logger], [WaitForLoggers(), ModelCheckpoint(tmp_path / "ends")], epochs=3)
    resumed.fit(_experiment(), _data(), ckpt_path=ckpts / "epoch=1-step=4")
    resumed.close()
    assert logger.run_id != first_logger.run_id
    assert _series(client, logger.run_id) == _history_series(resumed.history)
    assert resumed.history.num_records == 3 * 5  # an epoch: 3 steps, its end, a validation
    tags = client.get_run(logger.run_id).data.tags
    assert tags["solstice.resumed_from"] == first_logger.run_id

    # from the newest checkpoint of that resumed run (its end: nothing logged after it): the
    # same MLflow run goes on
    again_logger = make_logger()
    again = _trainer([again_logger], [ModelCheckpoint(tmp_path / "ends")], epochs=4)
    again.fit(_experiment(), _data(), ckpt_path="last")
    again.close()
    assert again_logger.run_id == logger.run_id
    assert _series(client, logger.run_id) == _history_series(again.history)


def test_images_are_png_decodable_bytes(make_logger, client, tmp_path):
    logger = make_logger()
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    logger.log_images({"rgb": rgb}, 7)
    logger.close()
    [png] = [
        f.path for f in client.list_artifacts(logger.run_id, "images") if f.path.endswith(".png")
    ]
    local = client.download_artifacts(logger.run_id, png, str(tmp_path))
    np.testing.assert_array_equal(np.asarray(PIL.open(io.BytesIO(Path(local).read_bytes()))), rgb)


def test_the_logger_contract(make_logger, client):
    """What every logger does (see test_loggers.py's battery): packed device metrics,
    a non-scalar named, close twice, nothing after close."""
    from solstice.loggers._packed import PackedMetrics

    logger = make_logger()
    packed = PackedMetrics(("loss", "acc"), jnp.asarray([0.5, 0.25]), {"epoch": 1}, "train/")
    logger.log_metrics(packed, 4)
    with pytest.raises(ValueError, match=r"'v' has shape \(2,\)"):
        logger.log_metrics({"v": jnp.zeros(2)}, 5)
    logger.close()
    logger.close()
    logger.flush()
    with pytest.raises(RuntimeError, match="it was closed"):
        logger.log_metrics({"x": 1.0}, 6)
    assert _series(client, logger.run_id) == {
        "train/loss": [(4, 0.5)],
        "train/acc": [(4, 0.25)],
        "train/epoch": [(4, 1.0)],  # (the prefix applies to every name)
    }


def test_killed_then_resumed_the_run_holds_the_uninterrupted_records(store, client, tmp_path):
    """SIGKILL mid-run (records still buffered, or sent after the last checkpoint), then
    `ckpt_path="last"`: the MLflow run written to holds exactly the records of a run that
    never stopped."""
    import signal
    import subprocess
    import sys
    import time

    from logger_worker import make_experiment, trainer_kwargs

    reference = solstice.Trainer(**trainer_kwargs(3))
    reference.fit(make_experiment(), blobs_datamodule())
    expected = _history_series(reference.history)

    worker = Path(__file__).with_name("mlflow_worker.py")
    command = [sys.executable, str(worker), str(tmp_path), store["tracking_uri"]]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "ckpts").glob("epoch=1-step=*/solstice.json")):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the worker does not get to its second epoch"
            time.sleep(0.01)
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    run_id = resumed.stdout.split("RUN ")[-1].strip()
    assert _series(client, run_id) == expected
