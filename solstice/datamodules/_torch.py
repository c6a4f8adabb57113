"""`TorchDataModule`: torch map-style datasets (or DataLoaders) as numpy batches.

torch is optional: it is imported only when a `TorchDataModule` is built.
"""

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree

from .._checks import check_int
from ._batching import narrow_64bit
from ._datamodule import DataModule
from ._loader_api import Loader
from ._order import OrderedLoader


def _import_torch():
    try:
        import torch
        import torch.utils.data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "`TorchDataModule` needs torch. Install a CPU build with "
            "`pip install torch==2.13.0` (an unpinned `torch` pulls several GB of CUDA)."
        ) from e
    return torch


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == object:
        raise TypeError(
            f"Cannot turn a sample entry of type {type(x.flat[0]).__name__ if x.size else '?'} "
            "into an array; samples must hold tensors, arrays, numbers or PIL images."
        )
    return x


def name_entries(item: Any, keys: Sequence[str] | None) -> Any:
    """Name the entries of a sample (or collated batch): tuples/lists take `keys` in order,
    dicts keep theirs, a single tensor becomes `{keys[0]: item}`. With `keys=None` the
    sample keeps its own structure (a tuple stays a tuple; lists become tuples)."""
    if keys is None:
        return tuple(item) if isinstance(item, list) else item
    if isinstance(item, Mapping):
        return dict(item)
    if isinstance(item, tuple | list):
        if len(item) != len(keys):
            raise ValueError(
                f"A sample is a {type(item).__name__} of {len(item)} entries but `keys` names "
                f"{len(keys)}: {tuple(keys)}. Pass `keys=` with one name per entry (e.g. "
                "`keys=('image', 'label', 'weight')`)."
            )
        return dict(zip(keys, item))
    return {keys[0]: item}


def collate(samples: list[Any], keys: Sequence[str] | None) -> PyTree:
    """Stack samples into one batch of numpy arrays (a dict, or the samples' own structure
    with `keys=None`)."""
    structured = [jax.tree.map(_to_numpy, name_entries(s, keys)) for s in samples]
    return jax.tree.map(lambda *xs: narrow_64bit(np.stack(xs)), *structured)


def convert_batch(batch: Any, keys: Sequence[str] | None) -> PyTree:
    """Turn one already-collated DataLoader batch into numpy arrays (see `collate`)."""
    return jax.tree.map(lambda x: narrow_64bit(_to_numpy(x)), name_entries(batch, keys))


class DatasetLoader(OrderedLoader):
    """Batches of a torch map-style `Dataset`, in an order fixed by `(seed, epoch)`.

    Each process fetches only its share of every global batch (`dataset[i]` per example,
    on the calling thread); the last evaluation batch may be shorter, like `BatchLoader`'s.

    **Arguments:** as `BatchLoader`, with `dataset` for the arrays and `keys` naming the
    entries of tuple samples (`None`: batches keep the samples' structure).

    **Example:**

    ```python
    loader = DatasetLoader(TensorDataset(x, y), 32, shuffle=True, seed=0, epoch=1)
    batch = next(loader.iter_from(3))    # {"image": ..., "label": ...}
    ```
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        process_index: int = 0,
        process_count: int = 1,
        keys: Sequence[str] | None = ("image", "label"),
    ):
        self.dataset = dataset
        self._set_order(
            len(dataset),
            batch_size,
            drop_last=drop_last,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            process_index=process_index,
            process_count=process_count,
        )
        self.keys = None if keys is None else tuple(keys)

    def _empty(self) -> PyTree:
        template = collate([self.dataset[0]], self.keys)
        return jax.tree.map(lambda x: x[:0], template)

    def _batches(self, start: int) -> Iterator[PyTree]:
        for b in range(start, len(self)):
            idx = self.order.local_indices(b)
            if len(idx):
                batch = collate([self.dataset[int(i)] for i in idx], self.keys)
            else:
                batch = self._empty()  # this process's share of a short last batch
            yield batch


class DataLoaderAdapter(Loader):
    """Wraps a torch `DataLoader`: its batches, as dicts of numpy arrays.

    The DataLoader keeps its own order, sampler and workers, so exact resume and
    multi-process sharding are its business (use a `DistributedSampler`; its `set_epoch` is
    called for you). `iter_from(start)` skips `start` batches. Batches pass as they come (a
    short last batch included: the Trainer runs it so that every sample counts once).

    **Example:**

    ```python
    adapter = DataLoaderAdapter(DataLoader(dataset, batch_size=64), keys=("image", "label"))
    ```
    """

    def __init__(self, loader: Any, *, keys: Sequence[str] | None = ("image", "label")):
        self.loader = loader
        self.keys = None if keys is None else tuple(keys)
        self.batch_size: int | None = getattr(loader, "batch_size", None)

    def __len__(self) -> int:
        return len(self.loader)

    def num_batches(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[PyTree]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[PyTree]:
        """Yield the DataLoader's batches from batch index `start` on."""
        check_int("start", start)
        return self._batches(start)

    def _batches(self, start: int) -> Iterator[PyTree]:
        for batch in itertools.islice(self.loader, start, None):
            yield convert_batch(batch, self.keys)


class TorchDataModule(DataModule):
    """Serves torch data: a map-style `Dataset` (any torchvision dataset, for instance) or a
    `DataLoader` per split, as dict batches of numpy arrays.

    For `Dataset`s Solstice does the batching: the order is fixed by `(seed, epoch)` (the
    same permutation as the built-ins), `iter_from(start)` resumes exactly, each process
    fetches only its share of every global batch, and the last evaluation batch keeps only
    real samples (the Trainer counts every sample once). Samples that are tuples `(x, y)`
    become `{"image": x, "label": y}` (see `keys`; `keys=None` keeps them tuples); dict
    samples keep their keys. Tensors become
    numpy arrays, and 64-bit dtypes become 32-bit (as JAX would store them) unless x64 is
    enabled. `DataLoader`s are iterated as they are (their own order, workers and
    collation), converted the same way; use them for heavy per-sample transforms that
    need worker processes.

    torch is optional and imported only here.

    **Arguments:**

    - `train`, `val`, `test`, `predict`: a `torch.utils.data.Dataset` (map-style) or
      `DataLoader` per split, or `None`.
    - `batch_size`: global training batch size (required for `Dataset` splits).
    - `eval_batch_size`: global batch size for val/test/predict (default: `batch_size`).
    - `shuffle`: shuffle training batches each epoch (for `Dataset`s).
    - `seed`: fixes the order.
    - `keys`: names of the entries of tuple samples, in order; `None` keeps batches in the
      samples' own structure (tuples, dicts, nested).

    **Example:**

    ```python
    from torch.utils.data import TensorDataset
    dm = TorchDataModule(train=TensorDataset(x, y), val=TensorDataset(xv, yv), batch_size=64)
    ```
    """

    def __init__(
        self,
        train: Any = None,
        val: Any = None,
        test: Any = None,
        predict: Any = None,
        *,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        keys: Sequence[str] | None = ("image", "label"),
    ):
        torch = _import_torch()
        data = torch.utils.data
        self.splits = {"train": train, "val": val, "test": test, "predict": predict}
        for name, split in self.splits.items():
            if split is None or isinstance(split, data.DataLoader):
                continue
            if isinstance(split, data.IterableDataset):
                raise TypeError(
                    f"The {name!r} split is an `IterableDataset`, which has no random access "
                    "for a resumable order; wrap it in a `DataLoader` and pass that instead."
                )
            if not (hasattr(split, "__getitem__") and hasattr(split, "__len__")):
                raise TypeError(
                    f"The {name!r} split must be a map-style torch `Dataset` (with "
                    f"`__getitem__` and `__len__`) or a `DataLoader`, got "
                    f"{type(split).__name__}."
                )
            if batch_size is None:
                raise ValueError(f"The {name!r} split is a `Dataset`, so `batch_size` is required.")
        check_int("batch_size", batch_size, minimum=1, allow_none=True)
        check_int("eval_batch_size", eval_batch_size, minimum=1, allow_none=True)
        if keys is not None and (
            isinstance(keys, str) or not keys or not all(isinstance(k, str) for k in keys)
        ):
            raise TypeError(f"`keys` must be a non-empty sequence of names, or None, got {keys!r}.")
        self._dataloader_type = data.DataLoader
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.keys = None if keys is None else tuple(keys)

    def _loader(self, name: str, *, train: bool) -> Iterable[PyTree] | None:
        split = self.splits[name]
        if split is None:
            return None
        if isinstance(split, self._dataloader_type):
            set_epoch = getattr(getattr(split, "sampler", None), "set_epoch", None)
            if train and set_epoch is not None:  # a DistributedSampler's
                set_epoch(self.epoch)
            return DataLoaderAdapter(split, keys=self.keys)
        size = self.batch_size if train else self.eval_batch_size
        if size is None:  # pragma: no cover - __init__ requires it for Dataset splits
            raise ValueError(f"The {name!r} split is a `Dataset`; pass `batch_size`.")
        if len(split) == 0 or (train and len(split) < size):
            raise ValueError(
                f"The {name!r} split has {len(split)} examples, fewer than one batch of "
                f"{size}; provide more data or a smaller batch size."
            )
        return DatasetLoader(
            split,
            size,
            shuffle=self.shuffle and train,
            seed=self.seed,
            epoch=self.epoch,
            drop_last=train,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            keys=self.keys,
        )

    def train_dataloader(self) -> Iterable[PyTree]:
        loader = self._loader("train", train=True)
        if loader is None:
            raise ValueError("`TorchDataModule` has no `train` split; pass `train=` to fit.")
        return loader

    def val_dataloader(self) -> Iterable[PyTree] | None:
        return self._loader("val", train=False)

    def test_dataloader(self) -> Iterable[PyTree] | None:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> Iterable[PyTree] | None:
        return self._loader("predict", train=False)
