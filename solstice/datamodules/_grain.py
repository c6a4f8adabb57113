"""`GrainDataModule`: Grain data sources and transforms, batched and sharded the Solstice way.

Grain is optional (`pip install solstice[grain]`): it is imported only when a
`GrainDataModule` is built.

Grain reads and transforms the records: each epoch of a split is a `grain.MapDataset` over
the split's source, through its `Map`/`RandomMap` transforms and `batch` (with
`drop_remainder=False`), iterated by Grain's read threads and, if asked, worker processes.
Solstice decides which records, in what order: the dataset's source is `EpochShare`, this
process's share of every global batch of an `EpochOrder` (the order every built-in loader
uses). So the global batches are those of `ArrayDataModule` over the same records, each
process reads only its share of them, and evaluation sees every record exactly once (a short
last batch). Grain's iterator state over such a dataset is the index of the next batch: a
checkpoint records it (the epoch and the batch within it), and a resumed run starts Grain's
iterator there, without reading the records before it.
"""

import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree

from .._checks import check_int
from ._batching import narrow_64bit
from ._datamodule import DataModule
from ._order import EpochOrder, OrderedLoader

SPLITS = ("train", "val", "test", "predict")


def _import_grain() -> Any:
    try:
        import grain
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "`GrainDataModule` needs Grain: `pip install grain array-record` (or "
            "`pip install solstice[grain]`)."
        ) from e
    return grain


class EpochRecords:
    """Random access to an epoch's records in their order: item `k` is the record at place
    `k` of the epoch (`EpochOrder.indices`), whichever process reads it."""

    def __init__(self, source: Any, order: EpochOrder):
        self.source = source
        self._keys = order.indices()

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> Any:
        return self.source[int(self._keys[index])]


class EpochShare:
    """Random access to this process's share of an epoch: item `i` is the item of `records`
    (the epoch's records in their order, `EpochRecords`, transformed) at row `i % L` of this
    process's share of global batch `i // L` (`L`: the local batch size), as
    `EpochOrder.local_indices` lays it out. Only the last batch's share may be shorter (or
    empty, in evaluation), so batching it by `L` gives exactly the epoch's batches."""

    def __init__(self, records: Any, order: EpochOrder):
        self.records = records
        self.order = order
        last = len(order.local_indices(len(order) - 1)) if len(order) else 0
        self._length = max(0, len(order) - 1) * order.local_batch_size + last

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:
        order = self.order
        batch, row = divmod(index, order.local_batch_size)
        position = batch * order.batch_size + order.process_index * order.local_batch_size + row
        return self.records[position]

    def __repr__(self) -> str:
        o = self.order
        return (
            f"EpochShare(num_records={o.num_examples}, batch_size={o.batch_size}, "
            f"drop_last={o.drop_last}, shuffle={o.shuffle}, seed={o.seed}, epoch={o.epoch}, "
            f"share={o.process_index}/{o.process_count})"
        )


def _transformed(dataset: Any, operations: Sequence[Any], seed: int) -> Any:
    """`dataset` (a `grain.MapDataset`) through `operations`; the `RandomMap`s draw from
    generators Grain derives from `seed` and each record's index."""
    grain = _import_grain()
    dataset = dataset.seed(seed)
    for op in operations:
        if isinstance(op, grain.transforms.RandomMap):
            dataset = dataset.random_map(op)
        else:
            dataset = dataset.map(op)
    return dataset


#: Grain's `ReadOptions` unless given: 4 threads, 8 batches ahead (Grain's own default,
#: 16 threads and 500 elements, is sized for records, and our elements are batches).
READ_THREADS, READ_AHEAD = 4, 8


def _read_options(read_options: Any) -> Any:
    if read_options is None:
        grain = _import_grain()
        return grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_AHEAD)
    return read_options


def _check_workers_can_start() -> None:
    """Grain's worker processes read `absl` flags: `RuntimeError` unless they are parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        raise RuntimeError(
            "`worker_count` > 0 starts Grain worker processes, which read `absl` flags, and "
            "they are not parsed in this program. Run it under `absl.app.run(main)`, or call "
            "`absl.flags.FLAGS.mark_as_parsed()` before `fit`; or use `worker_count=0`."
        )


def _as_numpy(leaf: Any) -> np.ndarray:
    # A batch from Grain's workers holds `SharedMemoryArray`s: viewed as plain arrays (no
    # copy; the shared memory is released with the last view).
    return narrow_64bit(np.asarray(leaf))


class GrainLoader(OrderedLoader):
    """This process's batches of a Grain random-access source, in an order fixed by `(seed,
    epoch)`, through Grain: a `grain.MapDataset` of the epoch's share, its transforms and
    `batch` (with `drop_remainder=False`), iterated with Grain's read threads and, if asked,
    worker processes. Resumable at any batch without reading the ones before.

    **Arguments:** as `BatchLoader`, with `source` (a Grain `RandomAccessDataSource`, or any
    sequence with `__len__` and `__getitem__`) for the arrays, and:

    - `operations`: Grain `Map`/`RandomMap` transforms applied to every record, in order,
      before batching.
    - `worker_count`: Grain worker processes (`mp_prefetch`), each making whole batches;
      `0`: none.
    - `read_options`: a `grain.ReadOptions`: threads that make batches ahead, and how many
      (default: `READ_THREADS`, `READ_AHEAD`).

    **Example:**

    ```python
    loader = GrainLoader(source, 32, operations=[Decode()], shuffle=True, seed=0, epoch=1)
    batch = next(loader.iter_from(3))   # the 4th batch of epoch 1, read without the first 3
    ```
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        operations: Sequence[Any] = (),
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        process_index: int = 0,
        process_count: int = 1,
        worker_count: int = 0,
        read_options: Any = None,
    ):
        self.source = source
        self._set_order(
            len(source),
            batch_size,
            drop_last=drop_last,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            process_index=process_index,
            process_count=process_count,
        )
        self.operations = tuple(operations)
        check_int("worker_count", worker_count)
        if worker_count:
            _check_workers_can_start()
        self.worker_count = worker_count
        self.read_options = _read_options(read_options)

    def random_seed(self) -> int:
        """The seed of this epoch's `RandomMap`s (from `seed` and `epoch`). Grain draws each
        record's numbers from it and the record's place in the epoch, so no two records
        draw the same numbers, and the draws do not depend on the number of processes."""
        o = self.order
        entropy = np.random.SeedSequence([o.seed, o.epoch])
        return int(entropy.generate_state(1)[0])

    def dataset(self) -> Any:
        """The epoch's batches of this process, as a random-access `grain.MapDataset`
        (batch `b` is `dataset()[b]`). The transforms apply to the epoch's records in their
        order (lazily: only this process's are read), then this process takes its share."""
        grain = _import_grain()
        epoch = grain.MapDataset.source(EpochRecords(self.source, self.order))
        records = _transformed(epoch, self.operations, self.random_seed())
        share = grain.MapDataset.source(EpochShare(records, self.order))
        return share.batch(self.order.local_batch_size, drop_remainder=False)

    def _batches(self, start: int) -> Iterator[PyTree]:
        grain = _import_grain()
        batches = self.dataset()
        produced = 0
        if start < len(batches):
            iterable = batches[start:].to_iter_dataset(self.read_options)
            if self.worker_count:
                options = grain.MultiprocessingOptions(num_workers=self.worker_count)
                iterable = iterable.mp_prefetch(options)
            iterator = iter(iterable)
            try:
                for batch in iterator:
                    produced += 1
                    yield jax.tree.map(_as_numpy, batch)
            finally:
                iterator.close()
        if produced < len(self) - start:  # this process's share of a short last batch: none
            yield self._empty()

    def _empty(self) -> PyTree:
        """A batch of no rows, shaped like the others (the epoch's first record,
        transformed)."""
        grain = _import_grain()
        first = grain.MapDataset.source([self.source[int(self.order.indices()[0])]])
        record = _transformed(first, self.operations, self.random_seed()).batch(1)[0]
        return jax.tree.map(lambda x: _as_numpy(x)[:0], record)


def _as_source(split: str, source: Any) -> Any:
    """A split's Grain source: a path (or a list of `pathlib.Path`s) of array_record files
    becomes an `ArrayRecordDataSource`; anything random-access stays as it is."""
    paths: list[Any] | None = None
    if isinstance(source, str | os.PathLike):
        paths = [source]
    elif (
        isinstance(source, list | tuple) and source and all(isinstance(p, PurePath) for p in source)
    ):
        paths = list(source)
    if paths is not None:
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"The {split!r} split names array_record files that do not exist: {missing}. "
                "Write them first (`array_record.python.array_record_module."
                "ArrayRecordWriter`), or check the paths."
            )
        return _import_grain().sources.ArrayRecordDataSource([str(p) for p in paths])
    if not (hasattr(source, "__getitem__") and hasattr(source, "__len__")):
        raise TypeError(
            f"The {split!r} split must be a random-access source (a "
            "`grain.sources.RandomAccessDataSource`, or any sequence with `__len__` and "
            "`__getitem__`), or the path of an array_record file (a list of `pathlib.Path`s "
            f"for several), got `{type(source).__name__}`."
        )
    return source


def _check_operations(name: str, operations: Any) -> tuple[Any, ...]:
    """The transforms as a tuple; `TypeError`/`ValueError` for any that is not a record-wise
    Grain `Map` or `RandomMap`."""
    grain = _import_grain()
    if not isinstance(operations, list | tuple):
        raise TypeError(f"`{name}` must be a list of Grain transforms, got {operations!r}.")
    for op in operations:
        if isinstance(op, grain.transforms.Batch):
            raise ValueError(
                f"`{name}` holds a `Batch` ({op!r}): `GrainDataModule` batches by itself, "
                "global batches sharded over processes. Remove it and pass `batch_size=` "
                "(and `eval_batch_size=`)."
            )
        if isinstance(op, grain.transforms.Filter):
            raise ValueError(
                f"`{name}` holds a `Filter` ({op!r}), which changes how many records a batch "
                "holds: the epoch's batches would no longer be fixed by position, so neither "
                "an exact resume nor exactly-once evaluation could be kept. Filter the "
                "source ahead of time (e.g. a source over the kept record indices)."
            )
        if not isinstance(op, grain.transforms.Map | grain.transforms.RandomMap):
            raise TypeError(
                f"`{name}` holds {op!r}; `GrainDataModule` applies record-wise Grain "
                "transforms: `grain.transforms.Map` (`MapTransform`) and "
                "`grain.transforms.RandomMap` (`RandomMapTransform`)."
            )
    return tuple(operations)


class GrainDataModule(DataModule):
    """Serves Grain data: a random-access source per split (array_record files, or any
    sequence with `__len__` and `__getitem__`), through Grain's transforms, batching, read
    threads and worker processes.

    Training batches are shuffled in an order fixed by `(seed, epoch)` and the final partial
    batch is dropped; evaluation and predict batches keep every record, the last batch
    shorter (the Trainer counts every record exactly once). The global batches are those of
    `ArrayDataModule` with the same seed over the same records. With several processes each
    reads only its share of every global batch. A checkpoint records the epoch and the
    batch within it, which fix where Grain's iterator is: a run resumed mid-epoch (after a
    crash or a `SIGKILL`) starts Grain at the next batch, without reading the ones before,
    and continues bit for bit.

    Grain is imported only here.

    **Arguments:**

    - `train`, `val`, `test`, `predict`: a split's source, or `None` for none: the path of
      an array_record file (a `str` or `os.PathLike`; a list of `pathlib.Path`s for several
      files), a `grain.sources.RandomAccessDataSource`, or any sequence with `__len__` and
      `__getitem__` (a list of dicts of arrays, say). Records of array_record files are
      `bytes`: decode them with a `Map` in `operations`.
    - `batch_size`: global training batch size (over all processes).
    - `eval_batch_size`: global batch size for val/test/predict (default: `batch_size`).
    - `operations`: Grain transforms applied to each record of every split, in order:
      `grain.transforms.Map` (`MapTransform`) and `RandomMap` (`RandomMapTransform`, whose
      `rng` is fixed by the seed, the epoch and the record's position in it). A record
      becomes a pytree of arrays (or numbers); a batch stacks them, and 64-bit dtypes
      become 32-bit (as JAX stores them) unless x64 is on.
    - `train_operations`: transforms applied after `operations` to training records only
      (random augmentation).
    - `shuffle`: shuffle training batches each epoch.
    - `seed`: fixes the order and the `rng` of `RandomMap`s.
    - `shard_options`: which share this process reads: a `grain.sharding.ShardOptions`;
      default `grain.sharding.ShardByJaxProcess()`, evaluated when a loader is made (after
      `jax.distributed.initialize()`). Its `shard_count` must be the number of JAX
      processes.
    - `worker_count`: Grain worker processes, each making whole batches (`0`: Grain's read
      threads make them). The batches are the same whatever the count. Grain's workers need
      `absl` flags parsed (run under `absl.app.run`).
    - `read_options`: a `grain.ReadOptions`: how many threads make batches ahead, and how
      many batches (default: 4 threads, 8 batches).

    **Example:**

    ```python
    class Decode(grain.transforms.Map):
        def map(self, record):
            x = np.frombuffer(record, np.float32)
            return {"image": x[:-1], "label": np.int32(x[-1])}

    dm = GrainDataModule(train="train.array_record", val="val.array_record",
                         operations=[Decode()], batch_size=64)
    ```
    """

    def __init__(
        self,
        train: Any = None,
        val: Any = None,
        test: Any = None,
        predict: Any = None,
        *,
        batch_size: int,
        eval_batch_size: int | None = None,
        operations: Sequence[Any] = (),
        train_operations: Sequence[Any] = (),
        shuffle: bool = True,
        seed: int = 0,
        shard_options: Any = None,
        worker_count: int = 0,
        read_options: Any = None,
    ):
        grain = _import_grain()
        check_int("batch_size", batch_size, minimum=1)
        check_int("eval_batch_size", eval_batch_size, minimum=1, allow_none=True)
        check_int("seed", seed)
        check_int("worker_count", worker_count)
        if worker_count:
            _check_workers_can_start()
        if shard_options is not None:
            if not isinstance(shard_options, grain.sharding.ShardOptions):
                raise TypeError(
                    "`shard_options` must be a `grain.sharding.ShardOptions` (e.g. "
                    f"`grain.sharding.ShardByJaxProcess()`), got {shard_options!r}."
                )
            if shard_options.drop_remainder:
                raise ValueError(
                    f"`shard_options={shard_options!r}` asks to drop the remainder, but the "
                    "shares here are of global batches: training drops the last partial "
                    "global batch and evaluation keeps every record. Pass "
                    "`drop_remainder=False` (the default)."
                )
        self.sources = {
            name: None if split is None else _as_source(name, split)
            for name, split in zip(SPLITS, (train, val, test, predict), strict=True)
        }
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.operations = _check_operations("operations", operations)
        self.train_operations = _check_operations("train_operations", train_operations)
        self.shuffle = shuffle
        self.seed = seed
        self.shard_options = shard_options
        self.worker_count = worker_count
        self.read_options = read_options

    def _shard(self) -> tuple[int, int]:
        """`(process_index, process_count)` of this process's share."""
        options = self.shard_options
        if options is None:
            options = _import_grain().sharding.ShardByJaxProcess()
        if options.shard_count != jax.process_count():
            raise ValueError(
                f"`shard_options` splits the data into {options.shard_count} shares, but "
                f"{jax.process_count()} JAX processes feed the Trainer, each its share of "
                "every global batch. Pass `grain.sharding.ShardByJaxProcess()` (the default)."
            )
        return options.shard_index, options.shard_count

    def _loader(self, split: str, *, train: bool) -> GrainLoader | None:
        source = self.sources[split]
        if source is None:
            return None
        size = self.batch_size if train else self.eval_batch_size
        if len(source) == 0 or (train and len(source) < size):
            raise ValueError(
                f"The {split!r} split has {len(source)} records, fewer than one batch of "
                f"{size}; provide more data or a smaller batch size."
            )
        process_index, process_count = self._shard()
        return GrainLoader(
            source,
            size,
            operations=self.operations + (self.train_operations if train else ()),
            shuffle=self.shuffle and train,
            seed=self.seed,
            epoch=self.epoch,
            drop_last=train,
            process_index=process_index,
            process_count=process_count,
            worker_count=self.worker_count,
            read_options=self.read_options,
        )

    def train_dataloader(self) -> GrainLoader:
        loader = self._loader("train", train=True)
        if loader is None:
            raise ValueError("`GrainDataModule` has no `train` split; pass `train=` to fit.")
        return loader

    def val_dataloader(self) -> GrainLoader | None:
        return self._loader("val", train=False)

    def test_dataloader(self) -> GrainLoader | None:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> GrainLoader | None:
        return self._loader("predict", train=False)

    def state_dict(self) -> dict[str, Any]:
        """The epoch, and how many records each split has (checked on resume)."""
        records = {k: len(s) for k, s in self.sources.items() if s is not None}
        return {"epoch": self.epoch, "records": records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output; `ValueError` if the training split has another
        number of records than it had (the checkpoint's position would point elsewhere)."""
        saved = state.get("records", {}).get("train")
        source = self.sources["train"]
        if saved is not None and source is not None and saved != len(source):
            raise ValueError(
                f"The checkpoint was taken with a training split of {saved} records; this "
                f"`GrainDataModule`'s has {len(source)}. The order and the position it "
                "records are of the other data: resume with the same training source."
            )
        super().load_state_dict(state)
