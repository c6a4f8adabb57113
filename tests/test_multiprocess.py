"""Multi-host data parallelism, on one machine: 2 processes joined by `jax.distributed`.

Each process runs `multiprocess_worker.py` with one CPU device, gloo collectives and the
coordinator on 127.0.0.1, and feeds its half of every global batch. The result must be the
one of a single process driving two devices. Checkpoints go to directories both processes
share, and a run resumed from them must be the uninterrupted one.
"""

import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import mse_by_hand, params_of, regression, regression_split, run_processes
from multiprocess_worker import TRAINER_KW, datamodule, experiment, user_datamodule

import solstice
from solstice.checkpointing import _find, verify
from solstice.checkpointing._format import (
    DELETING_SUFFIX,
    METADATA_FILE,
    ORBAX_COMMIT_FILE,
    ORBAX_STEP_FILE,
    ORBAX_TMP_SUFFIX,
    write_metadata,
)

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 1
WORKER = Path(__file__).with_name("multiprocess_worker.py")
TIMEOUT_S = 180


def _checkpoints(directory: Path) -> list[str]:
    """The checkpoint directories in `directory` (beside them: the run's history.jsonl)."""
    return sorted(p.name for p in directory.iterdir() if p.is_dir())


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


def test_a_users_experiment_counts_every_sample_once_across_processes(run):
    # One process with two devices, and the numbers by hand, are the reference.
    trainer = solstice.Trainer(**TRAINER_KW, devices=NUM_PROCESSES * DEVICES_PER_PROCESS)
    exp = trainer.fit(regression(), user_datamodule())
    val = mse_by_hand(exp, *regression_split(70, 1))
    test = mse_by_hand(exp, *regression_split(70, 2))
    assert trainer.callback_metrics["val/mse"] == pytest.approx(val, rel=1e-5)
    x, _ = regression_split(70, 3)
    predictions = np.asarray(jax.vmap(exp.model)(x)[:, 0])
    results, _ = run
    for info, arrays in results:
        assert "user" not in info["errors"], info["errors"].get("user")
        assert info["user"]["callback_metrics"]["val/mse"] == pytest.approx(val, rel=1e-4)
        assert info["user"]["test"]["test/mse"] == pytest.approx(test, rel=1e-4)
        np.testing.assert_allclose(arrays["user_predict"], predictions, rtol=1e-4, atol=1e-5)


def test_experiment_hook_can_replace_experiment(run):
    results, _ = run
    for info, _ in results:
        assert "replace" not in info["errors"], info["errors"].get("replace")


# ---------------------------------------------------------------------- checkpoints
# What `multiprocess_worker.checkpoint_stage` saves, in order. 7 steps per epoch, run in fused
# pairs; the first ModelCheckpoint saves every 5 steps (at the pairs' ends: steps 6, 10, 16,
# 20) and at every epoch end (7, 14, 21) and keeps the top 2 by val/loss plus the last; the
# second one (first two runs only) saves at every epoch end and keeps the most recent.
SAVES = {
    "first": ["epoch=0-step=6", "epoch=0-step=7", "epoch=0-step=7", "epoch=1-step=10"]
    + ["epoch=1-step=14", "epoch=1-step=14"],
    "resumed": ["epoch=2-step=16", "epoch=2-step=20", "epoch=2-step=21", "epoch=2-step=21"],
    "full": ["epoch=0-step=6", "epoch=0-step=7", "epoch=1-step=10", "epoch=1-step=14"]
    + ["epoch=2-step=16", "epoch=2-step=20", "epoch=2-step=21"],
}
# the top 2 (a step save is scored with the latest val/loss: step 16 with epoch 1's)
KEPT = ["epoch=2-step=16", "epoch=2-step=21"]


def _stage(results, name: str) -> list[dict]:
    """Each process's record of worker stage `name`, which must have run without error."""
    infos = []
    for info, _ in results:
        assert name not in info["errors"], info["errors"].get(name)
        infos.append(info[name])
    return infos


def test_checkpoint_runs_agree_across_processes_and_warn_nothing(run):
    results, out = run
    infos = _stage(results, "checkpoint")
    for name in ("first", "resumed", "full", "mid_epoch"):
        assert infos[0][name] == infos[1][name], name  # bookkeeping, metrics, history
        assert infos[0][name]["warnings"] == [], name  # no failed save, no skipped checkpoint
    first, resumed = infos[0]["first"]["callbacks"], infos[0]["resumed"]["callbacks"]
    assert (
        first[0]["last_model_path"]
        == first[0]["best_model_path"]
        == str(out / "ckpt" / "epoch=1-step=14")
    )
    assert first[1]["last_model_path"] == str(out / "ckpt_latest" / "epoch=1-step=14")
    assert (
        resumed[0]["last_model_path"]
        == resumed[0]["best_model_path"]
        == str(out / "ckpt" / "epoch=2-step=21")
    )
    assert sorted(resumed[0]["best_k_models"]) == [str(out / "ckpt" / n) for n in KEPT]
    assert resumed[1]["last_model_path"] == str(out / "ckpt_latest" / "epoch=2-step=21")
    # the resumed run keeps the books the uninterrupted one keeps
    full = json.loads(json.dumps(infos[0]["full"]["callbacks"][0]).replace("ckpt_full", "ckpt"))
    assert resumed[0] == full


def test_checkpoint_directories_hold_exactly_the_kept_checkpoints(run):
    _, out = run
    assert _checkpoints(out / "ckpt") == KEPT
    assert _checkpoints(out / "ckpt_full") == KEPT
    assert _checkpoints(out / "ckpt_latest") == ["epoch=2-step=21"]
    for directory in ("ckpt", "ckpt_full", "ckpt_latest"):
        for path in (p for p in (out / directory).iterdir() if p.is_dir()):
            assert ORBAX_TMP_SUFFIX not in path.name and not path.name.endswith(DELETING_SUFFIX)
            document = verify(path)  # complete: commit marker, checksum of every file
            assert document["kind"] == "trainer"
            assert document["checkpoint"]["name"] == path.name
            assert document["trainer"]["processes"] == NUM_PROCESSES
            # one metadata file, written once all processes had written their arrays: it
            # hashes process 1's files too (Orbax's `ocdbt.process_1/`, ...)
            assert [p.relative_to(path) for p in path.rglob(f"{METADATA_FILE}*")] == [
                Path(METADATA_FILE)
            ]
            assert any("process_1" in name for name in document["files"]), path


def test_only_process_zero_writes_checkpoint_metadata(run):
    results, _ = run
    writes = [info["metadata_writes"] for info in _stage(results, "checkpoint")]
    assert writes[1] == []
    expected = [n + ORBAX_TMP_SUFFIX for r in ("first", "resumed", "full") for n in SAVES[r]]
    assert writes[0] == expected


def test_resumed_runs_are_the_uninterrupted_run(run):
    results, _ = run
    infos = _stage(results, "checkpoint")
    for _, arrays in results:
        n = len([k for k in arrays if k.startswith("full_param")])
        assert n > 0
        for i in range(n):
            # checkpointing does not change training: the first run is the plain 2-epoch fit
            np.testing.assert_array_equal(arrays[f"first_param{i}"], arrays[f"param{i}"])
            # resumed at an epoch end ("last"), or mid-epoch: exactly the 3-epoch run
            np.testing.assert_array_equal(arrays[f"resumed_param{i}"], arrays[f"full_param{i}"])
            np.testing.assert_array_equal(arrays[f"mid_epoch_param{i}"], arrays[f"full_param{i}"])
    full = infos[0]["full"]
    assert full["global_step"] == 21
    for name in ("resumed", "mid_epoch"):
        assert infos[0][name]["callback_metrics"] == full["callback_metrics"], name
        assert infos[0][name]["history"] == full["history"], name


# (checkpoint of the 2-process run, Trainer settings of the 1-process resume): mid-epoch with
# the epoch's metric accumulators (unfused, too: one compiled step), and at the end of the
# 2-epoch timed run (trained on to 3)
RESUMES_IN_ONE_PROCESS = {
    "mid-epoch on 1 device": (
        "ckpt_full/epoch=2-step=16",
        dict(devices=1, steps_per_execution=1),
    ),
    "epoch end on 2 devices": ("ckpt_timed/epoch=1-step=14", dict(devices=2)),
}


@pytest.mark.parametrize("case", list(RESUMES_IN_ONE_PROCESS))
def test_a_two_process_checkpoint_resumes_in_one_process(run, case):
    """Another topology: the same global batches in the same order, results allclose to the
    uninterrupted 3-epoch run of the 2 processes."""
    results, out = run
    name, kwargs = RESUMES_IN_ONE_PROCESS[case]
    full = _stage(results, "checkpoint")[0]["full"]
    no_validation = dict(limit_val_batches=0, num_sanity_val_steps=0)  # (one compile less)
    trainer = solstice.Trainer(**{**TRAINER_KW, "max_epochs": 3, **no_validation, **kwargs})
    with pytest.warns(RuntimeWarning, match=r"`processes` 2 in the checkpoint, 1 now .*allclose"):
        exp = trainer.fit(experiment(), datamodule(), ckpt_path=out / name)
    assert trainer.global_step == full["global_step"] == 21
    _, arrays = results[0]
    for i, p in enumerate(params_of(exp)):
        np.testing.assert_allclose(np.asarray(p), arrays[f"full_param{i}"], rtol=1e-5, atol=1e-6)
    trained = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert "train/loss_epoch" in trained  # (val/* are the checkpoint's: this run validates not)
    for key, value in trained.items():
        assert value == pytest.approx(full["callback_metrics"][key], rel=1e-5, abs=1e-6), key


def test_last_ignores_a_checkpoint_removed_while_it_looks(tmp_path, monkeypatch):
    """With several processes, process 0 deletes the checkpoints retention drops when a save
    commits (at the latest at the end of `fit`) while the others go on: another process may
    already be looking for the last checkpoint of the next `fit(ckpt_path="last")`."""
    for step, created in ((7, 1), (14, 2)):
        path = tmp_path / f"epoch=0-step={step}"
        (path / "experiment").mkdir(parents=True)
        (path / "experiment" / "arrays").write_bytes(b"\0" * 8)
        (path / ORBAX_COMMIT_FILE).write_text("")
        (path / ORBAX_STEP_FILE).write_text("{}")
        write_metadata(path, {"kind": "trainer", "created_unix_ns": created})
    older = tmp_path / "epoch=0-step=7"
    read_metadata = _find.read_metadata

    def removed_meanwhile(path):
        if path == older and path.exists():  # process 0's `ModelCheckpoint._delete`
            trash = path.parent / (path.name + DELETING_SUFFIX)
            os.replace(path, trash)
            shutil.rmtree(trash)
        return read_metadata(path)

    monkeypatch.setattr(_find, "read_metadata", removed_meanwhile)
    found = _find.find_last(tmp_path)
    assert found is not None and found[0] == tmp_path / "epoch=0-step=14"


# ---------------------------------------------------------------------- agreement
def test_a_signal_to_one_process_stops_every_process_at_the_same_step(run):
    results, out = run
    infos = _stage(results, "agreement")
    # process 1 got SIGTERM before its 4th batch: both saved after step 4 and ended as SIGTERM
    for info in infos:
        assert info["signal_exit"] == 128 + signal.SIGTERM
        assert info["signal_step"] == 4
        assert info["signal_last"] == str(out / "ckpt_signal" / "epoch=0-step=4")
    saved = sorted(p for p in (out / "ckpt_signal").iterdir() if p.is_dir())
    assert [p.name for p in saved] == ["epoch=0-step=4"]
    document = verify(saved[0])
    assert document["checkpoint"]["reason"] == "interrupt"
    assert document["progress"]["global_step"] == 4


def test_a_timed_checkpoint_due_on_one_clock_is_saved_by_every_process(run):
    results, out = run
    infos = _stage(results, "agreement")
    assert (
        infos[0]["timed_last"]
        == infos[1]["timed_last"]
        == str(out / "ckpt_timed" / "epoch=1-step=14")
    )
    assert infos[0]["timed_saved_step"] == infos[1]["timed_saved_step"] == 14
    saved = sorted(p for p in (out / "ckpt_timed").iterdir() if p.is_dir())
    assert [p.name for p in saved] == ["epoch=1-step=14"]
    verify(saved[0])


def test_loop_controls_due_on_one_clock_act_in_every_process(run):
    results, out = run
    infos = _stage(results, "loop_controls")
    for info in infos:
        assert info["validated"] == [2, 4]
        assert info["global_step"] == 6 and info["stopped_by"] == "max_time"
        assert info["last"] == str(out / "ckpt_loop" / "epoch=0-step=6")
    assert _checkpoints(out / "ckpt_loop") == ["epoch=0-step=6"]
    document = verify(out / "ckpt_loop" / "epoch=0-step=6")
    assert document["checkpoint"]["reason"] == "interrupt"
    assert document["progress"]["validation_pending"]  # due at step 6, after the stop
