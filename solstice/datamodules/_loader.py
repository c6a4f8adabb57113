"""`BatchLoader`: batches over in-memory host arrays, in an order fixed by (seed, epoch)."""

import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree

from ._batching import batch_size_of, stack_length
from ._order import OrderedLoader
from ._order import epoch_permutation as epoch_permutation


class BatchLoader(OrderedLoader):
    """Iterates over a pytree of host arrays in batches; resumable and multi-process aware.

    **Arguments:**

    - `arrays`: pytree of arrays sharing a leading axis (the examples).
    - `batch_size`: the *global* batch size (over all processes).
    - `shuffle`: draw a fresh order each epoch from `(seed, epoch)`.
    - `seed`, `epoch`: fix the order.
    - `drop_last`: drop the final partial batch (training). Otherwise it comes as a shorter
      last batch (evaluation; with several processes, a process's share of it may be
      shorter still, or empty). Batches are never padded: the Trainer runs the short batch
      so that every example counts exactly once.
    - `process_index`, `process_count`: with several processes, each yields only its
      contiguous share of every global batch (and reads only those rows); the global
      batches are the same as with one.
    - `transform`: optional function applied to each host batch (numpy in, numpy out), e.g.
      decoding `uint8` pixels to `float32`.
    - `traceable_transform`: the transform also works on jax arrays inside `jit` (as
      `ArrayDataModule`'s transforms must), so a consumer may run it on the device instead
      (see `split_transform`).

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
        traceable_transform: bool = False,
    ):
        self.arrays = arrays
        self._set_order(
            batch_size_of(arrays),
            batch_size,
            drop_last=drop_last,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            process_index=process_index,
            process_count=process_count,
        )
        self.transform = transform
        self.traceable_transform = traceable_transform

    def split_transform(self) -> tuple["BatchLoader", Callable[[PyTree], PyTree]] | None:
        """`(loader, transform)`: this loader without its transform (same order, batches as
        gathered), and the transform, for a consumer that applies it on the device, inside
        its compiled step (the Trainer does: `uint8` pixels then travel to the device 4x
        smaller than `float32` ones and are decoded there).

        `None` unless the transform is declared `traceable_transform`. Such a transform must
        trace on this loader's batches: if it does not, that error propagates (with a note)
        rather than silently decoding on the host.

        **Example:**

        ```python
        raw, decode = loader.split_transform()
        step = jax.jit(lambda batch: model(decode(batch)["image"]))
        ```
        """
        if self.transform is None or not self.traceable_transform or len(self) == 0:
            return None
        raw = copy.copy(self)
        raw.transform = None
        try:
            jax.eval_shape(self.transform, next(raw.iter_from(0)))
        except Exception as error:
            add_note = getattr(error, "add_note", None)
            if add_note is not None:
                add_note(
                    f"(Solstice) the loader's `transform` {self.transform!r} is declared "
                    "traceable (it runs inside the compiled step on jax arrays) but failed to "
                    "trace: write it with operations numpy and jax both support, or pass "
                    "`traceable_transform=False`."
                )
            raise
        return raw, self.transform

    @property
    def stackable(self) -> bool:
        """Whether `iter_stacked` serves this loader: training batches (all full), no host
        transform, numpy leaves."""
        return (
            self.drop_last
            and self.transform is None
            and all(isinstance(a, np.ndarray) for a in jax.tree.leaves(self.arrays))
        )

    def iter_stacked(
        self,
        start: int,
        stop: int | None = None,
        *,
        max_batches: int,
        max_bytes: int,
        empty: Callable[[tuple[int, ...], Any], np.ndarray] = np.empty,
    ) -> Iterator[tuple[int, PyTree]] | None:
        """Batches `start` to `stop` (default: the epoch's end) in stacks, gathered straight
        into arrays of the caller's: `(n, stacked)` items, each leaf of `stacked` shaped
        `(size, local_batch, ...)` and holding batches `n` in a row (a short last stack
        repeats its last batch). `size` is as many batches as fit in `max_bytes`, at least
        1 and at most `max_batches`. Each stack's arrays come fresh from `empty(shape, dtype)`
        and hold the same values as the batches `iter_from(start)` yields.

        One gather per leaf and stack, written in place: the Trainer uploads small host
        batches a stack at a time (see `Feeder(chunked=True)`), and this saves a copy per
        batch. `None` unless the loader is `stackable`.

        **Example:**

        ```python
        for n, stacked in loader.iter_stacked(0, max_batches=16, max_bytes=4 << 20):
            first = jax.tree.map(lambda x: x[0], stacked)   # == next(iter(loader))
        ```
        """
        if not self.stackable:
            return None
        self.order.check_start(start)
        return self._stacks(start, stop, max_batches=max_batches, max_bytes=max_bytes, empty=empty)

    def _stacks(
        self,
        start: int,
        stop: int | None,
        *,
        max_batches: int,
        max_bytes: int,
        empty: Callable[[tuple[int, ...], Any], np.ndarray],
    ) -> Iterator[tuple[int, PyTree]]:
        stop = len(self) if stop is None else min(stop, len(self))
        order = self.order
        local = order.local_batch_size
        leaves, treedef = jax.tree.flatten(self.arrays)
        row_bytes = sum(a.dtype.itemsize * int(np.prod(a.shape[1:])) for a in leaves)
        size = stack_length(row_bytes * local, max_batches=max_batches, max_bytes=max_bytes)
        # Row `b` is global batch `b`; this process reads its own columns of it.
        by_batch = order.indices()[: len(self) * order.batch_size].reshape(len(self), -1)
        mine = by_batch[:, order.process_index * local : (order.process_index + 1) * local]
        for first in range(start, stop, size):
            n = min(size, stop - first)
            idx = mine[first : first + n].reshape(-1)
            stacked = []
            for a in leaves:
                out = empty((size, local, *a.shape[1:]), a.dtype)
                rows = out.reshape(size * local, *a.shape[1:])[: n * local]
                if a.flags.c_contiguous:
                    # Every index is in range; "clip" lets `take` write into `out` directly
                    # (with the default "raise" it gathers into a buffer, then copies).
                    a.take(idx, axis=0, out=rows, mode="clip")
                else:  # `take` would copy a strided view whole first
                    rows[...] = a[idx]
                out[n:] = out[n - 1]
                stacked.append(out)
            yield n, jax.tree.unflatten(treedef, stacked)

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
        transform = self.transform
        if type(self.arrays) is dict and jax.tree_util.all_leaves(self.arrays.values()):
            # The common case, a flat dict: no pytree overhead, and the keys keep their order.
            named = [(k, _take_rows(a)) for k, a in self.arrays.items()]
            for lo in range(first, end, size):
                idx = perm[lo : lo + local]
                batch = {k: take(idx) for k, take in named}
                if transform is not None:
                    batch = transform(batch)
                yield batch
            return
        leaves, treedef = jax.tree.flatten(self.arrays)
        takes = [_take_rows(a) for a in leaves]
        for lo in range(first, end, size):
            idx = perm[lo : lo + local]
            batch = jax.tree.unflatten(treedef, [take(idx) for take in takes])
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
