"""Data with 2 real processes joined by `jax.distributed` (2 CPU devices each), on one machine.

This file is also the worker: `python test_data_multiprocess.py PROCESS_ID PORT OUT_DIR`.
Each process builds the same DataModules in host and device mode and records, for every
batch, the rows it holds: host mode yields the process's share; device mode yields global
arrays whose addressable shards must be that same share. The test checks both against the
single-process global batches.
"""

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import join_local_processes, run_processes

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 120


def make_splits():
    rng = np.random.default_rng(0)

    def split(n):
        return {
            "image": rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8),
            "label": np.arange(n, dtype=np.int32),
        }

    return {"train": split(44), "val": split(21)}


def make_datamodule(on_device):
    from solstice.datamodules import ArrayDataModule, PixelDecode

    return ArrayDataModule(
        **make_splits(),
        batch_size=8,
        eval_batch_size=8,
        seed=3,
        on_device=on_device,
        transform=PixelDecode(),
    )


def local_rows(leaf):
    """The rows of a (possibly global) array held by this process, in global order."""
    import jax

    if not isinstance(leaf, jax.Array):
        return np.asarray(leaf)
    if leaf.sharding.is_fully_replicated:  # a short last batch that does not split
        return np.asarray(leaf.addressable_data(0))
    shards = sorted(leaf.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def collect(dm):
    out = {}
    dm.set_epoch(1)
    for split in ("train", "val"):
        for b, batch in enumerate(getattr(dm, f"{split}_dataloader")()):
            for key, leaf in batch.items():
                out[f"{split}/{b}/{key}"] = local_rows(leaf)
    return out


def worker(process_id: int, port: int, out_dir: str) -> None:
    import jax

    join_local_processes(process_id, NUM_PROCESSES, port, DEVICES_PER_PROCESS)
    assert jax.process_count() == NUM_PROCESSES
    assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS
    host, device = collect(make_datamodule(False)), collect(make_datamodule(True))
    batch = next(iter(make_datamodule(True).train_dataloader()))
    assert not batch["image"].is_fully_addressable  # one global array over both processes
    assert len(batch["image"].addressable_shards) == DEVICES_PER_PROCESS
    np.savez(os.path.join(out_dir, f"host{process_id}.npz"), **host)
    np.savez(os.path.join(out_dir, f"device{process_id}.npz"), **device)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.usefixtures("strict_promotion")
def test_each_process_holds_its_share_in_host_and_device_mode(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    run_processes(
        [
            [sys.executable, str(Path(__file__)), str(i), str(port), str(tmp_path)]
            for i in range(NUM_PROCESSES)
        ],
        env=env,
        timeout=TIMEOUT_S,
    )

    expected = collect(make_datamodule(False))  # one process: the global batches
    shares = {}
    for mode in ("host", "device"):
        for i in range(NUM_PROCESSES):
            with np.load(tmp_path / f"{mode}{i}.npz") as npz:
                shares[mode, i] = dict(npz)
    for mode in ("host", "device"):
        assert set(shares[mode, 0]) == set(shares[mode, 1]) == set(expected)
        for name, rows in expected.items():
            local = [shares[mode, i][name] for i in range(NUM_PROCESSES)]
            if len(rows) == 8:  # a full batch: each process holds its half
                assert all(len(x) == 4 for x in local), (mode, name)
            elif mode == "host":  # the short last one (5 rows): process 0 has 4, 1 the rest
                assert [len(x) for x in local] == [4, 1], name
            else:  # on the devices it does not split over 4 devices: replicated
                for x in local:
                    np.testing.assert_array_equal(x, rows, err_msg=name)
                continue
            np.testing.assert_array_equal(np.concatenate(local), rows, err_msg=f"{mode} {name}")


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
