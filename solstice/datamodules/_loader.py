"""`BatchLoader`: batches over in-memory host arrays, in an order fixed by (seed, epoch)."""

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from ._batching import batch_size_of, pad_batch
from ._order import EpochOrder, OrderedLoader
from ._order import epoch_permutation as epoch_permutation

PyTree = Any


class BatchLoader(OrderedLoader):
    """Iterates over a pytree of host arrays in batches; resumable and multi-process aware.

    **Arguments:**

    - `arrays`: pytree of arrays sharing a leading axis (the examples).
    - `batch_size`: the *global* batch size (over all processes).
    - `shuffle`: draw a fresh order each epoch from `(seed, epoch)`.
    - `seed`, `epoch`: fix the order.
    - `drop_last`: drop the final partial batch (training). Otherwise it is padded to
      `batch_size` and a boolean `"mask"` is added to every batch (evaluation), which
      requires dict batches.
    - `process_index`, `process_count`: with several processes, each yields only its
      contiguous share of every global batch (and reads only those rows); the global
      batches are the same as with one.
    - `transform`: optional function applied to each host batch (numpy in, numpy out), after
      padding, e.g. decoding `uint8` pixels to `float32`.

    **Example:**

    ```python
    loader = BatchLoader({"x": x, "y": y}, batch_size=32, shuffle=True, seed=0, epoch=3)
    for batch in loader.iter_from(5):   # resume at the 6th batch of epoch 3
        ...
    ```
    """

    def __init__(
        self,
        arrays: PyTree,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        process_index: int = 0,
        process_count: int = 1,
        transform: Callable[[PyTree], PyTree] | None = None,
    ):
        self.arrays = arrays
        self.num_examples = batch_size_of(arrays)
        self.order = EpochOrder(
            self.num_examples,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            drop_last=drop_last,
            process_index=process_index,
            process_count=process_count,
        )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.drop_last = drop_last
        self.process_index = process_index
        self.process_count = process_count
        self.transform = transform

    def _batches(self, start: int) -> Iterator[PyTree]:
        # The hot loop of host-mode training, kept free of per-batch call chains: the epoch's
        # order is computed once and sliced, and each leaf is gathered by one bound method
        # (`_take_rows`). Process `p` of `P` reads positions `[b * batch_size + p * local,
        # ... + local)` of the order, as `EpochOrder.local_indices(b)` does.
        order = self.order
        perm = order.indices()
        size, local = order.batch_size, order.local_batch_size
        first = start * size + order.process_index * local
        end = len(self) * size
        pad, transform = not self.drop_last, self.transform
        if type(self.arrays) is dict and jax.tree_util.all_leaves(self.arrays.values()):
            # The common case, a flat dict: no pytree overhead, and the keys keep their order.
            takes = [(k, _take_rows(a)) for k, a in self.arrays.items()]
            for lo in range(first, end, size):
                idx = perm[lo : lo + local]
                batch = {k: take(idx) for k, take in takes}
                if pad:
                    batch = pad_batch(batch, local)
                if transform is not None:
                    batch = transform(batch)
                yield batch
            return
        leaves, treedef = jax.tree.flatten(self.arrays)
        takes = [_take_rows(a) for a in leaves]
        for lo in range(first, end, size):
            idx = perm[lo : lo + local]
            batch = treedef.unflatten([take(idx) for take in takes])
            if pad:
                batch = pad_batch(batch, local)
            if transform is not None:
                batch = transform(batch)
            yield batch


def _take_rows(a: Any) -> Callable[[np.ndarray], Any]:
    """`take(idx)`: the rows `idx` of one leaf, the values of `np.take(a, idx, axis=0)`.

    Bound once per epoch, so no batch pays `np.take`'s dispatch. `ndarray.take` is the
    fastest gather of contiguous rows, but copies a non-contiguous array whole on every call
    (e.g. a view with a row stride); indexing is used for those and for 1-D arrays.
    """
    if type(a) is np.ndarray:
        if a.ndim == 1 or not a.flags.c_contiguous:
            return a.__getitem__
        return functools.partial(a.take, axis=0)
    return functools.partial(np.take, a, axis=0)
