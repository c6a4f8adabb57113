"""Multi-host data parallelism, on one machine: 2 processes joined by `jax.distributed`.

Each process runs `multiprocess_worker.py` with one CPU device, gloo collectives and the
coordinator on 127.0.0.1, and feeds its half of every global batch. The result must be the
one of a single process driving two devices.
"""

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import params_of, run_processes
from multiprocess_worker import TRAINER_KW, datamodule, experiment

import solstice

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 1
WORKER = Path(__file__).with_name("multiprocess_worker.py")
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Launch the processes once; return `(json results, npz arrays, out_dir)` per process."""
    out = tmp_path_factory.mktemp("multiprocess")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no fake devices
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    run_processes(
        [
            [
                sys.executable,
                str(WORKER),
                str(i),
                str(NUM_PROCESSES),
                str(port),
                str(DEVICES_PER_PROCESS),
                str(out),
            ]
            for i in range(NUM_PROCESSES)
        ],
        env=env,
        timeout=TIMEOUT_S,
        cwd=WORKER.parent,
    )
    results = []
    for i in range(NUM_PROCESSES):
        with open(out / f"{i}.json") as f:
            info = json.load(f)
        with np.load(out / f"{i}.npz") as npz:
            arrays = dict(npz)
        results.append((info, arrays))
    return results, out


@pytest.fixture(scope="module")
def reference():
    """One process, two devices, the same settings."""
    trainer = solstice.Trainer(**TRAINER_KW, devices=NUM_PROCESSES * DEVICES_PER_PROCESS)
    exp = trainer.fit(experiment(), datamodule())
    params = [np.asarray(p) for p in params_of(exp)]
    metrics = dict(trainer.callback_metrics)
    test = trainer.test(exp, datamodule())
    predictions = np.asarray(trainer.predict(exp, datamodule()))
    return params, metrics, test, predictions


def test_processes_form_one_mesh(run):
    results, _ = run
    for i, (info, _) in enumerate(results):
        assert info["process_index"] == i
        assert info["process_count"] == NUM_PROCESSES
        assert info["num_devices"] == NUM_PROCESSES * DEVICES_PER_PROCESS


def test_two_processes_match_one_process_with_two_devices(run, reference):
    results, _ = run
    params, metrics, test, _ = reference
    for info, arrays in results:
        got = [arrays[f"param{i}"] for i in range(len(params))]
        for a, b in zip(got, params, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        # metrics are computed over the global batch: every process sees the same numbers
        for name, value in metrics.items():
            assert info["callback_metrics"][name] == pytest.approx(value, rel=1e-5), name
        for name, value in test.items():
            assert info["test"][name] == pytest.approx(value, rel=1e-5), name


def test_only_process_zero_writes_logs(run):
    _, out = run
    header = "step,epoch"
    rows0 = (out / "logs0" / "metrics.csv").read_text().splitlines()
    assert rows0[0].startswith(header) and len(rows0) > 1
    assert (out / "logs0" / "hparams.json").exists()
    # process 1 built the same logger (its own directory) but leaves nothing on disk
    assert not (out / "logs1").exists()


def test_predict_returns_every_prediction_in_every_process(run, reference):
    results, _ = run
    for info, arrays in results:
        assert "predict" not in info["errors"], info["errors"].get("predict")
        np.testing.assert_allclose(arrays["predict"], reference[3], rtol=1e-5, atol=1e-6)


def test_experiment_hook_can_replace_experiment(run):
    results, _ = run
    for info, _ in results:
        assert "replace" not in info["errors"], info["errors"].get("replace")
