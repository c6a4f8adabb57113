"""`GrainDataModule`: Grain sources (array_record files, in-memory sequences) and transforms,
batched in global batches, sharded per process, resumed at any batch, evaluated exactly once."""

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import blobs

import solstice
from solstice.checkpointing._find import find_last
from solstice.datamodules import ArrayDataModule, GrainDataModule
from solstice.datamodules._grain import GrainLoader
from solstice.trainer._check_resume import _compare_arrays

grain = pytest.importorskip("grain")
pytest.importorskip("array_record")

from grain_worker import (  # noqa: E402
    DIM,
    N_TRAIN,
    N_VAL,
    Decode,
    grain_datamodule,
    make_datamodule,
    make_experiment,
    records,
    splits,
    trainer_kwargs,
    write_files,
)

WORKER = Path(__file__).with_name("grain_worker.py")


class Noise(grain.transforms.RandomMap):
    def random_map(self, record, rng):
        return {**record, "noise": rng.normal(size=2).astype(np.float32)}


def array_datamodule(**kw):
    return ArrayDataModule(**splits(), batch_size=16, eval_batch_size=32, seed=5, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("grain"))


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert type(u) is np.ndarray and u.dtype == v.dtype, (type(u), u.dtype, v.dtype)
            np.testing.assert_array_equal(u, v)


def test_the_batches_are_array_datamodules_over_the_same_records(files):
    in_memory = GrainDataModule(
        train=records(splits()["train"]),
        val=records(splits()["val"]),
        batch_size=16,
        eval_batch_size=32,
        seed=5,
    )
    for dm in (grain_datamodule(files), in_memory):
        reference = array_datamodule()
        for epoch in (0, 1):
            dm.set_epoch(epoch)
            reference.set_epoch(epoch)
            assert_same_batches(list(dm.train_dataloader()), list(reference.train_dataloader()))
        val = list(dm.val_dataloader())
        assert_same_batches(val, list(reference.val_dataloader()))
        # every record once: 32 + 32 + a short last batch of 6
        assert [len(b["label"]) for b in val] == [32, 32, 6]
        np.testing.assert_array_equal(
            np.concatenate([b["image"] for b in val]), splits()["val"]["image"]
        )


def test_fit_and_validate_match_array_datamodule_bit_for_bit(files):
    kwargs = dict(max_epochs=2, devices=1, enable_progress_bar=False, log_every_n_steps=2)
    reference = solstice.Trainer(**kwargs)
    expected = reference.fit(make_experiment(), array_datamodule())
    trainer = solstice.Trainer(**kwargs)
    got = trainer.fit(make_experiment(), grain_datamodule(files))
    differences: list[str] = []
    _compare_arrays(expected, got, differences)
    assert not differences, differences
    assert trainer.callback_metrics == reference.callback_metrics
    assert trainer.validate(got, grain_datamodule(files)) == reference.validate(
        expected, array_datamodule()
    )
    # predict: every record once, in order (70 rows: batches of 32, 32 and 6)
    to_predict = GrainDataModule(predict=files["val"], operations=[Decode()], batch_size=32)
    predicted = np.asarray(trainer.predict(got, to_predict))
    assert predicted.shape == (N_VAL, 4)  # logits of 4 classes
    reference_dm = ArrayDataModule(predict=splits()["val"], batch_size=32)
    np.testing.assert_array_equal(predicted, np.asarray(reference.predict(expected, reference_dm)))


def test_each_process_reads_its_share_of_every_global_batch():
    source = records(blobs(N_VAL, dim=DIM, seed=1))
    for drop_last, batch_size in ((True, 16), (False, 32), (False, 24)):
        # 70 records in batches of 24: the last (22 rows) leaves process 1 of 2 with 10;
        # of 3 processes, process 2 has none: it yields an empty batch (the Trainer pads it)
        for count in (2, 3) if batch_size == 24 else (2,):
            kw = dict(shuffle=True, seed=1, epoch=2, drop_last=drop_last)
            whole = list(GrainLoader(source, batch_size, **kw))
            shares = [
                list(GrainLoader(source, batch_size, process_index=p, process_count=count, **kw))
                for p in range(count)
            ]
            assert all(len(s) == len(whole) for s in shares)
            for b, batch in enumerate(whole):
                for key in batch:
                    parts = [s[b][key] for s in shares]
                    assert all(p.dtype == batch[key].dtype for p in parts)
                    np.testing.assert_array_equal(np.concatenate(parts), batch[key])
    last = [list(GrainLoader(source, 24, process_index=p, process_count=3))[-1] for p in range(3)]
    assert [len(b["label"]) for b in last] == [8, 8, 6]
    last = [list(GrainLoader(source, 30, process_index=p, process_count=3))[-1] for p in range(3)]
    assert [len(b["label"]) for b in last] == [10, 0, 0]
    assert last[2]["image"].shape == (0, DIM) and last[2]["label"].dtype == np.int32


def test_random_maps_are_fixed_by_seed_epoch_and_position():
    source = records(blobs(N_TRAIN, dim=DIM))

    def loader(epoch, **kw):
        return GrainLoader(
            source,
            16,
            operations=[Noise()],
            shuffle=True,
            seed=3,
            epoch=epoch,
            drop_last=True,
            **kw,
        )

    first = list(loader(0))
    assert_same_batches(list(loader(0).iter_from(4)), first[4:])  # resumed: the same draws
    again = list(loader(1))
    assert not np.array_equal(first[0]["noise"], again[0]["noise"])  # a new epoch, new draws
    shares = [list(loader(0, process_index=p, process_count=2)) for p in (0, 1)]
    # two processes never draw the same numbers, and together they draw what one process
    # draws: the global batches do not depend on the number of processes
    assert not np.array_equal(shares[0][0]["noise"], shares[1][0]["noise"])
    joined = [jax.tree.map(lambda *x: np.concatenate(x), a, b) for a, b in zip(*shares)]
    assert_same_batches(joined, first)


class CountingSource:
    """A random-access source that records which records were read."""

    def __init__(self, split):
        self.records = records(split)
        self.read = []

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        self.read.append(key)
        return self.records[key]


def test_a_resumed_epoch_reads_no_record_before_its_batch():
    source = CountingSource(blobs(N_TRAIN, dim=DIM))
    loader = GrainLoader(source, 16, shuffle=True, seed=0, epoch=3, drop_last=True)
    got = list(loader.iter_from(4))
    assert len(got) == 2
    assert sorted(source.read) == sorted(loader.indices()[4 * 16 : 6 * 16].tolist())


def test_the_batch_index_is_grains_iterator_state():
    # Grain's iterator over the epoch's batches, after k of them, is at state `next_index` k;
    # restored by Grain (`set_state`), it goes on as `iter_from(k)`, which the Trainer calls
    # with the batch index the checkpoint records
    loader = GrainLoader(
        records(splits()["train"]),
        16,
        operations=[Noise()],
        shuffle=True,
        seed=4,
        epoch=1,
        drop_last=True,
    )
    iterator = iter(loader.dataset().to_iter_dataset(loader.read_options))
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    assert state == {"next_index": 3}
    restored = iter(loader.dataset().to_iter_dataset(loader.read_options))
    restored.set_state(state)
    assert_same_batches(list(restored), list(loader.iter_from(3)))


def test_a_run_resumes_bit_for_bit_mid_epoch_and_at_an_epoch_end(files):
    kwargs = {**trainer_kwargs(), "max_epochs": 2}
    for step in (8, 6):  # 6 steps an epoch: mid-epoch 2, and the end of epoch 1
        report = solstice.check_resume(
            make_experiment,
            lambda: make_datamodule(files["train"].parent),
            kwargs,
            interrupt_at=step,
        )
        assert report, report


def _newest_step(dirpath: Path) -> int:
    """The highest global step among committed checkpoints (names `epoch=E-step=S[-vN]`)."""
    steps = []
    for p in list(dirpath.iterdir()) if dirpath.is_dir() else []:
        try:
            if "." not in p.name and (p / "solstice.json").exists():
                steps.append(int(p.name.split("step=")[1].split("-")[0]))
        except (OSError, IndexError, ValueError):  # renamed or removed while we look
            continue
    return max(steps, default=-1)


def _worker(files, ckpts: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, str(WORKER), str(files["train"].parent), str(ckpts), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_bit_for_bit(files, tmp_path):
    # As tests/test_resume_kill.py, with one kill (each costs a process start): a run
    # checkpointing every step is killed at a random moment (past a random step, after a
    # random delay) and restarted with `ckpt_path="last"`; it, and a run resumed here from the
    # checkpoint the kill left, must end bit for bit like a run that never stopped.
    rng = random.Random(16)
    ckpts = tmp_path / "ckpts"
    reference = solstice.Trainer(**trainer_kwargs())
    expected = reference.fit(make_experiment(), make_datamodule(files["train"].parent))
    target = rng.randrange(2, reference.global_step - 3)
    proc = _worker(files, ckpts)
    try:
        deadline = time.monotonic() + 90
        while _newest_step(ckpts) < target and proc.poll() is None:
            assert time.monotonic() < deadline, "the worker does not get to its step"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.kill()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -9, f"the run ended before it was killed:\n{err}"
    path, document = find_last(ckpts)
    kept = shutil.copytree(path, tmp_path / f"killed-{path.name}")
    proc = _worker(files, ckpts, "--resume", "--out", str(tmp_path / "final"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err

    trainer = solstice.Trainer(**trainer_kwargs())
    resumed = trainer.fit(make_experiment(), make_datamodule(files["train"].parent), ckpt_path=kept)
    assert trainer.callback_metrics == reference.callback_metrics
    for got in (resumed, solstice.load(tmp_path / "final", like=make_experiment())):
        differences: list[str] = []
        _compare_arrays(expected, got, differences)
        assert not differences, differences
    print(f"\nkilled after {path.name}: resumed bit for bit")


def test_a_checkpoint_of_other_training_data_is_refused(files, tmp_path):
    from solstice.callbacks import ModelCheckpoint

    kwargs = dict(max_epochs=1, devices=1, enable_progress_bar=False)
    ckpt = ModelCheckpoint(tmp_path, every_n_train_steps=4, every_n_epochs=None)
    solstice.Trainer(**kwargs, callbacks=[ckpt]).fit(make_experiment(), grain_datamodule(files))
    path, document = find_last(tmp_path)
    assert document["datamodule"] == {"epoch": 0, "records": {"train": N_TRAIN, "val": N_VAL}}
    other = GrainDataModule(train=records(blobs(N_TRAIN - 1, dim=DIM)), batch_size=16)
    with pytest.raises(ValueError, match=f"training split of {N_TRAIN} records"):
        solstice.Trainer(**kwargs).fit(make_experiment(), other, ckpt_path=path)


def test_mistakes_are_named(tmp_path):
    source = records(blobs(20, dim=DIM))
    with pytest.raises(FileNotFoundError, match="missing.array_record"):
        GrainDataModule(train=str(tmp_path / "missing.array_record"), batch_size=4)
    with pytest.raises(TypeError, match="random-access source"):
        GrainDataModule(train=iter(source), batch_size=4)
    with pytest.raises(ValueError, match="batches by itself"):
        GrainDataModule(train=source, batch_size=4, operations=[grain.transforms.Batch(4)])

    class Keep(grain.transforms.Filter):
        def filter(self, record):
            return True

    with pytest.raises(ValueError, match="Filter the source ahead of time"):
        GrainDataModule(train=source, batch_size=4, train_operations=[Keep()])
    with pytest.raises(TypeError, match="record-wise Grain transforms"):
        GrainDataModule(train=source, batch_size=4, operations=[lambda r: r])
    with pytest.raises(ValueError, match="drop_remainder=False"):
        GrainDataModule(
            train=source, batch_size=4, shard_options=grain.sharding.ShardOptions(0, 1, True)
        )
    dm = GrainDataModule(
        train=source, batch_size=4, shard_options=grain.sharding.ShardOptions(0, 2)
    )
    with pytest.raises(ValueError, match="2 shares, but 1 JAX processes"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="fewer than one batch of 32"):
        GrainDataModule(train=source, batch_size=32).train_dataloader()


@pytest.mark.slow
def test_grain_worker_processes_make_the_same_batches():
    from absl import flags

    source = records(splits()["train"])
    kw = dict(operations=[Noise()], shuffle=True, seed=2, epoch=1, drop_last=True)
    if not flags.FLAGS.is_parsed():
        with pytest.raises(RuntimeError, match="absl.app.run"):
            GrainLoader(source, 16, worker_count=1, **kw)
    parsed = flags.FLAGS.is_parsed()
    flags.FLAGS.mark_as_parsed()
    try:
        got = list(GrainLoader(source, 16, worker_count=1, **kw).iter_from(2))
    finally:
        if not parsed:
            flags.FLAGS.unparse_flags()
    assert_same_batches(got, list(GrainLoader(source, 16, **kw))[2:])


def test_import_solstice_does_not_import_grain():
    code = (
        "import sys, solstice, solstice.datamodules; "
        "print(sorted(m for m in ('grain', 'array_record') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
