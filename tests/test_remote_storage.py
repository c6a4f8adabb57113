"""Checkpoints on remote storage, against a real S3-compatible server (moto) on 127.0.0.1:
a run killed with SIGKILL resumes from `s3://` bit for bit; retention, `ckpt_path="last"`
and the fallback past a damaged checkpoint work there as on a local disk; a URL that lost a
slash is refused instead of becoming a local directory."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import blobs_datamodule
from resume_worker import make_experiment, trainer_kwargs

import solstice
from solstice.callbacks import ModelCheckpoint
from solstice.trainer._check_resume import _compare_arrays

pytest.importorskip("moto")
pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")

WORKER = Path(__file__).with_name("resume_worker.py")
EPOCHS = 4  # 32 steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1, the environment that points boto/s3fs at it, and a
    fresh bucket per test (`s3.bucket()`)."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "SOLSTICE_STAGING_DIR": str(tmp_path_factory.mktemp("staging")),
        "SOLSTICE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=endpoint)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.list_buckets()
            break
        except Exception:
            assert time.monotonic() < deadline and server.poll() is None, "moto did not start"
            time.sleep(0.2)

    class S3:
        count = 0

        def bucket(self) -> str:
            S3.count += 1
            name = f"bucket-{S3.count}"
            client.create_bucket(Bucket=name)
            return name

        def keys(self, bucket: str, prefix: str = "") -> list[str]:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
            return sorted(o["Key"] for o in listed)

        def put(self, bucket: str, key: str, data: bytes) -> None:
            client.put_object(Bucket=bucket, Key=key, Body=data)

        def get(self, bucket: str, key: str) -> bytes:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    yield S3()
    server.terminate()
    server.wait(timeout=10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _checkpoints(s3, bucket: str, prefix: str) -> list[str]:
    """The committed checkpoints under `prefix` (those with a `solstice.json`)."""
    return sorted(k.split("/")[-2] for k in s3.keys(bucket, prefix) if k.endswith("/solstice.json"))


def _step(name: str) -> int:
    return int(name.split("step=")[1].split("-")[0])


def test_a_url_that_lost_a_slash_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"Pass the URL as a string: `'gs://bucket/run'`"):
        ModelCheckpoint(Path("gs://bucket/run"))
    with pytest.raises(ValueError, match="one slash after `s3:`"):
        solstice.CSVLogger("s3:/bucket/logs")
    with pytest.raises(ValueError, match="one slash after `s3:`"):
        solstice.TensorBoardLogger(Path("s3://bucket/logs"))
    with pytest.raises(ValueError, match="one slash after `s3:`"):
        solstice.datamodules.MNIST("s3:/bucket/datasets")
    trainer = solstice.Trainer(max_epochs=1, enable_progress_bar=False)
    with pytest.raises(ValueError, match="one slash after `gs:`"):
        trainer.fit(make_experiment(), blobs_datamodule(), ckpt_path="gs:/bucket/run/x")
    assert not Path("gs:").exists() and not Path("s3:").exists()


@pytest.mark.slow
def test_sigkill_mid_run_on_s3_resumes_bit_for_bit(s3, tmp_path):
    bucket = s3.bucket()
    url = f"s3://{bucket}/run"
    reference = solstice.Trainer(**trainer_kwargs(EPOCHS))
    expected = reference.fit(make_experiment(), blobs_datamodule())

    def worker(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(WORKER), url, "--max-epochs", str(EPOCHS), "--every", "2", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )

    proc = worker()
    try:
        deadline = time.monotonic() + 120
        while not any(_step(n) >= 10 for n in _checkpoints(s3, bucket, "run/")):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint reached step 10"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -9, f"the run ended before it was killed:\n{err}"
    killed_at = max(_step(n) for n in _checkpoints(s3, bucket, "run/"))
    assert killed_at < 8 * EPOCHS

    proc = worker("--resume", "--out", f"s3://{bucket}/final")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    final = solstice.load(f"s3://{bucket}/final", like=make_experiment())
    differences: list[str] = []
    _compare_arrays(expected, final, differences)
    assert not differences, f"killed at step {killed_at}, resumed from s3: {differences}"
    # retention on S3: the newest checkpoint only, and no unfinished upload left behind
    assert _checkpoints(s3, bucket, "run/") == [f"epoch={EPOCHS - 1}-step={8 * EPOCHS}"], (
        _checkpoints(s3, bucket, "run/"),
        err,
    )
    names = {k.split("/")[1] for k in s3.keys(bucket, "run/") if k.count("/") > 1}
    assert names == {f"epoch={EPOCHS - 1}-step={8 * EPOCHS}"}, names
    assert "run/history.jsonl" in s3.keys(bucket, "run/")


def test_last_falls_back_past_a_damaged_checkpoint_on_s3(s3, tmp_path):
    bucket = s3.bucket()
    url = f"s3://{bucket}/run"
    checkpoint = ModelCheckpoint(url, every_n_train_steps=4, every_n_epochs=None, save_top_k=-1)
    trainer = solstice.Trainer(**trainer_kwargs(2), callbacks=[checkpoint])
    trainer.fit(make_experiment(), blobs_datamodule())
    saved = _checkpoints(s3, bucket, "run/")
    assert sorted(_step(n) for n in saved) == [4, 8, 12, 16]  # every 4 steps, all kept
    assert checkpoint.last_model_path == f"{url}/epoch=1-step=16"
    # a bit flipped in the newest checkpoint's arrays: same size, another SHA-256
    newest = "run/epoch=1-step=16"
    key = next(k for k in s3.keys(bucket, newest + "/experiment/") if "d/" in k or "ocdbt" in k)
    data = bytearray(s3.get(bucket, key))
    data[len(data) // 2] ^= 0xFF
    s3.put(bucket, key, bytes(data))

    resumed = solstice.Trainer(
        **trainer_kwargs(2), callbacks=[ModelCheckpoint(url, every_n_train_steps=4)]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = resumed.find_checkpoint("last")
    assert Path(path).name == "epoch=1-step=12"
    assert any("epoch=1-step=16" in str(w.message) and "SHA-256" in str(w.message) for w in caught)
    # the damaged checkpoint is left where it was
    assert "epoch=1-step=16" in _checkpoints(s3, bucket, "run/")


def test_a_dataset_directory_on_s3_is_a_verified_mirror(s3, tmp_path):
    from test_dataset_formats import write_mnist_files

    from solstice.datamodules import MNIST
    from solstice.datamodules._download import file_hash

    bucket = s3.bucket()
    arrays = write_mnist_files(tmp_path / "src", gz=True)
    raw = tmp_path / "src" / "MNIST" / "raw"
    for path in raw.iterdir():
        s3.put(bucket, f"datasets/MNIST/raw/{path.name}", path.read_bytes())

    class Synthetic(MNIST):  # the files written above, with their own MD5s
        resources = {p.name: file_hash(p, "md5") for p in raw.iterdir()}

    dm = Synthetic(f"s3://{bucket}/datasets", batch_size=8, val_fraction=0.0, shuffle=False)
    dm.setup("fit")
    np.testing.assert_array_equal(dm.splits["train"]["image"][:, 0], arrays["train_images"])
    assert Path(dm.data_dir).is_relative_to(os.environ["SOLSTICE_CACHE_DIR"])
    assert (Path(dm.raw_dir) / "train-images-idx3-ubyte.gz").is_file()  # cached locally

    # a damaged file on the mirror is refused by its MD5, never used
    key = "datasets/MNIST/raw/t10k-labels-idx1-ubyte.gz"
    s3.put(bucket, key, s3.get(bucket, key)[:-3] + b"xyz")
    Path(dm.raw_dir, "t10k-labels-idx1-ubyte.gz").unlink()
    again = Synthetic(f"s3://{bucket}/datasets", batch_size=8)
    with pytest.raises(ValueError, match="md5"):
        again.prepare_data()


def test_loggers_write_to_s3_and_resume_there(s3, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bucket = s3.bucket()
    url = f"s3://{bucket}/run"

    def loggers():
        return [solstice.CSVLogger(f"{url}/csv"), solstice.TensorBoardLogger(f"{url}/tb")]

    checkpoint = ModelCheckpoint(f"{url}/ckpts", every_n_train_steps=4, every_n_epochs=None)
    first = solstice.Trainer(**trainer_kwargs(2), callbacks=[checkpoint], loggers=loggers())
    first.fit(make_experiment(), blobs_datamodule())
    first.close()
    rows = s3.get(bucket, "run/csv/metrics.csv").decode().splitlines()
    assert rows[0].startswith("step,epoch") and len(rows) == 1 + first.history.num_records
    assert any(k.startswith("run/tb/events.out.tfevents") for k in s3.keys(bucket, "run/tb/"))

    # another machine: nothing local; the loggers continue the files on S3 exactly
    shutil.rmtree(os.environ["SOLSTICE_CACHE_DIR"])
    more = solstice.Trainer(
        **trainer_kwargs(3),
        callbacks=[ModelCheckpoint(f"{url}/ckpts", every_n_train_steps=4, every_n_epochs=None)],
        loggers=loggers(),
    )
    more.fit(make_experiment(), blobs_datamodule(), ckpt_path="last")
    more.close()
    reference = solstice.Trainer(**trainer_kwargs(3))
    reference.fit(make_experiment(), blobs_datamodule())
    reference.flush_logs()
    rows = s3.get(bucket, "run/csv/metrics.csv").decode().splitlines()
    assert len(rows) == 1 + reference.history.num_records  # no record twice, none missing
    steps = [int(r.split(",")[0]) for r in rows[1:]]
    assert steps == sorted(steps)
    local = tmp_path / "tb"
    for key in s3.keys(bucket, "run/tb/"):
        (local / key.rsplit("/", 1)[1]).parent.mkdir(exist_ok=True)
        (local / key.rsplit("/", 1)[1]).write_bytes(s3.get(bucket, key))
    events = EventAccumulator(str(local))
    events.Reload()
    logged = events.Scalars("train/loss")
    np.testing.assert_allclose(
        [e.value for e in logged], reference.history.metrics["train/loss"], rtol=1e-6
    )
