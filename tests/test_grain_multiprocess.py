"""`GrainDataModule` with 2 real processes joined by `jax.distributed` (1 CPU device each).

This file is also the worker: `python test_grain_multiprocess.py PROCESS_ID PORT DATA_DIR`.
Each process builds the same `GrainDataModule` over the same array_record files (sharded by
`grain.sharding.ShardByJaxProcess()`, the default) and records the rows it reads of every
batch, then fits one epoch through the Trainer. The evaluation batches are 64 of 70 records, so
process 1's share of the short last batch is empty (an empty batch, which the Trainer pads).
The test checks that the shares make up the single-process batches, and that the fit and its
validation match one process driving two devices.
"""

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import join_local_processes, run_processes

pytest.importorskip("grain")
pytest.importorskip("array_record")

NUM_PROCESSES = 2
TIMEOUT_S = 180


def make_datamodule(data_dir):
    from grain_worker import grain_datamodule

    files = {name: Path(data_dir) / f"{name}.array_record" for name in ("train", "val")}
    return grain_datamodule(files, eval_batch_size=64)


def shares(dm) -> dict[str, np.ndarray]:
    out = {}
    dm.set_epoch(1)
    for split in ("train", "val"):
        for b, batch in enumerate(getattr(dm, f"{split}_dataloader")()):
            out[f"{split}/{b}"] = batch["image"]
    return out


def fit(data_dir, devices=None) -> tuple[dict, dict]:
    """One epoch of `fit`, validating at its end (process 1's share of the last batch is
    empty): the parameters and `callback_metrics`."""
    import equinox as eqx
    import jax
    from grain_worker import make_experiment

    import solstice

    kwargs = dict(max_epochs=1, enable_progress_bar=False, compilation_cache=False)
    trainer = solstice.Trainer(**kwargs, devices=devices)
    experiment = trainer.fit(make_experiment(), make_datamodule(data_dir))
    params = jax.tree.leaves(eqx.filter(experiment.model, eqx.is_array))
    arrays = {f"param{i}": np.asarray(p.addressable_data(0)) for i, p in enumerate(params)}
    return arrays, dict(trainer.callback_metrics)


def worker(process_id: int, port: int, data_dir: str) -> None:
    import jax

    join_local_processes(process_id, NUM_PROCESSES, port, 1)
    assert jax.process_count() == NUM_PROCESSES
    np.savez(os.path.join(data_dir, f"shares{process_id}.npz"), **shares(make_datamodule(data_dir)))
    arrays, metrics = fit(data_dir)
    np.savez(os.path.join(data_dir, f"params{process_id}.npz"), **arrays)
    with open(os.path.join(data_dir, f"metrics{process_id}.json"), "w") as f:
        json.dump(metrics, f)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_read_their_shares_and_fit_as_one_process(tmp_path):
    from grain_worker import write_files

    write_files(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device each
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    run_processes(
        [
            [sys.executable, str(Path(__file__)), str(i), str(port), str(tmp_path)]
            for i in range(NUM_PROCESSES)
        ],
        env=env,
        timeout=TIMEOUT_S,
        cwd=Path(__file__).parent,
    )
    expected = shares(make_datamodule(tmp_path))  # one process: the global batches
    local = []
    for i in range(NUM_PROCESSES):
        with np.load(tmp_path / f"shares{i}.npz") as npz:
            local.append(dict(npz))
    for name, rows in expected.items():
        parts = [share[name] for share in local]
        if name == "val/1":  # the short last batch: 6 rows, all in process 0's share
            assert [len(p) for p in parts] == [6, 0]
        else:
            assert [len(p) for p in parts] == [len(rows) // 2] * 2, name
        np.testing.assert_array_equal(np.concatenate(parts), rows, err_msg=name)

    params, metrics = fit(tmp_path, devices=NUM_PROCESSES)  # one process, two devices
    for i in range(NUM_PROCESSES):
        with np.load(tmp_path / f"params{i}.npz") as npz:
            for name, value in params.items():
                np.testing.assert_allclose(npz[name], value, rtol=1e-5, atol=1e-6)
        with open(tmp_path / f"metrics{i}.json") as f:
            got = json.load(f)
        assert set(got) == set(metrics) and "val/accuracy" in got
        for name, value in metrics.items():
            assert got[name] == pytest.approx(value, rel=1e-5), name


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
