"""`BatchLoader`: batches over in-memory host arrays, in an order fixed by (seed, epoch)."""

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
        local = self.order.local_batch_size
        for b in range(start, len(self)):
            idx = self.order.local_indices(b)
            if type(self.arrays) is dict:  # the common case, without pytree overhead
                batch = {k: np.take(a, idx, axis=0) for k, a in self.arrays.items()}
            else:
                batch = jax.tree.map(lambda a, idx=idx: np.take(a, idx, axis=0), self.arrays)
            if not self.drop_last:
                batch = pad_batch(batch, local)
            if self.transform is not None:
                batch = self.transform(batch)
            yield batch
