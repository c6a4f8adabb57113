"""The DataModule contract battery: every built-in, in host and device mode.

Each case builds a fresh DataModule (MNIST, FashionMNIST and CIFAR-10 read tiny files in the
exact on-disk formats, written to `tmp_path`) and the battery checks shapes, dtypes and label
ranges; the order is a function of (seed, epoch); `iter_from(k)` equals skipping k batches;
evaluation sees every sample exactly once (last batch padded and masked); process shares
concatenate to the global batch; device mode gives exactly the host-mode batches.
"""

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest
from test_dataset_formats import write_cifar_binary, write_cifar_python, write_mnist_files

from solstice.datamodules import (
    CIFAR10,
    MNIST,
    ArrayDataModule,
    ColourMNIST,
    DataModule,
    Digits,
    FashionMNIST,
    GrainDataModule,
    TorchDataModule,
    batch_size_of,
)

pytestmark = pytest.mark.usefixtures("strict_promotion")

EVAL_SPLITS = ("val", "test", "predict")


def _array_splits():
    rng = np.random.default_rng(0)

    def split(n):
        return {
            "image": rng.normal(size=(n, 2, 3, 3)).astype(np.float32),
            "label": rng.integers(0, 5, size=n).astype(np.int32),
        }

    return {"train": split(100), "val": split(30), "test": split(18), "predict": split(22)}


def _torch_dm(tmp_path, *, seed=0, on_device=False):
    import torch
    from torch.utils.data import Dataset, TensorDataset

    splits = _array_splits()

    class DictDataset(Dataset):  # a custom map-style Dataset with dict samples
        def __init__(self, arrays):
            self.arrays = arrays

        def __len__(self):
            return len(self.arrays["label"])

        def __getitem__(self, i):
            return {
                "image": torch.from_numpy(self.arrays["image"][i]),
                "label": int(self.arrays["label"][i]),  # python int -> int64 -> int32
            }

    def tensors(name):
        s = splits[name]
        return TensorDataset(torch.from_numpy(s["image"]), torch.from_numpy(s["label"]).long())

    return TorchDataModule(
        train=tensors("train"),
        val=DictDataset(splits["val"]),
        test=tensors("test"),
        predict=DictDataset(splits["predict"]),
        batch_size=16,
        eval_batch_size=8,
        seed=seed,
    )


def _grain_dm(tmp_path, *, seed=0, on_device=False):
    """Each split as an array_record file (float32 bytes: the image, then the label), decoded
    by a Grain `Map`."""
    grain = pytest.importorskip("grain")
    writer_module = pytest.importorskip("array_record.python.array_record_module")

    class Decode(grain.transforms.Map):
        def map(self, record):
            row = np.frombuffer(record, np.float32)
            return {"image": row[:-1].reshape(2, 3, 3), "label": np.int64(row[-1])}

    tmp_path.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, split in _array_splits().items():
        files[name] = tmp_path / f"{name}.array_record"
        writer = writer_module.ArrayRecordWriter(str(files[name]), "group_size:1")
        for x, y in zip(split["image"], split["label"]):
            writer.write(np.append(x.ravel(), np.float32(y)).astype(np.float32).tobytes())
        writer.close()
    return GrainDataModule(
        **files, operations=[Decode()], batch_size=16, eval_batch_size=8, seed=seed
    )


@dataclasses.dataclass
class Case:
    build: Callable[..., DataModule]
    image_shape: tuple[int, ...]
    num_classes: int
    extra_keys: tuple[str, ...] = ()
    device: bool = True


def _mnist(cls, gz):
    def build(tmp_path, *, seed=0, on_device=False):
        write_mnist_files(tmp_path, folder=cls.folder, gz=gz, n_train=120, n_test=30)
        return cls(
            tmp_path,
            batch_size=16,
            eval_batch_size=12,
            val_fraction=0.25,
            seed=seed,
            download=False,
            on_device=on_device,
        )

    return build


def _cifar(pickled, augment=False):
    def build(tmp_path, *, seed=0, on_device=False):
        (write_cifar_python if pickled else write_cifar_binary)(tmp_path, n_per_batch=16)
        return CIFAR10(
            tmp_path,
            batch_size=16,
            eval_batch_size=12,
            val_fraction=0.2,
            seed=seed,
            augment=augment,
            download=False,
            on_device=on_device,
        )

    return build


CASES = {
    "digits": Case(
        lambda tmp_path, *, seed=0, on_device=False: Digits(
            batch_size=32, eval_batch_size=24, seed=seed, on_device=on_device
        ),
        (1, 8, 8),
        10,
    ),
    "array": Case(
        lambda tmp_path, *, seed=0, on_device=False: ArrayDataModule(
            **_array_splits(), batch_size=16, eval_batch_size=8, seed=seed, on_device=on_device
        ),
        (2, 3, 3),
        5,
    ),
    "mnist-gz": Case(_mnist(MNIST, gz=True), (1, 28, 28), 10),
    "fashion-mnist-raw": Case(_mnist(FashionMNIST, gz=False), (1, 28, 28), 10),
    "cifar10-bin": Case(_cifar(pickled=False, augment=True), (3, 32, 32), 10),
    "cifar10-py": Case(_cifar(pickled=True), (3, 32, 32), 10),
    "colour-mnist-digits": Case(
        lambda tmp_path, *, seed=0, on_device=False: ColourMNIST(
            Digits(batch_size=32, eval_batch_size=24), seed=seed, on_device=on_device
        ),
        (3, 8, 8),
        10,
        extra_keys=("colour",),
    ),
    "colour-mnist-mnist": Case(
        lambda tmp_path, *, seed=0, on_device=False: ColourMNIST(
            _mnist(MNIST, gz=True)(tmp_path), variance=0.05, seed=seed, on_device=on_device
        ),
        (3, 28, 28),
        10,
        extra_keys=("colour",),
    ),
    "torch": Case(_torch_dm, (2, 3, 3), 5, device=False),
    "grain": Case(_grain_dm, (2, 3, 3), 5, device=False),
}

PARAMS = [
    pytest.param(name, mode, id=f"{name}-{mode}")
    for name, case in CASES.items()
    for mode in (("host", "device") if case.device else ("host",))
]


def _make(name, mode, tmp_path, **kw):
    dm = CASES[name].build(tmp_path, on_device=(mode == "device"), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _host(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in batch.items()}


def _loader(dm, split):
    return getattr(dm, f"{split}_dataloader")()


def _equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def _split_size(dm, split):
    if isinstance(dm, GrainDataModule):
        return len(dm.sources[split])
    if isinstance(dm, TorchDataModule):
        return len(dm.splits[split])
    return batch_size_of(dm.splits[split])


def _reference_rows(dm, split):
    """Every example of `split`, decoded, straight from the stored arrays."""
    if isinstance(dm, GrainDataModule):
        records = []
        for record in dm.sources[split]:
            for op in dm.operations:
                record = op.map(record)
            records.append(record)
        return jax.tree.map(lambda *rows: np.stack(rows).astype(rows[0].dtype), *records)
    if isinstance(dm, TorchDataModule):
        from solstice.datamodules._torch import collate

        dataset = dm.splits[split]
        return collate([dataset[i] for i in range(len(dataset))], dm.keys)
    arrays = dict(dm.splits[split])
    return dm.transform(arrays) if dm.transform is not None else arrays


def _row_keys(batch, n=None):
    n = len(batch["label"]) if n is None else n
    return [(np.asarray(batch["image"][i]).tobytes(), int(batch["label"][i])) for i in range(n)]


@pytest.mark.parametrize("name,mode", PARAMS)
def test_batches_have_the_promised_shapes_dtypes_and_labels(tmp_path, name, mode):
    case = CASES[name]
    dm = _make(name, mode, tmp_path)
    keys = {"image", "label", *case.extra_keys}
    for split in ("train", *EVAL_SPLITS):
        loader = _loader(dm, split)
        assert loader is not None, split
        batches = [_host(b) for b in loader]
        assert len(batches) == len(loader) > 0
        size = dm.batch_size if split == "train" else dm.eval_batch_size
        for i, batch in enumerate(batches):
            # Loaders yield real rows only: no padding, no mask; only the last evaluation
            # batch may be shorter (the Trainer decides how to run it).
            assert set(batch) == keys
            rows = len(batch["label"])
            assert rows == size or (split != "train" and i == len(batches) - 1 and rows < size)
            assert batch["image"].shape == (rows, *case.image_shape)
            assert batch["image"].dtype == np.float32
            assert np.all(np.isfinite(batch["image"]))
            for key in ("label", *case.extra_keys):
                assert batch[key].shape == (rows,) and batch[key].dtype == np.int32
                assert batch[key].min() >= 0 and batch[key].max() < case.num_classes
        if mode == "device":
            first = next(iter(loader))
            assert all(isinstance(v, jax.Array) for v in first.values())


@pytest.mark.parametrize("name,mode", PARAMS)
def test_order_is_a_function_of_seed_and_epoch(tmp_path, name, mode):
    a, b = _make(name, mode, tmp_path / "a"), _make(name, mode, tmp_path / "b")
    for dm in (a, b):
        dm.set_epoch(3)
    for x, y in zip(a.train_dataloader(), b.train_dataloader(), strict=True):
        _equal(x, y)
    # another epoch is another order, of the same examples
    epoch3 = [_host(x) for x in a.train_dataloader()]
    a.set_epoch(4)
    epoch4 = [_host(x) for x in a.train_dataloader()]
    assert not np.array_equal(epoch3[0]["image"], epoch4[0]["image"])
    labels3 = np.sort(np.concatenate([x["label"] for x in epoch3]))
    labels4 = np.sort(np.concatenate([x["label"] for x in epoch4]))
    if len(labels3) == _split_size(a, "train"):  # no partial batch dropped
        np.testing.assert_array_equal(labels3, labels4)
    # another seed is another order
    c = _make(name, mode, tmp_path / "c", seed=1)
    c.set_epoch(3)
    assert not np.array_equal(
        np.asarray(next(iter(c.train_dataloader()))["image"]), epoch3[0]["image"]
    )


@pytest.mark.parametrize("name,mode", PARAMS)
def test_training_epoch_visits_distinct_examples(tmp_path, name, mode):
    dm = _make(name, mode, tmp_path)
    dm.set_epoch(1)
    rows = [r for b in dm.train_dataloader() for r in _row_keys(_host(b))]
    reference = collections.Counter(_row_keys(_reference_rows(dm, "train")))
    seen = collections.Counter(rows)
    assert len(rows) == len(dm.train_dataloader()) * dm.batch_size
    assert all(seen[r] <= reference[r] for r in seen)  # a subset, without repeats


@pytest.mark.parametrize("name,mode", PARAMS)
def test_iter_from_equals_skipping(tmp_path, name, mode):
    dm = _make(name, mode, tmp_path)
    dm.set_epoch(2)
    for split in ("train", "val"):
        loader = _loader(dm, split)
        full = [_host(b) for b in loader]
        for k in (0, 2, len(full) - 1, len(full)):
            resumed = [_host(b) for b in _loader(dm, split).iter_from(k)]
            assert len(resumed) == len(full) - k
            for x, y in zip(resumed, full[k:]):
                _equal(x, y)
    with pytest.raises(ValueError, match="start"):
        dm.train_dataloader().iter_from(len(full) + 10**6)


@pytest.mark.parametrize("name,mode", PARAMS)
def test_evaluation_sees_every_example_exactly_once(tmp_path, name, mode):
    dm = _make(name, mode, tmp_path)
    for split in EVAL_SPLITS:
        n = _split_size(dm, split)
        batches = [_host(b) for b in _loader(dm, split)]
        sizes = [len(b["label"]) for b in batches]
        assert sum(sizes) == n  # nothing padded
        assert all(size == dm.eval_batch_size for size in sizes[:-1])
        assert 0 < sizes[-1] <= dm.eval_batch_size
        seen = [r for b in batches for r in _row_keys(b)]
        reference = _reference_rows(dm, split)
        assert collections.Counter(seen) == collections.Counter(_row_keys(reference))
        # evaluation order is the stored order, whatever the epoch
        dm.set_epoch(5)
        again = [_host(b) for b in _loader(dm, split)]
        dm.set_epoch(0)
        for x, y in zip(batches, again, strict=True):
            _equal(x, y)


@pytest.mark.parametrize("name", [n for n in CASES])
def test_process_shares_concatenate_to_the_global_batch(tmp_path, name, monkeypatch):
    dm = _make(name, "host", tmp_path)
    dm.set_epoch(1)
    splits = ("train", "val", "test")
    global_batches = {s: [_host(b) for b in _loader(dm, s)] for s in splits}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    shares = {}
    for p in range(2):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        shares[p] = {s: [_host(b) for b in _loader(dm, s)] for s in splits}
    for s in splits:
        assert len(shares[0][s]) == len(shares[1][s]) == len(global_batches[s])
        half = (dm.batch_size if s == "train" else dm.eval_batch_size) // 2
        for g, a, b in zip(global_batches[s], shares[0][s], shares[1][s]):
            # process 0 owns the first half of every global batch, process 1 the rest (of a
            # short last one: what is left, maybe nothing)
            assert batch_size_of(a) == min(half, batch_size_of(g))
            assert batch_size_of(b) == batch_size_of(g) - batch_size_of(a)
            _equal({k: np.concatenate([a[k], b[k]]) for k in g}, g)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.device])
def test_device_mode_gives_the_host_batches(tmp_path, name):
    host = _make(name, "host", tmp_path / "h")
    device = _make(name, "device", tmp_path / "d")
    for epoch in (0, 1):
        host.set_epoch(epoch)
        device.set_epoch(epoch)
        for split in ("train", *EVAL_SPLITS):
            for x, y in zip(_loader(host, split), _loader(device, split), strict=True):
                _equal(x, y)
                for leaf in y.values():
                    if leaf.shape[0] % jax.device_count():
                        # a short last batch that does not split: every device holds it all
                        assert leaf.sharding.is_fully_replicated
                        continue
                    assert leaf.sharding.spec == jax.sharding.PartitionSpec("batch")
                    # each device holds its contiguous share of the global batch
                    shards = sorted(leaf.addressable_shards, key=lambda s: s.index[0].start)
                    assert len(shards) == jax.device_count()
                    np.testing.assert_array_equal(
                        np.concatenate([np.asarray(s.data) for s in shards]), np.asarray(leaf)
                    )
